"""apical.save / apical.load: exact resume, validation of malformed files, atomic writes."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import json
import os
import pickle
import re
import signal
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch as st
import torch
from torch import nn

import apical._io as apical_io
import apical.checkpoint as ck
from apical.checkpoint import CheckpointError, load, save
from apical.dendrites import Controller, DendriteConfig, DendriticLinear, dendritic_layers, perforate, structure

pytest.importorskip("sklearn")

SCRIPT = Path(__file__).parent / "scripts" / "resume_train.py"
_spec = importlib.util.spec_from_file_location("resume_train", SCRIPT)
rt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rt)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    return rt.make_data()


def _train(data, epochs, model=None, ctl=None, opt=None, gen=None):
    """Train like the script does, stopping after ``epochs`` epochs or when the controller is done."""
    xt, yt, xv, yv = data
    if model is None:
        model, ctl, opt, gen = rt.setup()
    steps = []
    while not ctl.done and len(steps) < epochs:
        rt.train_epoch(model, opt, xt, yt, gen)
        step = ctl.step(rt.accuracy(model, xv, yv))
        steps.append(step)
        if step.restructured:
            opt = rt.make_optimizer(ctl)
    return model, ctl, opt, gen, steps


def _extra(gen, epoch):
    return {"epoch": epoch, "data_rng": gen.get_state()}


def _resume(path):
    model, ctl, opt, gen = rt.setup()
    extra = load(path, model, ctl, opt)
    gen.set_state(extra["data_rng"])
    return model, ctl, opt, gen


def _assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("epochs", [11, 15, 19])  # dendrite phase; neuron phase after an install; 2nd set
def test_round_trip_in_process_resumes_exactly(data, tmp_path, epochs):
    model, ctl, opt, gen, _ = _train(data, epochs)
    assert not ctl.done
    path = tmp_path / "ckpt.safetensors"
    save(path, model, ctl, opt, extra=_extra(gen, epochs))

    fresh = rt.make_model()  # un-perforated: load perforates it and replays the structure
    assert load(path, fresh)["epoch"] == epochs
    assert structure(fresh) == structure(model)
    _assert_same_state(fresh, model)
    xv = data[2]
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(xv), model(xv))

    model2, ctl2, opt2, gen2 = _resume(path)
    assert ctl2.state_dict()["counters"] == ctl.state_dict()["counters"]
    assert [id(p) for p in opt2.param_groups[0]["params"]] == [id(p) for p in ctl2.parameters()]
    *_, steps = _train(data, 40, model, ctl, opt, gen)
    *_, steps2 = _train(data, 40, model2, ctl2, opt2, gen2)
    assert steps2 == steps and steps[-1].done
    assert ctl2.history == ctl.history
    _assert_same_state(model2, model)


CHILD = r"""
import importlib.util, json, sys
import torch
torch.set_num_threads(1)
import safetensors.torch as st
from apical.checkpoint import load
spec = importlib.util.spec_from_file_location("resume_train", sys.argv[1])
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)
ckpt, out = sys.argv[2], sys.argv[3]
xt, yt, xv, yv = rt.make_data(sys.argv[4])
fresh = rt.make_model()
load(ckpt, fresh)
fresh.eval()
with torch.no_grad():
    logits = fresh(xv)
model, ctl, opt, gen = rt.setup()
gen.set_state(load(ckpt, model, ctl, opt)["data_rng"])
steps = []
while not ctl.done:
    rt.train_epoch(model, opt, xt, yt, gen)
    s = ctl.step(rt.accuracy(model, xv, yv))
    steps.append([s.event, s.phase, s.dendrites, s.score])
    if s.restructured:
        opt = rt.make_optimizer(ctl)
tensors = {"logits": logits, **{"state/" + k: v.contiguous() for k, v in model.state_dict().items()}}
st.save_file(tensors, out, metadata={"steps": json.dumps(steps)})
"""


def test_round_trip_in_a_fresh_process(data, tmp_path):
    model, ctl, opt, gen, _ = _train(data, 15)
    path = tmp_path / "ckpt.safetensors"
    save(path, model, ctl, opt, extra=_extra(gen, 15))
    out = tmp_path / "child.safetensors"
    rt.save_data(str(tmp_path / "digits.safetensors"))
    res = subprocess.run([sys.executable, "-c", CHILD, str(SCRIPT), str(path), str(out),
                          str(tmp_path / "digits.safetensors")], env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    child = st.load_file(out)
    with open(out, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        child_steps = json.loads(json.loads(f.read(n))["__metadata__"]["steps"])
    model.eval()
    with torch.no_grad():
        assert torch.equal(child["logits"], model(data[2]))
    *_, steps = _train(data, 40, model, ctl, opt, gen)
    assert child_steps == [[s.event, s.phase, s.dendrites, s.score] for s in steps]
    state = model.state_dict()
    assert sorted(state) == sorted(k[len("state/"):] for k in child if k.startswith("state/"))
    for k, v in state.items():
        assert torch.equal(child["state/" + k], v), k


def test_mid_epoch_save_restores_correlation_statistics(data, tmp_path):
    model, ctl, opt, gen, _ = _train(data, 11)
    assert ctl.phase == "dendrite"
    xt, yt, xv, yv = data
    model.train()
    for i in range(0, 300, 100):  # three batches of the next dendrite-phase epoch
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt[i : i + 100]), yt[i : i + 100]).backward()
        opt.step()
    path = tmp_path / "mid.safetensors"
    save(path, model, ctl, opt, extra=_extra(gen, 11))
    model2, ctl2, opt2, _ = _resume(path)
    for (_, a), (_, b) in zip(ctl.layers, ctl2.layers, strict=True):
        assert a.stats.n == b.stats.n > 0
        for f in ("shift_a", "shift_d", *a.stats.FIELDS):
            assert torch.equal(getattr(a.stats, f), getattr(b.stats, f))
    for m, o in ((model, opt), (model2, opt2)):
        m.train()
        for i in range(300, 1200, 100):
            o.zero_grad()
            nn.functional.cross_entropy(m(xt[i : i + 100]), yt[i : i + 100]).backward()
            o.step()
    assert ctl2.step(0.5) == ctl.step(0.5)
    _assert_same_state(model2, model)


def test_extra_round_trips_json_values_and_tensors(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2))
    extra = {"epoch": 3, "lr": 1e-3, "flag": True, "none": None, "name": "x", "t": torch.arange(4),
             "nested": {"pair": (1, 2.5), "inf": float("-inf"), 7: ["a", torch.ones(2, dtype=torch.bfloat16)]},
             "__dunder": 1}
    save(tmp_path / "a.safetensors", model, extra=extra)
    back = load(tmp_path / "a.safetensors", nn.Sequential(nn.Linear(3, 2)))
    assert back["nested"]["pair"] == (1, 2.5) and back["nested"]["inf"] == float("-inf")
    assert torch.equal(back["t"], extra["t"]) and back["nested"][7][1].dtype == torch.bfloat16
    assert {k: v for k, v in back.items() if k not in ("t", "nested")} == {
        k: v for k, v in extra.items() if k not in ("t", "nested")}


def test_a_dict_key_holding_a_tensor_is_refused_at_save_and_nothing_is_written(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2))
    path = tmp_path / "k.safetensors"
    for key, kind in ((torch.tensor(1), "Tensor"), ((1, torch.tensor(2.0)), "tuple")):
        with pytest.raises(CheckpointError, match=rf"^cannot save 'extra/d': a dict key holds a tensor \({kind}\); "
                           r"keys must be None, bool, int, float, str or tuples of them$"):
            save(path, model, extra={"d": {key: 1}})
        assert not path.exists()
    save(path, model, extra={"d": {(1, ("a", None)): 2, 3.5: "x"}})  # keys made of JSON values are fine
    assert load(path, nn.Sequential(nn.Linear(3, 2)))["d"] == {(1, ("a", None)): 2, 3.5: "x"}


def test_module_names_that_read_as_regexes_load_into_a_fresh_model(tmp_path):
    """Saved without a controller, a fresh load perforates by the saved layer names: they are names,
    not patterns ("fc.1" must not also select "fcx1"; "a(b" is no valid regex)."""
    def build():
        torch.manual_seed(0)
        return nn.ModuleDict({"fc": nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), "fcx1": nn.Linear(4, 2),
                              "a(b": nn.Linear(2, 2)})

    model = build()
    perforate(model, DendriteConfig(mode="gd", include=[r"fc\.1", r"a\(b"]))
    for _, layer in dendritic_layers(model):
        layer.install_random(1.0, torch.Generator().manual_seed(1))
    save(tmp_path / "r.safetensors", model)
    fresh = build()
    load(tmp_path / "r.safetensors", fresh)
    assert sorted(n for n, _ in dendritic_layers(fresh)) == ["a(b", "fc.1"]
    _assert_same_state(fresh, model)


def test_a_non_finite_config_value_is_refused_at_save_and_nothing_is_written(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2))
    cfg = DendriteConfig(mode="pb")
    perforate(model, cfg)
    ctl = Controller(model, cfg)
    object.__setattr__(ctl.config, "init_scale", float("inf"))  # edited after it was validated
    path = tmp_path / "nf.safetensors"
    with pytest.raises(CheckpointError, match="the configuration holds a value JSON cannot store"):
        save(path, model, ctl)
    assert not path.exists()


def test_tied_weights_and_plain_models(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    save(tmp_path / "tied.safetensors", model)
    other = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    load(tmp_path / "tied.safetensors", other)
    assert torch.equal(other[1].weight, model[0].weight)


def test_load_never_unpickles(data, tmp_path, monkeypatch):
    model, ctl, opt, gen, _ = _train(data, 3)
    save(tmp_path / "c.safetensors", model, ctl, opt, extra=_extra(gen, 3))

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    _resume(tmp_path / "c.safetensors")


# ---------------------------------------------------------------------------------- malformed files
def _split(data: bytes):
    n = int.from_bytes(data[:8], "little")
    meta = dict(json.loads(data[8 : 8 + n])["__metadata__"])
    return meta, st.load(data)


def _rebuild(meta, tensors, resign=True) -> bytes:
    if resign:  # a forger can recompute the checksum: the content checks must still hold
        meta["sha256"] = ck._digest(meta, tensors)
    return st.save(tensors, metadata=meta)


def _edit(fn, resign=True):
    def mutate(data: bytes) -> bytes:
        meta, tensors = _split(data)
        sections = {k: json.loads(meta[k]) for k in ck._JSON_KEYS}
        fn(sections, tensors, meta)
        for k in ck._JSON_KEYS:
            meta[k] = json.dumps(sections[k])  # allow_nan: NaN written as a bare literal
        return _rebuild(meta, tensors, resign)
    return mutate


def _meta(key, value):
    def fn(sections, tensors, meta):
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    return _edit(fn, resign=key != "sha256")


def _flip(offset_from_end):
    def mutate(data):
        b = bytearray(data)
        b[len(b) - offset_from_end] ^= 0x01
        return bytes(b)
    return mutate


def _flip_header(data):
    b = bytearray(data)
    i = data.index(b'"apical_version"') + 20
    b[i] ^= 0x01
    return bytes(b)


def _set(section, *keys, value):
    def fn(sections, tensors, meta):
        obj = sections[section]
        for k in keys[:-1]:
            obj = obj[k]
        obj[keys[-1]] = value
    return _edit(fn)


def _replace_tensor(name, new):
    def fn(sections, tensors, meta):
        tensors[name] = new(tensors[name])
    return _edit(fn)


def _missing_key(sections, tensors, meta):
    ref = sections["model"].pop("2.base.bias")["__tensor__"]
    del tensors[ref]


def _extra_key(sections, tensors, meta):
    tensors["model/3.weight"] = torch.zeros(2)
    sections["model"]["3.weight"] = {"__tensor__": "model/3.weight"}


def _orphan(sections, tensors, meta):
    tensors["junk"] = torch.zeros(3)


def _dangling(sections, tensors, meta):
    sections["model"]["0.base.bias"] = {"__tensor__": "model/nowhere"}


def _opt_state_shape(sections, tensors, meta):
    state = sections["optimizer"]["state_dict"]["state"]["__dict__"]
    ref = state[0][1]["exp_avg"]["__tensor__"]
    tensors[ref] = torch.zeros(3, 3)


def _duplicate_key(data):
    meta, tensors = _split(data)
    meta["layers"] = meta["layers"][:-1] + ',"0":{"activation":"sigmoid","normaliser":"error","centring":"batch"}}'
    return _rebuild(meta, tensors)


def _torch_pickle(data):
    buf = io.BytesIO()
    torch.save({"weight": torch.ones(2)}, buf)
    return buf.getvalue()


def _no_controller(data):
    model = rt.make_model()
    perforate(model, DendriteConfig(**rt.CONFIG))
    return _save_bytes(model)


def _save_bytes(model) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        save(Path(d) / "x.safetensors", model)
        return (Path(d) / "x.safetensors").read_bytes()


def _target(kind):
    """Model, controller and optimiser to load into, built as a user would."""
    if kind == "fresh":
        return rt.make_model(), None, None
    if kind == "deep":
        return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10)), None, None
    cfg = DendriteConfig(**rt.CONFIG)
    model = rt.make_model()
    if kind == "wide":
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    if kind == "tanh":
        cfg = DendriteConfig(**{**rt.CONFIG, "activation": "tanh"})
    if kind == "gd":
        cfg = DendriteConfig(**{**rt.CONFIG, "mode": "gd"})
    if kind == "unperforated-controller":
        ctl = Controller(model, DendriteConfig(mode="none"))
        return model, ctl, torch.optim.Adam(ctl.parameters())
    perforate(model, cfg)
    ctl = Controller(model, cfg, maximize=True)
    if kind == "sgd":
        return model, ctl, torch.optim.SGD(ctl.parameters(), lr=0.1)
    return model, ctl, rt.make_optimizer(ctl)


CASES = [
    # (id, mutation of the good file's bytes or a special action, target, expected words)
    ("empty-file", lambda d: b"", "resume", "is empty"),
    ("truncated-half", lambda d: d[: len(d) // 2], "resume", "truncated"),
    ("truncated-one-byte", lambda d: d[:-1], "resume", "truncated"),
    ("trailing-bytes", lambda d: d + b"\0", "resume", "longer than its header"),
    ("short-file", lambda d: d[:5], "resume", "too short"),
    ("flipped-tensor-byte", _flip(3), "resume", "sha256 checksum mismatch"),
    ("flipped-header-byte", _flip_header, "resume", "sha256 checksum mismatch"),
    ("text-file", lambda d: b"this is not a checkpoint\n" * 20, "resume", "not a safetensors file"),
    ("torch-pickle-file", _torch_pickle, "resume", "not a safetensors file"),
    ("plain-safetensors", lambda d: st.save({"w": torch.ones(2)}), "resume", "no safetensors metadata"),
    ("other-format", _meta("format", "something.else"), "resume", "not an apical checkpoint"),
    ("future-version", _meta("format_version", "2"), "resume", "newer apical"),
    ("bad-version", _meta("format_version", "one"), "resume", "invalid format_version"),
    ("no-checksum", _meta("sha256", None), "resume", "no 'sha256'"),
    ("unknown-metadata", _meta("comment", "hi"), "resume", "unknown metadata entry 'comment'"),
    ("more-dendrites-than-tensors", _set("structure", "0", "dendrites", value=2), "fresh", "growth record"),
    ("more-candidates-than-tensors", _set("structure", "2", "candidates", value=3), "resume", "growth record"),
    ("negative-dendrites", _set("structure", "0", "dendrites", value=-1), "fresh", "integer >= 0"),
    ("boolean-dendrites", _set("structure", "0", "dendrites", value=True), "fresh", "integer >= 0"),
    ("unknown-layer-in-structure", _set("structure", "9", value={"dendrites": 0, "candidates": 0}), "fresh",
     "layers metadata"),
    ("wrong-shape", _replace_tensor("model/0.base.weight", lambda t: t[:, :63].contiguous()), "resume",
     "'0.base.weight' has shape (16, 63)"),
    ("wrong-dtype", _replace_tensor("model/0.base.weight", lambda t: t.double()), "resume", "dtype torch.float64"),
    ("missing-key", _edit(_missing_key), "resume", "'2.base.bias' is missing"),
    ("extra-key", _edit(_extra_key), "fresh", "'3.weight', which the model does not have"),
    ("orphan-tensor", _edit(_orphan), "resume", "'junk', which nothing refers to"),
    ("dangling-reference", _edit(_dangling), "resume", "does not hold"),
    ("nan-literal-in-counters", _set("controller", "counters", "best", value=float("nan")), "resume",
     "NaN is not valid JSON"),
    ("overflowing-number", _set("config", "init_scale", value=1e308 * 10), "fresh", "Infinity is not valid"),
    ("tagged-nan-counter", _set("controller", "counters", "best", value={"__float__": "nan"}), "resume",
     "finite number"),
    ("unknown-tag", _set("controller", "counters", "best", value={"__pickle__": "x"}), "resume", "unknown tagged"),
    ("unknown-phase", _set("controller", "counters", "phase", value="sleeping"), "resume", "phase 'sleeping'"),
    ("counter-disagrees-with-structure", _set("controller", "counters", "dendrites", value=2), "resume",
     "counts 2 dendrites"),
    ("config-unknown-field", _set("config", "colour", value="red"), "fresh", "config is invalid"),
    ("repeated-json-key", _duplicate_key, "resume", "repeated JSON key"),
    ("bad-generator-state", _replace_tensor("controller/generator", lambda t: t[:10].clone()), "resume",
     "generator state"),
    ("optimizer-unknown-parameter", _set("optimizer", "names", 0, 0, value="9.weight"), "resume",
     "parameter '9.weight'"),
    ("optimizer-state-shape", _edit(_opt_state_shape), "resume", "has shape (3, 3)"),
    ("other-architecture", None, "wide", "'0.base.weight' has shape (16, 64) but the model needs (32, 64)"),
    ("other-architecture-unperforated", None, "deep", "'2.base.weight' has shape (10, 16)"),
    ("optimizer-class", None, "sgd", "optimizer state is for 'torch.optim.adam.Adam'"),
    ("controller-mode", None, "gd", "mode 'pb'"),
    ("activation-mismatch", None, "tanh", "activation 'tanh'"),
    ("controller-on-unperforated-model", None, "unperforated-controller", "un-perforated"),
    ("no-controller-state", _no_controller, "resume", "holds no controller state"),
    ("directory", "directory", "resume", "is a directory"),
    ("missing-file", "missing", "resume", "does not exist"),
]


@pytest.fixture(scope="module")
def good_file(data, tmp_path_factory):
    model, ctl, opt, gen, _ = _train(data, 19)  # second dendrite phase: candidates, cascade, dp snapshot
    assert ctl.phase == "dendrite" and ctl.dendrites == 1
    path = tmp_path_factory.mktemp("good") / "ckpt.safetensors"
    save(path, model, ctl, opt, extra=_extra(gen, 19))
    return path.read_bytes()


def _snapshot(model, ctl, opt):
    snap = {
        "structure": structure(model),
        "modules": [type(m).__name__ for m in model.modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": [(n, p.requires_grad, id(p)) for n, p in model.named_parameters()],
    }
    if ctl is not None:
        snap["ctl"] = copy.deepcopy({k: v for k, v in ctl.state_dict().items()
                                     if k in ("counters", "history", "structure", "maximize")})
    if opt is not None:
        snap["opt"] = ([id(p) for g in opt.param_groups for p in g["params"]], copy.deepcopy(opt.state_dict()))
    return snap


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key == "state":
            assert a[key].keys() == b[key].keys()
            for k in a[key]:
                assert torch.equal(a[key][k], b[key][k]), k
        else:
            assert a[key] == b[key], key


def test_malformed_cases_are_edits_of_a_loadable_file(good_file, tmp_path):
    """The control for the malformed cases below: the file they edit loads into both targets they use, and
    every edit changes its bytes, so each refusal is caused by the edit (or by the target the case names).
    (That each case raises CheckpointError and leaves the file byte-identical is checked per case below.)"""
    ids = [c[0] for c in CASES]
    assert len(ids) >= 20 and len(set(ids)) == len(ids)
    path = tmp_path / "good.safetensors"
    path.write_bytes(good_file)
    for kind in ("resume", "fresh"):
        model, ctl, opt = _target(kind)
        assert load(path, model, ctl, opt)["epoch"] == 19
        assert structure(model) == {"0": {"dendrites": 1, "candidates": 2}, "2": {"dendrites": 1, "candidates": 2}}
        if ctl is not None:
            assert ctl.phase == "dendrite" and ctl.epoch == 19
    assert path.read_bytes() == good_file
    for name, mutate, kind, _ in CASES:
        if callable(mutate):
            assert mutate(good_file) != good_file, name
        else:  # no edit: the target itself does not fit the good file
            assert mutate in (None, "directory", "missing") and (mutate is not None or kind not in ("resume", "fresh"))


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_loaded_model_computes_the_dendrite_formula(tmp_path, activation):
    """A checkpoint of tensors set by hand, loaded into a fresh plain model, computes
    z = W x + b + sum_k v_k f(D_k x + b_k + sum_{e<k} u_ke a_e) per layer, written out in numpy."""
    g = torch.Generator().manual_seed(11)

    def net():
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

    model = perforate(net(), DendriteConfig(activation=activation))
    ref = []
    for i, sets in ((0, 2), (2, 1)):
        layer = model[i]
        layer.resize(sets)
        o, n = layer.out_channels, layer.fan_in
        t = {"W": torch.randn(o, n, generator=g), "b": torch.randn(o, generator=g),
             "D": torch.randn(sets, o, n, generator=g), "bd": torch.randn(sets, o, generator=g),
             "u": torch.randn(sets, sets, o, generator=g), "v": torch.randn(sets, o, generator=g)}
        with torch.no_grad():
            layer.base.weight.copy_(t["W"])
            layer.base.bias.copy_(t["b"])
            layer.dendrite_weight.copy_(t["D"])
            layer.dendrite_bias.copy_(t["bd"])
            layer.dendrite_cascade.copy_(t["u"])  # only its strictly lower triangle may count
            layer.dendrite_out.copy_(t["v"])
        ref.append({k: v.double().numpy() for k, v in t.items()})
    save(tmp_path / "hand.safetensors", model)

    fresh = net()
    load(tmp_path / "hand.safetensors", fresh)
    x = torch.randn(5, 3, generator=g)
    fresh.eval()
    with torch.no_grad():
        got = fresh(x).double().numpy()

    f = {"sigmoid": lambda s: 1 / (1 + np.exp(-s)), "tanh": np.tanh}[activation]
    h = x.double().numpy()
    for i, r in enumerate(ref):
        z = h @ r["W"].T + r["b"]
        acts = []
        for k in range(len(r["v"])):
            pre = h @ r["D"][k].T + r["bd"][k]
            for e in range(k):
                pre = pre + r["u"][k, e] * acts[e]
            acts.append(f(pre))
            z = z + r["v"][k] * acts[k]
        h = np.tanh(z) if i == 0 else z
    np.testing.assert_allclose(got, h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_refused_without_side_effects(good_file, tmp_path, case):
    _, mutate, kind, expect = case
    path = tmp_path / "ckpt.safetensors"
    if mutate == "directory":
        path.mkdir()
    elif mutate != "missing":
        path.write_bytes(good_file if mutate is None else mutate(good_file))
    before = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    model, ctl, opt = _target(kind)
    snap = _snapshot(model, ctl, opt)
    with pytest.raises(CheckpointError) as info:
        load(path, model, ctl, opt)
    message = str(info.value)
    assert "\n" not in message
    assert expect in message, message
    _same(_snapshot(model, ctl, opt), snap)
    after = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    assert after == before


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


# ---------------------------------------------------------------------------------- atomic writes
def test_crash_mid_save_keeps_previous_checkpoint(data, tmp_path, monkeypatch):
    model, ctl, opt, gen, _ = _train(data, 3)
    path = tmp_path / "ckpt.safetensors"
    save(path, model, ctl, opt, extra=_extra(gen, 3))
    good = path.read_bytes()
    *_, steps = _train(data, 2, model, ctl, opt, gen)

    def half_then_crash(f, payload):
        f.write(payload[: len(payload) // 2])
        f.flush()
        raise OSError("No space left on device")

    def replace_crash(src, dst):
        raise KeyboardInterrupt  # e.g. Ctrl-C between the write and the rename

    with monkeypatch.context() as m:
        m.setattr(apical_io, "_write_file", half_then_crash)
        with pytest.raises(OSError, match="No space"):
            save(path, model, ctl, opt, extra=_extra(gen, 5))
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["ckpt.safetensors"]
    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace_crash)
        with pytest.raises(KeyboardInterrupt):
            save(path, model, ctl, opt, extra=_extra(gen, 5))
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["ckpt.safetensors"]
    assert _resume(path)[1].epoch == 3  # still loads

    with pytest.raises(CheckpointError, match="neither a tensor nor a JSON value"):
        save(path, model, ctl, opt, extra={"bad": object()})
    assert path.read_bytes() == good
    with pytest.raises(CheckpointError, match="is a directory"):
        save(tmp_path, model)
    save(path, model, ctl, opt, extra=_extra(gen, 5))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.safetensors"]
    assert load(path, rt.make_model())["epoch"] == 5


# ---------------------------------------------------------------------------------- SIGKILL + resume
def _final(path: Path):
    tensors = st.load_file(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))["__metadata__"]
    return tensors, meta


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    full.mkdir()
    killed.mkdir()
    rt.save_data(str(tmp_path / "digits.safetensors"))
    cmd = [sys.executable, str(SCRIPT), "--data", str(tmp_path / "digits.safetensors")]
    reference = subprocess.Popen([*cmd, str(full)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
    victim = subprocess.Popen([*cmd, str(killed)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    seen = []
    for line in victim.stdout:
        seen.append(line)
        # kill inside the second dendrite phase: candidates, cascade and a dendrite-phase snapshot exist
        if "phase=dendrite dendrites=1" in line and "dendrite_phase" not in line:
            os.kill(victim.pid, signal.SIGKILL)
            break
    victim.wait(timeout=60)
    victim.stdout.close()
    victim.stderr.close()
    assert victim.returncode == -signal.SIGKILL, "".join(seen)
    assert not (killed / "final.safetensors").exists()
    resumed = subprocess.run([*cmd, str(killed), "--resume"], env=ENV, capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.startswith("resumed at epoch ")
    out, err = reference.communicate(timeout=120)
    assert reference.returncode == 0, err[-2000:]
    assert seen == out.splitlines(keepends=True)[: len(seen)]  # same trajectory up to the kill

    ta, ma = _final(full / "final.safetensors")
    tb, mb = _final(killed / "final.safetensors")
    assert ma == mb  # structure, controller history and decisions, optimiser hyper-parameters
    assert json.loads(ma["structure"]) == {"0": {"dendrites": 2, "candidates": 0},
                                           "2": {"dendrites": 2, "candidates": 0}}
    assert ta.keys() == tb.keys()
    for k in ta:  # bitwise: weights, controller snapshots, optimiser state
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


# ---------------------------------------------------------------------------------- exact behaviours
# A small model grown by a scripted sequence of scores (fast); every expectation below is written by
# hand or computed from the file's bytes with safetensors/json/hashlib, never by apical.checkpoint.
SMALL = {"seed": 0, "candidates": 2, "patience": 1, "dendrite_patience": 1, "min_dendrite_epochs": 1,
         "max_dendrite_epochs": 2}
SECTIONS = ("structure", "config", "layers", "model", "controller", "stats", "optimizer", "extra")


def _net():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _six():
    return nn.Sequential(*[nn.Linear(3, 3) for _ in range(6)])


def _batch(model, opt):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g)
    x = x.to(next(model.parameters()).dtype)
    model.train()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _grown(epochs, cfg=None, net=_net, lr=0.01):
    """Scores .5 .5 (plateau: dendrite phase) then two dendrite epochs (install), .6 .6 (kept: the second
    dendrite phase), one more dendrite epoch; then one batch of the next epoch (statistics mid-epoch)."""
    torch.manual_seed(0)
    model, cfg = net(), cfg or DendriteConfig(**SMALL)
    perforate(model, cfg)
    ctl = Controller(model, cfg)
    opt = torch.optim.Adam(ctl.parameters(), lr=lr)
    for score in [0.5, 0.5, 0.5, 0.5, 0.6, 0.6, 0.6][:epochs]:
        _batch(model, opt)
        if ctl.step(score).restructured:
            opt = torch.optim.Adam(ctl.parameters(), lr=lr)
    _batch(model, opt)
    return model, ctl, opt


def _bytes_of(model, ctl=None, opt=None, extra=None) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        save(Path(d) / "x.safetensors", model, ctl, opt, extra=extra)
        return (Path(d) / "x.safetensors").read_bytes()


@pytest.fixture(scope="module")
def small():
    """'dendrite': 1 set installed, 2 candidates, mid-epoch statistics, a dendrite-phase snapshot;
    'neuron': 1 set on trial, best_state with 1 set, accepted_state with none; 'plain': no dendrites."""
    model, ctl, _ = _grown(7)
    return {"dendrite": _bytes_of(*_grown(7), extra={"epoch": 7}),
            "neuron": _bytes_of(*_grown(5), extra={"epoch": 5}),
            "plain": _bytes_of(_net()),
            "perforated": _bytes_of(perforate(_net(), DendriteConfig(**SMALL))),
            "no-optimizer": _bytes_of(model, ctl),
            "six": _bytes_of(perforate(_six(), DendriteConfig()))}


def _small_target(kind):
    if kind == "fresh":
        return _net(), None, None
    cfg = DendriteConfig(**SMALL)
    model = perforate(_net(), cfg)
    if kind == "model":
        return model, None, None
    ctl = Controller(model, cfg)
    if kind == "sgd":
        return model, ctl, torch.optim.SGD(ctl.parameters(), lr=0.1)
    return model, ctl, (None if kind == "ctl" else torch.optim.Adam(ctl.parameters(), lr=0.01))


def _header(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])


def _raw(header: dict, body: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


def _sha(meta: dict, tensors: dict) -> str:
    """The documented checksum written out again: sha256 over length-prefixed fields (a tag, every metadata
    entry but sha256 by sorted key, then every tensor by sorted name: name, dtype+shape, raw bytes)."""
    h = hashlib.sha256()

    def put(b: bytes):
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    put(b"apical.checkpoint/digest/1")
    for k in sorted(meta):
        if k != "sha256":
            put(k.encode())
            put(meta[k].encode())
    for k in sorted(tensors):
        t = tensors[k]
        put(k.encode())
        put(f"{t.dtype}{tuple(t.shape)}".encode())
        put(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _refs(obj, out):
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"} and isinstance(obj["__tensor__"], str):
            out.add(obj["__tensor__"])
        for v in obj.values():
            _refs(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _refs(v, out)
    return out


def _forge(data: bytes, fn, prune=True) -> bytes:
    """Edit a file's JSON sections / tensors / metadata with ``fn`` and sign it again (as a forger can);
    tensors the edit left unreferenced are dropped unless ``prune`` is False."""
    meta, tensors = dict(_header(data)["__metadata__"]), st.load(data)
    sections = {k: json.loads(meta[k]) for k in SECTIONS}
    before = {k: json.dumps(v) for k, v in sections.items()}
    fn(sections, tensors, meta)
    for k in SECTIONS:
        if k in meta and json.dumps(sections[k]) != before[k]:
            meta[k] = json.dumps(sections[k])
    if prune:
        used = _refs([v for k, v in sections.items() if k in meta], set())
        tensors = {k: v for k, v in tensors.items() if k in used}
    meta["sha256"] = _sha(meta, tensors)
    return st.save(tensors, metadata=meta)


def _at(obj, keys):
    for k in keys:
        obj = obj[k]
    return obj


def _put(kind, section, *keys, value):
    def fn(sections, tensors, meta):
        if keys:
            _at(sections[section], keys[:-1])[keys[-1]] = value
        else:
            sections[section] = value
    return lambda files, path: path.write_bytes(_forge(files[kind], fn))


def _drop(kind, section, *keys):
    def fn(sections, tensors, meta):
        del _at(sections[section], keys[:-1])[keys[-1]]
    return lambda files, path: path.write_bytes(_forge(files[kind], fn))


def _with(kind, fn, prune=True):
    return lambda files, path: path.write_bytes(_forge(files[kind], fn, prune))


def _meta_entry(kind, key, value):
    def fn(sections, tensors, meta):
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    return lambda files, path: path.write_bytes(_forge(files[kind], fn))


def _tensor(kind, name, new):
    def fn(sections, tensors, meta):
        tensors[name] = new(tensors[name])
    return lambda files, path: path.write_bytes(_forge(files[kind], fn))


def _data(make):
    return lambda files, path: path.write_bytes(make(files))


def _under_a_file(files, path):
    if os.name != "posix":
        pytest.skip("POSIX error text")
    path.write_bytes(b"x")
    return path / "c.safetensors"


def _fifo(files, path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(path)


def _garbled_tensor_header(files):
    """The header describes a tensor of 2 floats in 4 bytes; every size check of the file still holds."""
    data = files["plain"]
    header = _header(data)
    n = int.from_bytes(data[:8], "little")
    header["model/0.bias"]["shape"] = [2]
    return _raw(header, data[8 + n :])


def _safetensors_error(data) -> str:
    try:
        st.load(data)
    except Exception as err:  # whatever the installed safetensors raises
        return f"{type(err).__name__}: {err}"
    raise AssertionError("safetensors read the garbled file")


def _unhashable_key(sections, tensors, meta):
    sections["extra"] = {"__dict__": [[{"__tuple__": [[1]]}, 2]]}


def _snapshot_two_sets(sections, tensors, meta):
    snap = sections["controller"]["accepted_state"]
    tensors["two"] = torch.zeros(2, 4, 3)
    snap["0.dendrite_weight"] = {"__tensor__": "two"}


def _snapshot_scalar(sections, tensors, meta):
    tensors["scalar"] = torch.zeros(())
    sections["controller"]["accepted_state"]["0.dendrite_weight"] = {"__tensor__": "scalar"}


def _snapshot_candidate(sections, tensors, meta):
    sections["controller"]["accepted_state"]["0.candidate_bias"] = sections["model"]["0.candidate_bias"]


def _orphans(sections, tensors, meta):
    tensors["z_junk"] = torch.zeros(1)
    tensors["a_junk"] = torch.zeros(1)


def _two_missing(sections, tensors, meta):
    for key in ("0.dendrite_out", "2.base.bias"):
        del tensors[sections["model"].pop(key)["__tensor__"]]


def _neuron_with_dp_snapshot(sections, tensors, meta):
    sections["controller"]["dp_snapshot"] = {}


def _dp_fields(sections, tensors, meta):
    del sections["controller"]["dp_snapshot"]["0"]["signs"]


def _dp_scores_float32(sections, tensors, meta):
    name = sections["controller"]["dp_snapshot"]["0"]["scores"]["__tensor__"]
    tensors[name] = tensors[name].float()


def _dp_weight_shape(sections, tensors, meta):
    name = sections["controller"]["dp_snapshot"]["0"]["weight"]["__tensor__"]
    tensors[name] = tensors[name][:, :, :2].contiguous()


def _stats_ref(name, new):
    def fn(sections, tensors, meta):
        ref = sections["stats"]["0"][name]["__tensor__"]
        tensors[ref] = new(tensors[ref])
    return fn


def _opt_state(pid, key, new):
    def fn(sections, tensors, meta):
        pairs = sections["optimizer"]["state_dict"]["state"]["__dict__"]
        values = next(v for k, v in pairs if k == pid)
        ref = values[key]["__tensor__"]
        tensors[ref] = new(tensors[ref])
    return fn


def _opt_pairs(edit):
    def fn(sections, tensors, meta):
        edit(sections["optimizer"]["state_dict"]["state"]["__dict__"])
    return fn


def _opt_group(edit):
    def fn(sections, tensors, meta):
        edit(sections["optimizer"]["state_dict"]["param_groups"][0], sections["optimizer"]["names"][0])
    return fn


def _generator(new):
    def fn(sections, tensors, meta):
        tensors["controller/generator"] = new(tensors["controller/generator"])
    return fn


def _both_configs(key, value):
    def fn(sections, tensors, meta):
        sections["config"][key] = value
        sections["controller"]["config"][key] = value
    return fn


def _counter(key, value):
    return _put("dendrite", "controller", "counters", key, value=value)


NO_FIT = "does not fit: "
BAD = "is invalid: "


def _unsigned(data):
    meta, tensors = dict(_header(data)["__metadata__"]), st.load(data)
    del meta["sha256"]
    return st.save(tensors, metadata=meta)


def _resigned_not(data):
    meta, tensors = dict(_header(data)["__metadata__"]), st.load(data)
    meta["apical_version"] = "0.0.0"
    return st.save(tensors, metadata=meta)


def _entries(*entries, body=b""):
    header = {"__metadata__": {}}
    for i, entry in enumerate(entries):
        header[f"t{i}"] = entry
    return _data(lambda files: _raw(header, body))


def _text(raw: bytes):
    return _data(lambda files: len(raw).to_bytes(8, "little") + raw)


def _f32(n):
    return {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}


def _size_of(*entries):
    header = {"__metadata__": {}}
    for i, entry in enumerate(entries):
        header[f"t{i}"] = entry
    return 8 + len(json.dumps(header).encode())


def _snap_tensor(label, key, new):
    def fn(sections, tensors, meta):
        ref = sections["controller"][label][key]["__tensor__"]
        tensors[ref] = new(tensors[ref])
    return fn


def _extra_as(value):
    return _put("plain", "extra", value=value)


def _not_a_tensor(sections, tensors, meta):
    sections["model"]["0.base.weight"] = 5


def _add_model_key(sections, tensors, meta):
    tensors["model/9.weight"] = torch.zeros(1)
    sections["model"]["9.weight"] = {"__tensor__": "model/9.weight"}


def _snapshot_key(sections, tensors, meta):
    sections["controller"]["accepted_state"]["9.weight"] = sections["model"]["0.base.bias"]


def _stats_copy(sections, tensors, meta):
    sections["stats"]["9"] = dict(sections["stats"]["0"])


def _stale_controller():
    from apical.dendrites import unwrap

    model, ctl, opt = _small_target("resume")
    unwrap(model, force=True)
    perforate(model, DendriteConfig(**SMALL))
    return model, ctl, opt


TARGETS = {
    "other-model": lambda: (perforate(_net(), DendriteConfig(**SMALL)),
                            Controller(perforate(_net(), DendriteConfig(**SMALL)), DendriteConfig(**SMALL)), None),
    "unperforated-controller": lambda: (lambda m: (m, Controller(m, DendriteConfig(mode="none")), None))(_net()),
    "stale-controller": _stale_controller,
    "gd": lambda: (lambda c: (lambda m: (m, Controller(m, c), None))(perforate(_net(), c)))(
        DendriteConfig(**{**SMALL, "mode": "gd"})),
    "only-0": lambda: (perforate(_net(), DendriteConfig(include=["0"])), None, None),
    "six": lambda: (perforate(_six(), DendriteConfig()), None, None),
    "tanh": lambda: (perforate(_net(), DendriteConfig(activation="tanh")), None, None),
    "relu-head": lambda: (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.ReLU()), None, None),
    "no-head": lambda: (nn.Sequential(nn.Linear(3, 4)), None, None),
    "wide": lambda: (nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)), None, None),
}

D, N, P = "dendrite", "neuron", "plain"
REFUSALS = [
    # ---- reading the file (_read)
    ("missing", lambda files, path: None, "fresh", "does not exist"),
    ("under-a-file", _under_a_file, "fresh", "cannot be read (Not a directory)"),
    ("directory", lambda files, path: path.mkdir(), "fresh", "is a directory, not a checkpoint file"),
    ("fifo", _fifo, "fresh", "is not a regular file"),
    ("empty", _data(lambda files: b""), "fresh", "is empty"),
    ("seven-bytes", _data(lambda files: bytes(7)), "fresh",
     "is not a safetensors file (7 bytes, too short for a header)"),
    ("eight-bytes", _data(lambda files: bytes(8)), "fresh",
     "is not a safetensors file (unreadable header: Expecting value: line 1 column 1 (char 0))"),
    ("header-past-the-end", _data(lambda files: (3).to_bytes(8, "little") + b"{}"), "fresh",
     "is truncated or not a safetensors file (header of 3 bytes, file of 10)"),
    ("header-to-the-end", _text(b"{}"), "fresh", "is not an apical checkpoint (no safetensors metadata)"),
    ("header-not-utf8", _text(b"\xff\xfe"), "fresh", "is not a safetensors file (unreadable header: 'utf-8' codec "
     "can't decode byte 0xff in position 0: invalid start byte)"),
    ("header-repeated-key", _text(b'{"a":1,"a":2}'), "fresh",
     "is not a safetensors file (unreadable header: repeated JSON key 'a')"),
    ("header-nan", _text(b'{"a":NaN}'), "fresh",
     "is not a safetensors file (unreadable header: NaN is not valid JSON)"),
    ("header-overflow", _text(b'{"a":1e999}'), "fresh",
     "is not a safetensors file (unreadable header: number 1e999 is out of range)"),
    ("header-list", _text(b"[]"), "fresh", "is not an apical checkpoint (no safetensors metadata)"),
    ("metadata-list", _text(b'{"__metadata__":[]}'), "fresh", "is not an apical checkpoint (no safetensors metadata)"),
    ("metadata-number", _text(b'{"__metadata__":{"format":1}}'), "fresh", "has non-string metadata values"),
    ("entry-number", _entries(5), "fresh", "has a malformed header entry for tensor 't0'"),
    ("entry-no-offsets", _entries({"dtype": "F32"}), "fresh", "has a malformed header entry for tensor 't0'"),
    ("entry-one-offset", _entries({"data_offsets": [0]}), "fresh", "has a malformed header entry for tensor 't0'"),
    ("entry-three-offsets", _entries({"data_offsets": [0, 4, 4]}), "fresh",
     "has a malformed header entry for tensor 't0'"),
    ("entry-offsets-object", _entries({"data_offsets": {"0": 0, "1": 4}}), "fresh",
     "has a malformed header entry for tensor 't0'"),
    ("entry-bool-offset", _entries(_f32(1), {"data_offsets": [0, True]}), "fresh",
     "has a malformed header entry for tensor 't1'"),
    ("entry-float-offset", _entries({"data_offsets": [0.0, 4]}), "fresh",
     "has a malformed header entry for tensor 't0'"),
    ("body-short", _entries(_f32(1), body=bytes(2)), "fresh",
     f"is truncated ({_size_of(_f32(1)) + 2} bytes, the header describes {_size_of(_f32(1)) + 4})"),
    ("body-long", _entries(_f32(1), body=bytes(6)), "fresh",
     f"is longer than its header says ({_size_of(_f32(1)) + 6} bytes, the header describes {_size_of(_f32(1)) + 4})"),
    ("body-fits-the-longest-entry", _entries(_f32(2), _f32(1), body=bytes(8)), "fresh",
     "is not an apical checkpoint (format None, expected 'apical.checkpoint')"),
    ("other-format", _meta_entry(P, "format", "other"), "fresh",
     "is not an apical checkpoint (format 'other', expected 'apical.checkpoint')"),
    ("version-word", _meta_entry(P, "format_version", "one"), "fresh", "has an invalid format_version 'one'"),
    ("version-missing", _meta_entry(P, "format_version", None), "fresh", "has an invalid format_version None"),
    ("version-arabic-digit", _meta_entry(P, "format_version", "\u0661"), "fresh",
     "has an invalid format_version '\u0661'"),
    ("version-ten-digits", _meta_entry(P, "format_version", "0000000001"), "fresh",
     "has an invalid format_version '0000000001'"),
    ("version-2", _meta_entry(P, "format_version", "2"), "fresh",
     "has format version 2; this apical reads version 1 (written by a newer apical: upgrade apical)"),
    ("version-0", _meta_entry(P, "format_version", "0"), "fresh", "has format version 0; this apical reads version 1"),
    ("no-apical-version", _with(P, lambda s, t, m: [m.pop("apical_version"), m.pop("extra")]), "fresh",
     "has no 'apical_version' metadata entry"),
    ("no-sha256", _data(lambda files: _unsigned(files[P])), "fresh", "has no 'sha256' metadata entry"),
    ("unknown-entries", _with(P, lambda s, t, m: m.update(zz="1", comment="hi")), "fresh",
     "has an unknown metadata entry 'comment'"),
    ("garbled-tensor-header", _data(_garbled_tensor_header), "fresh",
     lambda files: f"is not a valid safetensors file ({_safetensors_error(_garbled_tensor_header(files))})"),
    ("edited-not-signed", _data(lambda files: _resigned_not(files[P])), "fresh",
     "is corrupt or was modified (sha256 checksum mismatch)"),
    # ---- JSON sections (_json_loads, _unpack, _plan)
    ("extra-nan", _meta_entry(P, "extra", '{"a":NaN}'), "fresh",
     BAD + "metadata 'extra' is malformed: NaN is not valid JSON"),
    ("extra-minus-infinity", _meta_entry(P, "extra", '{"a":-Infinity}'), "fresh",
     BAD + "metadata 'extra' is malformed: -Infinity is not valid JSON"),
    ("extra-overflow", _meta_entry(P, "extra", '{"a":-1e999}'), "fresh",
     BAD + "metadata 'extra' is malformed: number -1e999 is out of range"),
    ("extra-repeated-key", _meta_entry(P, "extra", '{"a":1,"a":2}'), "fresh",
     BAD + "metadata 'extra' is malformed: repeated JSON key 'a'"),
    ("config-not-json", _meta_entry(P, "config", "{"), "fresh",
     BAD + "metadata 'config' is malformed: Expecting property name enclosed in double quotes: "
     "line 1 column 2 (char 1)"),
    ("unknown-tag", _extra_as({"__pickle__": "x"}), "fresh",
     BAD + "metadata 'extra' is malformed: unknown tagged value with keys ['__pickle__']"),
    ("tag-with-more-keys", _extra_as({"__tensor__": "x", "c": 1, "b": 2, "a": 3}), "fresh",
     BAD + "metadata 'extra' is malformed: unknown tagged value with keys ['__tensor__', 'a', 'b']"),
    ("dunder-key", _extra_as({"a": 1, "__b": 2}), "fresh",
     BAD + "metadata 'extra' is malformed: unknown tagged value with keys ['__b', 'a']"),
    ("dangling-reference", _extra_as({"t": {"__tensor__": "model/nowhere"}}), "fresh",
     BAD + "metadata 'extra' is malformed: reference to a tensor 'model/nowhere' that the file does not hold"),
    ("numeric-reference", _extra_as({"t": {"__tensor__": 5}}), "fresh",
     BAD + "metadata 'extra' is malformed: reference to a tensor 5 that the file does not hold"),
    ("bad-float-tag", _extra_as({"x": {"__float__": "1.5"}}), "fresh",
     BAD + "metadata 'extra' is malformed: bad float tag '1.5'"),
    ("tuple-tag-number", _extra_as({"x": {"__tuple__": 5}}), "fresh",
     BAD + "metadata 'extra' is malformed: __tuple__ needs a list"),
    ("dict-tag-object", _extra_as({"x": {"__dict__": {"a": 1}}}), "fresh",
     BAD + "metadata 'extra' is malformed: __dict__ needs a list"),
    ("dict-pair-short", _extra_as({"x": {"__dict__": [[1]]}}), "fresh",
     BAD + "metadata 'extra' is malformed: __dict__ entries must be [key, value] pairs"),
    ("dict-pair-number", _extra_as({"x": {"__dict__": [5]}}), "fresh",
     BAD + "metadata 'extra' is malformed: __dict__ entries must be [key, value] pairs"),
    ("dict-key-list", _extra_as({"x": {"__dict__": [[[1], 2]]}}), "fresh",
     BAD + "metadata 'extra' is malformed: bad or repeated dict key [1]"),
    ("dict-key-object", _extra_as({"x": {"__dict__": [[{"a": 1}, 2]]}}), "fresh",
     BAD + "metadata 'extra' is malformed: bad or repeated dict key {'a': 1}"),
    ("dict-key-tensor", _extra_as({"x": {"__dict__": [[{"__tensor__": "model/0.bias"}, 2]]}}), "fresh",
     re.compile(re.escape(BAD + "metadata 'extra' is malformed: bad or repeated dict key tensor(") + r".*\)")),
    ("dict-key-repeated", _extra_as({"x": {"__dict__": [[1, 2], [1, 3]]}}), "fresh",
     BAD + "metadata 'extra' is malformed: bad or repeated dict key 1"),
    ("unhashable-key", _with(P, _unhashable_key), "fresh", "is malformed (TypeError: unhashable type: 'list')"),
    ("orphans", _with(P, _orphans, prune=False), "fresh", "holds tensor 'a_junk', which nothing refers to"),
    ("extra-list", _extra_as([1]), "fresh", BAD + "extra must be a JSON object"),
    # ---- structure, layers, config
    ("structure-list", _put(P, "structure", value=[]), "fresh", BAD + "structure must be a JSON object"),
    ("structure-entry-short", _put(N, "structure", "0", value={"dendrites": 1}), "model",
     BAD + "structure entry for '0' must hold exactly 'dendrites' and 'candidates'"),
    ("structure-entry-long", _put(N, "structure", "0", value={"dendrites": 1, "candidates": 0, "x": 0}), "model",
     BAD + "structure entry for '0' must hold exactly 'dendrites' and 'candidates'"),
    ("structure-entry-number", _put(N, "structure", "0", value=5), "model",
     BAD + "structure entry for '0' must hold exactly 'dendrites' and 'candidates'"),
    ("dendrites-negative", _put(N, "structure", "0", "dendrites", value=-1), "model",
     BAD + "structure['0'].dendrites must be an integer >= 0, got -1"),
    ("dendrites-float", _put(N, "structure", "0", "dendrites", value=1.0), "model",
     BAD + "structure['0'].dendrites must be an integer >= 0, got 1.0"),
    ("candidates-text", _put(N, "structure", "2", "candidates", value="2"), "model",
     BAD + "structure['2'].candidates must be an integer >= 0, got '2'"),
    ("candidates-bool", _put(N, "structure", "2", "candidates", value=True), "model",
     BAD + "structure['2'].candidates must be an integer >= 0, got True"),
    ("layers-list", _put(N, "layers", value=[]), "model",
     BAD + "layers metadata does not name the same layers as the structure"),
    ("layers-one-missing", _drop(N, "layers", "2"), "model",
     BAD + "layers metadata does not name the same layers as the structure"),
    ("layers-entry-short", _put(N, "layers", "0", value={"activation": "sigmoid"}), "model",
     BAD + "layers['0'] must hold activation, normaliser and centring (and rank, if low-rank)"),
    ("layers-entry-text", _put(N, "layers", "0", value="sigmoid"), "model",
     BAD + "layers['0'] must hold activation, normaliser and centring (and rank, if low-rank)"),
    ("layers-rank", _put(N, "layers", "0", "rank", value=0), "model",
     BAD + "layers['0'].rank must be an integer >= 1, got 0"),
    ("layers-activation", _put(N, "layers", "0", "activation", value="gelu"), "model",
     BAD + "layers['0'].activation is 'gelu', not one of ('sigmoid', 'tanh', 'relu')"),
    ("layers-normaliser", _put(N, "layers", "2", "normaliser", value="cosine"), "model",
     BAD + "layers['2'].normaliser is 'cosine', not one of ('error', 'pearson')"),
    ("layers-centring", _put(N, "layers", "0", "centring", value="none"), "model",
     BAD + "layers['0'].centring is 'none', not one of ('batch', 'epoch')"),
    ("config-list", _put(P, "config", value=[]), "fresh", BAD + "config must be a JSON object"),
    ("config-unknown-field", _put(P, "config", "colour", value="red"), "fresh",
     BAD + "config is invalid: DendriteConfig: unknown field(s) ['colour']"),
    ("config-bad-value", _put(N, "config", "candidates", value=0), "model",
     BAD + "config is invalid: DendriteConfig.candidates must be an integer >= 1, got 0"),
    # ---- the model (_expected_model, _check_model_state)
    ("model-other-layers", None, "only-0",
     NO_FIT + "the model's dendritic layers differ from the checkpoint's: model only [], checkpoint only ['2']"),
    ("model-more-layers", None, "six", NO_FIT + "the model's dendritic layers differ from the checkpoint's: "
     "model only ['1', '3', '4'], checkpoint only []"),
    ("file-more-layers", _data(lambda files: files["six"]), "model", NO_FIT + "the model's dendritic layers differ "
     "from the checkpoint's: model only [], checkpoint only ['1', '3', '4']"),
    ("model-other-activation", None, "tanh",
     NO_FIT + "layer '0' uses activation 'tanh', the checkpoint's uses 'sigmoid'"),
    ("fresh-mixed-activations", _put(N, "layers", "2", "activation", value="tanh"), "fresh",
     BAD + "layers use activations ['sigmoid', 'tanh'], the config says 'sigmoid': perforate the model as it was, "
     "then load"),
    ("fresh-other-activation", _with(N, lambda s, t, m: [e.update(activation="relu") for e in s["layers"].values()]),
     "fresh", BAD + "layers use activations ['relu'], the config says 'sigmoid': perforate the model as it was, "
     "then load"),
    ("fresh-not-wrappable", None, "relu-head",
     re.compile(re.escape(NO_FIT + "the model cannot be perforated as recorded: include: cannot wrap '2' (ReLU)")
                + ".*")),
    ("fresh-no-such-module", None, "no-head",
     re.compile(re.escape(NO_FIT + "the model cannot be perforated as recorded: include: '2' matches no module")
                + ".*")),
    ("fresh-other-shape", None, "wide",
     NO_FIT + "model tensor '0.base.weight' has shape (4, 3) but the model needs (5, 3)"),
    ("model-list", _put(N, "model", value=[]), "model", NO_FIT + "model state must be a JSON object"),
    ("model-two-missing", _with(D, _two_missing), "model",
     NO_FIT + "model key '2.base.bias' is missing from the checkpoint (another architecture?)"),
    ("model-extra-key", _with(N, _add_model_key), "model",
     NO_FIT + "the checkpoint holds '9.weight', which the model does not have (another architecture?)"),
    ("model-not-a-tensor", _with(N, _not_a_tensor), "model", NO_FIT + "model tensor '0.base.weight' is not a tensor"),
    ("model-dendrite-shape", _tensor(D, "model/0.dendrite_out", lambda t: torch.zeros(2, 4)), "model",
     NO_FIT + "model tensor '0.dendrite_out' has shape (2, 4) but the growth record (1 dendrites, 2 candidates in '0') "
     "needs (1, 4)"),
    ("model-candidate-shape-fresh", _tensor(D, "model/2.candidate_cascade", lambda t: torch.zeros(2, 2, 2)), "fresh",
     NO_FIT + "model tensor '2.candidate_cascade' has shape (2, 2, 2) but the growth record (1 dendrites, 2 candidates "
     "in '2') needs (2, 1, 2)"),
    ("model-dtype", _tensor(N, "model/0.base.bias", lambda t: t.double()), "model",
     NO_FIT + "model tensor '0.base.bias' has dtype torch.float64 but the model's is torch.float32"),
    ("model-dendrite-dtype-fresh", _tensor(N, "model/2.dendrite_bias", lambda t: t.half()), "fresh",
     NO_FIT + "model tensor '2.dendrite_bias' has dtype torch.float16 but the model's is torch.float32"),
    # ---- the controller (_check_controller, _check_snapshot)
    ("no-controller-state", _data(lambda files: files["perforated"]), "ctl",
     "holds no controller state (it was saved without a controller)"),
    ("controller-of-another-model", None, "other-model",
     NO_FIT + "the controller drives another model than the one given to load"),
    ("controller-before-perforate", None, "unperforated-controller",
     NO_FIT + "the controller was created on the un-perforated model: call apical.perforate(model, config) before "
     "creating the Controller, or load the model alone first"),
    ("controller-of-replaced-layers", None, "stale-controller",
     NO_FIT + "the controller's dendritic layers are not the model's: create the Controller after apical.perforate"),
    ("controller-mode", None, "gd", BAD + "controller state is for mode 'pb', this controller runs 'gd'"),
    ("controller-list", _put(D, "controller", value=[]), "resume", BAD + "controller state must be a JSON object"),
    ("controller-no-history", _with(D, lambda s, t, m: [s["controller"].pop(k) for k in ("generator", "history")]),
     "resume", BAD + "controller state has no 'history'"),
    ("controller-version", _put(D, "controller", "version", value=2), "resume",
     BAD + "controller state version 2 is not 1"),
    ("controller-other-config", _put(D, "controller", "config", "seed", value=1), "resume",
     BAD + "controller config differs from the checkpoint's config"),
    ("controller-config-invalid", _with(D, _both_configs("include", ["type:os.path"])), "resume",
     BAD + "controller config is invalid: DendriteConfig: cannot restore module type 'os.path'; only torch.nn types"),
    ("controller-maximize", _put(D, "controller", "maximize", value=1), "resume",
     BAD + "controller maximize must be true or false"),
    ("counters-missing", _drop(D, "controller", "counters", "dp_since"), "resume",
     BAD + "controller counters do not match this apical's"),
    ("counters-list", _put(D, "controller", "counters", value=[]), "resume",
     BAD + "controller counters do not match this apical's"),
    ("counter-phase", _counter("phase", "sleeping"), "resume", BAD + "controller phase 'sleeping' is unknown"),
    ("counter-done", _counter("done", 0), "resume", BAD + "controller counter 'done' must be true or false"),
    ("counter-best", _counter("best", "x"), "resume",
     BAD + "controller counter 'best' must be a finite number or null, got 'x'"),
    ("counter-accepted-score", _counter("accepted_score", True), "resume",
     BAD + "controller counter 'accepted_score' must be a finite number or null, got True"),
    ("counter-dp-best", _counter("dp_best", [1]), "resume",
     BAD + "controller counter 'dp_best' must be a finite number or null, got [1]"),
    ("counter-best-epoch", _counter("best_epoch", -1), "resume",
     BAD + "controller counter 'best_epoch' must be an integer >= 0, got -1"),
    ("counter-epoch", _counter("epoch", 1.5), "resume",
     BAD + "controller counter 'epoch' must be an integer >= 0, got 1.5"),
    ("counter-tries", _counter("tries", None), "resume",
     BAD + "controller counter 'tries' must be an integer >= 0, got None"),
    ("controller-structure", _put(D, "controller", "structure", "0", "candidates", value=3), "resume",
     BAD + "controller structure differs from the checkpoint's structure"),
    ("counter-dendrites", _counter("dendrites", 2), "resume",
     BAD + "controller counts 2 dendrites, the structure holds 1"),
    ("candidates-in-neuron-phase", _counter("phase", "neuron"), "resume",
     NO_FIT + "layer '0' holds 2 candidates in the neuron phase"),
    ("no-candidates-in-dendrite-phase", _put(N, "controller", "counters", "phase", value="dendrite"), "resume",
     NO_FIT + "layer '0' holds 0 candidates in the dendrite phase"),
    ("history-object", _put(D, "controller", "history", value={}), "resume",
     BAD + "controller history must be a list of objects"),
    ("history-numbers", _put(D, "controller", "history", value=[1]), "resume",
     BAD + "controller history must be a list of objects"),
    ("snapshot-list", _put(D, "controller", "accepted_state", value=[]), "resume",
     BAD + "controller accepted_state must be a JSON object"),
    ("snapshot-candidate", _with(D, _snapshot_candidate), "resume",
     BAD + "controller accepted_state holds '0.candidate_bias', which the model does not have"),
    ("snapshot-unknown-key", _with(D, _snapshot_key), "resume",
     BAD + "controller accepted_state holds '9.weight', which the model does not have"),
    ("snapshot-no-dendrite-weight", _drop(D, "controller", "accepted_state", "2.dendrite_weight"), "resume",
     BAD + "controller accepted_state has no dendrite weights for '2'"),
    ("snapshot-scalar-dendrite-weight", _with(D, _snapshot_scalar), "resume",
     BAD + "controller accepted_state has no dendrite weights for '0'"),
    ("snapshot-flat-dendrite-weight", _with(D, _snap_tensor("accepted_state", "0.dendrite_weight",
                                                              lambda t: torch.zeros(1))), "resume",
     BAD + "controller accepted_state tensor '0.dendrite_weight' has shape (1,) but the growth record (1 dendrites, "
     "2 candidates in '0') needs (1, 4, 3)"),
    ("snapshot-more-sets", _with(D, _snapshot_two_sets), "resume",
     BAD + "controller accepted_state holds 2 dendrites in '0', more than the 1 recorded"),
    ("snapshot-missing-key", _drop(D, "controller", "accepted_state", "2.base.bias"), "resume",
     BAD + "controller accepted_state has no '2.base.bias'"),
    ("snapshot-shape", _with(D, _snap_tensor("accepted_state", "0.dendrite_out", lambda t: torch.zeros(1, 3))),
     "resume", BAD + "controller accepted_state tensor '0.dendrite_out' has shape (1, 3) but the growth record "
     "(1 dendrites, 2 candidates in '0') needs (1, 4)"),
    ("snapshot-dtype", _with(D, _snap_tensor("accepted_state", "2.base.bias", lambda t: t.double())), "resume",
     BAD + "controller accepted_state tensor '2.base.bias' has dtype torch.float64 but the model's is torch.float32"),
    ("best-state-shape", _with(N, _snap_tensor("best_state", "0.base.weight", lambda t: torch.zeros(4, 2))), "resume",
     BAD + "controller best_state tensor '0.base.weight' has shape (4, 2) but the model needs (4, 3)"),
    ("best-state-more-sets", _with(N, _snap_tensor("best_state", "2.dendrite_weight", lambda t: torch.zeros(2, 2, 4))),
     "resume", BAD + "controller best_state holds 2 dendrites in '2', more than the 1 recorded"),
    ("accepted-state-older-shape",
     _with(N, _snap_tensor("accepted_state", "0.dendrite_bias", lambda t: torch.zeros(1, 4))),
     "resume", BAD + "controller accepted_state tensor '0.dendrite_bias' has shape (1, 4) but the growth record "
     "(1 dendrites, 0 candidates in '0') needs (0, 4)"),
    ("dp-snapshot-in-neuron-phase", _with(N, _neuron_with_dp_snapshot), "resume",
     BAD + "controller holds a dendrite-phase snapshot outside the dendrite phase"),
    ("dp-snapshot-layers", _drop(D, "controller", "dp_snapshot", "2"), "resume",
     BAD + "controller dp_snapshot does not name the dendritic layers"),
    ("dp-snapshot-list", _put(D, "controller", "dp_snapshot", value=[]), "resume",
     BAD + "controller dp_snapshot does not name the dendritic layers"),
    ("dp-snapshot-fields", _with(D, _dp_fields), "resume",
     BAD + "controller dp_snapshot['0'] must hold weight, bias, cascade, scores, signs"),
    ("dp-snapshot-dtype", _with(D, _dp_scores_float32), "resume",
     BAD + "controller dp_snapshot['0'] 'scores' has dtype torch.float32 but the model's is torch.float64"),
    ("dp-snapshot-shape", _with(D, _dp_weight_shape), "resume",
     BAD + "controller dp_snapshot['0'] 'weight' has shape (2, 4, 2) but the model needs (2, 4, 3)"),
    ("generator-2d", _with(D, _generator(lambda t: t.reshape(2, -1))), "resume",
     BAD + "controller generator state must be a 1-d uint8 tensor"),
    ("generator-int64", _with(D, _generator(lambda t: t.long())), "resume",
     BAD + "controller generator state must be a 1-d uint8 tensor"),
    ("generator-short", _with(D, _generator(lambda t: t[:10].clone())), "resume",
     re.compile(re.escape(BAD + "controller generator state is invalid: ") + ".+")),
    # ---- candidates' statistics (_check_stats)
    ("stats-list", _put(D, "stats", value=[]), "resume", BAD + "stats must be a JSON object"),
    ("stats-unknown-layer", _with(D, _stats_copy), "resume", BAD + "stats for '9', which holds no candidates"),
    ("stats-without-candidates", _put(N, "stats", value={"2": {"n": 1.0}}), "resume",
     BAD + "stats for '2', which holds no candidates"),
    ("stats-fields", _drop(D, "stats", "0", "s_dd"), "resume",
     BAD + "stats['0'] must hold n and ['shift_a', 'shift_d', 's_a', 's_d', 's_ad', 's_aa', 's_dd']"),
    ("stats-entry-list", _put(D, "stats", "0", value=[]), "resume",
     BAD + "stats['0'] must hold n and ['shift_a', 'shift_d', 's_a', 's_d', 's_ad', 's_aa', 's_dd']"),
    ("stats-n-text", _put(D, "stats", "0", "n", value="16"), "resume",
     BAD + "stats['0'].n must be a finite number or null, got '16'"),
    ("stats-n-null", _put(D, "stats", "0", "n", value=None), "resume", BAD + "stats['0'].n must be positive"),
    ("stats-n-zero", _put(D, "stats", "2", "n", value=0), "resume", BAD + "stats['2'].n must be positive"),
    ("stats-n-negative", _put(D, "stats", "0", "n", value=-1.0), "resume", BAD + "stats['0'].n must be positive"),
    ("stats-s_d-shape", _with(D, _stats_ref("s_d", lambda t: t[:3].clone())), "resume",
     BAD + "stats['0'].s_d must be a float tensor of shape (4,)"),
    ("stats-s_dd-shape", _with(D, _stats_ref("s_dd", lambda t: torch.zeros(2, 4, dtype=torch.float64))), "resume",
     BAD + "stats['0'].s_dd must be a float tensor of shape (4,)"),
    ("stats-shift_d-shape", _with(D, _stats_ref("shift_d", lambda t: torch.zeros(2, 4))), "resume",
     BAD + "stats['0'].shift_d must be a float tensor of shape (4,)"),
    ("stats-s_a-shape", _with(D, _stats_ref("s_a", lambda t: t[:, :3].clone())), "resume",
     BAD + "stats['0'].s_a must be a float tensor of shape (2, 4)"),
    ("stats-shift_a-integer", _with(D, _stats_ref("shift_a", lambda t: t.long())), "resume",
     BAD + "stats['0'].shift_a must be a float tensor of shape (2, 4)"),
    ("stats-s_ad-number", _put(D, "stats", "0", "s_ad", value=1.0), "resume",
     BAD + "stats['0'].s_ad must be a float tensor of shape (2, 4)"),
    ("stats-s_aa-float32", _with(D, _stats_ref("s_aa", lambda t: t.float())), "resume",
     BAD + "stats['0'].s_aa must be float64"),
    ("stats-s_d-float32", _with(D, _stats_ref("s_d", lambda t: t.float())), "resume",
     BAD + "stats['0'].s_d must be float64"),
    # ---- the optimiser (_check_optimizer)
    ("no-optimizer-state", _data(lambda files: files["no-optimizer"]), "resume",
     "holds no optimizer state (it was saved without an optimizer)"),
    ("optimizer-entry-short", _drop(D, "optimizer", "names"), "resume",
     BAD + "optimizer entry must hold class, names and state_dict"),
    ("optimizer-entry-list", _put(D, "optimizer", value=[]), "resume",
     BAD + "optimizer entry must hold class, names and state_dict"),
    ("optimizer-class", None, "sgd",
     NO_FIT + "optimizer state is for 'torch.optim.adam.Adam', the optimizer given is 'torch.optim.sgd.SGD'"),
    ("optimizer-names-text", _put(D, "optimizer", "names", value="x"), "resume",
     BAD + "optimizer names must be lists of parameter names"),
    ("optimizer-names-flat", _put(D, "optimizer", "names", value=["0.candidate_weight"]), "resume",
     BAD + "optimizer names must be lists of parameter names"),
    ("optimizer-names-number", _put(D, "optimizer", "names", 0, 3, value=3), "resume",
     BAD + "optimizer names must be lists of parameter names"),
    ("optimizer-state-dict-short", _drop(D, "optimizer", "state_dict", "param_groups"), "resume",
     BAD + "optimizer state_dict is malformed"),
    ("optimizer-state-list", _put(D, "optimizer", "state_dict", "state", value=[]), "resume",
     BAD + "optimizer state_dict is malformed"),
    ("optimizer-groups-object", _put(D, "optimizer", "state_dict", "param_groups", value={}), "resume",
     BAD + "optimizer state_dict is malformed"),
    ("optimizer-groups-count", _put(D, "optimizer", "names", value=[[], []]), "resume",
     BAD + "optimizer state_dict is malformed"),
    ("optimizer-group-number", _put(D, "optimizer", "state_dict", "param_groups", 0, value=5), "resume",
     BAD + "optimizer param group 0 is malformed"),
    ("optimizer-group-params", _put(D, "optimizer", "state_dict", "param_groups", 0, "params", value="0"), "resume",
     BAD + "optimizer param group 0 is malformed"),
    ("optimizer-group-length", _with(D, _opt_group(lambda g, names: g["params"].pop())), "resume",
     BAD + "optimizer param group 0 lists 5 ids for 6 names"),
    ("optimizer-id-text", _with(D, _opt_group(lambda g, names: g["params"].__setitem__(0, "a"))), "resume",
     BAD + "optimizer param group 0 has a bad or repeated parameter id 'a'"),
    ("optimizer-id-bool", _with(D, _opt_group(lambda g, names: g["params"].__setitem__(2, True))), "resume",
     BAD + "optimizer param group 0 has a bad or repeated parameter id True"),
    ("optimizer-id-repeated", _with(D, _opt_group(lambda g, names: g["params"].__setitem__(3, 1))), "resume",
     BAD + "optimizer param group 0 has a bad or repeated parameter id 1"),
    ("optimizer-unknown-parameter", _put(D, "optimizer", "names", 0, 2, value="9.weight"), "resume",
     NO_FIT + "optimizer state is for parameter '9.weight', which the model does not have"),
    ("optimizer-parameter-twice", _put(D, "optimizer", "names", 0, 3, value="0.candidate_bias"), "resume",
     BAD + "optimizer lists parameter '0.candidate_bias' twice"),
    ("optimizer-state-unknown-id", _with(D, _opt_pairs(lambda pairs: pairs[2].__setitem__(0, 7))), "resume",
     BAD + "optimizer state for parameter id 7, which no group lists"),
    ("optimizer-state-number", _with(D, _opt_pairs(lambda pairs: pairs[1].__setitem__(1, 5))), "resume",
     BAD + "optimizer state for '0.candidate_bias' is malformed"),
    ("optimizer-state-integer", _with(D, _opt_state(2, "exp_avg", lambda t: t.long())), "resume",
     BAD + "optimizer state 'exp_avg' of '0.candidate_cascade' has dtype torch.int64"),
    ("optimizer-state-flat", _with(D, _opt_state(1, "exp_avg", lambda t: torch.zeros(3))), "resume",
     BAD + "optimizer state 'exp_avg' of '0.candidate_bias' has shape (3,), the parameter (2, 4)"),
    ("optimizer-state-shape", _with(D, _opt_state(1, "exp_avg_sq", lambda t: torch.zeros(3, 3))), "resume",
     BAD + "optimizer state 'exp_avg_sq' of '0.candidate_bias' has shape (3, 3), the parameter (2, 4)"),
]


def _refusal(path, model, ctl=None, opt=None) -> str:
    with pytest.raises(CheckpointError) as info:
        load(path, model, ctl, opt)
    text = str(info.value)
    head = f"checkpoint {str(path)!r} "
    assert text.startswith(head), text
    return text[len(head) :]


@pytest.mark.parametrize("case", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_refusal_names_the_file_and_the_first_problem_exactly(small, tmp_path, case):
    """Keyword-first problems read as they are ("checkpoint 'x' is empty"); a model, layer, controller or
    optimiser that does not match reads "does not fit: ..."; any other bad content "is invalid: ..."."""
    _, build, kind, expected = case
    path = tmp_path / "c.safetensors"
    if build is None:
        path.write_bytes(small["neuron"])
    else:
        made = build(small, path)
        path = made if isinstance(made, Path) else path
    model, ctl, opt = TARGETS[kind]() if kind in TARGETS else _small_target(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = _refusal(path, model, ctl, opt)
    if callable(expected):
        expected = expected(small)
    if isinstance(expected, re.Pattern):
        assert expected.fullmatch(got), got
    else:
        assert got == expected
    assert list(model.state_dict()) == list(before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _set_stats(name, new):
    return _with(D, _stats_ref(name, new))


ACCEPTED = [
    # (id, edit of a good file, target): edits the checks must let through
    ("version-nine-digits", _meta_entry(P, "format_version", "000000001"), "fresh"),
    ("no-coverage-entry", _meta_entry(P, "coverage", None), "fresh"),
    ("unrestorable-include-exclude", _with(N, lambda s, t, m: s["config"].update(
        include=["type:os.path"], exclude=["type:os.path"])), "fresh"),
    ("unrestorable-include-exclude-perforated", _with(N, lambda s, t, m: s["config"].update(
        include=["type:os.path"], exclude=["type:os.path"])), "model"),
    ("no-generator-state", _put(D, "controller", "generator", value=None), "resume"),
    ("best-epoch-null", _counter("best_epoch", None), "resume"),
    ("integer-counters-as-scores", _with(N, lambda s, t, m: s["controller"]["counters"].update(
        best=1, accepted_score=0, dp_best=-2)), "resume"),
    ("float64-shift", _set_stats("shift_a", lambda t: t.double()), "resume"),
    ("integer-n", _put(D, "stats", "0", "n", value=16), "resume"),
    ("one-observation", _put(D, "stats", "2", "n", value=1.0), "resume"),
    ("scalar-optimizer-state", _with(D, _opt_state(0, "exp_avg_sq", lambda t: torch.zeros(()))), "resume"),
    ("integer-step", _with(D, _opt_state(3, "step", lambda t: t.long())), "resume"),
]


@pytest.mark.parametrize("case", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_edits_within_the_format_still_load(small, tmp_path, case):
    _, build, kind = case
    path = tmp_path / "c.safetensors"
    build(small, path)
    model, ctl, opt = _small_target(kind)
    assert isinstance(load(path, model, ctl, opt), dict)


def _layer(model, name):
    return dict(model.named_modules())[name]


def test_each_layer_gets_its_own_normaliser_and_centring_back(tmp_path):
    model = perforate(_net(), DendriteConfig())
    model[2].normaliser, model[2].centring = "pearson", "epoch"
    save(tmp_path / "a.safetensors", model)
    other = perforate(_net(), DendriteConfig(normaliser="pearson", centring="epoch"))
    other[0].normaliser, other[0].centring = "error", "batch"
    save(tmp_path / "b.safetensors", other)
    for path, want in ((tmp_path / "a.safetensors", [("error", "batch"), ("pearson", "epoch")]),
                       (tmp_path / "b.safetensors", [("error", "batch"), ("pearson", "epoch")])):
        for target in (_net(), perforate(_net(), DendriteConfig()),
                       perforate(_net(), DendriteConfig(normaliser="pearson", centring="epoch"))):
            load(path, target)
            assert [(target[i].normaliser, target[i].centring) for i in (0, 2)] == want


def _stats_of(layer):
    s = layer.stats
    return {"n": s.n, "candidates": s.candidates, "neurons": s.neurons,
            **{f: getattr(s, f) for f in ("shift_a", "shift_d", "s_a", "s_d", "s_ad", "s_aa", "s_dd")}}


def test_statistics_restored_mid_dendrite_phase_and_training_continues_identically(tmp_path):
    model, ctl, opt = _grown(7)
    save(tmp_path / "c.safetensors", model, ctl, opt)
    model2, ctl2, opt2 = _small_target("resume")
    load(tmp_path / "c.safetensors", model2, ctl2, opt2)
    for name, outputs in (("0", 4), ("2", 2)):
        a, b = _stats_of(_layer(model, name)), _stats_of(_layer(model2, name))
        assert type(b["n"]) is float and b["n"] == a["n"] == 16.0
        assert (b["candidates"], b["neurons"]) == (2, outputs)
        for f in ("shift_a", "shift_d", "s_a", "s_d", "s_ad", "s_aa", "s_dd"):
            assert b[f].dtype == a[f].dtype and b[f].device == a[f].device and torch.equal(b[f], a[f]), f
        assert b["s_a"].dtype == torch.float64 and tuple(b["s_a"].shape) == (2, outputs)
    for m, o in ((model, opt), (model2, opt2)):  # the rest of the epoch accumulates on the restored sums
        _batch(m, o)
    for name in ("0", "2"):
        a, b = _stats_of(_layer(model, name)), _stats_of(_layer(model2, name))
        assert b["n"] == a["n"] == 32.0
        for f in ("s_a", "s_d", "s_ad", "s_aa", "s_dd"):
            assert torch.equal(b[f], a[f]), f
    assert ctl2.step(0.6) == ctl.step(0.6)
    _assert_same_state(model2, model)


def test_statistics_and_snapshots_go_to_the_model_device(tmp_path):
    """The 'meta' device stands in for an accelerator: whatever device the model lives on, the restored
    statistics and the controller's snapshots are put there (the file's tensors come in on the CPU)."""
    model, ctl, opt = _grown(7)
    save(tmp_path / "c.safetensors", model, ctl)
    cfg = DendriteConfig(**SMALL)
    target = perforate(_net(), cfg).to("meta")
    ctl2 = Controller(target, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: copying into a meta parameter is a no-op
        load(tmp_path / "c.safetensors", target, ctl2)
    for name in ("0", "2"):
        stats = _stats_of(_layer(target, name))
        for f in ("shift_a", "shift_d", "s_a", "s_d", "s_ad", "s_aa", "s_dd"):
            assert stats[f].device.type == "meta", f
        assert stats["s_dd"].dtype == torch.float64 and stats["shift_a"].dtype == torch.float32
    state = ctl2.state_dict()
    assert {v.device.type for v in state["accepted_state"].values()} == {"meta"}
    assert {t.device.type for fields in state["dp_snapshot"].values() for t in fields.values()} == {"meta"}


def test_fresh_model_is_perforated_with_the_saved_configuration(tmp_path):
    cfg = DendriteConfig(mode="gd", activation="tanh", include=["0"], candidate_lr_scale=2.0, normaliser="pearson",
                         centring="epoch", seed=0, patience=1)
    model = perforate(_net(), cfg)
    ctl = Controller(model, cfg)
    opt = torch.optim.SGD(ctl.parameters(), lr=0.1)
    for score in (0.5, 0.5):  # plateau: "gd" installs a set at once
        _batch(model, opt)
        ctl.step(score)
    assert structure(model) == {"0": {"dendrites": 1, "candidates": 0}}
    save(tmp_path / "c.safetensors", model, ctl)
    fresh = _net()
    load(tmp_path / "c.safetensors", fresh)
    assert type(fresh[2]) is nn.Linear and structure(fresh) == {"0": {"dendrites": 1, "candidates": 0}}
    layer = fresh[0]
    assert (layer.activation, layer.perforated, layer.candidate_scale) == ("tanh", False, 2.0)
    assert (layer.normaliser, layer.centring) == ("pearson", "epoch")
    _assert_same_state(fresh, model)


def test_optimizer_is_pointed_at_the_restored_parameters_by_name(tmp_path):
    model, ctl, opt = _grown(7)
    save(tmp_path / "c.safetensors", model, ctl, opt)
    model2, ctl2, _ = _small_target("resume")
    opt2 = torch.optim.Adam(ctl2.parameters(), lr=0.5)
    _batch(model2, opt2)  # state for parameters that the load replaces
    assert len(opt2.state) > 0
    seen = []
    opt2.register_load_state_dict_pre_hook(
        lambda o, sd: seen.append((type(o.state), o.state.default_factory, len(o.state))))
    load(tmp_path / "c.safetensors", model2, ctl2, opt2)
    assert seen == [(type(opt.state), dict, 0)]  # the old parameters' state is dropped first
    names = [f"{i}.candidate_{t}" for i in (0, 2) for t in ("weight", "bias", "cascade")]
    assert [n for n, p in model.named_parameters() if any(p is q for q in opt.param_groups[0]["params"])] == names
    params = dict(model2.named_parameters())
    assert [id(p) for p in opt2.param_groups[0]["params"]] == [id(params[n]) for n in names]
    assert opt2.param_groups[0]["lr"] == 0.01
    old = dict(model.named_parameters())
    for n in names:
        a, b = opt.state[old[n]], opt2.state[params[n]]
        assert a.keys() == b.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for k in a:
            assert torch.equal(a[k], b[k]), (n, k)
    _batch(model, opt)
    _batch(model2, opt2)
    _assert_same_state(model2, model)


class _OwnParams(torch.optim.SGD):
    """An optimiser that keeps something else under ``_params`` (and state of its own shape)."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, lr=lr)
        self._params = "mine"


def test_lbfgs_params_follow_the_restored_groups_and_other_optimizers_keep_theirs(tmp_path):
    model, ctl, _ = _grown(5)
    save(tmp_path / "l.safetensors", model, optimizer=torch.optim.LBFGS(model.parameters()))
    target = perforate(_net(), DendriteConfig(**SMALL))  # no dendrites yet: the load replaces them
    lbfgs = torch.optim.LBFGS(target.parameters())
    load(tmp_path / "l.safetensors", target, None, lbfgs)
    assert lbfgs._params is lbfgs.param_groups[0]["params"]
    assert [id(p) for p in lbfgs._params] == [id(p) for p in target.parameters()]

    own = _OwnParams(model.parameters())
    own.state[model[0].base.weight]["buf"] = torch.zeros(7)  # not the parameter's shape: not elementwise
    save(tmp_path / "o.safetensors", model, optimizer=own)
    target = perforate(_net(), DendriteConfig(**SMALL))
    own2 = _OwnParams(target.parameters())
    load(tmp_path / "o.safetensors", target, None, own2)
    assert own2._params == "mine"
    assert torch.equal(own2.state[target[0].base.weight]["buf"], torch.zeros(7))


def test_controller_restored_and_structure_replayed_without_one(small, tmp_path):
    model, ctl, opt = _grown(7)
    save(tmp_path / "c.safetensors", model, ctl, opt)
    model2, ctl2, opt2 = _small_target("resume")
    load(tmp_path / "c.safetensors", model2, ctl2, opt2)
    a, b = ctl.state_dict(), ctl2.state_dict()
    for key in ("counters", "history", "structure", "maximize", "config"):
        assert b[key] == a[key], key
    assert torch.equal(b["generator"], a["generator"])
    steps = []
    for m, o, c in ((model, opt, ctl), (model2, opt2, ctl2)):
        _batch(m, o)
        steps.append(c.step(0.6))
    assert steps[0] == steps[1]
    _assert_same_state(model2, model)

    path = tmp_path / "n.safetensors"
    path.write_bytes(small["neuron"])
    alone, _, _ = _small_target("model")  # perforated, no dendrites: resized to the record
    load(path, alone)
    assert structure(alone) == {"0": {"dendrites": 1, "candidates": 0}, "2": {"dendrites": 1, "candidates": 0}}
    grown, _, _ = _small_target("model")
    load(path, grown)
    kept = {n: id(p) for n, p in grown.named_parameters()}
    load(path, grown)  # already the recorded structure: the Parameter objects stay
    assert {n: id(p) for n, p in grown.named_parameters()} == kept


class _Counted(nn.Module):
    """A module with extra state (not a tensor) in its state dict."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.calls = {"n": 0, "shape": (3, 2)}

    def forward(self, x):
        return self.fc(x)

    def get_extra_state(self):
        return self.calls

    def set_extra_state(self, state):
        self.calls = state


def test_extra_state_and_a_model_that_holds_candidates_now(small, tmp_path):
    model = perforate(_Counted(), DendriteConfig())
    model.calls = {"n": 7, "shape": (3, 2)}
    save(tmp_path / "e.safetensors", model)
    for target in (_Counted(), perforate(_Counted(), DendriteConfig())):
        load(tmp_path / "e.safetensors", target)
        assert target.calls == {"n": 7, "shape": (3, 2)} and type(target.calls["shape"]) is tuple
        assert torch.equal(target.fc.weight, model.fc.weight)

    path = tmp_path / "n.safetensors"
    path.write_bytes(small["neuron"])
    busy, _, _ = _grown(7)  # mid dendrite phase: candidates the file does not have
    load(path, busy)
    assert structure(busy) == {"0": {"dendrites": 1, "candidates": 0}, "2": {"dendrites": 1, "candidates": 0}}
    assert busy[0].candidate_weight is None and busy[0].stats is None
    reference, _, _ = _small_target("model")
    load(path, reference)
    _assert_same_state(busy, reference)


def test_early_stopping_controller_and_single_candidate_round_trips(tmp_path):
    plain = _net()
    ctl = Controller(plain, DendriteConfig(mode="none", patience=3))
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    for score in (0.5, 0.6, 0.6):
        _batch(plain, opt)
        ctl.step(score)
    save(tmp_path / "n.safetensors", plain, ctl)
    plain2 = _net()
    ctl2 = Controller(plain2, DendriteConfig(mode="none", patience=3))
    load(tmp_path / "n.safetensors", plain2, ctl2)
    assert ctl2.state_dict()["counters"] == ctl.state_dict()["counters"]
    assert ctl2.state_dict()["counters"]["dendrites"] == 0

    cfg = DendriteConfig(**{**SMALL, "candidates": 1})
    model, ctl, opt = _grown(2, cfg=cfg)
    assert structure(model) == {"0": {"dendrites": 0, "candidates": 1}, "2": {"dendrites": 0, "candidates": 1}}
    save(tmp_path / "c.safetensors", model, ctl, opt)
    model2 = perforate(_net(), cfg)
    ctl2 = Controller(model2, cfg)
    load(tmp_path / "c.safetensors", model2, ctl2, torch.optim.Adam(ctl2.parameters()))
    assert ctl2.phase == "dendrite" and structure(model2) == structure(model)


def _counted_with_controller():
    cfg = DendriteConfig(**SMALL)
    model = perforate(_Counted(), cfg)
    return model, Controller(model, cfg), None


def _snapshot_of_extra_state_only(sections, tensors, meta):
    model = sections["model"]
    sections["controller"]["best_state"] = {"_extra_state": model["_extra_state"],
                                            "fc.dendrite_weight": model["fc.dendrite_weight"]}


def _snapshot_with_extra_state(sections, tensors, meta):
    sections["controller"]["best_state"] = dict(sections["model"])


def test_snapshots_holding_extra_state(tmp_path):
    """Snapshot entries that are not tensors (a module's extra state) are kept as they are, and the keys after
    them are still checked."""
    model, ctl, _ = _counted_with_controller()
    model.calls = {"n": 4, "shape": (3, 2)}
    assert list(model.state_dict())[:2] == ["_extra_state", "fc.dendrite_weight"]
    path = tmp_path / "c.safetensors"
    path.write_bytes(_forge(_bytes_of(model, ctl), _snapshot_of_extra_state_only))
    target, ctl2, _ = _counted_with_controller()
    assert _refusal(path, target, ctl2) == BAD + "controller best_state has no 'fc.dendrite_bias'"
    path.write_bytes(_forge(_bytes_of(model, ctl), _snapshot_with_extra_state))
    load(path, target, ctl2)
    best = ctl2.state_dict()["best_state"]
    assert best["_extra_state"] == {"n": 4, "shape": (3, 2)}
    assert torch.equal(best["fc.base.weight"], model.fc.base.weight)


class _Outer(nn.Linear):
    def __init__(self):
        super().__init__(3, 3)
        self.inner = DendriticLinear(nn.Linear(3, 3))


def test_nested_dendritic_layers_built_by_hand(tmp_path):
    """A tensor belongs to the innermost dendritic layer whose name prefixes its key."""
    def make():
        return nn.Sequential(DendriticLinear(_Outer()))

    torch.manual_seed(0)
    model = make()
    model[0].resize(1)
    model[0].base.inner.resize(2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    save(tmp_path / "n.safetensors", model)
    target = make()
    target[0].base.inner.resize(1, 3)  # candidates the file does not have
    load(tmp_path / "n.safetensors", target)
    assert structure(target) == {"0": {"dendrites": 1, "candidates": 0},
                                 "0.base.inner": {"dendrites": 2, "candidates": 0}}
    _assert_same_state(target, model)


def _attention():
    return nn.Sequential(nn.MultiheadAttention(4, 2, batch_first=True))


def _wrong_q_out(sections, tensors, meta):
    tensors[sections["model"]["0.q_proj.dendrite_out"]["__tensor__"]] = torch.zeros(1, 3)


def _without_v_proj(sections, tensors, meta):
    for section in ("structure", "layers"):
        del sections[section]["0.v_proj"]
    for key in [k for k in sections["model"] if k.startswith("0.v_proj.")]:
        del sections["model"][key]


def test_fresh_attention_model_grows_projections_it_does_not_have_yet(tmp_path):
    """q/k/v projections exist only once perforated: their tensors are expected from the growth record."""
    torch.manual_seed(0)
    model = perforate(_attention(), DendriteConfig())
    for _, layer in dendritic_layers(model):
        layer.resize(1, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    path = tmp_path / "a.safetensors"
    save(path, model)
    fresh = _attention()
    load(path, fresh)
    assert structure(fresh) == structure(model) and structure(model)["0.q_proj"] == {"dendrites": 1, "candidates": 2}
    _assert_same_state(fresh, model)
    good = path.read_bytes()
    path.write_bytes(_forge(good, _wrong_q_out))
    assert _refusal(path, _attention()) == NO_FIT + (
        "model tensor '0.q_proj.dendrite_out' has shape (1, 3) but the growth record (1 dendrites, 2 candidates in "
        "'0.q_proj') needs (1, 4)")
    path.write_bytes(_forge(good, _without_v_proj))  # perforating the attention creates all four projections
    assert _refusal(path, _attention()) == NO_FIT + (
        "the model cannot be perforated as recorded (would wrap ['0.k_proj', '0.out_proj', '0.q_proj'])")


def test_float64_model_round_trip(tmp_path):
    def net64():
        return _net().double()

    model, ctl, opt = _grown(7, net=net64)
    save(tmp_path / "c.safetensors", model, ctl, opt)
    fresh = net64()
    load(tmp_path / "c.safetensors", fresh)
    _assert_same_state(fresh, model)
    assert {v.dtype for v in fresh.state_dict().values()} == {torch.float64}
    assert _stats_of(fresh[0])["shift_a"].dtype == torch.float64
    with pytest.raises(CheckpointError, match=r"has dtype torch\.float64 but the model's is torch\.float32$"):
        load(tmp_path / "c.safetensors", _net())


def _file(path):
    data = Path(path).read_bytes()
    return _header(data)["__metadata__"], st.load(data), data


def test_saved_file_layout_written_out_by_hand(tmp_path):
    import apical

    model = perforate(nn.Sequential(nn.Linear(2, 1)), DendriteConfig(mode="gd", activation="relu",
                                                                     normaliser="pearson", centring="epoch"))
    extra = {"epoch": 3, "lr": 0.5, "name": "\u00e9", "flag": True, "none": None, "pair": (1, 2.5),
             "inf": float("inf"), "ninf": float("-inf"), "nan": float("nan"), "list": [1, torch.ones(2)],
             "d": {1: "a", "b": torch.zeros(3)}}
    save(tmp_path / "c.safetensors", model, extra=extra)
    meta, tensors, data = _file(tmp_path / "c.safetensors")
    assert set(meta) == {"format", "format_version", "apical_version", "torch_version", *SECTIONS, "coverage",
                         "sha256"}
    assert (meta["format"], meta["format_version"]) == ("apical.checkpoint", "1")
    assert (meta["apical_version"], meta["torch_version"]) == (apical.__version__, torch.__version__)
    assert meta["structure"] == '{"0":{"dendrites":0,"candidates":0}}'
    assert meta["layers"] == '{"0":{"activation":"relu","normaliser":"pearson","centring":"epoch"}}'
    want_config = DendriteConfig(mode="gd", activation="relu", normaliser="pearson", centring="epoch",
                                 include=["0"]).to_dict()
    assert meta["config"] == json.dumps(want_config, separators=(",", ":"))
    keys = ["0.dendrite_weight", "0.dendrite_bias", "0.dendrite_cascade", "0.dendrite_out", "0.base.weight",
            "0.base.bias"]
    assert meta["model"] == "{" + ",".join(f'"{k}":{{"__tensor__":"model/{k}"}}' for k in keys) + "}"
    assert (meta["controller"], meta["stats"], meta["optimizer"]) == ("null", "{}", "null")
    assert meta["extra"] == (
        '{"epoch":3,"lr":0.5,"name":"\\u00e9","flag":true,"none":null,"pair":{"__tuple__":[1,2.5]},'
        '"inf":{"__float__":"inf"},"ninf":{"__float__":"-inf"},"nan":{"__float__":"nan"},'
        '"list":[1,{"__tensor__":"extra/list/1"}],"d":{"__dict__":[[1,"a"],["b",{"__tensor__":"extra/d/b"}]]}}')
    assert json.loads(meta["coverage"]) == apical.coverage(model).to_rows()
    assert sorted(tensors) == sorted([f"model/{k}" for k in keys] + ["extra/list/1", "extra/d/b"])
    for k, v in model.state_dict().items():
        assert torch.equal(tensors[f"model/{k}"], v), k
    assert meta["sha256"] == _sha(meta, tensors)
    back = load(tmp_path / "c.safetensors", nn.Sequential(nn.Linear(2, 1)))
    assert back["pair"] == (1, 2.5) and type(back["pair"]) is tuple and back["d"][1] == "a"
    assert back["inf"] == float("inf") and back["ninf"] == float("-inf") and back["nan"] != back["nan"]
    assert torch.equal(back["list"][1], torch.ones(2)) and torch.equal(back["d"]["b"], torch.zeros(3))
    assert {k: back[k] for k in ("epoch", "lr", "name", "flag", "none")} == {
        "epoch": 3, "lr": 0.5, "name": "\u00e9", "flag": True, "none": None}


def test_checksum_is_the_documented_digest_of_the_raw_file(small):
    """sha256 from the raw bytes: the header's JSON and each tensor's bytes at its data_offsets."""
    names = {"F32": "torch.float32", "F64": "torch.float64", "U8": "torch.uint8", "I64": "torch.int64"}
    for data in small.values():
        header = _header(data)
        meta = header.pop("__metadata__")
        body = data[8 + int.from_bytes(data[:8], "little") :]
        h = hashlib.sha256()
        fields = [b"apical.checkpoint/digest/1"]
        for k in sorted(meta):
            if k != "sha256":
                fields += [k.encode(), meta[k].encode()]
        for k in sorted(header):
            start, end = header[k]["data_offsets"]
            fields += [k.encode(), f"{names[header[k]['dtype']]}{tuple(header[k]['shape'])}".encode(), body[start:end]]
        for b in fields:
            h.update(len(b).to_bytes(8, "little") + b)
        assert meta["sha256"] == h.hexdigest()


def test_saved_configuration_and_optimizer_entries(tmp_path):
    import apical

    plain = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    sgd = torch.optim.SGD([{"params": [plain[1].weight]}, {"params": [plain[0].bias, plain[0].weight], "lr": 0.5}],
                          lr=0.1, momentum=0.9)
    plain(torch.ones(1, 2)).sum().backward()
    sgd.step()
    save(tmp_path / "p.safetensors", plain, optimizer=sgd)
    meta, tensors, _ = _file(tmp_path / "p.safetensors")
    assert sorted(k for k in tensors if not k.startswith("model/")) == [
        f"optimizer/state/{i}/momentum_buffer" for i in range(3)]
    assert json.loads(meta["config"]) == DendriteConfig(mode="none").to_dict()
    entry = json.loads(meta["optimizer"])
    assert entry["class"] == "torch.optim.sgd.SGD"
    assert entry["names"] == [["1.weight"], ["0.bias", "0.weight"]]
    assert [g["params"] for g in entry["state_dict"]["param_groups"]] == [[0], [1, 2]]
    assert [g["lr"] for g in entry["state_dict"]["param_groups"]] == [0.1, 0.5]

    model = perforate(_net(), DendriteConfig(activation="tanh", include=["2"]))
    save(tmp_path / "m.safetensors", model)
    meta, _, _ = _file(tmp_path / "m.safetensors")
    assert json.loads(meta["config"]) == DendriteConfig(mode="pb", activation="tanh", include=["2"]).to_dict()
    cfg = DendriteConfig(include=["0"])
    model = perforate(_net(), cfg)
    save(tmp_path / "k.safetensors", model, Controller(model, cfg))
    rows = json.loads(_file(tmp_path / "k.safetensors")[0]["coverage"])
    assert rows == apical.coverage(model, cfg).to_rows() != apical.coverage(model).to_rows()

    model, ctl, opt = _grown(7)
    save(tmp_path / "c.safetensors", model, ctl, opt)
    meta, _, _ = _file(tmp_path / "c.safetensors")
    assert json.loads(meta["config"]) == DendriteConfig(**SMALL).to_dict()
    stats = json.loads(meta["stats"])
    assert sorted(stats) == ["0", "2"] and stats["0"]["n"] == 16.0
    assert stats["2"]["s_ad"] == {"__tensor__": "stats/2/s_ad"}
    for c in (ctl, None):  # candidates whose statistics are empty (start of an epoch) are not saved
        _layer(model, "0").stats.reset()
        save(tmp_path / "e.safetensors", model, c)
        assert sorted(json.loads(_file(tmp_path / "e.safetensors")[0]["stats"])) == ["2"]


def test_shared_overlapping_and_colliding_tensors(tmp_path):
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    base = torch.arange(6.0)
    extra = {"same": base, "again": base, "head": base[:4], "tail": base[2:], "d/1": torch.ones(1),
             "d": {1: torch.full((1,), 2.0), "1": torch.full((1,), 3.0)}, "empty": torch.zeros(0),
             "empty2": torch.zeros(0, 3), "transposed": torch.arange(6.0).reshape(2, 3).t(),
             "tuple": (torch.full((1,), 4.0), [torch.full((1,), 5.0)])}
    save(tmp_path / "t.safetensors", tied, extra=extra)
    meta, tensors, _ = _file(tmp_path / "t.safetensors")
    refs = json.loads(meta["model"])
    assert refs["1.weight"] == refs["0.weight"] == {"__tensor__": "model/0.weight"}
    assert sorted(tensors) == sorted(["model/0.weight", "model/0.bias", "model/1.bias", "extra/same", "extra/head",
                                      "extra/tail", "extra/d/1", "extra/d/1#2", "extra/d/1#3", "extra/empty",
                                      "extra/empty2", "extra/transposed", "extra/tuple/0", "extra/tuple/1/0"])
    ex = json.loads(meta["extra"])
    assert ex["again"] == {"__tensor__": "extra/same"}
    assert ex["d"] == {"__dict__": [[1, {"__tensor__": "extra/d/1#2"}], ["1", {"__tensor__": "extra/d/1#3"}]]}
    other = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    back = load(tmp_path / "t.safetensors", other)
    assert torch.equal(other[1].weight, tied[0].weight)
    for k in ("same", "again", "head", "tail", "d/1", "transposed"):
        assert torch.equal(back[k], extra[k]), k
    assert back["d"][1].item() == 2.0 and back["d"]["1"].item() == 3.0
    assert type(back["tuple"]) is tuple and back["tuple"][0].item() == 4.0 and back["tuple"][1][0].item() == 5.0
    assert tuple(back["empty"].shape) == (0,) and tuple(back["empty2"].shape) == (0, 3)


def _message(fn) -> str:
    with pytest.raises(CheckpointError) as info:
        fn()
    return str(info.value)


def test_save_refusals_are_exact(tmp_path):
    model = _net()
    p = tmp_path / "c.safetensors"
    assert _message(lambda: save(tmp_path, model)) == (
        f"cannot save to {str(tmp_path)!r}: it is a directory; give a file name")
    nowhere = tmp_path / "no" / "c.safetensors"
    assert _message(lambda: save(nowhere, model)) == (
        f"cannot save to {str(nowhere)!r}: directory {str(tmp_path / 'no')!r} does not exist")
    assert _message(lambda: save(p, "model")) == "save expects an nn.Module, got str"
    _, ctl, _ = _small_target("ctl")
    assert _message(lambda: save(p, perforate(_net(), DendriteConfig(**SMALL)), ctl)) == (
        "the controller drives another model than the one given to save")
    for bad in ([1], {1: 2}, "x"):
        assert _message(lambda bad=bad: save(p, model, extra=bad)) == "extra must be a dict with string keys"
    stranger = nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": [model[0].weight]}, {"params": [model[0].bias, model[2].bias, stranger.weight,
                                                                      stranger.bias]}], lr=0.1)
    assert _message(lambda: save(p, model, optimizer=opt)) == (
        "optimizer group 1 holds a parameter (index 2) that is not a parameter of the model; build the optimiser "
        "from controller.parameters() or model.parameters()")
    tail = "is neither a tensor nor a JSON value (None, bool, int, float, str, list, tuple, dict)"
    assert _message(lambda: save(p, model, extra={"a": [{"b": object()}]})) == (
        f"cannot save 'extra/a/0/b': a object {tail}")
    assert _message(lambda: save(p, model, extra={"t": (1, {2: {3, 4}})})) == f"cannot save 'extra/t/1/2': a set {tail}"
    assert not p.exists()
    assert _message(lambda: load(p, "model")) == "load expects an nn.Module, got str"
    save(p, model)
    assert load(p, _net()) == {}
    save(p, model, extra={})
    assert load(p, _net()) == {}


def test_configuration_that_json_cannot_hold_is_refused_before_writing(tmp_path):
    model, ctl, _ = _grown(1)
    ctl.config.output_init = float("nan")  # edited after validation
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        save(tmp_path / "c.safetensors", model, ctl)
    assert list(tmp_path.iterdir()) == []


def test_file_that_fails_to_read_and_file_without_tensors(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    save(path, nn.Sequential(nn.Tanh()), extra={"epoch": 2})
    assert sorted(_file(path)[1]) == []
    assert load(path, nn.Sequential(nn.Tanh())) == {"epoch": 2}

    def fails(self):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Path, "read_bytes", fails)
    assert _refusal(path, nn.Sequential(nn.Tanh())) == "cannot be read (Input/output error)"


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes and directory fsync")
def test_atomic_write_details(tmp_path, monkeypatch):
    model = _net()
    path = tmp_path / "c.safetensors"
    synced, opened, replaced = [], [], []
    real_fsync, real_open, real_replace = os.fsync, os.open, os.replace

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real_fsync(fd)

    def open_(p, flags, *args):
        opened.append((Path(p), flags))
        return real_open(p, flags, *args)

    def replace(src, dst):
        replaced.append((Path(src), Path(dst)))
        return real_replace(src, dst)

    old = os.umask(0o022)
    try:
        with monkeypatch.context() as m:
            m.setattr(os, "fsync", fsync)
            m.setattr(os, "open", open_)
            m.setattr(os, "replace", replace)
            save(path, model)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
        os.umask(0)
        save(tmp_path / "d.safetensors", model)
        assert stat.S_IMODE(os.stat(tmp_path / "d.safetensors").st_mode) == 0o666
    finally:
        os.umask(old)
    assert synced == [False, True]  # the file, then its directory
    [(src, dst)] = replaced
    assert dst == path and src.parent == tmp_path
    assert re.fullmatch(rf"\.c\.safetensors\.{os.getpid()}\.[0-9a-f]{{8}}\.tmp", src.name), src.name
    assert opened[0] == (src, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    assert opened[1] == (tmp_path, os.O_RDONLY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "d.safetensors"]


@pytest.mark.skipif(os.name != "posix", reason="directory fsync is POSIX only")
def test_directory_sync_failures_are_tolerated(tmp_path, monkeypatch):
    model = _net()
    closed = []
    real_open, real_fsync, real_close = os.open, os.fsync, os.close

    def open_dir_fails(p, flags, *args):
        if Path(p) == tmp_path:
            raise PermissionError("no")
        return real_open(p, flags, *args)

    def fsync_dir_fails(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError("EINVAL")
        return real_fsync(fd)

    def close(fd):
        closed.append(fd)
        return real_close(fd)

    with monkeypatch.context() as m:
        m.setattr(os, "open", open_dir_fails)
        save(tmp_path / "a.safetensors", model)
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", fsync_dir_fails)
        m.setattr(os, "close", close)
        save(tmp_path / "b.safetensors", model)
    assert len(closed) == 1  # the directory's descriptor, closed although its fsync failed
    for name in ("a", "b"):
        load(tmp_path / f"{name}.safetensors", _net())

    def replace_after_removing(src, dst):  # the temporary file is gone when the cleanup runs
        os.unlink(src)
        raise OSError("rename failed")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace_after_removing)
        with pytest.raises(OSError, match="^rename failed$"):
            save(tmp_path / "c.safetensors", model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_save_without_a_controller_keeps_the_candidates_learning_rate_scale(tmp_path):
    """A fresh model loaded from a save without a controller gets the layers' candidate_lr_scale back (it was
    the default 10), so the candidates' effective weights (stored value x scale) are the ones saved."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    perforate(model, DendriteConfig(candidate_lr_scale=2.0))
    for layer in (model[0], model[2]):
        layer.add_candidates(2, 1.0)
    path = tmp_path / "c.safetensors"
    save(path, model)
    fresh = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    load(path, fresh)
    for old, new in ((model[0], fresh[0]), (model[2], fresh[2])):
        assert new.candidate_scale == 2.0
        for a, b in zip(old.candidate_tensors(), new.candidate_tensors(), strict=True):
            assert torch.equal(a, b)
