"""apical.trial: the runner against the training loop, none-matched, resuming (SIGKILL included),
paired statistics against numpy/scipy, task errors, tuple inputs, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import apical
from apical import datasets, models, tasks
from apical.cli import main
from apical.trials import TaskError, load_task_file, matched_width, mode_config
from apical.trials import runner as trial_runner

pytest.importorskip("sklearn")
TASK_FILE = Path(__file__).parent / "scripts" / "trial_task.py"


def _lines(path: Path) -> list[dict]:
    """The records of a trial.jsonl without the wall-clock field."""
    out = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        record.pop("seconds")
        out.append(record)
    return out


def test_digits_task_through_the_trial_runner_scores_as_the_training_loop_did():
    """The built-in digits task gives, run by run, the scores of apical.training.fit (the loop of the
    suites before the trial runner existed): same test and val scores, epochs, parameters, dendrites."""
    from apical.training import fit

    changes = {"max_epochs": 30, "patience": 2, "lr": 1e-2, "max_dendrites": 1, "max_dendrite_epochs": 4}
    task = tasks.digits(**changes)
    result = apical.trial(task, modes=("none", "pb"), seeds=2, widths=(0.25,), out=None)
    assert any(r["dendrites"] > 0 for r in result.records if r["mode"] == "pb")  # the pb path is exercised
    for record in result.records:
        if record["mode"] == "none-matched":
            continue
        split = datasets.load("digits", seed=record["seed"])
        cfg = mode_config(record["mode"], 2, record["seed"], overrides={"max_dendrites": 1, "max_dendrite_epochs": 4})
        old = fit(lambda s=split: models.build("mlp", s, 0.25), split, cfg, lr=1e-2, batch_size=64, max_epochs=30,
                  seed=record["seed"])
        assert (record["test"], record["val"], record["epochs"], record["parameters"], record["dendrites"]) == \
            (old.test_score, old.val_score, old.epochs, old.parameters, old.dendrites), record["mode"]


def test_none_matched_trains_the_plain_width_with_the_closest_parameter_count(tmp_path):
    task = load_task_file(TASK_FILE)
    result = apical.trial(task, modes=("none", "pb"), seeds=2, out=tmp_path)
    pb = [r["parameters"] for r in result.records if r["mode"] == "pb"]
    matched = [r for r in result.records if r["mode"] == "none-matched"]
    assert result.modes == ["none", "none-matched", "pb"] and len(matched) == 2
    target = sum(pb) / len(pb)

    def count(h):  # Linear(64, h) + Linear(h, 10), by hand
        return 64 * h + h + h * 10 + 10

    best = min(range(1, 200), key=lambda h: (abs(count(h) - target), h))
    for r in matched:
        assert r["parameters"] == count(best) and round(4 * r["width"]) == best and r["for_width"] == 1.0
    assert result.summary("none-matched")["parameters"][0] == count(best)


def test_matched_width_finds_the_closest_count_and_refuses_a_model_that_does_not_grow():
    def build(width):
        return nn.Linear(10, max(1, round(8 * width)))  # 11 parameters per unit

    task = apical.Task(name="t", model=build, data=lambda s: None, loss=F.mse_loss)
    for target in (11 * 8, 11 * 13 + 4, 11 * 13 + 7, 11 * 40):
        w = matched_width(task, 1.0, target)
        got = 11 * max(1, round(8 * w))
        assert abs(got - target) == min(abs(11 * h - target) for h in range(8, 60)), (target, got)
    flat = apical.Task(name="flat", model=lambda w: nn.Linear(3, 3), data=lambda s: None, loss=F.mse_loss)
    with pytest.raises(TaskError, match="scale the hidden sizes"):
        matched_width(flat, 1.0, 1000)


def test_compare_is_the_paired_t_interval_of_the_recorded_scores():
    stats = pytest.importorskip("scipy.stats")
    task = load_task_file(TASK_FILE).with_settings(max_epochs=6)
    result = apical.trial(task, modes=("none", "none-long", "pb"), seeds=4, out=None)

    def scores(mode):
        return np.array([next(r["test"] for r in result.records if r["mode"] == mode and r["seed"] == s)
                         for s in range(4)])

    means = {m: scores(m).mean() for m in ("none", "none-long")}
    base = max(means, key=means.get)
    c = result.compare("pb")
    a, b = scores("pb"), scores(base)
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert c.baseline == base and c.n == 4 and c.seeds == (0, 1, 2, 3)
    assert c.diff == pytest.approx((a - b).mean(), abs=1e-12)
    if np.std(a - b) > 0:
        assert (c.lo, c.hi) == pytest.approx((ci.low, ci.high), abs=1e-3 * (ci.high - ci.low))
    assert c.wins == int((a > b).sum())
    m = result.compare("pb", "none-matched")
    assert m.diff == pytest.approx((a - scores("none-matched")).mean(), abs=1e-12)
    with pytest.raises(ValueError, match="gd"):
        result.compare("gd")


def test_a_lower_is_better_metric_counts_wins_downward():
    from apical.trials.stats import Comparison, compare

    records = [{"mode": m, "seed": s, "for_width": 1.0, "test": v}
               for m, vals in (("a", (1.0, 2.0, 3.0)), ("b", (2.0, 3.0, 4.5))) for s, v in enumerate(vals)]
    c = compare(records, "a", "b", 1.0, higher_is_better=False)
    assert c.wins == 3 and c.diff == pytest.approx(-7 / 6) and c.verdict == "better"
    assert compare(records, "a", "b", 1.0, higher_is_better=True).verdict == "worse"
    assert Comparison("a", "b", 1.0, 1, 0.1, float("nan"), float("nan"), 1, (0,)).verdict == "too few seeds"


def test_the_better_plain_baseline_is_chosen_on_the_seeds_both_have():
    """A partial table: none-long has a third, weak seed. Over the two shared seeds none-long is better
    (0.86 against 0.85 on average), over all its runs it would look worse (0.85): the shared seeds decide."""
    from apical.trials.stats import better_baseline

    def rec(mode, seed, test, width=1.0):
        return {"mode": mode, "seed": seed, "for_width": width, "test": test}

    records = [rec("none", 0, 0.85), rec("none", 1, 0.85), rec("none-long", 0, 0.86), rec("none-long", 1, 0.86),
               rec("none-long", 2, 0.83), rec("pb", 0, 0.99)]
    assert better_baseline(records, 1.0) == "none-long"
    assert better_baseline(records, 1.0, higher_is_better=False) == "none"
    # no shared seed: each mode's own mean; one plain mode only: that one; none at this width: None
    assert better_baseline([rec("none", 0, 0.8), rec("none-long", 1, 0.7)], 1.0) == "none"
    assert better_baseline([rec("none-long", 3, 0.1)], 1.0) == "none-long"
    assert better_baseline(records, 0.5) is None


def test_rerun_skips_finished_runs_and_redoes_a_torn_last_line(tmp_path, monkeypatch):
    task = load_task_file(TASK_FILE).with_settings(max_epochs=5)
    apical.trial(task, modes=("none", "pb"), seeds=2, out=tmp_path)
    path = tmp_path / "trial.jsonl"
    full = _lines(path)
    assert len(full) == 6 and (tmp_path / "trial.md").is_file()
    real_train = trial_runner.train
    trained = []

    def counting_train(*args, **kwargs):
        trained.append(args[1:4])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(trial_runner, "train", counting_train)
    apical.trial(task, modes=("none", "pb"), seeds=2, out=tmp_path)
    assert trained == [] and _lines(path) == full  # nothing trained again
    text = path.read_text().splitlines(keepends=True)
    path.write_text("".join(text[:3]) + text[3][: len(text[3]) // 2])  # killed while writing line 4
    apical.trial(task, modes=("none", "pb"), seeds=2, out=tmp_path)
    assert len(trained) == 3 and _lines(path) == full
    # other settings are not mixed in: their records move aside and every run is trained again
    trained.clear()
    apical.trial(task.with_settings(max_epochs=4), modes=("none",), seeds=1, out=tmp_path)
    assert len(trained) == 1 and (tmp_path / "trial.jsonl.previous").is_file()
    assert [r["mode"] for r in _lines(path)] == ["none"]


def _run_cli(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "apical", "trial", str(TASK_FILE), "--seeds", "2",
                             "--out", str(out), *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_a_trial_killed_with_sigkill_resumes_to_the_records_of_an_uninterrupted_run(tmp_path):
    whole = _run_cli(tmp_path / "whole")
    assert whole.wait(timeout=300) == 0, whole.stdout.read().decode()
    killed = _run_cli(tmp_path / "killed")
    path = tmp_path / "killed" / "trial.jsonl"
    deadline = time.monotonic() + 300
    while killed.poll() is None and time.monotonic() < deadline:
        if path.is_file() and path.read_text().count("\n") >= 3:
            break
        time.sleep(0.02)
    assert killed.poll() is None, "the trial finished before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    cut = path.read_text().count("\n")
    assert 3 <= cut < 10
    resumed = _run_cli(tmp_path / "killed")
    log = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, log
    assert log.count("test ") == 10 - cut  # only the runs the kill cut off were trained
    assert _lines(path) == _lines(tmp_path / "whole" / "trial.jsonl")
    assert (tmp_path / "killed" / "trial.md").is_file()


def test_the_cli_runs_a_task_file_to_its_tables(tmp_path, capsys):
    code = main(["trial", str(TASK_FILE), "--seeds", "2", "--modes", "none,pb", "--set", "max_epochs=4",
                 "--set", "max_dendrites=1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    md = (tmp_path / "trial.md").read_text()
    assert "| none-matched | 2 |" in md and "| pb | none-matched | 2 |" in md
    assert "apical trial" in md and "--set max_epochs=4" in md and "at most 4 epochs" in md
    assert "pb vs none-matched (width 1)" in out
    records = _lines(tmp_path / "trial.jsonl")
    assert {"mode", "seed", "width", "test", "val", "parameters", "dendrites", "epochs"} <= set(records[0])
    assert all(r["settings"]["max_epochs"] == 4 and r["settings"]["dendrites"]["max_dendrites"] == 1
               for r in records)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "compression.png").stat().st_size > 0


def test_bad_tasks_get_errors_that_name_the_field(tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("import nothing_of_that_name\n")
    with pytest.raises(TaskError, match="failed to import: ModuleNotFoundError"):
        load_task_file(broken)
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(TaskError, match="define task = apical.Task"):
        load_task_file(empty)
    with pytest.raises(TaskError, match="defines other, task"):
        load_task_file(TASK_FILE, "missing")
    assert load_task_file(TASK_FILE, "other").name == "other"
    with pytest.raises(TaskError, match="does not exist"):
        load_task_file(tmp_path / "nope.py")
    assert main(["trial", str(empty)]) == 1 and "define task" in capsys.readouterr().err

    good = load_task_file(TASK_FILE).with_settings(max_epochs=2)
    with pytest.raises(TaskError, match="metric 'auc' is unknown"):
        good.with_settings(metric="auc")
    with pytest.raises(TaskError, match="neither a Task field"):
        good.with_settings(learning_rate=0.1)
    with pytest.raises(TaskError, match="Task.dendrites"):
        good.with_settings(dendrites={"mode": "pb"})
    with pytest.raises(TaskError, match="model"):
        apical.trial(good.with_settings(model=lambda w: "a model"), modes=("none",), seeds=1, out=None)
    with pytest.raises(TaskError, match=r"must return \(train, val, test\)"):
        apical.trial(good.with_settings(data=lambda s: good.data(s)[:2]), modes=("none",), seeds=1, out=None)
    with pytest.raises(TaskError, match="the val split must be a sized"):
        apical.trial(good.with_settings(data=lambda s: (good.data(s)[0], [1, 2], good.data(s)[2])),
                     modes=("none",), seeds=1, out=None)
    with pytest.raises(TaskError, match="validation nan_metric is nan after epoch 1"):
        def nan_metric(outputs, targets):
            return float("nan")

        apical.trial(good.with_settings(metric=nan_metric), modes=("none",), seeds=1, out=None)
    with pytest.raises(ValueError, match="unknown mode"):
        apical.trial(good, modes=("none", "pbb"), seeds=1, out=None)


class _Masked(Dataset):
    """Inputs are (features, mask) pairs, batched by a custom collate_fn, as graph batches are."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return (self.x[i], (self.x[i] > 0).float()), self.y[i]


def _collate(items):
    xs = torch.stack([x for (x, _), _ in items])
    masks = torch.stack([m for (_, m), _ in items])
    return (xs, masks), torch.stack([y for _, y in items])


class _MaskedNet(nn.Module):
    def __init__(self, width):
        super().__init__()
        h = max(1, round(6 * width))
        self.fc = nn.Linear(16, h)
        self.out = nn.Linear(h, 3)

    def forward(self, x, mask):
        return self.out(torch.tanh(self.fc(torch.cat([x, mask], 1))))


def test_tuple_inputs_with_a_collate_fn_train_and_score():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(240, 8, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    splits = (_Masked(x[:160], y[:160]), _Masked(x[160:200], y[160:200]), _Masked(x[200:], y[200:]))
    task = apical.Task(name="masked", model=_MaskedNet, data=lambda seed: splits, loss=F.cross_entropy,
                       collate_fn=_collate, batch_size=32, lr=1e-2, patience=2, max_epochs=12,
                       dendrites={"max_dendrites": 1, "max_dendrite_epochs": 3})
    result = apical.trial(task, modes=("none", "pb"), seeds=1, out=None)
    pb = next(r for r in result.records if r["mode"] == "pb")
    assert pb["dendrites"] >= 1 and 0.3 < pb["test"] <= 1.0
    assert pb["val"] == max(h["score"] for h in pb["history"] if h["dendrites"] == pb["dendrites"])


def test_regression_task_with_missing_targets_minimises_mse():
    from apical.metrics import masked_mse

    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 5, generator=g)
    y = torch.stack([x[:, 0] - x[:, 1] ** 2, torch.sin(x[:, 2])], 1)
    y[torch.rand(y.shape, generator=g) < 0.2] = float("nan")
    parts = [TensorDataset(x[a:b], y[a:b]) for a, b in ((0, 200), (200, 250), (250, 300))]
    task = apical.Task(name="reg", model=lambda w: nn.Sequential(nn.Linear(5, max(1, round(4 * w))), nn.Tanh(),
                                                                  nn.Linear(max(1, round(4 * w)), 2)),
                       data=lambda s: tuple(parts), loss=masked_mse, metric="mse", lr=1e-2, patience=2, max_epochs=30)
    assert task.higher_is_better is False
    result = apical.trial(task, modes=("none", "none-long"), seeds=2, out=None)
    for r in result.records:
        assert np.isfinite(r["test"]) and r["test"] > 0
        best = min(h["score"] for h in r["history"])
        assert r["val"] == pytest.approx(best, rel=1e-6)  # the network kept is the one with the lowest val mse


def test_the_digits_suite_through_the_new_runner_reproduces_the_committed_table():
    """benchmarks/results/digits.jsonl was written by the suite runner before the trial runner existed
    (apical.training.fit); its seed-0 none and pb runs come out the same through the new one."""
    from apical.bench import suites
    from apical.bench.definitions import SUITES

    committed = Path(__file__).parents[1] / "benchmarks" / "results" / "digits.jsonl"
    old = {(r["mode"], r["seed"]): r for r in map(json.loads, committed.read_text().splitlines())
           if r["width"] == 0.25}
    suite = SUITES["digits"]
    settings = suites.run_settings(suite.models[0], quick=False, max_epochs=None)
    for mode in ("none", "pb"):
        new = suites.run_job(suite, suites.Job("mlp", mode, 0.25, 0), settings, timeout=600)
        was = old[(mode, 0)]
        # fields added to DendriteConfig since then are at their defaults (dendrite_rank: None)
        added = {k: v for k, v in new["config"].items() if k not in was["config"]}
        assert added == {"dendrite_rank": None}
        assert new["settings"] == was["settings"] and {k: new["config"][k] for k in was["config"]} == was["config"]
        keys = ("test_score", "val_score", "epochs", "parameters", "dendrites")
        assert {k: new["result"][k] for k in keys} == {k: was["result"][k] for k in keys}, mode


def test_the_readme_task_file_runs_as_written(tmp_path, monkeypatch):
    """The README's task example, saved as a file beside the data it loads, runs through `apical trial`."""
    import re

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Do dendrites help my model?")[1].split("\n## ")[0]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    commands = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    assert "apical trial my_task.py" in commands
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 20, generator=g)
    torch.save((x, (x[:, :5] + 0.5 * torch.randn(1200, 5, generator=g)).argmax(1)), "my_data.pt")
    (tmp_path / "my_task.py").write_text(code)
    assert main(["trial", "my_task.py", "--seeds", "2", "--modes", "none,pb", "--set", "max_epochs=3",
                 "--out", "trial-out"]) == 0
    assert "| none-matched | 2 |" in (tmp_path / "trial-out" / "trial.md").read_text()


def test_report_only_writes_the_table_of_the_runs_so_far_and_trains_nothing(tmp_path, monkeypatch):
    task = load_task_file(TASK_FILE).with_settings(max_epochs=4)
    apical.trial(task, modes=("none",), seeds=2, out=tmp_path)  # a trial stopped after its none runs
    monkeypatch.setattr(trial_runner, "train", lambda *a, **k: pytest.fail("report_only must not train"))
    records = tmp_path / "trial.jsonl"
    with records.open("a") as fh:  # a run of other settings, and a torn line another process is writing
        fh.write(json.dumps({"mode": "none", "seed": 5, "for_width": 1.0, "settings": {"lr": 9}}) + '\n{"mo')
    before = records.read_bytes()
    result = apical.trial(task, modes=("none", "pb"), seeds=2, out=tmp_path, report_only=True)
    assert records.read_bytes() == before and not (tmp_path / "trial.jsonl.previous").exists()
    assert [r["mode"] for r in result.records] == ["none", "none"]
    assert "| none | 2 |" in (tmp_path / "trial.md").read_text()


def test_matched_false_defers_none_matched_until_every_seed_has_its_pb_run(tmp_path, monkeypatch):
    """A trial filled in seed by seed with matched=False trains no none-matched run; the last call
    trains it once, at the width matched to the mean of every seed's pb parameters."""
    task = load_task_file(TASK_FILE).with_settings(max_epochs=4)
    trained: list[tuple[str, int]] = []
    real_train = trial_runner.train

    def counting(task_, mode, seed, *a, **k):
        trained.append((mode, seed))
        return real_train(task_, mode, seed, *a, **k)

    monkeypatch.setattr(trial_runner, "train", counting)
    apical.trial(task, modes=("none", "pb"), seeds=[1], out=tmp_path, matched=False)
    apical.trial(task, modes=("none", "pb"), seeds=[0], out=tmp_path, matched=False)
    assert sorted(trained) == [("none", 0), ("none", 1), ("pb", 0), ("pb", 1)]
    trained.clear()
    result = apical.trial(task, modes=("none", "pb"), seeds=2, out=tmp_path)
    assert sorted(trained) == [("none-matched", 0), ("none-matched", 1)]
    pb = [r["parameters"] for r in result.records if r["mode"] == "pb"]
    widths = {r["width"] for r in result.records if r["mode"] == "none-matched"}
    assert widths == {matched_width(task, 1.0, sum(pb) / 2)}
    # a report of the deferred state lists the runs so far without training
    trained.clear()
    again = apical.trial(task, modes=("none", "pb"), seeds=2, out=tmp_path, matched=False)
    assert trained == [] and len(again.records) == 6


def test_matched_to_lets_disjoint_seeds_train_none_matched_at_the_whole_trials_width(tmp_path, monkeypatch):
    """Two calls with disjoint seeds and matched_to=[0, 1] train one none-matched run each, at the width
    matched to the mean of both seeds' pb runs (what one call over both seeds uses); a seed of
    matched_to without its pb run is refused before anything is trained."""
    task = load_task_file(TASK_FILE).with_settings(max_epochs=4)
    apical.trial(task, modes=("none", "pb"), seeds=[0, 1], out=tmp_path, matched=False)
    path = tmp_path / "trial.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:  # as if seed 0's pb run had kept more sets than seed 1's
        if r["mode"] == "pb" and r["seed"] == 0:
            r["parameters"] *= 4
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    trained: list[tuple[str, int, float]] = []
    real_train = trial_runner.train

    def counting(task_, mode, seed, width, *a, **k):
        trained.append((mode, seed, width))
        return real_train(task_, mode, seed, width, *a, **k)

    monkeypatch.setattr(trial_runner, "train", counting)
    with pytest.raises(ValueError, match=r"seed\(s\) \[2\] have no pb run"):
        apical.trial(task, modes=("none", "pb"), seeds=[1], out=tmp_path, matched_to=[0, 1, 2])
    assert trained == []
    apical.trial(task, modes=("none", "pb"), seeds=[1], out=tmp_path, matched_to=[0, 1])
    apical.trial(task, modes=("none", "pb"), seeds=[0], out=tmp_path, matched_to=[0, 1])
    pb = {r["seed"]: r["parameters"] for r in records if r["mode"] == "pb"}
    want = matched_width(task, 1.0, (pb[0] + pb[1]) / 2)
    assert want not in (matched_width(task, 1.0, pb[0]), matched_width(task, 1.0, pb[1]))
    assert trained == [("none-matched", 1, want), ("none-matched", 0, want)]
    trained.clear()
    result = apical.trial(task, modes=("none", "pb"), seeds=2, out=tmp_path)  # the whole trial: nothing to redo
    assert trained == [] and len(result.records) == 6
    with pytest.raises(ValueError, match="matched_to needs out"):
        apical.trial(task, modes=("none", "pb"), seeds=[0], out=None, matched_to=[0])


def test_select_on_loss_gives_the_controller_the_validation_loss():
    """train(select_on="loss"): every controller decision reads the validation cross-entropy (lower
    is better), computed here by hand after each epoch; the default reads the metric."""
    from apical.trials.run import train

    task = load_task_file(TASK_FILE).with_settings(max_epochs=6, patience=1)
    splits = task.data(0)
    x_val, y_val = splits[1].tensors
    seen: list[float] = []
    accuracy: list[float] = []

    def by_hand(model, ctl):
        model.eval()
        with torch.no_grad():
            out = model(x_val)
            seen.append(float(F.cross_entropy(out, y_val)))
            accuracy.append(float((out.argmax(1) == y_val).float().mean()))
        model.train()

    out = train(task, "pb", 0, 1.0, splits, on_epoch=by_hand, select_on="loss")
    scores = [h["score"] for h in out["history"]]
    assert len(scores) == len(seen) >= 2
    np.testing.assert_allclose(scores, seen, rtol=1e-5)
    # a network that overfits (lr 0.1, width 16): its lowest validation loss comes at epoch 12, its best
    # accuracy at epoch 25; the network kept is the one its signal picks
    overfit = task.with_settings(max_epochs=25, patience=25, lr=0.1)
    kept = {}
    for chosen in ("loss", "metric"):
        seen.clear(), accuracy.clear()
        kept[chosen] = train(overfit, "none", 0, 16.0, splits, on_epoch=by_hand, select_on=chosen)["val"]
    assert accuracy[int(np.argmin(seen))] < max(accuracy)
    assert kept["loss"] == pytest.approx(accuracy[int(np.argmin(seen))], abs=1e-6)
    assert kept["metric"] == pytest.approx(max(accuracy), abs=1e-6)
    with pytest.raises(ValueError, match="select_on"):
        train(task, "none", 0, 1.0, splits, select_on="val")


def test_rewriting_unchanged_records_leaves_the_file_alone(tmp_path):
    """Two processes starting side by side on one trial must not replace each other's file."""
    from apical.trials import records as jsonl

    path = tmp_path / "trial.jsonl"
    rows = [{"mode": "none", "seed": 0, "test": 0.5}, {"mode": "pb", "seed": 1, "test": 0.75}]
    jsonl.rewrite(path, rows)
    inode = path.stat().st_ino
    jsonl.rewrite(path, rows)
    assert path.stat().st_ino == inode  # not replaced
    path.write_text(path.read_text() + '{"mode": "gd", "se')  # a torn last line is dropped
    jsonl.rewrite(path, jsonl.read(path))
    assert jsonl.read(path) == rows and path.read_text().endswith("\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trial.jsonl"]
