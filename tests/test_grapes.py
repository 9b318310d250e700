"""GRAPES: modulated gradients against forward and backward passes written out by hand in numpy."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn

import apical
from apical.grapes import grapes, grapes_factors


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def np_factor(w: np.ndarray, clip: tuple[float, float] | None = (1.0, 2.0)) -> np.ndarray:
    imp = np.abs(w).reshape(w.shape[0], -1).sum(axis=1)  # per row, never the whole matrix
    f = 2.0 * imp / imp.max()
    return f if clip is None else np.clip(f, *clip)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    np.testing.assert_allclose(_np(a), _np(b), rtol=1e-5, atol=1e-7)


def _spread_rows(module: nn.Module, gen: torch.Generator) -> None:
    """Give each output row its own scale, so that factors differ (some below the clip)."""
    with torch.no_grad():
        w = module.weight
        scale = torch.rand(w.shape[0], generator=gen, dtype=w.dtype) * 0.8 + 0.2
        w.mul_(scale.view(-1, *([1] * (w.dim() - 1))))


# ---------------------------------------------------------------------------------- models
def _mlp() -> nn.Sequential:
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    for i in (0, 2, 4):
        _spread_rows(model[i], gen)
    return model


def _mlp_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(7, 4, generator=gen, dtype=torch.float64), torch.randn(7, 3, generator=gen,
                                                                               dtype=torch.float64)


def _loss(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((y - t) ** 2).sum()


def _grads(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    _loss(model(x), t).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def np_mlp_backward(ws, bs, x, t, mode, factors):
    """Hand-written forward/backward of Linear-tanh-Linear-tanh-Linear with GRAPES.

    ``factors`` maps a layer index (0, 1, 2) to its per-neuron F; a layer not in it is unmodulated.
    Returns the weight and bias gradients and the gradient of the input."""
    h = [x]
    for i in range(3):
        z = h[-1] @ ws[i].T + bs[i]
        h.append(np.tanh(z) if i < 2 else z)
    delta = h[3] - t  # error at the output layer's output
    gw, gb = [None] * 3, [None] * 3
    for i in (2, 1, 0):
        f = factors.get(i, np.ones(ws[i].shape[0]))
        if mode == "propagate":
            delta = delta * f
            gw[i], gb[i] = delta.T @ h[i], delta.sum(0)
        else:
            gw[i], gb[i] = f[:, None] * (delta.T @ h[i]), f * delta.sum(0)
        delta = delta @ ws[i]
        if i:
            delta = delta * (1 - h[i] ** 2)
    return gw, gb, delta


def np_mlp_grads(ws, bs, x, t, mode, clip=(1.0, 2.0), modulated=(0, 1)):
    gw, gb, _ = np_mlp_backward(ws, bs, x, t, mode, {i: np_factor(ws[i], clip) for i in modulated})
    return gw, gb


def _mlp_expected(model, x, t, mode, clip=(1.0, 2.0), prefix=""):
    lin = [model[i].base if prefix else model[i] for i in (0, 2, 4)]
    gw, gb = np_mlp_grads([_np(m.weight) for m in lin], [_np(m.bias) for m in lin], _np(x), _np(t),
                          mode, clip)
    out = {}
    for k, i in enumerate((0, 2, 4)):
        out[f"{i}{prefix}.weight"], out[f"{i}{prefix}.bias"] = gw[k], gb[k]
    return out


def _check(got: dict[str, torch.Tensor], expected: dict[str, np.ndarray]) -> None:
    for name, ref in expected.items():
        np.testing.assert_allclose(_np(got[name]), ref, rtol=1e-10, atol=1e-12, err_msg=name)


# ---------------------------------------------------------------------------------- MLP
@pytest.mark.parametrize("mode", ["propagate", "local"])
def test_mlp_matches_numpy(mode):
    model = _mlp()
    x, t = _mlp_data()
    plain = _grads(model, x, t)
    handle = grapes(model, mode=mode)
    assert handle.layers == ["0", "2"]  # the output layer "4" is left alone
    got = _grads(model, x, t)
    _check(got, _mlp_expected(model, x, t, mode))
    assert torch.equal(got["4.weight"], plain["4.weight"]) and torch.equal(got["4.bias"], plain["4.bias"])
    assert not torch.allclose(got["0.weight"], plain["0.weight"])
    for name, f in handle.factors().items():
        np.testing.assert_allclose(_np(f), np_factor(_np(model.get_submodule(name).weight)), rtol=1e-12)


def test_mlp_unclipped_matches_numpy():
    model = _mlp()
    x, t = _mlp_data()
    handle = grapes(model, clip=None)
    _check(_grads(model, x, t), _mlp_expected(model, x, t, "propagate", clip=None))
    assert min(float(f.min()) for f in handle.factors().values()) < 1.0  # (0, 2]: some shrink


def test_local_differs_from_propagate_below_the_top_hidden_layer():
    model = _mlp()
    x, t = _mlp_data()
    with grapes(model, mode="propagate"):
        prop = _grads(model, x, t)
    with grapes(model, mode="local"):
        loc = _grads(model, x, t)
    assert torch.allclose(prop["2.weight"], loc["2.weight"])  # same error at the top hidden layer
    assert not torch.allclose(prop["0.weight"], loc["0.weight"])  # compounded vs local


def test_module_called_twice_compounds():
    lin, out = nn.Linear(3, 3).double(), nn.Linear(3, 2).double()
    _spread_rows(lin, torch.Generator().manual_seed(3))
    model = nn.ModuleDict({"lin": lin, "out": out})
    x, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    handle = grapes(model)
    assert handle.layers == ["lin"]
    _loss(out(torch.tanh(lin(torch.tanh(lin(x))))), t).backward()
    w, b, wo = _np(lin.weight), _np(lin.bias), _np(out.weight)
    f = np_factor(w)
    h1 = np.tanh(_np(x) @ w.T + b)
    h2 = np.tanh(h1 @ w.T + b)
    d = _np(out(torch.tanh(lin(torch.tanh(lin(x)))))) - _np(t)
    d2 = (d @ wo) * (1 - h2**2) * f  # second use
    d1 = (d2 @ w) * (1 - h1**2) * f  # first use: both factors
    np.testing.assert_allclose(_np(lin.weight.grad), d2.T @ h1 + d1.T @ _np(x), rtol=1e-10)


# ---------------------------------------------------------------------------------- CNN
def _cnn() -> nn.Sequential:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(27, 4)).double()
    _spread_rows(model[0], torch.Generator().manual_seed(4))
    return model


def np_cnn(w, b, wl, bl, x, t, mode, clip=(1.0, 2.0)):
    """Hand-written conv2d (valid, stride 1) - relu - flatten - linear, forward and backward."""
    k = w.shape[2]
    patches = sliding_window_view(x, (k, k), axis=(2, 3))  # [N, C, H', W', k, k]
    z = np.einsum("ncyxij,ocij->noyx", patches, w) + b[None, :, None, None]
    h = np.maximum(z, 0.0)
    flat = h.reshape(h.shape[0], -1)
    d_out = flat @ wl.T + bl - t
    g = {"3.weight": d_out.T @ flat, "3.bias": d_out.sum(0)}
    d_z = (d_out @ wl).reshape(z.shape) * (z > 0)
    f = np_factor(w, clip)
    if mode == "propagate":
        d_z = d_z * f[None, :, None, None]
    g["0.weight"] = np.einsum("noyx,ncyxij->ocij", d_z, patches)
    g["0.bias"] = d_z.sum((0, 2, 3))
    if mode == "local":
        g["0.weight"] = g["0.weight"] * f[:, None, None, None]
        g["0.bias"] = g["0.bias"] * f
    gx = np.zeros_like(x)
    ho, wo = z.shape[2:]
    for i in range(k):
        for j in range(k):
            gx[:, :, i : i + ho, j : j + wo] += np.einsum("noyx,oc->ncyx", d_z, w[:, :, i, j])
    return g, gx


@pytest.mark.parametrize("mode", ["propagate", "local"])
def test_cnn_matches_numpy(mode):
    model = _cnn()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    handle = grapes(model, mode=mode)
    assert handle.layers == ["0"]
    got = _grads(model, x, t)  # the in-place ReLU right after the conv must not disturb the hook
    ref, ref_x = np_cnn(_np(model[0].weight), _np(model[0].bias), _np(model[3].weight), _np(model[3].bias),
                        _np(x), _np(t), mode)
    _check(got, ref)
    np.testing.assert_allclose(_np(x.grad), ref_x, rtol=1e-10, atol=1e-12)  # scaled only if propagate


@pytest.mark.parametrize("clip", [(1.0, 2.0), (0.5, 1.3)])
@pytest.mark.parametrize("mode", ["propagate", "local"])
@pytest.mark.parametrize("conv_type", [nn.Conv1d, nn.Conv3d])
def test_conv1d_conv3d_scale_per_channel(conv_type, mode, clip):
    gen = torch.Generator().manual_seed(6)
    conv = conv_type(2, 3, 2).double()
    spatial = conv.weight.dim() - 2
    _spread_rows(conv, gen)
    head = nn.Linear(3 * 2**spatial, 2).double()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), head)
    x = torch.randn(2, 2, *([3] * spatial), generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 2, generator=gen, dtype=torch.float64)
    with grapes(model, mode=mode, clip=clip):
        got = _grads(model, x, t)
    # the same network in torch.nn.functional on copies of the tensors, its error at the conv output
    # scaled by a factor computed in numpy (or, in local mode, its own gradients scaled afterwards)
    f = torch.from_numpy(np_factor(_np(conv.weight), clip))
    assert f.max() == clip[1] and not torch.all(f == clip[1])
    w, b, wh, bh, xr = (v.detach().clone().requires_grad_() for v in (conv.weight, conv.bias, head.weight,
                                                                     head.bias, x))
    z = getattr(torch.nn.functional, f"conv{spatial}d")(xr, w, b)
    loss = _loss(torch.nn.functional.linear(torch.tanh(z).flatten(1), wh, bh), t)
    d_z, gwh, gbh = torch.autograd.grad(loss, (z, wh, bh), retain_graph=True)
    per_channel = f.view(1, -1, *([1] * spatial))
    gx, gw, gb = torch.autograd.grad(z, (xr, w, b), d_z * per_channel if mode == "propagate" else d_z)
    if mode == "local":
        gw, gb = gw * f.view(-1, *([1] * (spatial + 1))), gb * f
    for name, ref in {"0.weight": gw, "0.bias": gb, "3.weight": gwh, "3.bias": gbh}.items():
        np.testing.assert_allclose(_np(got[name]), _np(ref), rtol=1e-10, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(_np(x.grad), _np(gx), rtol=1e-10, atol=1e-12)  # scaled only if propagate


# ---------------------------------------------------------------------------------- factors
def test_factors_are_per_row_not_whole_matrix():
    lin = nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 6).abs() + 0.1)
        lin.weight.mul_(torch.tensor([1.0, 0.7, 0.4, 0.1])[:, None])
    w = _np(lin.weight)
    for clip in [(1.0, 2.0), None]:
        f = _np(grapes_factors(lin.weight, clip))
        np.testing.assert_allclose(f, np_factor(w, clip), rtol=1e-6)
        assert len(np.unique(np.round(f, 6))) > 1 and not np.allclose(f, 2.0)
    raw = _np(grapes_factors(lin.weight, None))
    assert raw.max() == pytest.approx(2.0) and raw.min() < 0.5  # the biggest row gets exactly 2
    model = nn.Sequential(lin, nn.Linear(4, 1))
    handle = grapes(model, clip=None)
    np.testing.assert_allclose(_np(handle.factors()["0"]), np_factor(w, None), rtol=1e-6)


def test_zero_weights_give_uniform_factors():
    assert torch.equal(grapes_factors(torch.zeros(3, 4), None), torch.full((3,), 2.0))


# ---------------------------------------------------------------------------------- clip bounds
#: row importances I_n = sum |W[n, ...]| set by hand, and F = 2 I / max I written out
ROW_IMPORTANCE = {
    "0": [1.0, 0.7, 0.55, 0.3, 0.1],  # Linear(4, 5)
    "2": [0.9, 1.0, 0.2, 0.5, 0.62, 0.05],  # Linear(5, 6)
    "4": [1.0, 0.6, 0.2],  # Linear(6, 3)
    "conv": [0.4, 1.0, 0.75],  # Conv2d(2, 3, 2)
}
RAW = {"0": [2.0, 1.4, 1.1, 0.6, 0.2], "2": [1.8, 2.0, 0.4, 1.0, 1.24, 0.1], "4": [2.0, 1.2, 0.4],
       "conv": [0.8, 2.0, 1.5]}
CLIPS = [(0.5, 1.3), (1.0, 1.5), None, (1.0, 2.0)]
HAND_FACTORS = {  # RAW clipped by hand
    (0.5, 1.3): {"0": [1.3, 1.3, 1.1, 0.6, 0.5], "2": [1.3, 1.3, 0.5, 1.0, 1.24, 0.5], "4": [1.3, 1.2, 0.5],
                 "conv": [0.8, 1.3, 1.3]},
    (1.0, 1.5): {"0": [1.5, 1.4, 1.1, 1.0, 1.0], "2": [1.5, 1.5, 1.0, 1.0, 1.24, 1.0], "4": [1.5, 1.2, 1.0],
                 "conv": [1.0, 1.5, 1.5]},
    None: RAW,
    (1.0, 2.0): {"0": [2.0, 1.4, 1.1, 1.0, 1.0], "2": [1.8, 2.0, 1.0, 1.0, 1.24, 1.0], "4": [2.0, 1.2, 1.0],
                 "conv": [1.0, 2.0, 1.5]},
}


def _set_row_importance(module: nn.Module, importance: list[float], gen: torch.Generator) -> None:
    """Random signs and shapes, each row rescaled so that its sum of |w| is ``importance[n]``."""
    with torch.no_grad():
        w = torch.randn(module.weight.shape, generator=gen, dtype=torch.float64)
        w /= w.abs().flatten(1).sum(1).view(-1, *([1] * (w.dim() - 1)))
        module.weight.copy_(w * torch.tensor(importance, dtype=torch.float64).view(-1, *([1] * (w.dim() - 1))))


def _designed_mlp() -> nn.Sequential:
    model = _mlp()
    gen = torch.Generator().manual_seed(11)
    for i in (0, 2, 4):
        _set_row_importance(model[i], ROW_IMPORTANCE[str(i)], gen)
    return model


def _designed_conv() -> nn.Conv2d:
    conv = nn.Conv2d(2, 3, 2).double()
    _set_row_importance(conv, ROW_IMPORTANCE["conv"], torch.Generator().manual_seed(12))
    return conv


@pytest.mark.parametrize("clip", CLIPS)
def test_factors_under_clip_bounds_match_hand_values(clip):
    model, conv = _designed_mlp(), _designed_conv()
    layers = {"0": model[0], "2": model[2], "4": model[4], "conv": conv}
    for name, layer in layers.items():
        w = _np(layer.weight)
        np.testing.assert_allclose(np.abs(w).reshape(w.shape[0], -1).sum(1), ROW_IMPORTANCE[name], rtol=1e-12)
        got = _np(grapes_factors(layer.weight, clip))
        np.testing.assert_allclose(got, HAND_FACTORS[clip][name], rtol=1e-12, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(got, np_factor(w, clip), rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(_np(grapes_factors(layer.weight.float(), clip)), HAND_FACTORS[clip][name],
                                   rtol=1e-6, err_msg=name)
    if clip is not None:  # the hand values hit both bounds and the inside, so both bounds matter
        values = np.concatenate([HAND_FACTORS[clip][n] for n in layers])
        assert values.max() == clip[1] and values.min() == clip[0]
        assert np.any((values > clip[0]) & (values < clip[1]))


def test_clip_with_infinite_upper_bound_keeps_the_top():
    conv = _designed_conv()
    np.testing.assert_allclose(_np(grapes_factors(conv.weight, (0.9, float("inf")))), [0.9, 2.0, 1.5], rtol=1e-12)


@pytest.mark.parametrize("modulated", [("0", "2"), ("0", "2", "4")])
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("mode", ["propagate", "local"])
def test_mlp_gradients_under_clip_bounds(mode, clip, modulated):
    """Every parameter's gradient and the input's against numpy, with the hand-clipped factors."""
    model = _designed_mlp()
    x, t = _mlp_data()
    x.requires_grad_(True)
    handle = grapes(model, mode=mode, clip=clip, exclude=() if "4" in modulated else ("output layer",))
    assert handle.layers == list(modulated)
    got = _grads(model, x, t)
    ws, bs = [_np(model[i].weight) for i in (0, 2, 4)], [_np(model[i].bias) for i in (0, 2, 4)]
    factors = {int(n) // 2: np.array(HAND_FACTORS[clip][n]) for n in modulated}
    gw, gb, gx = np_mlp_backward(ws, bs, _np(x), _np(t), mode, factors)
    for k, i in enumerate((0, 2, 4)):
        np.testing.assert_allclose(_np(got[f"{i}.weight"]), gw[k], rtol=1e-10, atol=1e-12, err_msg=f"{i}.weight")
        np.testing.assert_allclose(_np(got[f"{i}.bias"]), gb[k], rtol=1e-10, atol=1e-12, err_msg=f"{i}.bias")
    np.testing.assert_allclose(_np(x.grad), gx, rtol=1e-10, atol=1e-12)
    for name, f in handle.factors().items():  # the factors the backward used
        np.testing.assert_allclose(_np(f), HAND_FACTORS[clip][name], rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("mode", ["propagate", "local"])
def test_cnn_gradients_under_clip_bounds(mode, clip):
    model = _cnn()
    _set_row_importance(model[0], ROW_IMPORTANCE["conv"], torch.Generator().manual_seed(13))
    np.testing.assert_allclose(np_factor(_np(model[0].weight), clip), HAND_FACTORS[clip]["conv"], rtol=1e-12)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    with grapes(model, mode=mode, clip=clip):
        got = _grads(model, x, t)
    ref, ref_x = np_cnn(_np(model[0].weight), _np(model[0].bias), _np(model[3].weight), _np(model[3].bias),
                        _np(x), _np(t), mode, clip)
    _check(got, ref)
    np.testing.assert_allclose(_np(x.grad), ref_x, rtol=1e-10, atol=1e-12)


def test_propagate_compounds_factors_towards_the_input_by_hand():
    """y = W3 W2 W1 x with diagonal weights and loss sum(y): every number below is worked out by hand.

    W1 = diag(2, 1), W2 = diag(0.5, 1), W3 = diag(1, 0.75) give F1 = (2, 1), F2 = (1, 2), F3 = (2, 1.5)
    (all inside the default clip). Plain errors: d3 = (1, 1), d2 = (1, 0.75), d1 = (0.5, 0.75).
    Propagate: d3 = F3 = (2, 1.5), d2 = (d3 W3) F2 = (2, 2.25), d1 = (d2 W2) F1 = (2, 2.25): the first
    layer's error carries F1 F2 F3 = (4, 3) times the plain one. Local: each layer's gradient times its
    own F only; the input gradient stays plain."""
    def make() -> nn.Sequential:
        model = nn.Sequential(*(nn.Linear(2, 2, bias=False) for _ in range(3))).double()
        with torch.no_grad():
            for layer, diag in zip(model, ([2.0, 1.0], [0.5, 1.0], [1.0, 0.75]), strict=True):
                layer.weight.copy_(torch.diag(torch.tensor(diag, dtype=torch.float64)))
        return model

    ones = [1.0, 1.0]
    expected = {  # h0 = x = (1, 1), h1 = W1 x = (2, 1), h2 = W2 h1 = (1, 1); grad W = outer(d, h)
        None: ({"0.weight": [[0.5, 0.5], [0.75, 0.75]], "1.weight": [[2.0, 1.0], [1.5, 0.75]],
                "2.weight": [ones, ones]}, [1.0, 0.75]),
        "propagate": ({"0.weight": [[2.0, 2.0], [2.25, 2.25]], "1.weight": [[4.0, 2.0], [4.5, 2.25]],
                       "2.weight": [[2.0, 2.0], [1.5, 1.5]]}, [4.0, 2.25]),
        "local": ({"0.weight": [[1.0, 1.0], [0.75, 0.75]], "1.weight": [[2.0, 1.0], [3.0, 1.5]],
                   "2.weight": [[2.0, 2.0], [1.5, 1.5]]}, [1.0, 0.75]),
    }
    for mode, (grads, grad_x) in expected.items():
        model = make()
        handle = grapes(model, mode=mode, exclude=()) if mode else None
        x = torch.ones(1, 2, dtype=torch.float64, requires_grad=True)
        model(x).sum().backward()
        for name, p in model.named_parameters():
            np.testing.assert_allclose(_np(p.grad), grads[name], rtol=1e-12, err_msg=f"{mode} {name}")
        np.testing.assert_allclose(_np(x.grad), [grad_x], rtol=1e-12, err_msg=str(mode))
        if handle is not None:
            assert [_np(f).tolist() for f in handle.factors().values()] == [[2.0, 1.0], [1.0, 2.0], [2.0, 1.5]]
            handle.remove()


# ---------------------------------------------------------------------------------- switches
@pytest.mark.parametrize("mode", ["propagate", "local"])
def test_remove_restores_plain_gradients_exactly(mode):
    model = _mlp()
    x, t = _mlp_data()
    plain = _grads(model, x, t)
    handle = grapes(model, mode=mode)
    modulated = _grads(model, x, t)
    assert not torch.equal(modulated["0.weight"], plain["0.weight"])
    pending = _loss(model(x), t)  # a graph built before remove() runs unmodulated
    handle.remove()
    model.zero_grad(set_to_none=True)
    pending.backward()
    assert all(torch.equal(p.grad, plain[n]) for n, p in model.named_parameters())
    after = _grads(model, x, t)
    assert all(torch.equal(after[n], plain[n]) for n in plain)
    assert all(not m._forward_hooks for m in model.modules())
    assert all(not p._backward_hooks for p in model.parameters())
    grapes(model, mode=mode).remove()  # attachable again once removed


@pytest.mark.parametrize("mode", ["propagate", "local"])
def test_remove_gives_the_gradients_of_a_model_that_never_had_grapes(mode):
    model = _designed_mlp()
    twin = copy.deepcopy(model)  # never sees a handle
    x, t = _mlp_data()
    handle = grapes(model, mode=mode, clip=(0.5, 1.3), exclude=())
    ws, bs = [_np(model[i].weight) for i in (0, 2, 4)], [_np(model[i].bias) for i in (0, 2, 4)]
    factors = {k: np.array(HAND_FACTORS[(0.5, 1.3)][str(2 * k)]) for k in range(3)}
    gw, _, _ = np_mlp_backward(ws, bs, _np(x), _np(t), mode, factors)
    for _ in range(2):  # modulated twice, so that every hook has fired and every memo is set
        np.testing.assert_allclose(_np(_grads(model, x, t)["0.weight"]), gw[0], rtol=1e-10)
    handle.remove()
    assert handle.removed
    xm, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, ref = _grads(model, xm, t), _grads(twin, xt, t)
    assert got.keys() == ref.keys() == {f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    assert all(torch.equal(got[n], ref[n]) for n in ref)
    assert torch.equal(xm.grad, xt.grad)
    gw, gb, gx = np_mlp_backward(ws, bs, _np(x), _np(t), mode, {})  # the plain gradients, in numpy
    for k, i in enumerate((0, 2, 4)):
        np.testing.assert_allclose(_np(got[f"{i}.weight"]), gw[k], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(_np(got[f"{i}.bias"]), gb[k], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_np(xm.grad), gx, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["propagate", "local"])
def test_remove_on_a_perforated_model_with_dendrites(mode):
    """Local mode hooks the dendrite tensors too; after remove() none of them is scaled, also for a set
    installed after the removal."""
    model = _mlp()
    apical.perforate(model, apical.DendriteConfig(mode="pb"))
    for i in (0, 2, 4):
        model[i].install_random(1.0, torch.Generator().manual_seed(i))
        with torch.no_grad():
            model[i].dendrite_out.normal_(generator=torch.Generator().manual_seed(10 + i))
    twin = copy.deepcopy(model)
    x, t = _mlp_data()
    plain = _grads(twin, x, t)
    handle = grapes(model, mode=mode, exclude=())
    modulated = _grads(model, x, t)
    f = np_factor(_np(model[4].base.weight))  # the top layer: the same scaling in both modes
    np.testing.assert_allclose(_np(modulated["4.dendrite_out"]), _np(plain["4.dendrite_out"]) * f, rtol=1e-10)
    handle.remove()
    got = _grads(model, x, t)
    assert got.keys() == plain.keys() and all(torch.equal(got[n], plain[n]) for n in plain)
    for m in (model, twin):
        m[0].install_random(1.0, torch.Generator().manual_seed(20))
        with torch.no_grad():
            m[0].dendrite_out.fill_(0.5)
    got, ref = _grads(model, x, t), _grads(twin, x, t)
    assert got.keys() == ref.keys() and all(torch.equal(got[n], ref[n]) for n in ref)
    assert all(not p._backward_hooks for p in model.parameters())


def test_pause_and_enabled():
    model = _mlp()
    x, t = _mlp_data()
    plain = _grads(model, x, t)
    handle = grapes(model)
    with handle.pause():
        assert all(torch.equal(g, plain[n]) for n, g in _grads(model, x, t).items())
    assert handle.enabled
    handle.enabled = False
    assert all(torch.equal(g, plain[n]) for n, g in _grads(model, x, t).items())
    handle.enabled = True
    assert not torch.equal(_grads(model, x, t)["0.weight"], plain["0.weight"])


def test_selection_by_name_regex_and_type():
    model = _mlp()
    for kwargs, names in [({"layers": ["2"]}, ["2"]), ({"exclude": [r"[24]"]}, ["0"]),
                          ({"exclude": ()}, ["0", "2", "4"])]:
        handle = grapes(model, **kwargs)
        assert handle.layers == names
        handle.remove()
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Conv1d(1, 1, 1))
    assert grapes(mixed, layers=[nn.Conv1d], exclude=()).layers == ["1"]


def test_bad_arguments_raise():
    model = _mlp()
    for kwargs in [{"mode": "forward"}, {"clip": (0.0, 2.0)}, {"clip": (-1.0, 2.0)}, {"clip": (2.0, 1.0)},
                   {"clip": 2.0}, {"importance": "outgoing"}, {"layers": ["nope"]}, {"exclude": ["nope"]},
                   {"layers": "0"}, {"layers": ["4"]}]:
        with pytest.raises(ValueError):
            grapes(model, **kwargs)
    with pytest.raises(ValueError, match="matches no"):
        grapes(model, layers=["1"])  # a Tanh: not a modulable layer
    grapes(model)
    with pytest.raises(ValueError, match="already"):
        grapes(model)


# ---------------------------------------------------------------------------------- apical
def test_perforated_neuron_phase_matches_numpy():
    model = _mlp()
    x, t = _mlp_data()
    apical.perforate(model, apical.DendriteConfig(mode="pb"))
    handle = grapes(model, layers=["0.base", "2", "4"])  # ".base" names mean the dendritic layer
    assert handle.layers == ["0", "2"]
    got = _grads(model, x, t)
    _check(got, _mlp_expected(model, x, t, "propagate", prefix=".base"))


@pytest.mark.parametrize("mode", ["propagate", "local"])
def test_perforated_with_dendrites_scales_base_and_v(mode):
    model = _mlp()
    x, t = _mlp_data()
    apical.perforate(model, apical.DendriteConfig(mode="pb"))
    for i in (0, 2, 4):
        model[i].install_random(1.0)
        with torch.no_grad():
            model[i].dendrite_out.normal_()  # v != 0: the dendrites shape the output
    plain = _grads(model, x, t)
    handle = grapes(model, mode=mode)
    got = _grads(model, x, t)
    factors = handle.factors()
    checked = ("2",) if mode == "propagate" else ("0", "2")  # propagate compounds below "2"
    for name in checked:
        f = np_factor(_np(model.get_submodule(name).base.weight))  # from the base weight only: v ignored
        np.testing.assert_allclose(_np(factors[name]), f)
        np.testing.assert_allclose(_np(got[f"{name}.base.weight"]), _np(plain[f"{name}.base.weight"]) * f[:, None],
                                   rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(_np(got[f"{name}.base.bias"]), _np(plain[f"{name}.base.bias"]) * f,
                                   rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(_np(got[f"{name}.dendrite_out"]), _np(plain[f"{name}.dendrite_out"]) * f,
                                   rtol=1e-10, atol=1e-12)
    assert torch.equal(got["4.dendrite_out"], plain["4.dendrite_out"])


def _dendrite_phase_model() -> nn.Sequential:
    model = _mlp()
    apical.perforate(model, apical.DendriteConfig(mode="pb"))
    gen = torch.Generator().manual_seed(7)
    for _, layer in apical.dendritic_layers(model):
        layer.add_candidates(2, 1.0, generator=gen)
        layer.set_training_mode("dendrite", True)
        layer.base.requires_grad_(False)
    return model


def _candidate_grads(model, x, t):
    for _, layer in apical.dendritic_layers(model):
        layer.stats.reset()
    return _grads(model, x, t)


@pytest.mark.parametrize("mode", ["propagate", "local"])
def test_dendrite_phase_leaves_candidates_alone(mode):
    model = _dendrite_phase_model()
    x, t = _mlp_data()
    plain = _candidate_grads(model, x, t)
    assert plain and all("candidate" in n for n in plain)
    handle = grapes(model, mode=mode)
    got = _candidate_grads(model, x, t)
    assert got.keys() == plain.keys() and all(torch.equal(got[n], plain[n]) for n in plain)
    handle.remove()
    if mode == "propagate":  # asked for: the compounded factor of "2" reshapes the error at "0"
        grapes(model, during_dendrite_phase=True)
        asked = _candidate_grads(model, x, t)
        assert not torch.allclose(asked["0.candidate_weight"], plain["0.candidate_weight"])
        # a layer's own (constant, per-neuron) factor cancels in the normalised covariance
        _close(asked["2.candidate_weight"], plain["2.candidate_weight"])


def test_dendrite_phase_is_model_wide():
    """A plain layer above a dendritic one must not reshape the error its candidates see."""
    model = _mlp()
    apical.perforate(model, apical.DendriteConfig(mode="pb", include=["0"]))
    layer = model[0]
    layer.add_candidates(2, 1.0, generator=torch.Generator().manual_seed(8))
    layer.set_training_mode("dendrite", True)
    x, t = _mlp_data()
    plain = _candidate_grads(model, x, t)
    handle = grapes(model)
    assert handle.layers == ["0", "2"]
    got = _candidate_grads(model, x, t)
    assert torch.equal(got["0.candidate_weight"], plain["0.candidate_weight"])
    assert torch.equal(got["2.weight"], plain["2.weight"])  # plain "2" unmodulated during the phase


def test_parametrized_weight():
    """weight_norm: F comes from the effective weight g v / |v|, and the modulated error reaches g and v
    through the parametrisation (all checked against numpy)."""
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.Tanh(),
                          nn.Linear(4, 1)).double()
    with pytest.raises(ValueError, match="propagate"):
        grapes(model, mode="local")
    par = model[0].parametrizations.weight
    with torch.no_grad():
        par.original0.copy_(torch.tensor([[1.5], [-0.4], [1.0], [0.2]], dtype=torch.float64))  # g: one per row
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    t = torch.randn(5, 1, generator=gen, dtype=torch.float64)
    g, v, b = _np(par.original0), _np(par.original1), _np(model[0].bias)
    wo, bo = _np(model[2].weight), _np(model[2].bias)
    norm = np.sqrt((v**2).sum(1, keepdims=True))
    w = g * v / norm  # the effective weight
    f = np_factor(w)
    assert not np.allclose(f, np_factor(v)) and len(np.unique(np.round(f, 6))) > 1
    with grapes(model) as handle:
        got = _grads(model, x, t)
        np.testing.assert_allclose(_np(handle.factors()["0"]), f, rtol=1e-12)
    h = np.tanh(_np(x) @ w.T + b)
    d_y = h @ wo.T + bo - _np(t)
    d_z = (d_y @ wo) * (1 - h**2) * f
    gw = d_z.T @ _np(x)
    u = v / norm
    gg = (gw * u).sum(1, keepdims=True)
    expected = {
        "0.bias": d_z.sum(0),
        "0.parametrizations.weight.original0": gg,
        "0.parametrizations.weight.original1": g / norm * (gw - gg * u),
        "2.weight": d_y.T @ h,
        "2.bias": d_y.sum(0),
    }
    assert got.keys() == expected.keys()
    _check(got, expected)


# ---------------------------------------------------------------------------------- error messages
def test_error_messages_name_what_is_wrong():
    model = _mlp()
    cases = [
        ({"mode": "forward"}, r"^mode must be one of \('propagate', 'local'\), got 'forward'$"),
        ({"importance": "outgoing"}, r"^importance must be one of \('incoming',\), got 'outgoing'$"),
        ({"clip": 2.0}, r"^clip must be None or a pair \(lo, hi\) of numbers, got 2\.0$"),
        ({"clip": (1.0, 2.0, 3.0)}, r"^clip must be None or a pair \(lo, hi\) of numbers, got \(1\.0, 2\.0, 3\.0\)$"),
        ({"clip": (0.0, 2.0)}, r"^clip: lo must be a finite number > 0, got 0\.0$"),
        ({"clip": (float("inf"), float("inf"))}, r"^clip: lo must be a finite number > 0, got inf$"),
        ({"clip": (2.0, 1.5)}, r"^clip: need lo <= hi, got \(2\.0, 1\.5\)$"),
        ({"clip": (1.0, float("nan"))}, r"^clip: need lo <= hi, got \(1\.0, nan\)$"),
        ({"layers": "0"}, r"^layers must be a sequence of names/regexes/types, e\.g\. \['0'\]$"),
        ({"exclude": nn.Linear}, r"^exclude must be a sequence of names/regexes/types, e\.g\. \[<class "),
        ({"layers": [3]}, r"^layers: 3 is neither a name, a regex nor a module type$"),
        ({"exclude": [None]}, r"^exclude: None is neither a name, a regex nor a module type$"),
        ({"layers": ["nope"]}, r"^layers: 'nope' matches no Linear/Conv/recurrent/dendritic layer of the model; "
                               r"its layers are \['0', '2', '4'\]$"),
        ({"exclude": ["1"]}, r"^exclude: '1' matches no Linear/Conv/recurrent/dendritic layer"),
        ({"layers": ["2"], "exclude": ["2"]},
         r"^nothing left to modulate after layers=\['2'\], exclude=\['2'\] \(layers: \['0', '2', '4'\]\)$"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            grapes(model, **kwargs)
    with pytest.raises(TypeError, match=r"^grapes expects an nn\.Module, got int$"):
        grapes(3)
    with pytest.raises(TypeError, match=r"^grapes expects an nn\.Module, got Tensor$"):
        grapes(torch.zeros(2, 2))
    no_layer = r"^the model has no nn\.Linear / nn\.Conv1d/2d/3d / recurrent / dendritic layer to modulate$"
    with pytest.raises(ValueError, match=no_layer):
        grapes(nn.Sequential(nn.Tanh(), nn.ReLU()))
    parametrized = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"^layer '0': its weight is computed on access .*"
                                         r"mode='local' cannot hook its gradient; use mode='propagate'$"):
        grapes(parametrized, mode="local")


def test_error_messages_list_only_the_first_eight_layers():
    model = nn.Sequential(*(nn.Linear(2, 2) for _ in range(10)))
    first_eight = re.escape(str([str(i) for i in range(8)]))  # "['0', ..., '7']": "8" and "9" left out
    with pytest.raises(ValueError, match=rf"its layers are {first_eight}$"):
        grapes(model, layers=["nope"])
    with pytest.raises(ValueError, match=rf"\(layers: {first_eight}\)$"):
        grapes(model, layers=["3"], exclude=["3"])


def test_equal_clip_bounds_give_a_constant_factor():
    """lo == hi is allowed (lo <= hi): every neuron's error is scaled by that one number."""
    model = _designed_mlp()
    x, t = _mlp_data()
    handle = grapes(model, clip=(1.5, 1.5))
    assert handle.clip == (1.5, 1.5)
    got = _grads(model, x, t)
    ws, bs = [_np(model[i].weight) for i in (0, 2, 4)], [_np(model[i].bias) for i in (0, 2, 4)]
    gw, gb, _ = np_mlp_backward(ws, bs, _np(x), _np(t), "propagate", {0: np.full(5, 1.5), 1: np.full(6, 1.5)})
    np.testing.assert_allclose(_np(got["0.weight"]), gw[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_np(got["2.bias"]), gb[1], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------- handle state
def test_handle_attributes_and_repr():
    model = _mlp()
    handle = grapes(model)
    assert handle.importance == "incoming" and handle.mode == "propagate" and handle.clip == (1.0, 2.0)
    assert handle.removed is False
    assert repr(handle) == "GrapesHandle(mode='propagate', clip=(1.0, 2.0), layers=['0', '2'], enabled)"
    with handle.pause():
        assert repr(handle) == "GrapesHandle(mode='propagate', clip=(1.0, 2.0), layers=['0', '2'], paused)"
        handle.remove()
        assert repr(handle) == "GrapesHandle(mode='propagate', clip=(1.0, 2.0), layers=['0', '2'], removed)"
    assert handle.removed is True
    assert repr(handle).endswith(", removed)")  # still removed once the pause is over
    local = grapes(model, mode="local", clip=None, exclude=["0"])
    assert repr(local) == "GrapesHandle(mode='local', clip=None, layers=['2', '4'], enabled)"
    local.enabled = False
    assert repr(local).endswith("layers=['2', '4'], paused)")


def test_factors_are_those_of_the_latest_backward_not_of_the_current_weights():
    model = _designed_mlp()
    x, t = _mlp_data()
    handle = grapes(model, clip=None)
    _grads(model, x, t)
    with torch.no_grad():  # e.g. an optimiser step after the backward
        model[0].weight.mul_(torch.tensor([0.1, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)[:, None])
    assert handle.factors()["0"].tolist() == pytest.approx(RAW["0"], rel=1e-12)  # as used, hand values
    _grads(model, x, t)  # the next backward recomputes them from the new weights: I = (0.1, 0.7, ...)
    assert handle.factors()["0"].tolist() == pytest.approx([0.2 / 0.7, 2.0, 1.1 / 0.7, 0.6 / 0.7, 0.2 / 0.7],
                                                           rel=1e-12)


# ---------------------------------------------------------------------------------- which layers
def test_layers_inside_multihead_attention_are_left_alone():
    """MultiheadAttention reads out_proj.weight directly (out_proj's forward never runs): not a target."""
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(4, 2), "head": nn.Linear(4, 2)})
    assert grapes(model, exclude=()).layers == ["head"]
    with pytest.raises(ValueError, match=r"matches no Linear/Conv/recurrent/dendritic layer of the model; "
                                         r"its layers are \['head'\]$"):
        grapes(model, layers=["attn.out_proj"])
    # perforated, the attention holds dendritic layers (its projections): still read directly, still left alone
    apical.perforate(model, apical.DendriteConfig(mode="gd"))
    assert {"attn.out_proj", "attn.q_proj"} <= {n for n, _ in apical.dendritic_layers(model)}
    assert grapes(model, exclude=()).layers == ["head"]


def test_a_base_type_or_name_selects_its_dendritic_layer():
    model = _mlp()
    apical.perforate(model, apical.DendriteConfig(mode="pb", include=["0"]))  # "0" dendritic, "2", "4" plain
    handle = grapes(model, layers=[nn.Linear], exclude=())  # the type of "0.base"
    assert handle.layers == ["0", "2", "4"]
    handle.remove()
    layer = apical.DendriticLinear(nn.Linear(3, 2))  # the model is the layer itself: named "", base "base"
    handle = grapes(layer, layers=["base"], exclude=())
    assert handle.layers == [""]
    handle.remove()
    assert grapes(layer, layers=[r"ba.e"], exclude=()).layers == [""]


# ---------------------------------------------------------------------------------- factors
def test_factors_of_a_one_dimensional_weight_are_per_entry():
    w = torch.tensor([1.0, -3.0, 0.5, 2.0])
    np.testing.assert_allclose(_np(grapes_factors(w, None)), [2 / 3, 2.0, 1 / 3, 4 / 3], rtol=1e-6)
    np.testing.assert_allclose(_np(grapes_factors(w)), [1.0, 2.0, 1.0, 4 / 3], rtol=1e-6)
    half = grapes_factors(w.half(), None)
    assert half.dtype == torch.float32 and half.shape == (4,)
    np.testing.assert_allclose(_np(half), [2 / 3, 2.0, 1 / 3, 4 / 3], rtol=1e-6)


def test_half_precision_importance_is_summed_in_float32():
    """Row sums of 120000 and 60000 overflow float16 (max 65504): they are summed in float32."""
    w = torch.tensor([[30000.0] * 4, [-15000.0] * 4], dtype=torch.float16)
    f = grapes_factors(w, None)
    assert f.dtype == torch.float32
    assert f.tolist() == [2.0, 1.0]
    assert grapes_factors(w.bfloat16(), (1.2, 1.8)).tolist() == pytest.approx([1.8, 1.2], rel=1e-6)


# ---------------------------------------------------------------------------------- hooks
@pytest.mark.parametrize("mode", ["propagate", "local"])
def test_forward_without_autograd_and_with_frozen_weights(mode):
    model = _mlp()
    x, _ = _mlp_data()
    ws, bs = [_np(model[i].weight) for i in (0, 2, 4)], [_np(model[i].bias) for i in (0, 2, 4)]
    h = _np(x)
    for i in range(3):
        h = h @ ws[i].T + bs[i]
        h = np.tanh(h) if i < 2 else h
    grapes(model, mode=mode)
    with torch.no_grad():  # inference: nothing to hook
        np.testing.assert_allclose(_np(model(x)), h, rtol=1e-12)
    model.requires_grad_(False)  # a frozen model under autograd: its outputs need no gradient
    out = model(x)
    assert not out.requires_grad
    np.testing.assert_allclose(_np(out), h, rtol=1e-12)


def _two_layer_low_precision(dtype: torch.dtype) -> nn.Sequential:
    """W0 = diag(2, 1) gives F = (2, 1); W1 = [[1, 1]]. Every gradient below is exact in bfloat16."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)).to(dtype)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        model[1].weight.fill_(1.0)
    return model


@pytest.mark.parametrize("mode", ["propagate", "local"])
def test_bfloat16_gradients_keep_their_dtype(mode):
    model = _two_layer_low_precision(torch.bfloat16)
    handle = grapes(model, mode=mode)
    assert handle.layers == ["0"]
    x = torch.ones(1, 2, dtype=torch.bfloat16, requires_grad=True)
    model(x).sum().backward()
    # plain error at the output of "0": (1, 1); scaled by F = (2, 1) for its own gradient in both modes
    assert model[0].weight.grad.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert model[0].weight.grad.tolist() == [[2.0, 2.0], [1.0, 1.0]]
    assert model[1].weight.grad.tolist() == [[2.0, 1.0]]  # the output layer, h = W0 x = (2, 1)
    assert x.grad.tolist() == ([[4.0, 1.0]] if mode == "propagate" else [[2.0, 1.0]])  # d W0


def test_local_mode_scales_a_gradient_taken_before_any_forward():
    """The parameter hooks are live from attach time, e.g. for a penalty on the weights alone."""
    model = _designed_mlp()
    handle = grapes(model, mode="local", clip=(0.5, 1.3))
    assert handle.layers == ["0", "2"]
    (model[0].weight.sum() + model[2].bias.sum()).backward()
    np.testing.assert_allclose(_np(model[0].weight.grad), np.tile(np.array(HAND_FACTORS[(0.5, 1.3)]["0"])[:, None],
                                                                  (1, 4)), rtol=1e-12)
    np.testing.assert_allclose(_np(model[2].bias.grad), HAND_FACTORS[(0.5, 1.3)]["2"], rtol=1e-12)


def test_local_mode_with_a_frozen_weight_still_scales_the_bias():
    model = _designed_mlp()
    model[0].weight.requires_grad_(False)
    x, t = _mlp_data()
    grapes(model, mode="local", clip=(1.0, 1.5))
    got = _grads(model, x, t)
    assert "0.weight" not in got
    ws, bs = [_np(model[i].weight) for i in (0, 2, 4)], [_np(model[i].bias) for i in (0, 2, 4)]
    factors = {k: np.array(HAND_FACTORS[(1.0, 1.5)][n]) for k, n in ((0, "0"), (1, "2"))}
    gw, gb, _ = np_mlp_backward(ws, bs, _np(x), _np(t), "local", factors)
    np.testing.assert_allclose(_np(got["0.bias"]), gb[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_np(got["2.weight"]), gw[1], rtol=1e-10, atol=1e-12)


def test_local_mode_on_a_linear_without_a_bias_attribute():
    class TiedHead(nn.Linear):  # shares an embedding's weight; never calls nn.Linear.__init__
        def __init__(self, weight: nn.Parameter) -> None:
            nn.Module.__init__(self)
            self.weight = weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight.T

    w = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)  # I = (2, 1, 1): F = (2, 1, 1)
    model = nn.Sequential(TiedHead(nn.Parameter(w.clone())), nn.Linear(3, 1, bias=False).double())
    handle = grapes(model, mode="local")
    assert handle.layers == ["0"]
    model(torch.ones(1, 2, dtype=torch.float64)).sum().backward()
    wo = _np(model[1].weight)
    np.testing.assert_allclose(_np(model[0].weight.grad), np.array([[2.0], [1.0], [1.0]]) * wo.T * [[1.0, 1.0]],
                               rtol=1e-12)


def test_a_user_hook_registered_after_attach_sees_the_modulated_gradient():
    """GRAPES' parameter hook is registered once: a later user hook runs after it at every step."""
    model = _designed_mlp()
    x, t = _mlp_data()
    grapes(model, mode="local", clip=None)
    seen = []
    model[0].weight.register_hook(lambda g: seen.append(g.clone()))
    ws, bs = [_np(model[i].weight) for i in (0, 2, 4)], [_np(model[i].bias) for i in (0, 2, 4)]
    factors = {k: np.array(RAW[n]) for k, n in ((0, "0"), (1, "2"))}
    gw, _, _ = np_mlp_backward(ws, bs, _np(x), _np(t), "local", factors)
    for _ in range(2):
        _grads(model, x, t)
    assert len(seen) == 2
    for g in seen:
        np.testing.assert_allclose(_np(g), gw[0], rtol=1e-10, atol=1e-12)


def test_local_mode_hooks_dendrite_sets_installed_while_attached():
    """Installing a set replaces the layer's dendrite Parameters: the next forward hooks the new ones
    (and unhooks the old), so their gradients are scaled exactly once by the layer's own F."""
    model = _designed_mlp()
    apical.perforate(model, apical.DendriteConfig(mode="pb"))
    twin = copy.deepcopy(model)
    x, t = _mlp_data()
    handle = grapes(model, mode="local", clip=(0.5, 1.3), exclude=())
    _grads(model, x, t)
    replaced = []
    for round_ in range(2):  # the first set replaces a frozen empty v, the second a hooked one
        replaced += [model[i].dendrite_out for i in (0, 2, 4)]
        for m in (model, twin):
            for i in (0, 2, 4):
                m[i].install_random(1.0, torch.Generator().manual_seed(30 + i + 10 * round_))
                with torch.no_grad():
                    m[i].dendrite_out.normal_(generator=torch.Generator().manual_seed(50 + i + 10 * round_))
        for _ in range(2):
            got, plain = _grads(model, x, t), _grads(twin, x, t)
            for i in (0, 2, 4):
                f = np.array(HAND_FACTORS[(0.5, 1.3)][str(i)])
                np.testing.assert_allclose(_np(got[f"{i}.dendrite_out"]), _np(plain[f"{i}.dendrite_out"]) * f,
                                           rtol=1e-10, atol=1e-12)
                np.testing.assert_allclose(_np(got[f"{i}.base.weight"]),
                                           _np(plain[f"{i}.base.weight"]) * f[:, None], rtol=1e-10, atol=1e-12)
    assert model[0].num_dendrites == 2
    assert all(not p._backward_hooks for p in replaced)
    handle.remove()
    assert all(not p._backward_hooks for p in model.parameters())


def test_a_single_candidate_is_a_dendrite_phase_too():
    model = _mlp()
    apical.perforate(model, apical.DendriteConfig(mode="pb"))
    for _, layer in apical.dendritic_layers(model):
        layer.add_candidates(1, 1.0, generator=torch.Generator().manual_seed(7))
        layer.set_training_mode("dendrite", True)
        layer.base.requires_grad_(False)
    x, t = _mlp_data()
    plain = _candidate_grads(model, x, t)
    grapes(model)
    got = _candidate_grads(model, x, t)
    assert got.keys() == plain.keys() and all(torch.equal(got[n], plain[n]) for n in plain)


def test_a_user_forward_hook_is_not_taken_for_a_grapes_handle():
    model = _mlp()
    x, t = _mlp_data()
    seen = []
    model[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))  # e.g. logging activations
    handle = grapes(model, clip=None)
    assert handle.layers == ["0", "2"]
    _check(_grads(model, x, t), _mlp_expected(model, x, t, "propagate", clip=None))
    assert seen == [(7, 5)]


def test_grapes_on_a_spiking_network_modulates_every_time_step():
    """snntorch layers are nn.Linear plus neuron modules; GRAPES (propagate) scales the error at fc1's
    output at every time step, so fc1's gradients are the plain ones times F per neuron."""
    snn = pytest.importorskip("snntorch")
    from snntorch import surrogate

    from apical.grapes import grapes, grapes_factors

    class SNN(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 3)
            self.lif1 = snn.Leaky(beta=0.9, spike_grad=surrogate.fast_sigmoid())
            self.lif2 = snn.Leaky(beta=0.9, spike_grad=surrogate.fast_sigmoid())

        def forward(self, x):  # x: [T, N, 6]
            m1, m2 = self.lif1.reset_mem(), self.lif2.reset_mem()
            counts = 0
            for t in range(x.shape[0]):
                s1, m1 = self.lif1(self.fc1(x[t]), m1)
                s2, m2 = self.lif2(self.fc2(s1), m2)
                counts = counts + s2 + m2  # spikes and membranes: a loss with a gradient at every step
            return counts

    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(10, 5, 6, generator=g) * 2, torch.tensor([0, 1, 2, 0, 1])
    plain, modulated = SNN(), SNN()
    nn.functional.cross_entropy(plain(x), y).backward()
    handle = grapes(modulated)  # the output layer fc2 is left out by default
    nn.functional.cross_entropy(modulated(x), y).backward()
    assert handle.layers == ["fc1"]
    factor = grapes_factors(plain.fc1.weight)
    assert factor.max() > 1.0  # a real modulation
    torch.testing.assert_close(modulated.fc1.weight.grad, factor[:, None] * plain.fc1.weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(modulated.fc1.bias.grad, factor * plain.fc1.bias.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(modulated.fc2.weight.grad, plain.fc2.weight.grad)


def test_propagate_on_a_dendritic_conv_scales_its_channels():
    """A perforated Conv2d (output [N, C, H, W] with W != C): the factor multiplies axis 1, so the
    wrapped conv's gradients are the plain ones times F per output channel."""
    from apical.grapes import grapes, grapes_factors

    def build():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 6, 3))
        apical.perforate(net, apical.DendriteConfig(mode="pb", seed=0))
        return net

    x, y = torch.randn(3, 2, 5, 6), torch.tensor([0, 1, 2])
    plain, modulated = build(), build()
    nn.functional.cross_entropy(plain(x), y).backward()
    handle = grapes(modulated)
    nn.functional.cross_entropy(modulated(x), y).backward()
    assert handle.layers == ["0"]
    factor = grapes_factors(plain[0].base.weight)
    assert factor.max() > 1.0
    torch.testing.assert_close(modulated[0].base.weight.grad, factor[:, None, None, None] * plain[0].base.weight.grad,
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(modulated[0].base.bias.grad, factor * plain[0].base.bias.grad, rtol=1e-5, atol=1e-7)
