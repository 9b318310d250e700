"""GRAPES on recurrent layers: modulated gradients against backprop through time written out in numpy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import apical
from apical.dendrites.recurrent import DendriticRecurrentCell
from apical.grapes import grapes, recurrent_factors

KINDS = {"rnn": (nn.RNN, nn.RNNCell, 1), "gru": (nn.GRU, nn.GRUCell, 3), "lstm": (nn.LSTM, nn.LSTMCell, 4)}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _sig(a: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-a))


def np_factor(w_ih: np.ndarray, w_hh: np.ndarray, clip=(1.0, 2.0)) -> np.ndarray:
    """Importance of hidden unit n: |weights| of rows n, H + n, 2H + n, ... of both matrices."""
    hidden = w_hh.shape[1]
    imp = np.zeros(hidden)
    for row in range(w_ih.shape[0]):
        imp[row % hidden] += np.abs(w_ih[row]).sum() + np.abs(w_hh[row]).sum()
    f = 2.0 * imp / imp.max()
    return f if clip is None else np.clip(f, *clip)


# ---------------------------------------------------------------------------------- numpy BPTT
def np_cell_forward(kind, x, h, c, wi, wh, bi, bh):
    gi, gh = x @ wi.T + bi, h @ wh.T + bh
    if kind == "rnn":
        hn = np.tanh(gi + gh)
        return hn, None, {"hn": hn}
    if kind == "gru":
        n_h = wh.shape[1]
        r = _sig(gi[:, :n_h] + gh[:, :n_h])
        z = _sig(gi[:, n_h:2 * n_h] + gh[:, n_h:2 * n_h])
        n = np.tanh(gi[:, 2 * n_h:] + r * gh[:, 2 * n_h:])
        return (1 - z) * n + z * h, None, {"r": r, "z": z, "n": n, "ghn": gh[:, 2 * n_h:]}
    a = gi + gh
    n_h = wh.shape[1]
    i, f, g, o = (_sig(a[:, :n_h]), _sig(a[:, n_h:2 * n_h]), np.tanh(a[:, 2 * n_h:3 * n_h]), _sig(a[:, 3 * n_h:]))
    cn = f * c + i * g
    return o * np.tanh(cn), cn, {"i": i, "f": f, "g": g, "o": o, "cn": cn}


def np_cell_backward(kind, cache, x, h, c, wi, wh, dhn, dcn):
    """Gradients of one step: (dx, dh, dc, d gate pre-activations from the input and from h)."""
    if kind == "rnn":
        da = dhn * (1 - cache["hn"] ** 2)
        dgi = dgh = da
        dh_direct, dc = 0.0, None
    elif kind == "gru":
        r, z, n = cache["r"], cache["z"], cache["n"]
        dn = dhn * (1 - z)
        dz = dhn * (h - n)
        dan = dn * (1 - n**2)
        dar = dan * cache["ghn"] * r * (1 - r)
        daz = dz * z * (1 - z)
        dgi = np.concatenate([dar, daz, dan], 1)
        dgh = np.concatenate([dar, daz, dan * r], 1)
        dh_direct, dc = dhn * z, None
    else:
        i, f, g, o, cn = cache["i"], cache["f"], cache["g"], cache["o"], cache["cn"]
        dct = dcn + dhn * o * (1 - np.tanh(cn) ** 2)
        da = np.concatenate([dct * g * i * (1 - i), dct * c * f * (1 - f), dct * i * (1 - g**2),
                             dhn * np.tanh(cn) * o * (1 - o)], 1)
        dgi = dgh = da
        dh_direct, dc = 0.0, dct * f
    return dgi @ wi, dgh @ wh + dh_direct, dc, dgi, dgh


def np_layer(kind, xs, h0, c0, w, dys, dh_end, dc_end, mode, factor, reverse=False):
    """One layer and direction over time: forward, then BPTT with the error at every step's h scaled by
    ``factor`` (propagate) or the weight-gradient rows scaled (local). ``dys``: the loss's gradient with
    respect to each step's output; returns (gradients of w, dxs, dh0, dc0, outputs, h_T, c_T)."""
    wi, wh, bi, bh = w
    order = list(range(len(xs)))[::-1] if reverse else list(range(len(xs)))
    h, c = h0, c0
    hs, caches, prev = {}, {}, {}
    for t in order:
        prev[t] = (h, c)
        h, c, caches[t] = np_cell_forward(kind, xs[t], h, c, wi, wh, bi, bh)
        hs[t] = h
    h_end, c_end = h, c
    g = [np.zeros_like(a) for a in w]
    dxs = [None] * len(xs)
    dh, dc = dh_end, dc_end
    for t in order[::-1]:
        dh = dh + dys[t]
        if mode == "propagate":
            dh = dh * factor
        hp, cp = prev[t]
        dxs[t], dh, dc, dgi, dgh = np_cell_backward(kind, caches[t], xs[t], hp, cp, wi, wh, dh, dc)
        g[0] += dgi.T @ xs[t]
        g[1] += dgh.T @ hp
        g[2] += dgi.sum(0)
        g[3] += dgh.sum(0)
    if mode == "local":
        rows = np.tile(factor, w[0].shape[0] // len(factor))
        g = [gi * (rows[:, None] if gi.ndim == 2 else rows) for gi in g]
    return g, dxs, dh, dc, [hs[t] for t in range(len(xs))], h_end, c_end


def np_rnn(kind, module, x, h0, c0, ry, rh, rc, mode, clip, modulated=True):
    """nn.RNN/GRU/LSTM (time-major, several layers, maybe bidirectional) with the loss
    ``sum(out * ry) + sum(h_n * rh) [+ sum(c_n * rc)]``: parameter gradients and dL/dx."""
    dirs = 2 if module.bidirectional else 1
    hidden = module.hidden_size
    lstm = kind == "lstm"
    params = {n: _np(p) for n, p in module.named_parameters()}
    # forward pass layer by layer (the backward needs every layer's input)
    inputs = [list(x)]
    for k in range(module.num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"_l{k}{'_reverse' if d else ''}"
            w = [params[f"{a}{sfx}"] for a in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            zeros = [np.zeros((x.shape[1], hidden))] * x.shape[0]
            j = k * dirs + d
            *_, hs, _, _ = np_layer(kind, inputs[-1], h0[j], c0[j] if lstm else None, w, zeros, 0.0,
                                    0.0 if lstm else None, "none", None, reverse=bool(d))
            outs.append(hs)
        inputs.append([np.concatenate([o[t] for o in outs], 1) for t in range(x.shape[0])])
    grads = {}
    dys = list(ry)
    for k in range(module.num_layers - 1, -1, -1):
        dx_layer = [np.zeros_like(a) for a in inputs[k]]
        for d in range(dirs):
            sfx = f"_l{k}{'_reverse' if d else ''}"
            names = [f"{a}{sfx}" for a in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            w = [params[n] for n in names]
            j = k * dirs + d
            f = np_factor(w[0], w[1], clip) if modulated else np.ones(hidden)
            dy = [a[:, d * hidden:(d + 1) * hidden] for a in dys]
            g, dxs, *_ = np_layer(kind, inputs[k], h0[j], c0[j] if lstm else None, w, dy, rh[j],
                                  rc[j] if lstm else None, mode, f, reverse=bool(d))
            grads.update(zip(names, g, strict=True))
            dx_layer = [a + b for a, b in zip(dx_layer, dxs, strict=True)]
        dys = dx_layer
    return grads, np.stack(dys)


def _spread(module: nn.Module, seed: int) -> None:
    """Give each hidden unit its own weight scale (same across its gates), so that factors differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("weight"):
                hidden = module.hidden_size
                scale = torch.rand(hidden, generator=gen, dtype=p.dtype) * 0.9 + 0.1
                p.mul_(scale.repeat(p.shape[0] // hidden)[:, None])


def _rnn(kind, layers=1, bidirectional=False, batch_first=False):
    torch.manual_seed(0)
    m = KINDS[kind][0](3, 4, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first).double()
    _spread(m, 1)
    return m


def _rnn_data(kind, module, steps=5, batch=2):
    gen = torch.Generator().manual_seed(7)
    dirs = 2 if module.bidirectional else 1

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = r(steps, batch, 3)
    h0, c0 = r(module.num_layers * dirs, batch, 4), r(module.num_layers * dirs, batch, 4)
    ry, rh, rc = r(steps, batch, 4 * dirs), r(module.num_layers * dirs, batch, 4), r(module.num_layers * dirs, batch, 4)
    return x, h0, c0, ry, rh, rc


def _rnn_loss(kind, module, x, h0, c0, ry, rh, rc):
    if kind == "lstm":
        out, (hn, cn) = module(x, (h0, c0))
        return (out * ry).sum() + (hn * rh).sum() + (cn * rc).sum()
    out, hn = module(x, h0)
    return (out * ry).sum() + (hn * rh).sum()


# ---------------------------------------------------------------------------------- nn.RNN/GRU/LSTM
@pytest.mark.parametrize("mode", ["propagate", "local"])
@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("shape", [(1, False), (2, True)])
def test_rnn_modules_match_numpy_bptt(kind, mode, shape):
    layers, bidirectional = shape
    module = _rnn(kind, layers, bidirectional)
    model = nn.Sequential(module)
    data = _rnn_data(kind, module)
    x = data[0].clone().requires_grad_()
    handle = grapes(model, mode=mode, exclude=())
    dirs = ["", "_reverse"] if bidirectional else [""]
    assert handle.layers == [f"0:l{k}{d}" for k in range(layers) for d in dirs]
    _rnn_loss(kind, module, x, *data[1:]).backward()
    want, want_x = np_rnn(kind, module, _np(data[0]), *(_np(d) for d in data[1:]), mode, (1.0, 2.0))
    for name, p in module.named_parameters():
        np.testing.assert_allclose(_np(p.grad), want[name], rtol=1e-9, atol=1e-12, err_msg=f"{kind} {mode} {name}")
    np.testing.assert_allclose(_np(x.grad), want_x, rtol=1e-9, atol=1e-12)
    # and it is a real modulation: the plain BPTT gradients differ
    plain, _ = np_rnn(kind, module, _np(data[0]), *(_np(d) for d in data[1:]), mode, (1.0, 2.0), modulated=False)
    assert not np.allclose(plain["weight_hh_l0"], want["weight_hh_l0"])
    for name, f in handle.factors().items():
        sfx = "_" + name.split(":")[1]
        w_ih, w_hh = _np(getattr(module, f"weight_ih{sfx}")), _np(getattr(module, f"weight_hh{sfx}"))
        np.testing.assert_allclose(_np(f), np_factor(w_ih, w_hh), rtol=1e-12)
        assert f.min() >= 1.0 and f.max() == 2.0 and f.min() < 2.0
    handle.remove()


def test_propagate_mode_steps_every_recurrent_module_of_the_model():
    """Two recurrent modules in one model (a GRU and a 2-layer LSTM): each gets its own step loop, and
    each one's gradients are its numpy BPTT reference's."""
    gru, lstm = _rnn("gru"), _rnn("lstm", layers=2)
    model = nn.ModuleDict({"gru": gru, "lstm": lstm})
    handle = grapes(model, mode="propagate", exclude=())
    assert handle.layers == ["gru:l0", "lstm:l0", "lstm:l1"]
    data = {k: _rnn_data(k, m) for k, m in (("gru", gru), ("lstm", lstm))}
    (_rnn_loss("gru", gru, *data["gru"]) + _rnn_loss("lstm", lstm, *data["lstm"])).backward()
    for kind, module in (("gru", gru), ("lstm", lstm)):
        want, _ = np_rnn(kind, module, *(_np(d) for d in data[kind]), "propagate", (1.0, 2.0))
        for name, p in module.named_parameters():
            np.testing.assert_allclose(_np(p.grad), want[name], rtol=1e-9, atol=1e-12, err_msg=f"{kind} {name}")
    handle.remove()


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_unclipped_propagate_on_a_batch_first_rnn(kind):
    module = _rnn(kind, batch_first=True)
    x, h0, c0, ry, rh, rc = _rnn_data(kind, module, steps=4, batch=3)
    handle = grapes(module, clip=None, exclude=())
    assert handle.layers == ["l0"]
    _rnn_loss(kind, module, x.transpose(0, 1), h0, c0, ry.transpose(0, 1), rh, rc).backward()
    want, _ = np_rnn(kind, module, *(_np(d) for d in (x, h0, c0, ry, rh, rc)), "propagate", None)
    for name, p in module.named_parameters():
        np.testing.assert_allclose(_np(p.grad), want[name], rtol=1e-9, atol=1e-12, err_msg=name)
    assert float(handle.factors()["l0"].min()) < 1.0


@pytest.mark.parametrize("mode", ["propagate", "local"])
@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_remove_restores_the_module_exactly(kind, mode):
    module = _rnn(kind, layers=2, bidirectional=True)
    model = nn.Sequential(module)
    twin = copy.deepcopy(model)
    data = _rnn_data(kind, module)
    handle = grapes(model, mode=mode, exclude=())
    if mode == "propagate":
        assert "forward" in module.__dict__
        with torch.no_grad():  # the step loop computes what the fused kernel does
            for a, b in zip(module(data[0]), twin[0](data[0]), strict=True):
                for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,), strict=True):
                    torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
    _rnn_loss(kind, module, *data).backward()
    handle.remove()
    assert "forward" not in module.__dict__ and not module._forward_hooks
    assert all(not p._backward_hooks for p in module.parameters())
    model.zero_grad(set_to_none=True)
    xa, xb = data[0].clone().requires_grad_(), data[0].clone().requires_grad_()
    out_a = module(xa, (data[1], data[2]) if kind == "lstm" else data[1])
    out_b = twin[0](xb, (data[1], data[2]) if kind == "lstm" else data[1])
    assert torch.equal(out_a[0], out_b[0])
    _rnn_loss(kind, module, xa, *data[1:]).backward()
    _rnn_loss(kind, twin[0], xb, *data[1:]).backward()
    for (n, p), q in zip(module.named_parameters(), twin[0].parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), n
    assert torch.equal(xa.grad, xb.grad)


def test_paused_step_loop_gives_plain_bptt():
    module = _rnn("gru", layers=2)
    twin = copy.deepcopy(module)
    data = _rnn_data("gru", module)
    handle = grapes(module, exclude=())
    with handle.pause():
        _rnn_loss("gru", module, *data).backward()
    _rnn_loss("gru", twin, *data).backward()
    for (n, p), q in zip(module.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=n)
    handle.remove()


def test_unbatched_input_and_default_hidden_state():
    module = _rnn("lstm")
    twin = copy.deepcopy(module)
    x = torch.randn(6, 3, dtype=torch.float64)
    with grapes(module, exclude=()), torch.no_grad():
        out, (h, c) = module(x)
    ref, (hr, cr) = twin(x)
    for a, b in ((out, ref), (h, hr), (c, cr)):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)


STEP_LOOP_CASES = [
    # (module type, extra constructor arguments, batch_first, unbatched, train)
    (nn.RNN, {"nonlinearity": "relu"}, False, False, False),
    (nn.RNN, {"bias": False}, True, False, False),
    (nn.GRU, {"dropout": 1.0}, False, False, True),  # train: layer 2 reads zeros, its own output is kept
    (nn.GRU, {"dropout": 0.5}, True, False, False),  # eval: no dropout anywhere
    (nn.GRU, {}, False, True, False),
    (nn.LSTM, {"bias": False, "dropout": 1.0}, True, False, True),
    (nn.LSTM, {}, False, True, False),
]


@pytest.mark.parametrize("cls, extra, batch_first, unbatched, train", STEP_LOOP_CASES)
def test_step_loop_forward_equals_torchs_own(cls, extra, batch_first, unbatched, train):
    """In propagate mode GRAPES runs nn.RNN/GRU/LSTM as its own loop over time steps: the outputs
    must be PyTorch's fused forward's, for every mode, hidden size 5 (so that gates split unevenly
    under a wrong chunk count), two bidirectional layers, with and without biases, batch-first,
    unbatched with a given hidden state, and dropout between layers (p = 1: deterministic)."""
    torch.manual_seed(3)
    module = cls(3, 5, num_layers=2, bidirectional=True, batch_first=batch_first, **extra).double()
    module.train(train)
    twin = copy.deepcopy(module)
    batch_shape = () if unbatched else (2,)
    x = torch.randn(*((6, *batch_shape) if not batch_first else (*batch_shape, 6)), 3, dtype=torch.float64)
    h0 = torch.randn(4, *batch_shape, 5, dtype=torch.float64)
    hx = (h0, torch.randn_like(h0)) if cls is nn.LSTM else h0
    with grapes(module, exclude=()) as handle:
        assert handle.mode == "propagate"
        out, state = module(x, hx)
    ref, ref_state = twin(x, hx)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(state if cls is nn.LSTM else (state,), ref_state if cls is nn.LSTM else (ref_state,),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_propagate_mode_on_a_frozen_recurrent_layer():
    """A frozen GRU (fine-tuning only the head) under GRAPES: no hook on tensors without gradients,
    and the head's gradient is plain backprop's (GRAPES modulates the head's output only)."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"gru": nn.GRU(3, 4), "head": nn.Linear(4, 2)}).double()
    model["gru"].requires_grad_(False)
    twin = copy.deepcopy(model)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with grapes(model, layers=["gru"], exclude=()):
        model["head"](model["gru"](x)[0]).sum().backward()
    twin["head"](twin["gru"](x)[0]).sum().backward()
    torch.testing.assert_close(model["head"].weight.grad, twin["head"].weight.grad)
    assert model["gru"].weight_ih_l0.grad is None


def test_packed_sequence_needs_local_mode():
    module = _rnn("gru")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    packed = nn.utils.rnn.pack_padded_sequence(x, [5, 3])
    with grapes(module, exclude=()), pytest.raises(ValueError) as err:
        module(packed)
    assert str(err.value) == ("grapes(mode='propagate') on nn.RNN/GRU/LSTM needs a padded tensor, not a "
                              "PackedSequence; pad it or use mode='local'")
    with grapes(module, mode="local", exclude=()):
        module(packed)[0].data.sum().backward()  # local mode leaves the forward alone
    assert module.weight_hh_l0.grad is not None


# ---------------------------------------------------------------------------------- cells
def _cell(kind):
    torch.manual_seed(2)
    cell = KINDS[kind][1](3, 4).double()
    _spread(cell, 3)
    return cell


@pytest.mark.parametrize("mode", ["propagate", "local"])
@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_cells_in_a_loop_match_numpy_bptt(kind, mode):
    """A cell called at every step of a user loop, with a Linear readout of every step's h."""
    cell = _cell(kind)
    readout = nn.Linear(4, 2).double()
    model = nn.ModuleDict({"cell": cell, "readout": readout})
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(6, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, 2, 2, generator=gen, dtype=torch.float64)
    handle = grapes(model, mode=mode)
    assert handle.layers == ["cell"]  # the readout is the output layer
    h = torch.zeros(2, 4, dtype=torch.float64)
    state = (h, h) if kind == "lstm" else h
    loss = 0.0
    for t in range(6):
        state = cell(x[t], state)
        h = state[0] if kind == "lstm" else state
        loss = loss + 0.5 * ((readout(h) - target[t]) ** 2).sum()
    loss.backward()

    # numpy: forward over time, then BPTT with the readout's error entering every step
    wi, wh, bi, bh = (_np(p) for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh))
    wr, br = _np(readout.weight), _np(readout.bias)
    xs = list(_np(x))
    hs = []
    hh, cc = np.zeros((2, 4)), np.zeros((2, 4))
    for t in range(6):
        hh, cc, _ = np_cell_forward(kind, xs[t], hh, cc, wi, wh, bi, bh)
        hs.append(hh)
    errs = [hs[t] @ wr.T + br - _np(target[t]) for t in range(6)]
    dys = [e @ wr for e in errs]
    g, dxs, *_ = np_layer(kind, xs, np.zeros((2, 4)), np.zeros((2, 4)) if kind == "lstm" else None,
                          [wi, wh, bi, bh], dys, 0.0, 0.0 if kind == "lstm" else None, mode, np_factor(wi, wh))
    for p, want in zip((cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh), g, strict=True):
        np.testing.assert_allclose(_np(p.grad), want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(_np(x.grad), np.stack(dxs), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(_np(readout.weight.grad), sum(e.T @ h for e, h in zip(errs, hs, strict=True)),
                               rtol=1e-9)
    handle.remove()
    assert not cell._forward_hooks and all(not p._backward_hooks for p in cell.parameters())


def test_recurrent_factors_share_a_unit_across_gates():
    w_ih, w_hh = torch.zeros(8, 3), torch.zeros(8, 2)  # LSTM-like: 4 gates x 2 units
    w_ih[5, 0] = 1.0  # gate 2, unit 1
    w_hh[0, 1] = 0.5  # gate 0, unit 0
    w_hh[6, 0] = 1.0  # gate 3, unit 0: unit 0 has 1.5, unit 1 has 1.0
    torch.testing.assert_close(recurrent_factors(w_ih, w_hh, clip=None), torch.tensor([2.0, 4 / 3]))
    torch.testing.assert_close(recurrent_factors(w_ih, w_hh), torch.tensor([2.0, 4 / 3]))


def test_selection_exclusions_and_errors():
    torch.manual_seed(0)
    model = nn.ModuleDict({"gru": nn.GRU(3, 4, num_layers=2), "cell": nn.LSTMCell(3, 4), "out": nn.Linear(4, 2)})
    handle = grapes(model)
    assert handle.layers == ["gru:l0", "gru:l1", "cell"]
    handle.remove()
    with grapes(model, layers=[nn.LSTMCell]) as h:
        assert h.layers == ["cell"]
    with pytest.raises(ValueError, match="proj_size"):
        grapes(nn.ModuleDict({"lstm": nn.LSTM(3, 4, proj_size=2), "out": nn.Linear(2, 2)}))
    patched = nn.GRU(3, 4)
    patched.forward = patched.forward
    with pytest.raises(ValueError) as err:
        grapes(nn.ModuleDict({"gru": patched, "out": nn.Linear(4, 2)}))
    assert str(err.value) == ("layer 'gru' already has a forward of its own (patched); GRAPES' propagate mode "
                              "replaces it while attached: use mode='local' or remove the patch")


def test_apicals_dendritic_recurrent_wrappers_stay_excluded():
    torch.manual_seed(0)
    model = nn.ModuleDict({"gru": nn.GRU(3, 4), "cell": nn.GRUCell(3, 4), "fc": nn.Linear(4, 4),
                           "out": nn.Linear(4, 2)})
    apical.perforate(model, apical.DendriteConfig(mode="pb", seed=0))
    handle = grapes(model)
    assert type(model["gru"]).__name__ == "DendriticGRU" and isinstance(model["cell"], DendriticRecurrentCell)
    assert handle.layers == ["fc"]  # the wrapped GRU and GRUCell are not modulated
    handle.remove()


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_numpy_reference_reproduces_torchs_plain_bptt(kind):
    """The reference itself: unmodulated, it gives PyTorch's own (fused kernel) gradients."""
    module = _rnn(kind, layers=2, bidirectional=True)
    data = _rnn_data(kind, module)
    x = data[0].clone().requires_grad_()
    _rnn_loss(kind, module, x, *data[1:]).backward()
    want, want_x = np_rnn(kind, module, *(_np(d) for d in data), "propagate", None, modulated=False)
    for name, p in module.named_parameters():
        np.testing.assert_allclose(_np(p.grad), want[name], rtol=1e-9, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(_np(x.grad), want_x, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_recurrent_factors_of_half_precision_weights_sum_in_float32(dtype):
    """Importance sums of bf16 / fp16 weights are accumulated (and returned) in float32: the
    factors equal a float64 numpy computation on the same (rounded) weights."""
    torch.manual_seed(4)
    w_ih, w_hh = torch.randn(15, 40).to(dtype), torch.randn(15, 5).to(dtype)  # a GRU: 3 gates x 5 units
    f = recurrent_factors(w_ih, w_hh, clip=None)
    assert f.dtype == torch.float32
    ref = np_factor(_np(w_ih), _np(w_hh), clip=None)
    np.testing.assert_allclose(f.double().numpy(), ref, rtol=2e-7, atol=0)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_local_mode_on_biasless_layers_scales_each_units_rows(kind):
    """Local mode on nn.GRU/LSTM and their cells without biases: each weight gradient is plain
    backprop's with every gate row of unit n scaled by F_n (numpy factors)."""
    torch.manual_seed(6)
    for module in (KINDS[kind][0](3, 4, bias=False).double(), KINDS[kind][1](3, 4, bias=False).double()):
        _spread(module, 2)
        twin = copy.deepcopy(module)
        x = torch.randn(5, 3, dtype=torch.float64) if isinstance(module, nn.RNNCellBase) else \
            torch.randn(5, 2, 3, dtype=torch.float64)
        suffix = "" if isinstance(module, nn.RNNCellBase) else "_l0"
        factor = np_factor(_np(getattr(module, "weight_ih" + suffix)), _np(getattr(module, "weight_hh" + suffix)))
        rows = np.tile(factor, KINDS[kind][2])[:, None]
        with grapes(module, mode="local", exclude=()):
            out = module(x)
            (out[0] if isinstance(out, tuple) else out).pow(2).sum().backward()
        out = twin(x)
        (out[0] if isinstance(out, tuple) else out).pow(2).sum().backward()
        for (n, p), q in zip(module.named_parameters(), twin.parameters(), strict=True):
            np.testing.assert_allclose(_np(p.grad), _np(q.grad) * rows, rtol=1e-10, atol=1e-12, err_msg=n)


class _Same(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 1.0  # the same values, a new tensor (not the Parameter) on every access


@pytest.mark.parametrize("which", ["weight_ih", "weight_hh"])
def test_weights_computed_on_access_need_propagate_mode(which):
    """A cell whose weight is a parametrization (a tensor computed on access, not a Parameter):
    local mode cannot hook its gradient and says so; propagate mode works on it."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    cell = nn.GRUCell(3, 4).double()
    twin = copy.deepcopy(cell)
    parametrize.register_parametrization(cell, which, _Same())
    with pytest.raises(ValueError) as err:
        grapes(cell, mode="local", exclude=())
    assert str(err.value) == ("layer '': its weights are computed on access, so mode='local' cannot hook their "
                              "gradients; use mode='propagate'")
    x = torch.randn(5, 3, dtype=torch.float64)
    with grapes(cell, exclude=()) as handle:
        cell(x).sum().backward()
    with grapes(twin, exclude=()):
        twin(x).sum().backward()
    assert handle.layers == [""]
    torch.testing.assert_close(cell.bias_hh.grad, twin.bias_hh.grad, rtol=1e-12, atol=1e-12)


def test_remove_after_the_patched_forward_is_gone():
    """remove() restores the class's forward; it also copes with a forward deleted meanwhile."""
    module = _rnn("gru")
    handle = grapes(module, exclude=())
    assert "forward" in module.__dict__
    del module.forward
    handle.remove()
    assert "forward" not in module.__dict__ and handle.removed
