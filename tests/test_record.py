"""Run records: history.csv / summary.json written by Controller(run_dir=...), plot_run, inspect_text."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
from torch import nn

import apical
from apical.checkpoint import CheckpointError
from apical.inspection import inspect_text
from apical.record import plot_run, read_history, read_summary

CFG = dict(mode="pb", candidates=2, max_dendrites=3, patience=2, dendrite_patience=1, min_dendrite_epochs=1,
           max_dendrite_epochs=3, max_tries=1, improvement_threshold=(0.0, 0.0, 10.0), seed=0)
HISTORY_KEYS = ("epoch", "phase", "score", "best_score", "dendrites", "parameters", "event", "correlation")


def make_task():
    """A small 3-class problem that a 3-neuron hidden layer cannot solve well (XOR-like)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(384, 6, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    return x[:256], y[:256], x[256:], y[256:]


def setup(run_dir=None, **overrides):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 3))
    cfg = apical.DendriteConfig(**{**CFG, **overrides})
    apical.perforate(model, cfg)
    ctl = apical.Controller(model, cfg, run_dir=run_dir)
    return model, ctl, torch.optim.Adam(ctl.parameters(), lr=2e-2)


def train(data, model, ctl, opt, epochs=200):
    """Train until done or for ``epochs`` more epochs; returns the current optimiser."""
    xt, yt, xv, yv = data
    for _ in range(epochs):
        if ctl.done:
            break
        model.train()
        for i in range(0, len(xt), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[i : i + 64]), yt[i : i + 64]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xv).argmax(1) == yv).float().mean().item()
        if ctl.step(acc).restructured:
            opt = torch.optim.Adam(ctl.parameters(), lr=2e-2)
    return opt


@pytest.fixture(scope="module")
def data():
    return make_task()


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """One complete run (installed, kept, installed, reverted, done) recorded in a run_dir."""
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("run") / "nested" / "run"
    model, ctl, opt = setup(run_dir)
    opt = train(data, model, ctl, opt)
    assert ctl.done
    return run_dir, model, ctl, opt


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_history_csv_matches_controller_history(finished):
    run_dir, _, ctl, _ = finished
    lines = _csv_rows(run_dir / "history.csv")
    assert lines[0] == [*HISTORY_KEYS, "seconds"]
    assert sum(1 for line in lines if line == lines[0]) == 1  # header once
    rows = read_history(run_dir)
    assert len(rows) == len(ctl.history) > 5
    for row, record in zip(rows, ctl.history, strict=True):
        assert {k: row[k] for k in HISTORY_KEYS} == record
        assert isinstance(row["seconds"], float) and row["seconds"] >= 0
    events = ",".join(r["event"] for r in rows)
    for event in ("plateau", "dendrite_phase", "installed", "kept", "reverted", "done"):
        assert event in events


def test_summary_json(finished):
    run_dir, model, ctl, _ = finished
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["format"] == "apical.run" and summary["mode"] == "pb"
    assert summary["done"] is True
    assert summary["epochs"] == ctl.epoch == len(ctl.history)
    assert summary["best_score"] == ctl.accepted_score
    assert summary["dendrites"] == ctl.dendrites == apical.dendrite_count(model) == 1
    assert summary["parameters"] == apical.parameter_count(model)
    seconds = summary["seconds"]
    assert seconds["neuron"] > 0 and seconds["dendrite"] > 0
    assert seconds["total"] == pytest.approx(seconds["neuron"] + seconds["dendrite"], abs=1e-5)
    expected = [(h["epoch"], e) for h in ctl.history for e in h["event"].split(",")
                if e and e not in ("improved", "correlation_improved")]
    assert [(e["epoch"], e["event"]) for e in summary["events"]] == expected
    installs = [e["epoch"] for e in summary["events"] if e["event"] == "installed"]
    reverts = [e["epoch"] for e in summary["events"] if e["event"] == "reverted"]
    assert len(installs) == 2 and len(reverts) == 1 and installs[1] < reverts[0]
    archs = summary["architectures"]
    assert [(a["dendrites"], a["outcome"]) for a in archs] == [(0, "kept"), (1, "kept"), (2, "reverted")]
    assert [a["parameters"] for a in archs] == sorted({h["parameters"] for h in ctl.history})
    assert summary["config"]["max_tries"] == 1
    assert read_summary(run_dir) == summary
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_nothing_is_written_without_run_dir(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, ctl, opt = setup()
    train(data, model, ctl, opt, epochs=8)
    ctl.finish()
    assert ctl._record is None
    assert list(tmp_path.iterdir()) == []


def test_plot_run_writes_two_pngs(finished):
    mpimg = pytest.importorskip("matplotlib.image")
    run_dir = finished[0]
    paths = plot_run(run_dir)
    assert [p.name for p in paths] == ["scores.png", "architectures.png"]
    for path in paths:
        assert path.parent == run_dir and path.stat().st_size > 10_000
        img = mpimg.imread(path)
        assert img.shape[:2] == (450, 800)
        rgb = img[..., :3].reshape(-1, 3)
        assert rgb.std() > 0.05  # not blank
        colours = {tuple(c) for c in (rgb * 255).round().astype(int)[::7].tolist()}
        assert len(colours) > 50
        # some clearly coloured pixels (phase shading, markers), not only greys
        saturated = (rgb.max(axis=1) - rgb.min(axis=1)) > 0.3
        assert saturated.sum() > 200


def test_plot_run_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="run directory"):
        plot_run(tmp_path / "missing")
    (tmp_path / "history.csv").write_text("epoch,phase,score\n")
    with pytest.raises(ValueError, match="no epochs"):
        plot_run(tmp_path)
    (tmp_path / "history.csv").write_text("epoch,phase,score\n1,neuron,0.5\n")
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install apical\[plot\]"):
        plot_run(tmp_path)


def test_resume_continues_or_rewrites_history(data, tmp_path):
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt.safetensors"
    model, ctl, opt = setup(run_dir)
    opt = train(data, model, ctl, opt, epochs=4)
    apical.save(ckpt, model, ctl, opt)
    saved = [dict(h) for h in ctl.history]

    # 1. resume right where the file ends: rows are appended
    model, ctl, opt = setup(run_dir)
    apical.load(ckpt, model, ctl, opt)
    opt = train(data, model, ctl, opt, epochs=3)
    rows = read_history(run_dir)
    assert len(rows) == len(ctl.history) == 7
    assert [{k: r[k] for k in HISTORY_KEYS} for r in rows] == ctl.history
    assert all(r["seconds"] is not None for r in rows)
    assert sum(1 for line in _csv_rows(run_dir / "history.csv") if line[0] == "epoch") == 1
    assert read_summary(run_dir)["epochs"] == 7

    # 2. resume from the older checkpoint: the file (7 rows) is rewritten from the history
    model, ctl, opt = setup(run_dir)
    apical.load(ckpt, model, ctl, opt)
    train(data, model, ctl, opt, epochs=1)
    rows = read_history(run_dir)
    assert len(rows) == 5 and ctl.history[:4] == saved
    assert [{k: r[k] for k in HISTORY_KEYS} for r in rows] == ctl.history
    assert all(r["seconds"] is not None for r in rows[:4])  # kept from the file: same epochs

    # 3. a fresh run in the same directory starts the file again
    model, ctl, opt = setup(run_dir)
    train(data, model, ctl, opt, epochs=2)
    assert len(read_history(run_dir)) == 2
    summary = read_summary(run_dir)  # written at the first epoch and at events, not every epoch
    assert summary["epochs"] == 1 and summary["done"] is False


def test_finish_is_recorded(data, tmp_path):
    model, ctl, opt = setup(tmp_path, patience=2)
    opt = train(data, model, ctl, opt, epochs=7)  # stops inside the first dendrite set's neuron phase
    assert not ctl.done and ctl.dendrites == 1
    summary = read_summary(tmp_path)
    assert summary["done"] is False and summary["epochs"] <= ctl.epoch
    ctl.finish()
    summary = read_summary(tmp_path)
    assert summary["done"] is True and summary["epochs"] == ctl.epoch
    last = [e["event"] for e in summary["events"] if e["epoch"] == ctl.epoch]
    assert last[-3:] in (["finish", "kept", "done"], ["finish", "reverted", "done"])
    assert summary["architectures"][-1]["outcome"] in ("kept", "reverted")
    assert len(read_history(tmp_path)) == len(ctl.history)  # finish adds no epoch


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        setup(tmp_path / "f")


def test_inspect_text(finished, tmp_path):
    _, model, ctl, opt = finished
    path = tmp_path / "ck.safetensors"
    apical.save(path, model, ctl, opt, extra={"epoch": ctl.epoch})
    text = inspect_text(path)
    assert "DendriticLinear" in text
    for name in ("name", "type", "neurons", "dendrites", "parameters"):
        assert name in text
    assert f"total parameters: {apical.parameter_count(model)}" in text
    assert "installed" in text and "reverted" in text and "done" in text
    assert f"extra: epoch={ctl.epoch}" in text
    # model only, on a plain model: no controller section, BatchNorm buffers not counted
    plain = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    apical.save(tmp_path / "plain.safetensors", plain)
    text = inspect_text(tmp_path / "plain.safetensors")
    assert "controller: not saved" in text and "BatchNorm" in text
    assert f"total parameters: {sum(p.numel() for p in plain.parameters())}" in text
    with pytest.raises(CheckpointError, match="does not exist"):
        inspect_text(tmp_path / "missing.safetensors")
