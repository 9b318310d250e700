import pytest
import torch
from torch import nn

import apical
from apical.dendrites.layer import DendriticConv, DendriticLinear


def _perforated(module: nn.Module, mode: str = "pb") -> nn.Sequential:
    model = nn.Sequential(module)
    apical.perforate(model, apical.DendriteConfig(mode=mode))
    return model


CASES = [
    (lambda: nn.Linear(5, 4), (7, 5)),
    (lambda: nn.Linear(5, 4), (3, 6, 5)),  # (batch, time, features)
    (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9)),
    (lambda: nn.Conv2d(4, 6, 3, stride=2), (2, 4, 9, 9)),
    (lambda: nn.Conv2d(4, 6, 3, groups=2, bias=False), (2, 4, 7, 7)),
    (lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1, padding_mode="reflect"), (2, 4, 6, 6)),
    (lambda: nn.Conv3d(2, 3, 2), (2, 2, 4, 4, 4)),
]


def _train_candidates(model, x, steps=3):
    layer = model[0]
    layer.add_candidates(3, 1.0)
    layer.set_training_mode("dendrite", perforated=True)
    layer.base.requires_grad_(False)
    opt = torch.optim.SGD([layer.candidate_weight, layer.candidate_bias, layer.candidate_cascade], lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    return layer


@pytest.mark.parametrize("make, shape", CASES)
def test_installing_a_set_preserves_the_function(make, shape):
    model = _perforated(make())
    layer = model[0]
    x = torch.randn(*shape)
    layer.install_random(1.0)  # a first set, with a non-zero v so the cascade matters
    with torch.no_grad():
        layer.dendrite_out.normal_()
    model.eval()
    before = model(x).detach()
    # pb: train candidates on the correlation objective, then install the best per neuron
    model.train()
    layer = _train_candidates(model, x)
    scores = layer.candidate_scores()
    layer.install_best(scores)
    assert layer.num_dendrites == 2 and layer.num_candidates == 0
    assert layer.dendrite_cascade[1, 0].abs().sum() > 0  # the cascade from set 0 was learned
    model.eval()
    assert torch.allclose(model(x), before, atol=1e-6, rtol=0)
    # gd: a random set with v = 0
    layer.install_random(1.0)
    assert torch.allclose(model(x), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("make, shape", CASES)
def test_forward_matches_a_per_dendrite_reference(make, shape):
    """The one-op stacked forward equals a loop over dendrite copies of the module."""
    base = make()
    model = _perforated(base)
    layer = model[0]
    for _ in range(3):
        layer.install_random(1.0)
    with torch.no_grad():
        layer.dendrite_out.normal_()
        layer.dendrite_cascade.normal_()
    x = torch.randn(*shape)
    acts = []
    expected = base(x)
    axis = -1 if isinstance(base, nn.Linear) else 1
    for k in range(3):
        copy = make()
        with torch.no_grad():
            copy.weight.copy_(layer.dendrite_weight[k])
            if copy.bias is None:
                copy.bias = nn.Parameter(layer.dendrite_bias[k].clone())
            else:
                copy.bias.copy_(layer.dendrite_bias[k])
        h = copy(x)
        for e in range(k):
            h = h + layer.dendrite_cascade[k, e].view(_chan_shape(h, axis)) * acts[e]
        acts.append(torch.sigmoid(h))
        expected = expected + layer.dendrite_out[k].view(_chan_shape(h, axis)) * acts[k]
    assert torch.allclose(model(x), expected, atol=1e-5)


def _chan_shape(h, axis):
    shape = [1] * h.dim()
    shape[axis] = h.shape[axis]
    return shape


@pytest.mark.parametrize("mode, zero_expected", [("pb", True), ("gd", False)])
def test_perforation_blocks_error_through_dendrites(mode, zero_expected):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    cfg = apical.DendriteConfig(mode=mode)
    apical.perforate(model, cfg)
    ctl = apical.Controller(model, cfg)
    layer2 = model[2]
    layer2.install_random(1.0)
    ctl._apply_phase()
    with torch.no_grad():
        layer2.base.weight.zero_()
        layer2.dendrite_out.fill_(1.0)
    x = torch.randn(8, 3)
    model(x).pow(2).sum().backward()
    grad = model[0].base.weight.grad
    assert grad is not None
    if zero_expected:
        assert torch.count_nonzero(grad) == 0
        assert layer2.dendrite_weight.grad is None  # frozen: no gradient computed
        assert layer2.dendrite_out.grad is not None and layer2.dendrite_out.grad.abs().sum() > 0
    else:
        assert grad.abs().sum() > 0
        assert layer2.dendrite_weight.grad.abs().sum() > 0


def test_pb_neuron_phase_builds_no_graph_for_dendrites():
    model = _perforated(nn.Linear(4, 3))
    layer = model[0]
    layer.install_random(1.0)
    a = layer.dendrite_activations(torch.randn(5, 4, requires_grad=True))
    assert not a.requires_grad


def test_dispatch_and_dtype_follow_the_module():
    model = nn.Sequential(nn.Linear(3, 3).double(), nn.Conv1d(1, 2, 1))
    apical.perforate(model, apical.DendriteConfig(include=["0"]))
    assert isinstance(model[0], DendriticLinear)
    model[0].install_random(1.0)
    assert model[0].dendrite_weight.dtype == torch.float64
    m2 = nn.Sequential(nn.Conv3d(1, 1, 1))
    apical.perforate(m2)
    assert isinstance(m2[0], DendriticConv)


def test_unbatched_conv_input():
    model = _perforated(nn.Conv1d(2, 3, 3))
    model[0].install_random(1.0)
    with torch.no_grad():
        model[0].dendrite_out.normal_()
    x = torch.randn(2, 8)
    out = model(x)
    assert out.shape == (3, 6)  # unbatched in, unbatched out (allclose alone would broadcast)
    assert torch.allclose(out, model(x[None])[0])
    assert DendriticConv(nn.Conv1d(2, 3, 3)).activation == "sigmoid"  # the documented default


@pytest.mark.parametrize("make", [lambda: nn.Linear(3, 4), lambda: nn.Conv1d(2, 4, 3)], ids=["linear", "conv1d"])
def test_structure_changes_keep_dtype_and_frozen_flags(make):
    """resize, install_random and remove_last keep the layer's dtype (float64 here, not the default float32)
    and a perforated layer's flags: input weights, biases and cascade frozen, v trainable."""
    model = _perforated(make().double())
    layer = model[0]
    tail = tuple(layer.base.weight.shape[1:])

    def check(d, c):
        assert (layer.num_dendrites, layer.num_candidates) == (d, c)
        shapes = {"dendrite_weight": (d, 4, *tail), "dendrite_bias": (d, 4), "dendrite_cascade": (d, d, 4),
                  "dendrite_out": (d, 4)}
        if c:
            shapes.update(candidate_weight=(c, 4, *tail), candidate_bias=(c, 4), candidate_cascade=(c, d, 4))
        for name, shape in shapes.items():
            p = getattr(layer, name)
            assert p.shape == shape and p.dtype == torch.float64, name
            trains = (name == "dendrite_out" and d > 0) or name.startswith("candidate_")  # nothing empty trains
            assert p.requires_grad == trains, name

    layer.resize(2, 3)
    check(2, 3)
    assert all(int(torch.count_nonzero(getattr(layer, n))) == 0 for n in ("dendrite_weight", "candidate_weight"))
    layer.resize(2)  # no candidates unless asked
    check(2, 0)
    layer.remove_last()
    check(1, 0)
    g = torch.Generator().manual_seed(3)
    layer.install_random(2.0, g)
    check(2, 0)
    # the new set: randn draws (weights, then biases) times scale / sqrt(fan_in); no cascade, v = 0
    ref = torch.Generator().manual_seed(3)
    std = 2.0 / float(torch.tensor(tail).prod()) ** 0.5
    w = torch.randn(1, 4, *tail, generator=ref) * std
    b = torch.randn(1, 4, generator=ref) * std
    torch.testing.assert_close(layer.dendrite_weight[1], w[0].double())
    torch.testing.assert_close(layer.dendrite_bias[1], b[0].double())
    assert int(torch.count_nonzero(layer.dendrite_cascade[1])) == 0
    assert int(torch.count_nonzero(layer.dendrite_out[1])) == 0
    layer.remove_last()
    layer.remove_last()
    check(0, 0)
    with pytest.raises(RuntimeError, match="^no dendrite set to remove$"):
        layer.remove_last()


def test_remove_last_restores_previous_structure():
    model = _perforated(nn.Linear(4, 3))
    layer = model[0]
    layer.install_random(1.0)
    with torch.no_grad():
        layer.dendrite_out.normal_()
    x = torch.randn(5, 4)
    before = model(x).detach()
    layer.install_random(1.0)
    with torch.no_grad():
        layer.dendrite_out[1].normal_()
    assert not torch.allclose(model(x), before)
    layer.remove_last()
    assert layer.num_dendrites == 1
    assert torch.allclose(model(x), before)


def _conv_net_pass(device):
    """A perforated conv + linear net with two installed sets (cascade) and two candidates per layer, built
    on the CPU from fixed seeds and moved to ``device``: its dendrite-phase output, gradients and
    statistics, its neuron-phase gradients and its eval output, all on the CPU."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    apical.perforate(model, apical.DendriteConfig())
    g = torch.Generator().manual_seed(1)
    layers = [layer for _, layer in apical.dendritic_layers(model)]
    for layer in layers:
        layer.install_random(1.0, g)
        layer.install_random(1.0, g)
        layer.add_candidates(2, 1.0, g)
        with torch.no_grad():
            for p in (layer.dendrite_out, layer.dendrite_cascade, layer.candidate_cascade):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        layer.set_training_mode("dendrite", True)
    model.to(device)
    x = torch.randn(4, 3, 8, 8, generator=g).to(device)
    out = model(x)
    out.pow(2).sum().backward()
    assert all(layer.candidate_weight.grad.device.type == torch.device(device).type for layer in layers)
    res = {"out": out.detach().cpu()}
    res.update({f"grad {n}": p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None})
    for i, layer in enumerate(layers):
        res.update({f"stats {i} {k}": v.cpu() for k, v in layer.stats.moments().items()})
        layer.drop_candidates()
        layer.set_training_mode("neuron", True)
    model.zero_grad()
    model(x).pow(2).sum().backward()
    res.update({f"neuron grad {n}": p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None})
    model.eval()
    with torch.no_grad():
        res["eval"] = model(x).cpu()
    return res


class _SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, add_zero_attn=True, batch_first=True)  # a zero key/value made inside

    def forward(self, x):
        return self.attn(x, x, x)[0]


class _PackedBiGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(8, 4, num_layers=2, batch_first=True, bidirectional=True)  # flips within each length

    def forward(self, x):
        packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([3, 2]), batch_first=True)
        return self.gru(packed)[0].data  # (torch's pad_packed_sequence reads values: not on meta)


class _LSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 4)

    def forward(self, x):
        return self.lstm(x)[0]


META_CASES = {
    "linear": lambda: nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)),
    "conv": lambda: nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 2, 1)),
    "attention": _SelfAttention,
    "packed-bigru": _PackedBiGRU,
    "lstm": _LSTM,
}


@pytest.mark.parametrize("rank", [None, 2], ids=["full", "rank2"])
@pytest.mark.parametrize("kind", META_CASES)
def test_every_tensor_made_in_a_pass_follows_the_inputs_device(kind, rank):
    """The CUDA path without a GPU: on the meta device, which like CUDA refuses to mix with CPU tensors, both
    phases' forward and backward and the eval forward run, so every tensor apical creates inside a pass (zero
    attention keys, time masks and flips, index ranges) is made on the input's device."""
    torch.manual_seed(0)
    model = META_CASES[kind]()
    apical.perforate(model, apical.DendriteConfig(dendrite_rank=rank))
    layers = [layer for _, layer in apical.dendritic_layers(model)]
    for layer in layers:
        layer.install_random(1.0)
        layer.install_random(1.0)
        layer.add_candidates(2, 1.0)
        layer.set_training_mode("dendrite", True)
    model.to("meta").train()
    x = torch.randn(3, 2, 8, device="meta") if kind == "lstm" else torch.randn(2, 3, 8, device="meta")
    model(x).sum().backward()
    assert all(layer.candidate_weight.grad.device.type == "meta" for layer in layers)
    for layer in layers:
        layer.drop_candidates()
        layer.set_training_mode("neuron", True)
    model(x).sum().backward()
    assert all(layer.dendrite_out.grad.device.type == "meta" for layer in layers)
    model.eval()
    with torch.no_grad():
        assert model(x).device.type == "meta"


def test_install_best_chooses_on_the_layers_device_from_scores_kept_elsewhere():
    layer = DendriticLinear(nn.Linear(3, 4))
    layer.add_candidates(2, 1.0)
    layer.to("meta")
    best = layer.install_best(torch.rand(2, 4))  # scores on the CPU
    assert best.device.type == "meta" and best.shape == (4,) and layer.dendrite_weight.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_backward():
    """Forward, gradients (both phases) and correlation statistics on CUDA equal the CPU's."""
    want = _conv_net_pass("cpu")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # full float32 convolutions
        got = _conv_net_pass("cuda")
    assert got.keys() == want.keys()
    assert {"grad 0.candidate_weight", "grad 3.candidate_weight", "neuron grad 0.dendrite_out"} <= set(got)
    for k, ref in want.items():
        # a tolerance above TF32's rounding, far below what a wrong term or index would give
        torch.testing.assert_close(got[k], ref, rtol=2e-3, atol=2e-3 * float(ref.abs().max()), msg=k)


def test_a_replayed_structure_trains_v_only_where_a_set_exists():
    """resize (apply_structure before a load): v of an installed set trains in the neuron phase, a
    zero-size v never requires grad (plain DDP would wait for its gradient)."""
    model = _perforated(nn.Linear(5, 4))
    layer = model[0]
    layer.resize(0, 0)
    assert not layer.dendrite_out.requires_grad
    layer.resize(1, 0)
    assert layer.dendrite_out.requires_grad and layer.dendrite_out.shape == (1, 4)
    layer.resize(2, 3)
    assert layer.dendrite_out.requires_grad and layer.num_candidates == 3


@pytest.mark.parametrize("rank", [None, 2], ids=["full", "rank2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_sets_and_candidates_keep_the_layers_dtype(dtype, rank):
    """Every way a set or candidate comes to be (random, installed best, replayed by resize) keeps the
    layer's dtype, low-rank projections included."""
    model = nn.Sequential(nn.Linear(5, 4).to(dtype))
    apical.perforate(model, apical.DendriteConfig(mode="gd", dendrite_rank=rank))
    layer = model[0]

    def check(d, c):
        assert (layer.num_dendrites, layer.num_candidates) == (d, c)
        tensors = (*layer.dendrite_parameters(), *layer.candidate_parameters())
        assert len(tensors) == 4 + (rank is not None) + (3 + (rank is not None) if c else 0)
        assert all(p.dtype == dtype for p in tensors), [p.dtype for p in tensors]

    layer.install_random(1.0)
    layer.add_candidates(2, 1.0)
    check(1, 2)
    layer.install_best(torch.rand(2, 4, dtype=torch.float64), output_init=0.5,
                       signs=torch.ones(2, 4, dtype=torch.float64))
    check(2, 0)
    layer.resize(3, 2)
    check(3, 2)


def test_the_lr_scale_changes_how_candidates_learn_not_where_they_start():
    """Candidates are stored divided by the lr scale: the same draws give the same effective candidates
    (weights, biases, cascade and low-rank projection) whatever the scale."""
    effective = []
    for scale in (1.0, 2.0, 10.0):
        model = nn.Sequential(nn.Linear(5, 4))
        apical.perforate(model, apical.DendriteConfig(dendrite_rank=2, candidate_lr_scale=scale))
        layer = model[0]
        layer.install_random(1.0, torch.Generator().manual_seed(0))
        layer.add_candidates(3, 1.0, torch.Generator().manual_seed(1))
        assert layer.candidate_scale == scale
        effective.append([t.detach() for t in (*layer.candidate_tensors(), layer.candidate_projection())])
    for one, *others in zip(*effective, strict=True):
        for other in others:
            torch.testing.assert_close(other, one, rtol=1e-6, atol=0)


def test_candidates_get_their_own_optimiser_group_and_a_cascade_only_when_it_has_inputs():
    from apical.training import _optimizer_factory

    layer = DendriticLinear(nn.Linear(3, 1))
    layer.add_candidates(1, 1.0)  # no installed set: the cascade [C, 0, O] has no entries
    assert layer.candidate_cascade.numel() == 0 and not layer.candidate_cascade.requires_grad
    layer.drop_candidates()
    layer.install_random(1.0)
    layer.add_candidates(1, 1.0)  # one set, one candidate, one neuron: a single cascade weight trains
    assert layer.candidate_cascade.numel() == 1 and layer.candidate_cascade.requires_grad
    opt = _optimizer_factory("adam", 1e-3, 0.0, candidate_lr=0.5)(layer.parameters())
    groups = [({id(p) for p in g["params"]}, g["lr"]) for g in opt.param_groups]
    candidates = {id(p) for p in layer.candidate_parameters()}
    assert groups == [({id(p) for p in layer.parameters()} - candidates, 1e-3), (candidates, 0.5)]


@pytest.mark.parametrize("fan_in", [1, 16])
def test_random_sets_have_the_documented_scales_and_use_only_the_given_generator(fan_in):
    """A full set: weights and biases ~ N(0, (scale / sqrt(fan_in))^2); a rank-r set: Q ~ N(0, scale / r),
    P ~ N(0, scale / fan_in), so that its pre-activation has a full set's variance. The draws come from the
    generator passed, never from torch's global one."""
    scale, o = 1.5, 4000
    full = DendriticLinear(nn.Linear(fan_in, o))
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    full.install_random(scale, torch.Generator().manual_seed(1))
    assert torch.equal(torch.rand(3), before)  # the global generator was not touched
    std = scale / fan_in ** 0.5
    assert abs(full.dendrite_weight.std().item() / std - 1) < 0.05
    assert abs(full.dendrite_bias.std().item() / std - 1) < 0.05
    low = apical.perforate(nn.Sequential(nn.Linear(fan_in, 200)), apical.DendriteConfig(dendrite_rank=2))[0]
    torch.manual_seed(0)
    q, b, p = low._random_sets(400, scale, torch.Generator().manual_seed(1))  # 400 sets: enough draws of P
    assert torch.equal(torch.rand(3), before)
    assert abs(q.std().item() / (scale / 2) ** 0.5 - 1) < 0.05  # Q: [K, O, r]
    assert abs(p.std().item() / (scale / fan_in) ** 0.5 - 1) < 0.05  # P: [K, r, fan_in]
    assert abs(b.std().item() / std - 1) < 0.05
    # hence a pre-activation variance of about a full set's: r * (scale / r) * fan_in * (scale / fan_in) = scale^2
    x = torch.randn(4000, fan_in)
    with torch.no_grad():
        var_full = (x @ full.dendrite_weight[0].T).var().item()
        var_low = torch.einsum("nf,krf,kor->nko", x[:200], p, q).var().item()
    assert abs(var_full / scale**2 - 1) < 0.1 and abs(var_low / scale**2 - 1) < 0.25  # (a heavy-tailed product)


def test_a_set_of_the_wrong_kind_is_refused_by_message():
    layer = DendriticLinear(nn.Linear(3, 2))
    with pytest.raises(ValueError) as err:
        layer._append_set(torch.zeros(2, 3), torch.zeros(2), torch.zeros(0, 2), torch.zeros(2), torch.zeros(1, 3))
    assert str(err.value) == "a low-rank layer's set needs its projection, and a full set none"
    assert layer.num_dendrites == 0


def test_install_best_with_the_users_own_scores_needs_no_statistics():
    """Scores from elsewhere (no batch seen): each neuron gets the argmax candidate's row, and v starts at 0."""
    layer = DendriticLinear(nn.Linear(3, 4))
    layer.add_candidates(3, 1.0, torch.Generator().manual_seed(0))
    w, b = layer.candidate_weight.detach().clone(), layer.candidate_bias.detach().clone()
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.3], [0.5, 0.1, 0.8, 0.2], [0.4, 0.2, 0.1, 0.7]])
    assert layer.install_best(scores).tolist() == [1, 0, 1, 2]
    assert torch.equal(layer.dendrite_weight[0], torch.stack([w[1, 0], w[0, 1], w[1, 2], w[2, 3]]))
    assert torch.equal(layer.dendrite_bias[0], torch.stack([b[1, 0], b[0, 1], b[1, 2], b[2, 3]]))
    assert torch.equal(layer.dendrite_out, torch.zeros(1, 4))


def test_repr_names_sets_candidates_rank_activation_and_phase():
    model = _perforated(nn.Linear(3, 2))
    layer = model[0]
    assert layer.extra_repr() == "dendrites=0, candidates=0, activation=sigmoid, perforated=True"
    layer.install_random(1.0)
    layer.add_candidates(4, 1.0)
    assert layer.extra_repr() == "dendrites=1, candidates=4, activation=sigmoid, perforated=True"
    low = nn.Sequential(nn.Linear(3, 2))
    apical.perforate(low, apical.DendriteConfig(dendrite_rank=2, activation="tanh"))
    low[0].set_training_mode("neuron", perforated=False)
    assert "DendriticLinear(\n    dendrites=0, candidates=0, rank=2, activation=tanh, perforated=False\n" in repr(low)


def test_the_registry_protocol_of_a_dendritic_layer_class():
    """unsupported() names why a module cannot be wrapped; wrap() gives sigmoid dendrites by default."""
    assert DendriticLinear.unsupported(nn.ReLU()) == "it has no weight tensor"
    assert DendriticLinear.unsupported(nn.LazyLinear(3)) == (
        "it is a lazy layer that has not been initialised yet: run one forward pass through the model first")
    assert DendriticLinear.unsupported(nn.Linear(3, 2)) is None
    wrapped = DendriticLinear.wrap(nn.Linear(3, 2))
    assert isinstance(wrapped, DendriticLinear) and wrapped.activation == "sigmoid"
    assert DendriticLinear.wrap(nn.Linear(3, 2), activation="tanh").activation == "tanh"


def test_one_element_tensors_train_in_their_phase():
    """One input, one neuron, one set, one candidate: every dendrite tensor has a single element, and
    each still trains in its phase (only empty tensors never do)."""
    layer = DendriticLinear(nn.Linear(1, 1))
    layer.install_random(1.0)
    sets = {"weight": layer.dendrite_weight, "bias": layer.dendrite_bias, "cascade": layer.dendrite_cascade,
            "out": layer.dendrite_out}
    assert {n: p.numel() for n, p in sets.items()} == dict.fromkeys(sets, 1)
    layer.set_training_mode("neuron", perforated=False)  # gd: the sets' input weights train with v
    assert {n: p.requires_grad for n, p in sets.items()} == dict.fromkeys(sets, True)
    layer.set_training_mode("neuron", perforated=True)  # pb: only v
    assert {n: p.requires_grad for n, p in sets.items()} == {"weight": False, "bias": False, "cascade": False,
                                                               "out": True}
    layer.add_candidates(1, 1.0)
    layer.set_training_mode("dendrite", perforated=True)
    cands = layer.candidate_parameters()
    assert [p.numel() for p in cands] == [1, 1, 1] and all(p.requires_grad for p in cands)
    assert not any(p.requires_grad for p in sets.values())


def test_an_unknown_phase_is_refused_and_changes_nothing():
    layer = DendriticLinear(nn.Linear(2, 3))
    layer.install_random(1.0)
    layer.set_training_mode("neuron", perforated=True)
    for phase in ("Neuron", None, "candidates"):
        with pytest.raises(ValueError, match=f"^phase must be 'neuron' or 'dendrite', got {phase!r}$"):
            layer.set_training_mode(phase, perforated=False)
    assert layer.perforated and layer.dendrite_out.requires_grad and not layer.dendrite_weight.requires_grad


def test_a_fresh_layer_is_perforated_with_empty_frozen_tensors_in_its_base_dtype():
    """Built directly (no perforate): pb's defaults, no set, no candidate, and every empty dendrite tensor
    frozen and in the wrapped weight's dtype."""
    for base, tail in ((nn.Linear(3, 4), (3,)), (nn.Conv2d(2, 4, 3), (2, 3, 3))):
        layer = (DendriticLinear if isinstance(base, nn.Linear) else DendriticConv)(base.double())
        assert layer.perforated is True and layer.activation == "sigmoid"
        assert (layer.normaliser, layer.centring, layer.candidate_scale) == ("error", "batch", 1.0)
        assert layer.rank is None and layer.stats is None and layer.base is base
        want = {"dendrite_weight": (0, 4, *tail), "dendrite_bias": (0, 4), "dendrite_cascade": (0, 0, 4),
                "dendrite_out": (0, 4)}
        for name, shape in want.items():
            p = getattr(layer, name)
            assert (tuple(p.shape), p.dtype, p.requires_grad) == (shape, torch.float64, False), name
        assert all(getattr(layer, n) is None for n in ("candidate_weight", "candidate_bias", "candidate_cascade",
                                                        "dendrite_proj", "candidate_proj"))


def test_a_module_the_class_cannot_wrap_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="^cannot wrap LazyLinear: it is a lazy layer that has not been initialised "
                                         "yet: run one forward pass through the model first$"):
        DendriticLinear(nn.LazyLinear(3))

    class NoWeight(nn.Module):
        weight = None

    with pytest.raises(ValueError, match="^cannot wrap NoWeight: it has no weight tensor$"):
        DendriticLinear(NoWeight())
