"""``benchmarks/cheap_dendrites.py``: width-1 references taken over from another benchmark's records
only when they are the very run the sweep would make (same task, mode, seed, width and settings)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from apical import tasks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("cheap_dendrites", ROOT / "benchmarks" / "cheap_dendrites.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RECORDS", tmp_path / "cheap.jsonl")
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "REFERENCE_RECORDS", {"digits": tmp_path / "trial.jsonl"})
    return module


def _trial_line(mode: str, seed: int, width: float, settings: dict, test: float) -> str:
    return json.dumps({"task": "digits", "mode": mode, "seed": seed, "width": width, "test": test, "val": test,
                       "parameters": 2410, "dendrites": 0, "epochs": 7, "seconds": 1.5, "settings": settings})


def test_a_reference_is_reused_only_with_the_same_seed_width_and_settings(bench, tmp_path):
    settings = tasks.get("digits").settings()
    other = {**settings, "lr": settings["lr"] * 2}
    (tmp_path / "trial.jsonl").write_text("\n".join([
        _trial_line("none", 0, 0.5, settings, 0.1),  # another width
        _trial_line("none", 1, 1.0, settings, 0.2),  # another seed
        _trial_line("none", 0, 1.0, other, 0.3),  # other settings
        "{cut off",
        _trial_line("none", 0, 1.0, settings, 0.9),
    ]) + "\n")
    got = bench._reused_reference("digits", "none", 0, settings)
    assert got == {"test": 0.9, "val": 0.9, "parameters": 2410, "dendrites": 0, "epochs": 7, "seconds": 1.5}
    assert bench._reused_reference("digits", "none-long", 0, settings) is None
    assert bench._reused_reference("digits", "none", 2, settings) is None
    assert bench._reused_reference("mnist5k", "none", 0, settings) is None  # no other benchmark for it


def test_the_sweep_copies_a_reused_reference_and_trains_the_rest(bench, tmp_path, monkeypatch):
    settings = tasks.get("digits").settings()
    (tmp_path / "trial.jsonl").write_text(_trial_line("none", 0, 1.0, settings, 0.9) + "\n")
    trained = []

    def fake_train(task, mode, seed, width, splits, select_on="metric"):
        trained.append((mode, width))
        return {"test": 0.5, "val": 0.5, "parameters": 100, "dendrites": 0, "epochs": 1, "seconds": 0.1,
                "history": []}

    monkeypatch.setattr(bench, "train", fake_train)
    monkeypatch.setattr(bench, "check_splits", lambda task, seed, data: data)
    bench.run_suite("digits", [0], [], log=lambda m: None)
    records = [json.loads(line) for line in (tmp_path / "cheap.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["test"]) for r in records] == [("none@1", 0.9), ("none-long@1", 0.5)]
    assert records[0]["reused_from"] == "trial.jsonl" and "reused_from" not in records[1]
    assert trained == [("none-long", 1.0)]
