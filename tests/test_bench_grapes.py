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


def test_claims_quick_run_is_resumable_and_its_report_rebuilds_from_the_jsonl(tmp_path):
    from apical.bench import grapes_claims as claims

    names = ["depth", "fa", "recurrent", "forgetting"]
    try:
        import snntorch  # noqa: F401
        names.append("spiking")
    except ImportError:
        pass
    (tmp_path / "grapes.md").write_text("# speed report\n")
    argv = ["--claims", ",".join(names), "--quick", "--seeds", "2", "--out", str(tmp_path)]
    bench.main(argv)
    lines = [json.loads(x) for x in (tmp_path / "grapes_claims.jsonl").read_text().splitlines()]
    settings = {n: claims.quick(s) for n, s in claims.SETTINGS.items() if s.claim in names}
    expected = sum(len(s.arms) * len(s.lrs) * 2 + 2 for s in settings.values())
    assert len(lines) == expected
    for name, s in settings.items():
        mine = [r for r in lines if r["setting"] == name]
        # the chosen lr is the grid value with the best mean final validation accuracy, by hand
        means = {lr: sum(r["final_val"] for r in mine if r["arm"] == "grapes" and r["lr"] == lr) / 2 for lr in s.lrs}
        best = max(means.values())
        lr_g = min(lr for lr, v in means.items() if v == best)
        for seed in (0, 1):
            g = next(r for r in mine if r["arm"] == "grapes" and r["lr"] == lr_g and r["seed"] == seed)
            c = next(r for r in mine if r["arm"] == "control" and r["seed"] == seed)
            assert c["lr"] == pytest.approx(lr_g * g["mean_factor"], rel=1e-12)
            assert len(g["val_curve"]) == s.epochs * s.tasks
            if s.clip is not None:
                assert 1.0 <= g["mean_factor"] <= 2.0
    # resumable: a second call trains nothing new
    bench.main(argv)
    assert len((tmp_path / "grapes_claims.jsonl").read_text().splitlines()) == expected
    md = (tmp_path / "grapes.md").read_text()
    assert md.startswith("# speed report") and md.count(claims.BEGIN) == 1
    for claim in names:
        assert f"### Claim: {claim}" in md
    assert md.count("**Verdict (") == len(names)
    # the report rebuilds from the jsonl alone
    (tmp_path / "grapes_claims.md").unlink()
    bench.main([*argv, "--report-only"])
    assert "**Verdict (" in (tmp_path / "grapes_claims.md").read_text()
    assert (tmp_path / "grapes.md").read_text().count(claims.BEGIN) == 1
