"""``benchmarks/tox21_gnn.py --paper-switching``: pb with long neuron phases, paired with the main trial's runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

T975 = {2: 4.302653, 3: 3.182446}  # Student t quantiles, from a table
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("tox21_gnn", ROOT / "benchmarks" / "tox21_gnn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(mode: str, seed: int, test: float, settings: dict) -> dict:
    return {"task": "tox21-gnn", "mode": mode, "seed": seed, "width": 1.0, "for_width": 1.0, "test": test,
            "val": test, "parameters": 1, "dendrites": 0, "epochs": 1, "seconds": 1.0, "settings": settings}


def test_paper_switching_is_paired_with_the_main_trials_runs_of_the_same_settings(bench, tmp_path):
    base = {"task": "tox21-gnn", "lr": 0.001, "patience": 10, "dendrites": {}}
    paper_settings = {**base, "dendrites": {"patience": 40}}
    long_ = {0: 0.80, 1: 0.82, 2: 0.85, 3: 0.90}
    pb = {0: 0.81, 1: 0.80, 2: 0.86, 3: 0.91}
    paper = {0: 0.83, 1: 0.81, 2: 0.84, 3: 0.95}
    main = [_record("none-long", s, v, base) for s, v in long_.items()]
    main += [_record("pb", s, v, base) for s, v in pb.items() if s != 3]
    main.append(_record("pb", 3, 0.10, {**base, "lr": 0.01}))  # other settings: not paired
    main.append(_record("none", 0, 0.5, base))  # not a compared mode
    path = tmp_path / "trial.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in main))
    text = bench.against_main_trial([_record("pb", s, v, paper_settings) for s, v in paper.items()], path, [1.0], True)
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| 1 |")}
    for baseline, ref, seeds in (("none-long", long_, [0, 1, 2, 3]), ("pb", pb, [0, 1, 2])):
        d = np.array([paper[s] - ref[s] for s in seeds])
        half = T975[len(d) - 1] * d.std(ddof=1) / np.sqrt(len(d))
        assert rows[baseline][2] == str(len(seeds))
        assert rows[baseline][3] == f"{d.mean():+.4f}"
        assert rows[baseline][4] == f"[{d.mean() - half:+.4f}, {d.mean() + half:+.4f}]"
        assert rows[baseline][5] == f"{int((d > 0).sum())}/{len(seeds)}"
    assert "No seed" in bench.against_main_trial([], path, [1.0], True)
