"""Feedback alignment: weight updates against hand-computed references; removal restores everything."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apical.feedback import feedback_alignment


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(7, 5, generator=g), torch.randn(7, 2, generator=g)


def _hand(model, x, t, error_into):
    """Backward pass written out: error_into(layer_index, e_out, delta_above) gives the error at
    the input of layer 2 or 3 (0-based 1, 2) from the output error and the layer's delta."""
    w = [model[i].weight.detach() for i in (0, 2, 4)]
    b = [model[i].bias.detach() for i in (0, 2, 4)]
    h1 = torch.tanh(x @ w[0].T + b[0])
    h2 = torch.tanh(h1 @ w[1].T + b[1])
    z3 = h2 @ w[2].T + b[2]
    e = 2 * (z3 - t) / z3.numel()  # d mse / d z3
    d2 = error_into(2, e, e) * (1 - h2**2)
    d1 = error_into(1, e, d2) * (1 - h1**2)
    return {"0": (d1.T @ x, d1.sum(0)), "2": (d2.T @ h1, d2.sum(0)), "4": (e.T @ h2, e.sum(0))}


def test_fa_sends_the_error_through_fixed_random_matrices_and_keeps_the_weight_gradients_local():
    model = _mlp()
    x, t = _data()
    handle = feedback_alignment(model, "fa", seed=3)
    assert handle.layers == ["0", "2", "4"] and handle.feedback["2"].shape == (3, 4)
    F.mse_loss(model(x), t).backward()
    fb = handle.feedback
    want = _hand(model, x, t, lambda i, e, delta: delta @ fb[{1: "2", 2: "4"}[i]])
    for name, (gw, gb) in want.items():
        layer = dict(model.named_modules())[name]
        torch.testing.assert_close(layer.weight.grad, gw, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.bias.grad, gb, rtol=1e-5, atol=1e-7)
    # and it is not backprop: the first layer's gradient differs from the true one
    ref = _mlp()
    F.mse_loss(ref(x), t).backward()
    assert not torch.allclose(ref[0].weight.grad, model[0].weight.grad, atol=1e-4)


def test_dfa_projects_the_output_error_to_every_hidden_layer():
    model = _mlp()
    x, t = _data()
    handle = feedback_alignment(model, "dfa", seed=4)
    F.mse_loss(model(x), t).backward()
    fb = handle.feedback
    assert fb["2"].shape == (4, 2) and fb["4"].shape == (3, 2)  # [layer input size, output size]
    want = _hand(model, x, t, lambda i, e, delta: e @ fb[{1: "2", 2: "4"}[i]].T)
    for name, (gw, gb) in want.items():
        layer = dict(model.named_modules())[name]
        torch.testing.assert_close(layer.weight.grad, gw, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.bias.grad, gb, rtol=1e-5, atol=1e-7)


def test_fa_on_a_convolution_sends_the_transposed_convolution_with_b():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    model = nn.Sequential(conv)
    x = torch.randn(2, 2, 7, 7, requires_grad=True)
    handle = feedback_alignment(model, "fa", seed=5)
    y = model(x)
    g = torch.randn_like(y)
    y.backward(g)
    b = handle.feedback["0"]
    want_x = F.conv_transpose2d(g, b, stride=2, padding=1, output_padding=0)
    torch.testing.assert_close(x.grad, want_x, rtol=1e-5, atol=1e-6)
    ref = copy.deepcopy(conv)
    ref.weight.grad = ref.bias.grad = None
    ref(x.detach()).backward(g)  # the weight gradient is the ordinary one
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["fa", "dfa"])
def test_remove_gives_back_plain_backprop_exactly(mode):
    model, ref = _mlp(), _mlp()
    x, t = _data()
    with feedback_alignment(model, mode, seed=6) as handle:
        F.mse_loss(model(x), t).backward()
    assert handle.removed and "removed" in repr(handle)
    model.zero_grad()
    F.mse_loss(model(x), t).backward()
    F.mse_loss(ref(x), t).backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), n
    for m in model.modules():
        assert "forward" not in m.__dict__ and not m._forward_hooks and not m._forward_pre_hooks
    handle.remove()  # idempotent


def test_grapes_on_top_of_fa_and_bad_arguments():
    from apical.grapes import grapes

    model = _mlp()
    x, t = _data()
    fa = feedback_alignment(model, "fa", seed=3)
    g = grapes(model, clip=None)
    F.mse_loss(model(x), t).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    g.remove()
    fa.remove()
    with pytest.raises(ValueError, match="mode must be one of"):
        feedback_alignment(model, "bp")
    with pytest.raises(TypeError, match="not a Linear or ConvNd"):
        feedback_alignment(model, layers=["1"])
    with pytest.raises(ValueError, match="no module named"):
        feedback_alignment(model, layers=["9"])
    first = feedback_alignment(model)
    with pytest.raises(ValueError, match="attached twice"):
        feedback_alignment(model)
    first.remove()


def _hand_factor(w):
    """The unclipped GRAPES factor by hand: twice each row's sum of |w| over the largest row sum."""
    rows = [float(sum(abs(v) for v in row)) for row in w.tolist()]
    return torch.tensor([2 * r / max(rows) for r in rows])


@pytest.mark.parametrize("mode", ["fa", "dfa"])
def test_grapes_on_top_of_feedback_alignment_matches_the_hand_written_updates(mode):
    """GRAPES (propagate, clip=None, output layer left alone) multiplies each hidden layer's error at
    its output by F; under fa that error then travels down through B (so factors compound), under dfa
    the hidden layers get B e from the output error (no compounding)."""
    from apical.grapes import grapes

    model = _mlp()
    with torch.no_grad():  # rows of different sizes, so that factors differ (some below 1)
        model[0].weight.mul_(torch.tensor([1.0, 0.3, 0.6, 0.9])[:, None])
        model[2].weight.mul_(torch.tensor([0.2, 1.0, 0.5])[:, None])
    x, t = _data()
    fa = feedback_alignment(model, mode, seed=3)
    g = grapes(model, clip=None)
    assert g.layers == ["0", "2"]
    F.mse_loss(model(x), t).backward()
    fb = fa.feedback
    f = {1: _hand_factor(model[0].weight), 2: _hand_factor(model[2].weight)}
    assert min(float(v.min()) for v in f.values()) < 1.0  # unclipped: some errors shrink
    if mode == "fa":
        want = _hand(model, x, t, lambda i, e, delta: (delta @ fb[{1: "2", 2: "4"}[i]]) * f[i])
    else:
        want = _hand(model, x, t, lambda i, e, delta: (e @ fb[{1: "2", 2: "4"}[i]].T) * f[i])
    for name, (gw, gb) in want.items():
        layer = dict(model.named_modules())[name]
        torch.testing.assert_close(layer.weight.grad, gw, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.bias.grad, gb, rtol=1e-5, atol=1e-7)
    g.remove()
    fa.remove()
