import re

import pytest
import torch
from torch import nn

import apical
from apical import DendriteConfig, PerforationError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc1 = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(8, 3)
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.bil = nn.Bilinear(8, 8, 20)  # unsupported, and most of the layer parameters (not in forward)

    def forward(self, img, seq):
        h = self.bn(self.conv(img)).mean((2, 3))  # [N, 4]
        s, _ = self.attn(seq, seq, seq)
        s = self.drop(torch.relu(self.fc1(s)))  # Linear on (batch, time, features)
        s, _ = self.rnn(s)
        return self.head(s.mean(1)) + h[:, :3]


def test_default_wraps_linear_and_conv_keeping_parameters():
    net = Net()
    refs = {n: p for n, p in net.named_parameters()}
    attn = net.attn
    with pytest.warns(UserWarning, match="unsupported type Bilinear"):  # it holds most parameters
        apical.perforate(net, DendriteConfig())
    names = [n for n, _ in apical.dendritic_layers(net)]
    assert names == ["conv", "attn.out_proj", "attn.q_proj", "attn.k_proj", "attn.v_proj", "fc1", "head",
                     "rnn.cell_l0"]
    assert net.fc1.base.weight is refs["fc1.weight"]
    assert net.conv.base.bias is refs["conv.bias"]
    assert net.attn is attn and isinstance(attn, nn.MultiheadAttention)  # the same object, dendrites inside
    assert attn.in_proj_weight is refs["attn.in_proj_weight"]
    assert attn.out_proj.base.weight is refs["attn.out_proj.weight"]
    out = net(torch.randn(2, 1, 6, 6), torch.randn(2, 5, 8))
    assert out.shape == (2, 3)


def test_include_exclude_by_type_name_and_regex():
    net = Net()
    apical.perforate(net, DendriteConfig(include=[nn.Linear], exclude=["head"]))
    assert [n for n, _ in apical.dendritic_layers(net)] == ["fc1"]
    net = Net()
    apical.perforate(net, DendriteConfig(include=["fc.*", "conv"]))
    assert [n for n, _ in apical.dendritic_layers(net)] == ["conv", "fc1"]


KINDS = "supported kinds are {} (apical.register_layer adds one)"
NAMES = "names look like ['conv', 'bn', 'attn', 'attn.out_proj', 'fc1']"


@pytest.mark.parametrize(
    "include, message",
    [
        (["nothere"], f"include: 'nothere' matches no module of the model; {NAMES}"),
        (["bil"], f"include: cannot wrap 'bil' (Bilinear): unsupported type Bilinear; {KINDS}"),
        ([nn.Bilinear], f"include: apical cannot wrap Bilinear; {KINDS}"),
        (["attn.out_proj"], "include: cannot wrap 'attn.out_proj' (NonDynamicallyQuantizableLinear): it sits "
                            "inside MultiheadAttention, which reads its weights directly (wrap that module instead); "
                            + KINDS),
        (["dr.p"], "include: 'dr.p' matches only modules apical cannot wrap: [('drop', 'Dropout')]"),
        (["fc1", "fc1"], None),  # a repeated name is wrapped once
    ],
)
def test_bad_selections_are_refused_without_changes(include, message):
    from apical.dendrites.registry import layer_registry

    net = Net()
    if message is None:
        with pytest.warns(UserWarning, match="Most layer parameters sit in modules left out"):
            apical.perforate(net, DendriteConfig(include=include))
        assert [n for n, _ in apical.dendritic_layers(net)] == ["fc1"]
        return
    message = message.replace("{}", str(layer_registry.kinds()))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(PerforationError, match=f"^{re.escape(message)}$"):
        apical.perforate(net, DendriteConfig(include=include))
    assert not apical.dendritic_layers(net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_model_with_nothing_to_wrap():
    from apical.dendrites.registry import layer_registry

    message = ("nothing to wrap: the model has no module apical supports (outside excluded names), so dendrites have "
               f"nowhere to go; supported kinds are {layer_registry.kinds()} (apical.register_layer adds one). "
               "apical.coverage(model) lists every module")
    with pytest.raises(PerforationError, match=f"^{re.escape(message)}$"):
        apical.perforate(nn.Sequential(nn.ReLU(), nn.Bilinear(3, 3, 3)))


def test_perforate_refuses_a_non_module_and_a_bare_layer_by_name():
    with pytest.raises(TypeError, match="^perforate expects an nn.Module, got dict$"):
        apical.perforate({"fc": nn.Linear(3, 4)})
    layer = nn.Linear(3, 4)
    with pytest.raises(PerforationError, match=re.escape(
            "the model itself is a single layer: put it inside a container (e.g. nn.Sequential(layer)) so that "
            "it can be replaced in place") + "$"):
        apical.perforate(layer)
    assert type(layer) is nn.Linear and not list(layer.children())  # left as it was


def test_perforating_twice_is_refused_and_unwrap_undoes():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    w = net[0].weight
    apical.perforate(net)
    with pytest.raises(PerforationError, match=r"^the model is already perforated; call apical.unwrap\(model\) first$"):
        apical.perforate(net)
    apical.unwrap(net)
    assert type(net[0]) is nn.Linear and net[0].weight is w
    apical.perforate(net)
    net[2].install_random(1.0)
    with pytest.raises(PerforationError, match="hold dendrites"):
        apical.unwrap(net)


def test_counts_and_structure_replay():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    apical.perforate(net)
    plain = apical.parameter_count(net)
    assert plain == 3 * 4 + 4 + 4 * 2 + 2
    for _, layer in apical.dendritic_layers(net):
        layer.install_random(1.0)
    # a set adds one copy of each layer (weights + bias) plus v (D*O) and a 1x1 cascade per neuron
    assert apical.parameter_count(net) == plain + (plain + 4 + 2) + (4 + 2)
    assert apical.dendrite_count(net) == 1
    record = apical.structure(net)
    fresh = apical.perforate(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    apical.apply_structure(fresh, record)
    fresh.load_state_dict(net.state_dict())
    x = torch.randn(5, 3)
    assert torch.equal(fresh(x), net(x))


def test_dendrite_count_is_the_largest_count_and_zero_without_dendritic_layers():
    assert apical.dendrite_count(nn.Sequential(nn.Linear(3, 4))) == 0  # nothing perforated
    net = apical.perforate(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    assert apical.dendrite_count(net) == 0
    net[2].install_random(1.0)
    net[2].install_random(1.0)
    net[0].install_random(1.0)
    assert apical.dendrite_count(net) == 2


def test_apply_structure_refuses_records_that_do_not_fit_by_name():
    def make():
        return apical.perforate(nn.Sequential(*[nn.Linear(3, 3) for _ in range(7)]))

    net = make()
    names = [n for n, _ in apical.dendritic_layers(net)]
    assert names == [str(i) for i in range(7)]
    full = {n: {"dendrites": 1} for n in names}  # "candidates" may be left out: none
    cases = [
        ({**full, "x": {"dendrites": 1}}, "['x'] recorded but not in the model, [] in the model but not recorded"),
        ({n: full[n] for n in names[1:]}, "[] recorded but not in the model, ['0'] in the model but not recorded"),
        ({f"y{i}": {"dendrites": 1} for i in range(7)},  # both sides, five names each at most
         "['y0', 'y1', 'y2', 'y3', 'y4'] recorded but not in the model, "
         "['0', '1', '2', '3', '4'] in the model but not recorded"),
    ]
    for record, message in cases:
        with pytest.raises(PerforationError, match=f"^structure does not fit the model: layers {re.escape(message)}$"):
            apical.apply_structure(net, record)
    assert apical.dendrite_count(net) == 0  # nothing changed
    for bad in ({"dendrites": -1, "candidates": 0}, {"dendrites": 1, "candidates": -2}):
        with pytest.raises(PerforationError, match=r"^structure: negative count for layer '0'$"):
            apical.apply_structure(net, {**full, "0": bad})
    apical.apply_structure(net, full)
    assert [(layer.num_dendrites, layer.num_candidates) for _, layer in apical.dendritic_layers(net)] == [(1, 0)] * 7


def _dendritic_linear(layer, h):
    """z = W h + b + sum_k v_k * sigmoid(D_k h + b_k) (one cascade-free set), by hand."""
    z = h @ layer.base.weight.T + layer.base.bias
    for k in range(layer.num_dendrites):
        z = z + layer.dendrite_out[k] * torch.sigmoid(h @ layer.dendrite_weight[k].T + layer.dendrite_bias[k])
    return z


def test_batchnorm_dropout_train_and_eval_modes():
    """Train and eval semantics of a perforated net with BatchNorm and Dropout, against a hand-built forward:
    train uses batch statistics, updates the running ones and drops units; eval uses the running statistics,
    changes nothing and drops nothing."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 2))
    apical.perforate(net)
    for _, layer in apical.dendritic_layers(net):
        layer.install_random(1.0)
        with torch.no_grad():
            layer.dendrite_out.normal_()
    bn = net[1]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    x = torch.randn(10, 4) * 2 + 1

    def reference(train, mask=None):
        with torch.no_grad():
            z = _dendritic_linear(net[0], x)
            if train:
                mean, var = z.mean(0), z.var(0, unbiased=False)
            else:
                mean, var = bn.running_mean, bn.running_var
            h = torch.relu((z - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias)
            if mask is not None:
                h = h * mask / 0.5
            return _dendritic_linear(net[4], h), z

    net.train()
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    torch.manual_seed(1)
    out = net(x)
    torch.manual_seed(1)  # the same draw as the Dropout's: its mask, taken by hand
    mask = (torch.nn.functional.dropout(torch.ones(10, 6), 0.5, training=True) > 0).float()
    assert 0 < mask.sum() < mask.numel()  # units are dropped, not all
    want, z = reference(True, mask)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_mean, 0.9 * rm + 0.1 * z.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, 0.9 * rv + 0.1 * z.var(0, unbiased=True), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert net[0].dendrite_out.grad is not None and net[0].dendrite_out.grad.abs().sum() > 0

    net.eval()
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    first = net(x)
    want, _ = reference(False)
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(net(x), first)  # no dropout in eval
    assert torch.equal(bn.running_mean, rm) and torch.equal(bn.running_var, rv)  # no update in eval


def test_unwrap_refusal_names_at_most_five_layers_and_the_way_out():
    net = nn.Sequential(*[nn.Linear(2, 2) for _ in range(7)])
    apical.perforate(net)
    for i in range(7):
        net[i].install_random(1.0)
    names = ", ".join(repr(str(i)) for i in range(5))
    with pytest.raises(PerforationError) as err:
        apical.unwrap(net)
    assert str(err.value) == (f"layers [{names}] hold dendrites; apical.export(model) keeps them in a plain "
                              "module, or pass force=True to drop them")
    assert all(isinstance(m, apical.DendriticLinear) for m in net)  # nothing changed
    apical.unwrap(net, force=True)
    assert all(type(m) is nn.Linear for m in net)


def test_an_exclusion_that_cannot_take_effect_is_an_error():
    def build():
        return nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 2))

    for name in ("0.q_proj", "0.v_proj", "0.out_proj"):  # inside the attention, which is wrapped whole
        with pytest.raises(PerforationError, match=rf"exclude: '{re.escape(name)}' sits inside '0' "
                           r"\(MultiheadAttention\).*exclude '0'"):
            apical.perforate(build(), DendriteConfig(exclude=[name]))
    with pytest.raises(PerforationError, match=r"^exclude: 'fc9' matches no module of the model; names look like "
                       r"\['0', '0.out_proj', '1'\]$"):
        apical.perforate(build(), DendriteConfig(exclude=["fc9"]))
    net = build()
    apical.perforate(net, DendriteConfig(exclude=["0"]))  # the whole attention: honoured
    assert [n for n, _ in apical.dendritic_layers(net)] == ["1"]
    net = build()
    apical.perforate(net, DendriteConfig(exclude=["0", "0.out_proj"]))  # inside an excluded root: fine
    assert [n for n, _ in apical.dendritic_layers(net)] == ["1"]


LAZY = ("'0' (LazyLinear) is a lazy layer that is not initialised yet: run one forward pass through the model "
        "first (so that it knows its input size), then perforate")


@pytest.mark.parametrize("include", [None, ["0"], [".*"]], ids=["all", "by-name", "by-pattern"])
def test_a_lazy_layer_is_refused_by_name_and_type_however_it_is_selected(include):
    net = nn.Sequential(nn.LazyLinear(3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(PerforationError, match=f"^{re.escape(LAZY)}$"):
        apical.perforate(net, apical.DendriteConfig(include=include))
    assert type(net[0]) is nn.LazyLinear and type(net[2]) is nn.Linear  # nothing wrapped


def test_the_projection_inside_an_unsupported_attention_is_left_alone_by_default():
    class MyAttention(nn.MultiheadAttention):  # reads out_proj.weight directly: wrapping it would be bypassed
        pass

    net = nn.Sequential(MyAttention(4, 2), nn.Linear(4, 2))
    with pytest.warns(UserWarning):
        apical.perforate(net)
    assert type(net[0].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert [n for n, _ in apical.dendritic_layers(net)] == ["1"]


def test_an_include_that_matches_only_unwrappable_modules_names_the_first_five():
    net = nn.Sequential(*[nn.Bilinear(2, 2, 2) for _ in range(6)])
    listed = ", ".join(f"('{i}', 'Bilinear')" for i in range(5))
    with pytest.raises(PerforationError, match=re.escape(
            f"include: '.*' matches only modules apical cannot wrap: [{listed}]") + "$"):
        apical.perforate(net, apical.DendriteConfig(include=[".*"]))


def test_an_exclude_name_after_a_type_is_still_checked():
    net = nn.Sequential(nn.Linear(3, 3), nn.Conv1d(1, 1, 1), nn.Linear(3, 2))
    with pytest.raises(PerforationError, match=re.escape(
            "exclude: 'nope' matches no module of the model; names look like ['0', '1', '2']") + "$"):
        apical.perforate(net, apical.DendriteConfig(exclude=[nn.Conv1d, "nope"]))


def test_exclude_by_type_leaves_every_module_of_that_type_alone():
    net = nn.Sequential(nn.Linear(3, 3), nn.Conv1d(1, 1, 1), nn.Linear(3, 2))
    apical.perforate(net, apical.DendriteConfig(exclude=[nn.Conv1d]))
    assert [n for n, _ in apical.dendritic_layers(net)] == ["0", "2"] and type(net[1]) is nn.Conv1d


def test_an_exclude_that_matches_nothing_names_the_first_five_modules():
    net = nn.Sequential(*[nn.Linear(2, 2) for _ in range(7)])
    with pytest.raises(PerforationError, match=re.escape(
            "exclude: 'nope' matches no module of the model; names look like ['0', '1', '2', '3', '4']") + "$"):
        apical.perforate(net, apical.DendriteConfig(exclude=["nope"]))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc = nn.Linear(4, 4)


@pytest.mark.parametrize("proj", ["q_proj", "k_proj", "v_proj"])
def test_a_nested_attentions_projection_is_refused_as_inside_it_and_a_linears_as_missing(proj):
    """An attention's q/k/v projections are not modules before perforate: excluding one is refused with the
    way out (exclude the attention); the same name under a Linear matches nothing."""
    with pytest.raises(PerforationError, match=re.escape(
            f"exclude: '0.attn.{proj}' sits inside '0.attn' (MultiheadAttention), which reads its weights directly "
            "and is wrapped as a whole; exclude '0.attn' to leave it without dendrites") + "$"):
        apical.perforate(nn.Sequential(_Block()), apical.DendriteConfig(exclude=[f"0.attn.{proj}"]))
    with pytest.raises(PerforationError, match=re.escape(f"exclude: '0.fc.{proj}' matches no module of the model")):
        apical.perforate(nn.Sequential(_Block()), apical.DendriteConfig(exclude=[f"0.fc.{proj}"]))
