"""Dendrites on recurrent layers: function kept, coverage, the step math against a hand-written GRU
and LSTM, statistics over batch x time against numpy, pb's cut error paths, a pb cycle, checkpoint,
export and unwrap."""

from __future__ import annotations

import copy
import functools
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import apical
from apical.dendrites.recurrent import DendriticGRU, DendriticLSTM, DendriticRecurrentCell


def _flat(out) -> torch.Tensor:
    if isinstance(out, tuple):
        return torch.cat([_flat(t) for t in out])
    if isinstance(out, nn.utils.rnn.PackedSequence):
        return out.data.flatten()
    return out.flatten()


class LSTMClassifier(nn.Module):
    def __init__(self, features=6):
        super().__init__()
        self.rnn = nn.LSTM(features, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        _, (h, _) = self.rnn(x)
        return self.head(h[-1])


class BiGRU(nn.Module):
    def __init__(self, features=6):
        super().__init__()
        self.rnn = nn.GRU(features, 8, bidirectional=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        out, _ = self.rnn(x.transpose(0, 1))
        return self.head(out[-1])


class CellLoop(nn.Module):
    def __init__(self, features=6):
        super().__init__()
        self.gru = nn.GRUCell(features, 8)
        self.lstm = nn.LSTMCell(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = hc = None
        for t in range(x.shape[1]):
            h = self.gru(x[:, t], h)
            hc = self.lstm(h, hc)
        return self.head(hc[0])


MODELS = {"lstm": LSTMClassifier, "bigru": BiGRU, "cells": CellLoop}


def _perforated(name, mode="gd", **cfg):
    torch.manual_seed(0)
    model = MODELS[name]()
    reference = copy.deepcopy(model)
    params = {id(p) for p in model.parameters()}
    config = apical.DendriteConfig(mode=mode, seed=0, **cfg)
    apical.perforate(model, config)
    return model, reference, params, config


@pytest.mark.parametrize("name", MODELS)
def test_function_kept_and_every_recurrent_parameter_in_a_wrapped_layer(name):
    model, reference, params, _ = _perforated(name)
    x = torch.randn(5, 7, 6)
    report = apical.coverage(model)
    assert report.fraction >= 0.95, report.summary()
    assert params <= {id(p) for p in model.parameters()}  # the original Parameter objects are kept
    for _, layer in apical.dendritic_layers(model):
        layer.install_random(1.0, torch.Generator().manual_seed(1))  # gd: v = 0 keeps the function
    assert (model(x) - reference(x)).abs().max() < 1e-5


@pytest.mark.parametrize("build,args", [
    (lambda: nn.GRU(5, 4, num_layers=2, bidirectional=True), ()),
    (lambda: nn.LSTM(5, 4, num_layers=2, batch_first=True, bidirectional=True), ()),
    (lambda: nn.RNN(5, 4, nonlinearity="relu", num_layers=2), ()),
    (lambda: nn.GRU(5, 4, num_layers=2), ("h0",)),
    (lambda: nn.LSTM(5, 4, num_layers=2), ("h0c0",)),
    (lambda: nn.GRU(5, 4, bidirectional=True), ("packed",)),
    (lambda: nn.LSTM(5, 4, bidirectional=True, num_layers=2), ("packed",)),
    (lambda: nn.GRU(5, 4), ("unbatched",)),
    (lambda: nn.GRU(5, 4, num_layers=2, bidirectional=True), ("h0", "bidirectional")),  # a state per layer, direction
    (lambda: nn.GRU(5, 4), ("unbatched", "h0")),
    (lambda: nn.LSTM(5, 4, bias=False), ("unbatched", "h0c0")),
    (lambda: nn.GRU(5, 4, num_layers=2, dropout=1.0), ("train",)),  # layer 2 reads zeros, its output is kept
    (lambda: nn.LSTM(5, 4, num_layers=2, dropout=0.5), ()),  # eval: no dropout anywhere
])
def test_step_loop_equals_the_fused_kernel_in_every_input_form(build, args):
    torch.manual_seed(0)
    plain = build().train("train" in args)
    box = nn.Sequential(copy.deepcopy(plain))
    apical.perforate(box, apical.DendriteConfig(mode="gd"))
    for _, layer in apical.dendritic_layers(box):
        layer.install_random(1.0, torch.Generator().manual_seed(1))
    wrapped = box[0]
    x = torch.randn(7, 3, 5)
    extra = ()
    states = (plain.num_layers * (2 if plain.bidirectional else 1),) + (() if "unbatched" in args else (3,)) + (4,)
    if "h0" in args:
        extra = (torch.randn(*states),)
    if "h0c0" in args:
        extra = ((torch.randn(*states), torch.randn(*states)),)
    if "packed" in args:
        x = pack_padded_sequence(x, torch.tensor([7, 3, 5]), enforce_sorted=False)
    if "unbatched" in args:
        x = x[:, 0]
    assert any(c.num_dendrites for c in wrapped.cells())  # so the step loop runs, not the kernel
    got, want = wrapped(x, *extra), plain(x, *extra)
    assert _shapes(got) == _shapes(want)
    assert (_flat(got) - _flat(want)).abs().max() < 1e-5


def _shapes(out):
    """The nested shapes of an RNN's output (a packed sequence by its data)."""
    if isinstance(out, tuple):
        return tuple(_shapes(t) for t in out)
    return tuple((out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out).shape)


@pytest.mark.parametrize("kind", [nn.GRU, nn.LSTM])
def test_dropout_between_layers_draws_the_mask_torch_would_draw_for_that_tensor(kind):
    """In training, layer k + 1 reads F.dropout(output of layer k): the reference is two one-layer
    modules with the same weights and the same seed's dropout mask between them."""
    torch.manual_seed(0)
    plain = kind(5, 4, num_layers=2, dropout=0.5)
    box = nn.Sequential(copy.deepcopy(plain))
    apical.perforate(box, apical.DendriteConfig(mode="gd"))
    for _, layer in apical.dendritic_layers(box):
        layer.install_random(1.0, torch.Generator().manual_seed(1))  # v = 0: the function of plain
    first, second = kind(5, 4), kind(4, 4)
    for k, single in enumerate((first, second)):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(single, f"{name}_l0").data.copy_(getattr(plain, f"{name}_l{k}"))
    x = torch.randn(6, 3, 5)
    torch.manual_seed(7)
    got, _ = box[0].train()(x)
    torch.manual_seed(7)
    want, _ = second(nn.functional.dropout(first(x)[0], 0.5, True))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, second(first(x)[0])[0], atol=1e-3)  # the mask did act


@pytest.mark.parametrize("kind, state", [(nn.GRU, "h"), (nn.LSTM, "hc")])
def test_without_dendrites_the_fused_kernel_takes_the_initial_state(kind, state):
    torch.manual_seed(0)
    plain = kind(5, 4, num_layers=2)
    box = nn.Sequential(copy.deepcopy(plain))
    apical.perforate(box, apical.DendriteConfig(mode="gd"))
    x = torch.randn(6, 3, 5)
    h0 = torch.randn(2, 3, 4)
    hx = h0 if state == "h" else (h0, torch.randn(2, 3, 4))
    assert not any(c.num_dendrites for c in box[0].cells())
    got, want = box[0](x, hx), plain(x, hx)
    assert _shapes(got) == _shapes(want)
    torch.testing.assert_close(_flat(got), _flat(want))


def _hand_gru(x, h0, w_ih, w_hh, b_ih, b_hh, dend):
    """A GRU written out: gates s_t (kept for their gradient) with dendrite terms dend(x_t, h_{t-1})."""
    h, hs, ss = h0, [], []
    n = h0.shape[1]
    for t in range(x.shape[0]):
        gi, gh = x[t] @ w_ih.T + b_ih, h @ w_hh.T + b_hh
        s = torch.cat([gi[:, :2 * n] + gh[:, :2 * n], gi[:, 2 * n:]], 1) + dend(x[t], h)
        s.retain_grad()
        ss.append(s)
        r, z = torch.sigmoid(s[:, :n]), torch.sigmoid(s[:, n:2 * n])
        cand = torch.tanh(s[:, 2 * n:] + r * gh[:, 2 * n:])
        h = (1 - z) * cand + z * h
        hs.append(h)
    return torch.stack(hs), ss


def _gru_cell_model(dendrites: int):
    torch.manual_seed(3)
    gru = nn.GRU(4, 3)
    box = nn.Sequential(gru)
    cfg = apical.DendriteConfig(mode="pb", seed=0, candidates=3)
    apical.perforate(box, cfg)
    cell = gru.cell_l0
    for k in range(dendrites):
        cell.install_random(2.0, torch.Generator().manual_seed(10 + k))
        with torch.no_grad():
            cell.dendrite_out.normal_(generator=torch.Generator().manual_seed(20 + k))
            cell.dendrite_cascade.normal_(generator=torch.Generator().manual_seed(30 + k))
    return gru, cell


def _dend_term(cell, detach, v=None):
    """sum_k v_k a_k of the installed sets, written out (inputs detached as pb does, or not)."""
    v = cell.dendrite_out if v is None else v

    def term(x, h):
        u = torch.cat([x, h], 1)
        u = u.detach() if detach else u
        w, b, casc = cell.dendrite_weight.detach(), cell.dendrite_bias.detach(), cell.dendrite_cascade.detach()
        acts, out = [], 0
        for k in range(w.shape[0]):
            pre = u @ w[k].T + b[k]
            for e in range(k):
                pre = pre + casc[k, e] * acts[e]
            acts.append(torch.sigmoid(pre))
            out = out + v[k] * acts[k]
        return out
    return term


def test_a_gru_with_dendrites_computes_the_documented_function_and_pb_cuts_their_error_paths():
    gru, cell = _gru_cell_model(2)
    gru.train()
    cell.set_training_mode("neuron", perforated=True)
    x = torch.randn(6, 5, 4, requires_grad=True)
    h0 = torch.randn(1, 5, 3, requires_grad=True)
    out, hn = gru(x, h0)
    (out.square().sum() + hn.sum()).backward()
    xr, hr = x.detach().clone().requires_grad_(), h0.detach().clone().requires_grad_()
    v_ref = cell.dendrite_out.detach().clone().requires_grad_()
    ref_out, _ = _hand_gru(xr, hr[0], gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0,
                           _dend_term(cell, detach=True, v=v_ref))
    assert torch.allclose(out, ref_out, atol=1e-6)
    (ref_out.square().sum() + ref_out[-1].sum()).backward()
    # no error through the dendrites into the inputs or earlier steps: the same gradients as the cut model
    assert torch.allclose(x.grad, xr.grad, atol=1e-6) and torch.allclose(h0.grad, hr.grad, atol=1e-6)
    assert torch.allclose(cell.dendrite_out.grad, v_ref.grad, atol=1e-6)
    assert cell.dendrite_weight.grad is None  # frozen in the neuron phase


def test_gd_lets_the_error_through_the_dendrites():
    gru, cell = _gru_cell_model(1)
    cell.set_training_mode("neuron", perforated=False)
    x = torch.randn(5, 2, 4, requires_grad=True)
    gru(x)[0].sum().backward()
    xr = x.detach().clone().requires_grad_()
    ref, _ = _hand_gru(xr, torch.zeros(2, 3), gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0,
                       _dend_term(cell, detach=False))
    ref.sum().backward()
    assert torch.allclose(x.grad, xr.grad, atol=1e-6)


def test_candidate_statistics_are_numpys_over_batch_and_time():
    gru, cell = _gru_cell_model(1)
    cell.add_candidates(3, 1.5, torch.Generator().manual_seed(7))
    cell.set_training_mode("dendrite", perforated=True)
    gru.train()
    x = torch.randn(6, 5, 4)
    out, _ = gru(x)
    target = torch.randn_like(out)
    ((out - target) ** 2).sum().backward()
    m = cell.stats.moments()
    # the same errors from the hand-written GRU, and the candidates' outputs from their weights
    ref_out, ss = _hand_gru(x, torch.zeros(5, 3), gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0,
                            gru.bias_hh_l0, _dend_term(cell, detach=True))
    ((ref_out - target) ** 2).sum().backward()
    d = torch.stack([s.grad for s in ss]).reshape(-1, 9).double().numpy()  # [T*B, 3H]
    hs = torch.cat([torch.zeros(1, 5, 3), ref_out[:-1]]).detach()
    u = torch.cat([x, hs], 2).reshape(-1, 7)
    cw, cb, cu = (t.detach() for t in cell.candidate_tensors())
    w, b, casc = cell.dendrite_weight.detach(), cell.dendrite_bias.detach(), cell.dendrite_cascade.detach()
    a_inst = torch.sigmoid(u @ w[0].T + b[0])  # the one installed set
    a = torch.sigmoid(torch.einsum("pi,coi->pco", u, cw) + cb + cu[:, 0] * a_inst[:, None]).double().numpy()
    assert casc.shape == (1, 1, 9)
    n = d.shape[0]
    cov = ((a - a.mean(0)) * (d - d.mean(0))[:, None]).sum(0) / n
    assert cell.stats.n == n == 30
    # float32 forward passes on both sides: agreement to 1e-5 of each quantity's scale
    np.testing.assert_allclose(m["mean_d"].numpy(), d.mean(0), atol=1e-5 * np.abs(d.mean(0)).max())
    np.testing.assert_allclose(m["cov"].numpy(), cov, atol=1e-5 * np.abs(cov).max())
    np.testing.assert_allclose(m["var_a"].numpy(), a.var(0), atol=1e-5 * a.var(0).max())


def _digits_rows():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 8, 8)[:600], torch.tensor(y)[:600]


class RowGRU(nn.Module):
    """Digits read row by row by a GRU, then an LSTM cell over the GRU's outputs."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(8, 6, batch_first=True)
        self.cell = nn.LSTMCell(6, 6)
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        out, _ = self.rnn(x)
        state = None
        for t in range(out.shape[1]):
            state = self.cell(out[:, t], state)
        return self.head(state[0])


def _grow_one_set(model, x, y):
    """A pb cycle on digits rows with a scripted score: flat until a set is installed (a plateau,
    then a dendrite phase on the real data's errors), better after it (so the set is kept)."""
    cfg = apical.DendriteConfig(mode="pb", seed=0, patience=1, candidates=2, max_dendrites=1, dendrite_patience=1,
                                min_dendrite_epochs=1, max_dendrite_epochs=2, improvement_threshold=0.0)
    apical.perforate(model, cfg)
    ctl = apical.Controller(model, cfg)
    opt = torch.optim.Adam(ctl.parameters(), lr=1e-2)
    for _ in range(12):
        model.train()
        for i in range(0, 600, 100):
            opt.zero_grad()
            F.cross_entropy(model(x[i:i + 100]), y[i:i + 100]).backward()
            opt.step()
        step = ctl.step(0.5 if ctl.dendrites == 0 else 0.9)
        if step.restructured:
            opt = torch.optim.Adam(ctl.parameters(), lr=1e-2)
        if step.done:
            break
    grown = {n: layer.num_dendrites for n, layer in apical.dendritic_layers(model)}
    assert all(d == 1 for d in grown.values()), grown
    return ctl, grown


def _round_trip(model, ctl, build, x, tmp_path):
    """A fresh model loaded from the checkpoint, and the export, give the model's outputs."""
    model.eval()
    with torch.no_grad():
        expected = model(x)
    apical.save(tmp_path / "rnn.safetensors", model, ctl)
    torch.manual_seed(9)
    fresh = build()
    apical.load(tmp_path / "rnn.safetensors", fresh)
    fresh.eval()
    exported = apical.export(model)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
        assert torch.allclose(exported(x), expected, atol=1e-6)
    return exported


@pytest.mark.parametrize("name", MODELS)
def test_a_pb_cycle_grows_a_set_in_every_layer_of_the_named_models(name, tmp_path):
    pytest.importorskip("sklearn")
    x, y = _digits_rows()
    torch.manual_seed(0)
    model = MODELS[name](8)
    ctl, grown = _grow_one_set(model, x, y % 3)  # the named models have 3 outputs: the digit mod 3
    assert len(grown) == {"lstm": 3, "bigru": 3, "cells": 3}[name]
    _round_trip(model, ctl, lambda: MODELS[name](8), x[:50], tmp_path)


def test_a_gru_and_an_lstm_cell_in_one_model_grow_and_round_trip(tmp_path):
    pytest.importorskip("sklearn")
    x, y = _digits_rows()
    torch.manual_seed(0)
    model = RowGRU()
    ctl, grown = _grow_one_set(model, x, y)
    assert set(grown) == {"rnn.cell_l0", "cell", "head"}
    exported = _round_trip(model, ctl, RowGRU, x[:50], tmp_path)
    assert isinstance(exported.rnn, DendriticGRU) and isinstance(exported.cell, DendriticRecurrentCell)
    assert all(c.num_candidates == 0 for c in exported.rnn.cells())
    plain = apical.unwrap(copy.deepcopy(model), force=True)
    assert type(plain.rnn) is nn.GRU and type(plain.cell) is nn.LSTMCell and not hasattr(plain.rnn, "cell_l0")


def test_export_and_unwrap_without_dendrites_give_the_plain_modules_back():
    model, reference, _, _ = _perforated("lstm")
    assert isinstance(model.rnn, DendriticLSTM)
    exported = apical.export(model)
    assert type(exported.rnn) is nn.LSTM and type(exported.head) is nn.Linear
    x = torch.randn(2, 5, 6)
    assert torch.allclose(exported(x), reference.eval()(x), atol=1e-6)
    apical.unwrap(model)
    assert type(model.rnn) is nn.LSTM
    assert dict(model.named_parameters()).keys() == dict(reference.named_parameters()).keys()


def test_unsupported_recurrent_modules_say_why():
    proj_reason = "an LSTM with proj_size > 0 (projected hidden states) is not supported"
    proj = nn.Sequential(nn.LSTM(4, 6, proj_size=3))
    assert {e.name: e.reason for e in apical.coverage(proj).entries}["0"] == proj_reason
    with pytest.raises(ValueError, match=f"^cannot wrap LSTM: {re.escape(proj_reason)}$"):
        DendriticLSTM.wrap(nn.LSTM(4, 6, proj_size=3))

    class MyGRU(nn.GRU):
        def forward(self, x, h=None):
            return super().forward(x * 2, h)

    reason = "MyGRU subclasses GRU with code of its own: register a layer class for it (apical.register_layer)"
    assert {e.name: e.reason for e in apical.coverage(nn.Sequential(MyGRU(3, 2))).entries}["0"] == reason
    with pytest.raises(ValueError, match=f"^cannot wrap MyGRU: {re.escape(reason)}$"):
        DendriticGRU.wrap(MyGRU(3, 2))


def test_unwrap_of_a_bidirectional_stack_gives_back_the_plain_module():
    """One cell per layer and direction, no more: unwrap removes exactly those and leaves nn.GRU itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.GRU(3, 4, num_layers=2, bidirectional=True))
    params = dict(model[0].named_parameters())
    x = torch.randn(5, 2, 3)
    want = model(x)[0]
    apical.perforate(model, apical.DendriteConfig(mode="gd"))
    assert [n for n, _ in apical.dendritic_layers(model)] == ["0.cell_l0", "0.cell_l0_reverse", "0.cell_l1",
                                                              "0.cell_l1_reverse"]
    assert len(model[0].cells()) == 4
    apical.unwrap(model)
    assert type(model[0]) is nn.GRU and not list(model[0].children())
    assert dict(model[0].named_parameters()) == params
    assert torch.equal(model(x)[0], want)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_every_cell_takes_the_configs_activation(activation):
    model = nn.Sequential(nn.GRU(3, 4, num_layers=2, bidirectional=True))
    apical.perforate(model, apical.DendriteConfig(activation=activation))
    cells = list(model[0].cells())
    assert len(cells) == 4 and all(c.activation == activation for c in cells)
    assert {c.activation for c in DendriticGRU.wrap(nn.GRU(3, 4)).cells()} == {"sigmoid"}  # wrap's default


def test_attentive_fp_carries_dendrites_on_its_gru_cells():
    tg = pytest.importorskip("torch_geometric")
    from torch_geometric.data import Batch, Data

    torch.manual_seed(0)
    model = tg.nn.models.AttentiveFP(in_channels=5, hidden_channels=16, out_channels=2, edge_dim=3, num_layers=2,
                                     num_timesteps=2, dropout=0.0)
    graphs = []
    for n in (4, 6, 5):
        edges = torch.tensor([[i for i in range(n - 1)] + [i + 1 for i in range(n - 1)],
                              [i + 1 for i in range(n - 1)] + [i for i in range(n - 1)]])
        graphs.append(Data(x=torch.randn(n, 5), edge_index=edges, edge_attr=torch.randn(edges.shape[1], 3)))
    b = Batch.from_data_list(graphs)
    reference = copy.deepcopy(model).eval()
    apical.perforate(model, apical.DendriteConfig(mode="gd"))
    assert apical.coverage(model).fraction >= 0.95
    grus = [n for n, layer in apical.dendritic_layers(model) if isinstance(layer, DendriticRecurrentCell)]
    assert grus == ["gru", "atom_grus.0", "mol_gru"]
    for _, layer in apical.dendritic_layers(model):
        layer.install_random(1.0, torch.Generator().manual_seed(1))
    model.eval()
    args = (b.x, b.edge_index, b.edge_attr, b.batch)
    assert (model(*args) - reference(*args)).abs().max() < 1e-5


def test_grapes_leaves_recurrent_cells_alone_and_keeps_working_on_the_rest():
    from apical.grapes import grapes

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 5, batch_first=True)
            self.fc = nn.Linear(5, 5)
            self.out = nn.Linear(5, 3)

        def forward(self, x):
            o, _ = self.rnn(x)
            return self.out(torch.relu(self.fc(o[:, -1])))

    torch.manual_seed(0)
    model = Model()
    apical.perforate(model, apical.DendriteConfig(mode="pb"))
    handle = grapes(model)
    assert handle.layers == ["fc"]
    model(torch.randn(2, 6, 4)).sum().backward()
    assert model.fc.base.weight.grad is not None and model.rnn.weight_ih_l0.grad is not None


def test_the_hidden_state_placement_adds_the_dendrites_to_h_and_is_chosen_through_the_registry(tmp_path):
    from apical.dendrites.recurrent import DendriticGRUOnHidden, DendriticRecurrentCellOnHidden

    torch.manual_seed(3)
    model = nn.Sequential(nn.GRU(4, 3))
    reference = copy.deepcopy(model)
    with apical.layer_registry.registered(nn.GRU, DendriticGRUOnHidden):
        apical.perforate(model, apical.DendriteConfig(mode="pb", seed=0))
    gru = model[0]
    cell = gru.cell_l0
    assert isinstance(gru, DendriticGRUOnHidden) and isinstance(cell, DendriticRecurrentCellOnHidden)
    assert cell.out_channels == 3 and cell.weight_tail == (7,)  # H neurons reading [x, h]
    x = torch.randn(5, 2, 4)
    cell.install_random(1.0, torch.Generator().manual_seed(1))
    assert torch.allclose(model(x)[0], reference(x)[0], atol=1e-6)  # v = 0: the function is kept
    with torch.no_grad():
        cell.dendrite_out.normal_(generator=torch.Generator().manual_seed(2))
    w, b, v = cell.dendrite_weight[0].detach(), cell.dendrite_bias[0].detach(), cell.dendrite_out[0].detach()
    plain = reference[0]
    h, outs = torch.zeros(2, 3), []
    for t in range(5):  # h' = GRU(x, h) + v * sigmoid(W [x, h] + b)
        _, h_plain = plain(x[t:t + 1], h[None])
        h = h_plain[0] + v * torch.sigmoid(torch.cat([x[t], h], 1) @ w.T + b)
        outs.append(h)
    assert torch.allclose(model(x)[0], torch.stack(outs), atol=1e-6)
    apical.save(tmp_path / "h.safetensors", model)
    fresh = nn.Sequential(nn.GRU(4, 3))
    with apical.layer_registry.registered(nn.GRU, DendriticGRUOnHidden):
        apical.load(tmp_path / "h.safetensors", fresh)
    assert torch.equal(fresh(x)[0], model(x)[0])
    with pytest.raises(ValueError, match="wraps GRU, not LSTM"):
        DendriticGRUOnHidden.wrap(nn.LSTM(4, 3))


def test_a_nested_gru_loads_into_a_fresh_model(tmp_path):
    """The layer 'enc.0.cell_l0' comes from the GRU 'enc.0' two levels down (found by walking the
    name's prefixes past the containers)."""
    def build():
        torch.manual_seed(0)
        return nn.ModuleDict({"enc": nn.Sequential(nn.GRU(3, 4)), "head": nn.Linear(4, 2)})

    model = build()
    apical.perforate(model, apical.DendriteConfig(mode="gd"))
    for _, layer in apical.dendritic_layers(model):
        layer.install_random(1.0, torch.Generator().manual_seed(1))
    assert [n for n, _ in apical.dendritic_layers(model)] == ["enc.0.cell_l0", "head"]
    apical.save(tmp_path / "n.safetensors", model)  # no controller: a fresh load perforates by name
    fresh = build()
    apical.load(tmp_path / "n.safetensors", fresh)
    x = torch.randn(5, 2, 3)
    assert torch.equal(fresh["enc"](x)[0], model["enc"](x)[0])


@pytest.mark.parametrize("kind", [nn.RNNCell, nn.GRUCell, nn.LSTMCell])
def test_a_cell_keeps_its_own_signature_with_and_without_sets(kind):
    """Batched and unbatched inputs, with and without an initial state, through the fused cell (no
    set) and through the step (a set with v = 0): always the plain cell's outputs."""
    torch.manual_seed(0)
    plain = kind(4, 3)
    box = nn.Sequential(copy.deepcopy(plain))
    apical.perforate(box, apical.DendriteConfig(mode="gd"))
    cell = box[0]
    lstm = kind is nn.LSTMCell
    x = torch.randn(2, 4)
    h = (torch.randn(2, 3), torch.randn(2, 3)) if lstm else torch.randn(2, 3)

    def same(a, b):
        return all(torch.allclose(p, q, atol=1e-6) for p, q in zip(_as_tuple(a), _as_tuple(b), strict=True))

    for installed in (False, True):
        if installed:
            cell.install_random(1.0, torch.Generator().manual_seed(1))
        assert cell.active is installed
        assert same(cell(x, h), plain(x, h))
        assert same(cell(x), plain(x))
        h1 = tuple(t[0] for t in h) if lstm else h[0]
        out = cell(x[0], h1)
        assert same(out, plain(x[0], h1)) and _as_tuple(out)[0].shape == (3,)
        assert same(cell(x[0]), plain(x[0]))


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def test_the_hidden_placement_on_an_lstm_adds_to_h_and_leaves_c():
    from apical.dendrites.recurrent import DendriticRecurrentCellOnHidden

    torch.manual_seed(2)
    plain = nn.LSTMCell(4, 3)
    box = nn.Sequential(copy.deepcopy(plain))
    with apical.layer_registry.registered(nn.LSTMCell, DendriticRecurrentCellOnHidden):
        apical.perforate(box, apical.DendriteConfig(mode="pb"))
    cell = box[0]
    cell.install_random(1.0, torch.Generator().manual_seed(1))
    with torch.no_grad():
        cell.dendrite_out.normal_(generator=torch.Generator().manual_seed(3))
    x, h, c = torch.randn(2, 4), torch.randn(2, 3), torch.randn(2, 3)
    w, b, v = cell.dendrite_weight[0].detach(), cell.dendrite_bias[0].detach(), cell.dendrite_out[0].detach()
    h_plain, c_plain = plain(x, (h, c))
    h_new, c_new = cell(x, (h, c))
    assert torch.allclose(c_new, c_plain, atol=1e-6)
    assert torch.allclose(h_new, h_plain + v * torch.sigmoid(torch.cat([x, h], 1) @ w.T + b), atol=1e-6)


def test_planned_layers_read_each_directions_own_weights():
    """What perforate would create on a bidirectional GRU: one layer per cell and direction, each
    with that direction's [W_ih, W_hh] rows as its neurons' weights."""
    from apical.dendrites.model import planned_layers

    model = nn.Sequential(nn.GRU(3, 2, num_layers=2, bidirectional=True))
    gru = model[0]
    plan = planned_layers(model, apical.DendriteConfig())
    assert list(plan) == ["0.cell_l0", "0.cell_l0_reverse", "0.cell_l1", "0.cell_l1_reverse"]
    for name, (root, weight) in plan.items():
        suffix = name.split(".cell")[1]
        assert root == "0"
        rows = [getattr(gru, f"weight_ih{suffix}"), getattr(gru, f"weight_hh{suffix}")]
        assert torch.equal(weight, torch.cat(rows, 1))


def test_a_cell_kind_is_refused_by_reason():
    class Halfway(nn.Module):  # an input matrix only
        def __init__(self):
            super().__init__()
            self.weight_ih = nn.Parameter(torch.zeros(4, 3))

    class OddMode(nn.Module):  # both matrices, a mode apical does not know
        mode = "QRNN"

        def __init__(self):
            super().__init__()
            self.weight_ih, self.weight_hh = nn.Parameter(torch.zeros(4, 3)), nn.Parameter(torch.zeros(4, 4))

    class Lazy(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight_ih = nn.parameter.UninitializedParameter()

    class NoMode(nn.Module):  # both matrices, not one of torch's cells, no mode attribute
        def __init__(self):
            super().__init__()
            self.weight_ih, self.weight_hh = nn.Parameter(torch.zeros(4, 3)), nn.Parameter(torch.zeros(4, 4))

    no_weights = "it has no weight_ih / weight_hh tensors"
    assert DendriticRecurrentCell.unsupported(NoMode()) == "unknown recurrent mode None"
    assert DendriticRecurrentCell.unsupported(nn.Identity()) == no_weights
    assert DendriticRecurrentCell.unsupported(Halfway()) == no_weights
    assert DendriticRecurrentCell.unsupported(OddMode()) == "unknown recurrent mode 'QRNN'"
    assert DendriticRecurrentCell.unsupported(Lazy()) == ("it is a lazy layer that has not been initialised yet: run "
                                                          "one forward pass through the model first")
    assert DendriticRecurrentCell.unsupported(nn.GRUCell(3, 4)) is None


def test_a_cell_built_by_hand_has_sigmoid_dendrites_like_perforate_gives():
    cell = DendriticRecurrentCell(nn.GRUCell(3, 4))
    assert cell.activation == "sigmoid" == apical.DendriteConfig().activation
    cell.install_random(1.0, torch.Generator().manual_seed(0))
    u = torch.randn(5, 7)  # [x, h] side by side
    pre = u @ cell.dendrite_weight[0].T + cell.dendrite_bias[0]
    assert torch.allclose(cell.dendrite_activations(u)[:, 0], torch.sigmoid(pre))


@pytest.mark.parametrize("kind, mode", [(nn.RNNCell, "RNN_TANH"), (nn.GRUCell, "GRU"), (nn.LSTMCell, "LSTM"),
                                        (functools.partial(nn.RNNCell, nonlinearity="relu"), "RNN_RELU")],
                         ids=["rnn", "gru", "lstm", "rnn-relu"])
def test_an_unbatched_cell_step_returns_torchs_types_and_values(kind, mode):
    torch.manual_seed(0)
    plain = kind(3, 4)
    box = nn.Sequential(copy.deepcopy(plain))
    apical.perforate(box, apical.DendriteConfig(mode="gd"))
    box[0].install_random(1.0, torch.Generator().manual_seed(1))  # v = 0: the function is kept
    assert (box[0].input_size, box[0].hidden_size, box[0].mode) == (3, 4, mode)
    x = torch.randn(3)
    got, want = box[0](x), plain(x)
    if kind is nn.LSTMCell:
        assert isinstance(got, tuple) and len(got) == 2
        for a, b in zip(got, want, strict=True):
            assert a.shape == (4,) and torch.allclose(a, b, atol=1e-6)
    else:
        assert isinstance(got, torch.Tensor) and got.shape == (4,)
        assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("kind", [nn.GRU, nn.LSTM])
def test_packed_sequences_backpropagate_like_the_fused_kernel(kind):
    """Two bidirectional layers on a packed batch of unequal lengths: the step loop's input gradient
    equals the fused kernel's, and no gradient picks up anything from the padding."""
    torch.manual_seed(0)
    plain = kind(5, 4, num_layers=2, bidirectional=True)
    box = nn.Sequential(copy.deepcopy(plain))
    apical.perforate(box, apical.DendriteConfig(mode="gd"))
    for _, layer in apical.dendritic_layers(box):
        layer.install_random(1.0, torch.Generator().manual_seed(1))
    x = torch.randn(7, 3, 5)
    grads = []
    for module in (box[0], plain):
        xi = x.clone().requires_grad_(True)
        out = module(pack_padded_sequence(xi, torch.tensor([7, 3, 5]), enforce_sorted=False))[0]
        (out.data * torch.linspace(-1, 1, out.data.numel()).view_as(out.data)).sum().backward()
        grads.append(xi.grad)
        assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
