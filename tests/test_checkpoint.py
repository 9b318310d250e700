"""apical.save / apical.load: exact resume, validation of malformed files, atomic writes."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch as st
import torch
from torch import nn

import apical.checkpoint as ck
from apical.checkpoint import CheckpointError, load, save
from apical.dendrites import Controller, DendriteConfig, perforate, structure

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
        m.setattr(ck, "_write_file", half_then_crash)
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
