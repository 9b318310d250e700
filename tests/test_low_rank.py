"""Low-rank dendrite sets (``DendriteConfig.dendrite_rank``): parameter cost against the formula,
function kept at insertion, the candidates' math and statistics against numpy, the best-of-C
choice with a shared projection, save/load and export on Linear, Conv2d and a recurrent layer."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import apical
from apical.dendrites.layer import DendriticLinear


def _grow(model: nn.Module, x: torch.Tensor, candidates: int = 3, steps: int = 3, scale: float = 3.0) -> None:
    """One dendrite phase by hand on every dendritic layer (random targets), then install."""
    layers = [layer for _, layer in apical.dendritic_layers(model)]
    for layer in layers:
        layer.add_candidates(candidates, scale)
        layer.set_training_mode("dendrite", perforated=True)
    params = [p for layer in layers for p in layer.candidate_parameters()]
    opt = torch.optim.SGD(params, lr=0.2)
    target = torch.randn_like(model(x))
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - target).pow(2).sum().backward()
        opt.step()
    for layer in layers:
        layer.install_best(layer.candidate_scores())
        layer.set_training_mode("neuron", perforated=True)
        with torch.no_grad():  # give the new set a say, so that later checks see it
            layer.dendrite_out.normal_()


@pytest.mark.parametrize("make, rank, per_set", [
    # F = 12 inputs, O = 7 neurons: r*F projection + O*r mix + O bias + O v
    (lambda: nn.Linear(12, 7), 2, 2 * 12 + 7 * 2 + 7 + 7),
    # 4 -> 6 channels, 3x3 kernel, 2 groups: r channels per group of 2 inputs x 9 taps
    (lambda: nn.Conv2d(4, 6, 3, groups=2), 3, (2 * 3) * (2 * 9) + 6 * 3 + 6 + 6),
    (lambda: nn.Conv1d(5, 4, 3), 1, 1 * 15 + 4 * 1 + 4 + 4),
])
def test_a_sets_parameter_count_is_the_formula(make, rank, per_set):
    model = nn.Sequential(make())
    apical.perforate(model, apical.DendriteConfig(mode="gd", dendrite_rank=rank))
    layer = model[0]
    before = apical.parameter_count(model)
    o = layer.out_channels
    assert layer.set_parameters() == per_set
    layer.install_random(1.0)  # the cascade is stored as a [D, D, O] square: one [1, 1, O] block
    assert apical.parameter_count(model) - before == per_set + o
    layer.install_random(1.0)  # the square grows to [2, 2, O]
    assert apical.parameter_count(model) - before == 2 * per_set + 4 * o
    # a full copy costs O * F instead of r * (F + O)
    full = nn.Sequential(make())
    apical.perforate(full, apical.DendriteConfig(mode="gd"))
    w = full[0].base.weight
    assert full[0].set_parameters() == w.numel() + 2 * w.shape[0]


def test_a_gru_sets_cost_r_times_inputs_plus_gate_units():
    model = nn.Sequential(nn.GRU(5, 4, batch_first=True))
    apical.perforate(model, apical.DendriteConfig(mode="gd", dendrite_rank=2))
    (_, cell), = apical.dendritic_layers(model)
    before = apical.parameter_count(model)
    cell.install_random(1.0)
    # gate units 3*4 = 12 neurons reading [x, h] = 9 inputs (and the [1, 1, 12] cascade block)
    assert apical.parameter_count(model) - before == 2 * 9 + 12 * 2 + 12 + 12 + 12


CASES = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), (20, 6)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.ReLU(), nn.Conv2d(6, 3, 3)), (5, 4, 8, 8)),
    "gru": (lambda: GRUNet(), (6, 5, 4)),
}


class GRUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("mode", ["pb", "gd"])
def test_function_kept_at_insertion(name, mode):
    make, shape = CASES[name]
    torch.manual_seed(0)
    model = make()
    apical.perforate(model, apical.DendriteConfig(mode=mode, dendrite_rank=2))
    x = torch.randn(*shape)
    _grow(model, x)  # a first set with v != 0, so that the second one's cascade input matters
    model.eval()
    before = model(x).detach()
    model.train()
    if mode == "pb":
        for _, layer in apical.dendritic_layers(model):
            layer.add_candidates(3, 3.0)
            layer.set_training_mode("dendrite", perforated=True)
        model(x).sum().backward()
        for _, layer in apical.dendritic_layers(model):
            layer.install_best(layer.candidate_scores())
    else:
        for _, layer in apical.dendritic_layers(model):
            layer.install_random(3.0)
    model.eval()
    assert all(layer.num_dendrites == 2 for _, layer in apical.dendritic_layers(model))
    assert torch.allclose(model(x), before, atol=1e-6, rtol=0)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def test_linear_candidates_math_statistics_gradient_and_choice_against_numpy():
    torch.manual_seed(1)
    n, f, o, c, r = 40, 6, 5, 4, 2
    model = nn.Sequential(nn.Linear(f, o)).double()
    apical.perforate(model, apical.DendriteConfig(dendrite_rank=r))
    layer = model[0]
    layer.candidate_scale = 1.0
    layer.add_candidates(c, 3.0)
    layer.set_training_mode("dendrite", perforated=True)
    x = torch.randn(n, f, dtype=torch.float64)
    t = torch.randn(n, o, dtype=torch.float64)
    (model(x) * t).sum().backward()  # dL/dz = t: every neuron's error is known
    xp, tp = x.numpy(), t.numpy()
    P = layer.candidate_proj.detach().numpy()[0]  # [r, F], shared
    Q = layer.candidate_weight.detach().numpy()  # [C, O, r]
    b = layer.candidate_bias.detach().numpy()  # [C, O]
    h = xp @ P.T  # [N, r]
    a = _sigmoid(np.einsum("nr,cor->nco", h, Q) + b)  # [N, C, O]
    am, dm = a - a.mean(0), tp - tp.mean(0)
    cov = (am * dm[:, None]).mean(0)
    sd = dm.std(0)
    assert np.allclose(layer.candidate_scores().numpy(), np.abs(cov) / sd, atol=1e-12)
    # the gradient of -|cov| / sd, through the activation, the mix and the shared projection
    ga = -np.sign(cov) / (n * sd) * dm[:, None]  # [N, C, O]
    gpre = ga * a * (1 - a)
    assert np.allclose(layer.candidate_weight.grad.numpy(), np.einsum("nco,nr->cor", gpre, h), atol=1e-12)
    assert np.allclose(layer.candidate_bias.grad.numpy(), gpre.sum(0), atol=1e-12)
    gP = np.einsum("nco,cor,nf->rf", gpre, Q, xp)
    assert np.allclose(layer.candidate_proj.grad.numpy()[0], gP, atol=1e-12)
    # best of C per neuron: that candidate's mix row and bias, with the shared projection
    scores = layer.candidate_scores()
    best = layer.install_best(scores).numpy()
    assert (best == np.argmax(np.abs(cov) / sd, 0)).all()
    assert np.allclose(layer.dendrite_weight.detach().numpy()[0], Q[best, np.arange(o)])
    assert np.allclose(layer.dendrite_bias.detach().numpy()[0], b[best, np.arange(o)])
    assert np.allclose(layer.dendrite_proj.detach().numpy()[0], P)


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("shape", [(1, 6), (4, 3, 6)])
def test_linear_forward_with_several_low_rank_sets_against_numpy(rank, shape):
    """Installed sets each keep their own projection: z = Wx + b + sum_k v_k a_k with
    a_k = sigmoid(Q_k P_k x + b_k + sum_{e<k} u_ke a_e), for a batch of one and a 3-D input."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 5)).double()
    apical.perforate(model, apical.DendriteConfig(dendrite_rank=rank))
    layer = model[0]
    for _ in range(3):
        layer.install_random(1.0)
    with torch.no_grad():
        layer.dendrite_out.normal_()
        layer.dendrite_cascade.normal_()
        layer.dendrite_bias.normal_()
    x = torch.randn(*shape, dtype=torch.float64)
    xp = x.numpy()
    W, b = layer.base.weight.detach().numpy(), layer.base.bias.detach().numpy()
    P, Q = layer.dendrite_proj.detach().numpy(), layer.dendrite_weight.detach().numpy()  # [D, r, F], [D, O, r]
    B, U, V = (t.detach().numpy() for t in (layer.dendrite_bias, layer.dendrite_cascade, layer.dendrite_out))
    assert P.shape == (3, rank, 6) and Q.shape == (3, 5, rank)
    z = xp @ W.T + b
    acts = []
    for k in range(3):
        pre = (xp @ P[k].T) @ Q[k].T + B[k] + sum(U[k, e] * acts[e] for e in range(k))
        acts.append(_sigmoid(pre))
        z = z + V[k] * acts[k]
    np.testing.assert_allclose(model(x).detach().numpy(), z, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale", [10.0, 2.0], ids=["default-scale", "scale2"])
def test_conv_candidates_read_their_own_groups_features_against_numpy(scale):
    torch.manual_seed(2)
    g, cin, o, k, r, c = 2, 4, 6, 3, 2, 3
    model = nn.Sequential(nn.Conv2d(cin, o, k, groups=g, bias=False)).double()
    apical.perforate(model, apical.DendriteConfig(dendrite_rank=r, candidate_lr_scale=scale))
    layer = model[0]
    assert layer.candidate_scale == scale
    layer.add_candidates(c, 3.0)
    layer.set_training_mode("dendrite", perforated=True)
    x = torch.randn(3, cin, 6, 6, dtype=torch.float64)
    t = torch.randn(3, o, 4, 4, dtype=torch.float64)
    (model(x) * t).sum().backward()
    s = layer.candidate_scale
    P = layer.candidate_proj.detach().numpy()[0] * s  # [g * r, cin / g, k, k]
    Q = layer.candidate_weight.detach().numpy() * s  # [C, O, r]
    b = layer.candidate_bias.detach().numpy() * s
    xp = x.numpy()
    # the projection by hand: output row q of group q // r reads that group's input channels
    h = np.zeros((3, g * r, 4, 4))
    per_in = cin // g
    for q in range(g * r):
        grp = q // r
        for i in range(4):
            for j in range(4):
                patch = xp[:, grp * per_in:(grp + 1) * per_in, i:i + k, j:j + k]
                h[:, q, i, j] = (patch * P[q]).sum(axis=(1, 2, 3))
    per_out = o // g
    pre = np.zeros((3, c, o, 4, 4))
    for n_ in range(o):
        grp = n_ // per_out
        pre[:, :, n_] = np.einsum("nrij,cr->ncij", h[:, grp * r:(grp + 1) * r], Q[:, n_]) + b[:, n_, None, None]
    a = _sigmoid(pre)
    tp = t.numpy()
    a_obs = np.moveaxis(a, (3, 4), (1, 2)).reshape(-1, c, o)  # every sample and position observes a neuron
    d_obs = np.moveaxis(tp, 1, 3).reshape(-1, o)
    am, dm = a_obs - a_obs.mean(0), d_obs - d_obs.mean(0)
    cov = (am * dm[:, None]).mean(0)
    assert np.allclose(layer.candidate_scores().numpy(), np.abs(cov) / dm.std(0), atol=1e-10)


def _round_trip(model_fn, x, tmp_path, rank=2):
    torch.manual_seed(3)
    model = model_fn()
    cfg = apical.DendriteConfig(dendrite_rank=rank, seed=0)
    apical.perforate(model, cfg)
    _grow(model, x)
    _grow(model, x)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    path = tmp_path / "low-rank.apical"
    apical.save(path, model)
    fresh = model_fn()  # un-perforated: load replays the rank and the structure
    apical.load(path, fresh)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)
        exported = apical.export(model)
        assert torch.allclose(exported(x), ref, atol=1e-5, rtol=1e-5)
    # a model perforated with another rank is refused before anything changes
    other = model_fn()
    apical.perforate(other, apical.DendriteConfig(dendrite_rank=rank + 1))
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(apical.CheckpointError, match=rf"does not fit: layer '[\w.]+' has dendrite rank {rank + 1}, "
                       rf"the checkpoint's {rank}: perforate with the checkpoint's dendrite_rank$"):
        apical.load(path, other)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in state.items())
    return model, exported


@pytest.mark.parametrize("name", CASES)
def test_save_load_and_export(name, tmp_path):
    make, shape = CASES[name]
    model, exported = _round_trip(make, torch.randn(*shape), tmp_path)
    names = {type(m).__name__ for m in exported.modules()}
    if name == "linear":
        assert names >= {"FusedDendriticLinear"}
    if name == "conv2d":
        assert names >= {"FusedDendriticConv"}
        fused = exported[0]
        # one convolution: the wrapped 6 channels plus 2 sets x 2 groups x r=2 projection channels
        assert fused.conv.out_channels == 6 + 2 * 2 * 2


def test_a_checkpoint_with_mixed_ranks_loads_only_into_a_model_perforated_as_it_was(tmp_path):
    """A model whose layers use different ranks (one wrapped by hand) cannot be rebuilt from one config:
    loading into a plain model is refused by name; a model perforated the same way loads."""
    def make():
        return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))

    def perforate_mixed(model):
        apical.perforate(model, apical.DendriteConfig(dendrite_rank=2, seed=0))
        model[2] = DendriticLinear(model[2].base)  # full sets on the last layer
        return model

    torch.manual_seed(0)
    model = perforate_mixed(make())
    x = torch.randn(8, 4)
    for _, layer in apical.dendritic_layers(model):
        layer.install_random(1.0)
        with torch.no_grad():
            layer.dendrite_out.normal_()
    path = tmp_path / "mixed.apical"
    apical.save(path, model)
    with pytest.raises(apical.CheckpointError, match=r"is invalid: layers use dendrite ranks \[2, None\], the config "
                       r"says 2: perforate the model as it was, then load$"):
        apical.load(path, make())
    same = perforate_mixed(make())
    apical.load(path, same)
    assert torch.equal(same(x), model(x))


def test_a_dendrite_phase_checkpoint_resumes_with_the_shared_projection(tmp_path):
    torch.manual_seed(4)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    make = CASES["linear"][0]
    model = make()
    cfg = apical.DendriteConfig(dendrite_rank=2, seed=0, patience=0, min_dendrite_epochs=2, max_dendrite_epochs=3)
    apical.perforate(model, cfg)
    ctl = apical.Controller(model, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def epoch():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):  # improves, plateaus (patience 0: dendrite phase), one dendrite epoch
        epoch()
        if ctl.step(0.5).restructured:
            opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert ctl.phase == "dendrite" and ctl.dp_epochs == 1 and ctl._dp_snapshot is not None
    assert all("proj" in snap for snap in ctl._dp_snapshot.values())
    path = tmp_path / "phase.apical"
    apical.save(path, model, ctl)
    fresh = make()
    apical.perforate(fresh, cfg)
    ctl2 = apical.Controller(fresh, cfg)
    apical.load(path, fresh, ctl2)
    for (_, a), (_, b) in zip(apical.dendritic_layers(model), apical.dendritic_layers(fresh), strict=True):
        assert torch.equal(a.candidate_proj, b.candidate_proj)
        assert torch.equal(ctl._dp_snapshot["0"]["proj"], ctl2._dp_snapshot["0"]["proj"])


def test_rank_mismatch_between_perforate_and_controller_is_an_error():
    model = nn.Sequential(nn.Linear(4, 3))
    apical.perforate(model, apical.DendriteConfig(dendrite_rank=2))
    with pytest.raises(ValueError, match="dendrite_rank"):
        apical.Controller(model, apical.DendriteConfig())
    with pytest.raises(ValueError, match="dendrite_rank"):
        apical.DendriteConfig(dendrite_rank=0)


@pytest.mark.parametrize("rank", [0, -1, 2.5, 0.5, True, "2"])
def test_a_layer_refuses_a_rank_that_is_not_a_positive_integer(rank):
    layer = apical.perforate(nn.Sequential(nn.Linear(4, 3)))[0]
    message = f"dendrite rank must be an integer >= 1 or None, got {rank!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        layer.set_rank(rank)
    assert layer.rank is None
    layer.set_rank(3)  # a good one still works, and None goes back to full sets
    assert layer.rank == 3 and layer.set_parameters() == 3 * (4 + 3) + 2 * 3
    layer.set_rank(None)
    assert layer.rank is None and layer.set_parameters() == 3 * 4 + 2 * 3


@pytest.mark.parametrize("holding", ["a set", "a candidate"])
def test_a_layer_changes_its_rank_only_while_it_holds_no_set_and_no_candidate(holding):
    layer = apical.perforate(nn.Sequential(nn.Linear(4, 3)))[0]
    if holding == "a set":
        layer.install_random(1.0)
    else:
        layer.add_candidates(1, 1.0)
    weights = [t.clone() for t in (layer.dendrite_weight, layer.dendrite_out)]
    with pytest.raises(RuntimeError, match="^the rank of a layer's dendrite sets can change only while it holds none$"):
        layer.set_rank(2)
    assert layer.rank is None and (layer.num_dendrites, layer.num_candidates) == (
        (1, 0) if holding == "a set" else (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(weights, (layer.dendrite_weight, layer.dendrite_out), strict=True))
    layer.set_rank(None)  # the same rank is not a change: allowed


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x)[0]


class _Cell(nn.Module):
    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.cell(x)
        return torch.cat(out, -1) if isinstance(out, tuple) else out


def _kinds():
    kinds = {
        "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3)), (2, 3, 7)),
        "conv3d-depthwise": (lambda: nn.Sequential(nn.Conv3d(4, 4, 2, groups=4)), (2, 4, 3, 3, 3)),
        "multihead-attention": (_Attention, (2, 5, 8)),
        "lstm": (lambda: nn.Sequential(nn.LSTM(4, 3, num_layers=2, batch_first=True, bidirectional=True)), (2, 5, 4)),
        "lstm-cell": (lambda: _Cell(nn.LSTMCell(4, 3)), (6, 4)),
        "rnn-cell": (lambda: _Cell(nn.RNNCell(4, 3)), (6, 4)),
    }
    try:
        from transformers.pytorch_utils import Conv1D

        kinds["transformers-conv1d"] = (lambda: nn.Sequential(Conv1D(6, 4)), (2, 5, 4))
    except ImportError:
        pass
    return kinds


def _output(out) -> torch.Tensor:
    if isinstance(out, tuple):
        out = out[0]
    return out


@pytest.mark.parametrize("name", list(_kinds()))
def test_every_layer_kind_takes_low_rank_sets(name, tmp_path):
    """Function kept at insertion, then a set with its say: the export and a fresh load compute the same."""
    make, shape = _kinds()[name]
    torch.manual_seed(5)
    model = make()
    apical.perforate(model, apical.DendriteConfig(mode="gd", dendrite_rank=2))
    x = torch.randn(*shape)
    model.eval()
    before = _output(model(x)).detach()
    for _, layer in apical.dendritic_layers(model):
        assert layer.rank == 2
        layer.install_random(3.0)
    # (a recurrent layer with sets runs apical's step loop instead of the fused kernel: rounding differs)
    assert torch.allclose(_output(model(x)), before, atol=1e-6, rtol=0)
    for _, layer in apical.dendritic_layers(model):
        with torch.no_grad():
            layer.dendrite_out.normal_()
    with torch.no_grad():
        ref = _output(model(x))
        assert not torch.allclose(ref, before)
        assert torch.allclose(_output(apical.export(model)(x)), ref, atol=1e-5, rtol=1e-5)
    apical.save(tmp_path / "kind.apical", model)
    fresh = make()
    apical.load(tmp_path / "kind.apical", fresh)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(_output(fresh(x)), ref)
