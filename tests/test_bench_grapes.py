import json

import pytest

from apical.bench import grapes as bench


def test_quick_run_writes_every_arm_seed_and_a_matched_control(tmp_path):
    bench.main(["--quick", "--out", str(tmp_path), "--datasets", "digits", "--seeds", "2", "--epochs", "2"])
    for suffix in ("md", "json"):
        assert (tmp_path / f"grapes.{suffix}").is_file()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "grapes.png").stat().st_size > 0

    data = json.loads((tmp_path / "grapes.json").read_text())
    runs = data["datasets"]["digits"]["runs"]
    assert {(r["arm"], r["seed"]) for r in runs} == {(a, s) for a in bench.ARMS for s in (0, 1)}
    by = {(r["arm"], r["seed"]): r for r in runs}
    for seed in (0, 1):
        g = by[("sgd_grapes", seed)]
        assert len(g["val_curve"]) == 3 and len(g["factor_per_epoch"]) == 2
        # the factor is a mean of per-neuron factors in [1, 2]
        assert all(1.0 <= f <= 2.0 for f in g["factor_per_epoch"])
        recomputed = sum(g["factor_per_epoch"]) / len(g["factor_per_epoch"])
        control = by[("sgd_lr_matched", seed)]
        assert control["lr_multiplier"] == pytest.approx(recomputed, rel=1e-12)
        assert control["base_lr"] == g["base_lr"] and by[("sgd", seed)]["lr_multiplier"] == 1.0
        gain = by[("sgd_gain_matched", seed)]["layer_lr_multipliers"]
        assert gain == pytest.approx({n: sum(v) / len(v) for n, v in g["layer_gain_per_epoch"].items()})
        # arms of a seed start from the same weights: same validation accuracy before training
        assert len({by[(a, seed)]["val_curve"][0] for a in bench.ARMS}) == 1

    md = (tmp_path / "grapes.md").read_text()
    assert "apical bench grapes --quick" in md and "What this shows" in md
    for label in bench.ARMS.values():
        assert label in md
