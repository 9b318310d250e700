"""The ``apical`` command line: help, exit codes, error lines, demo, plot, inspect."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import apical
from apical.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apical", *args], capture_output=True, text=True, env=ENV,
                          timeout=120)


def test_help_exits_0():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("demo", "trial", "bench", "plot", "inspect"):
        assert command in proc.stdout


@pytest.mark.parametrize("command", ["demo", "trial", "plot", "inspect", "bench"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"usage: apical {command}" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    for argv in (["frobnicate"], ["demo", "--width", "four"], ["plot"], []):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_error_is_one_line_without_traceback(tmp_path):
    proc = run_cli("inspect", str(tmp_path / "missing.file"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("apical inspect: error:") and "does not exist" in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_debug_shows_the_traceback(tmp_path, capsys):
    missing = str(tmp_path / "missing.file")
    for argv in (["--debug", "inspect", missing], ["inspect", missing, "--debug"]):
        with pytest.raises(apical.CheckpointError, match="does not exist"):  # the interpreter prints it
            main(argv)
    assert main(["inspect", missing]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_errors_in_process(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("apical plot: error:")
    assert main(["demo", "--modes", "bogus"]) == 1
    assert "mode" in capsys.readouterr().err


def test_demo_prints_the_table_and_records_a_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["-v", "demo", "--modes", "none", "--width", "4", "--patience", "2", "--run-dir", str(run_dir),
                 "--progress"])
    out, err = capsys.readouterr()
    assert code == 0
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["mode", "hidden", "dendrites"])
    assert set(lines[header + 1].replace(" ", "")) == {"-"}
    assert lines[header + 2].split()[0] == "none"
    assert "apical: epoch" in err and "plateau" in err  # --verbose: one INFO line per phase change
    assert (run_dir / "history.csv").is_file() and (run_dir / "summary.json").is_file()

    pytest.importorskip("matplotlib")
    assert main(["plot", str(run_dir)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(run_dir / "scores.png"), str(run_dir / "architectures.png")]
    assert all((run_dir / name).stat().st_size > 0 for name in ("scores.png", "architectures.png"))


def test_demo_is_quiet_without_verbose(capsys):
    assert main(["demo", "--modes", "none", "--width", "4", "--patience", "2"]) == 0
    out, err = capsys.readouterr()
    assert "none" in out and err == ""


def test_inspect_prints_layers_and_history(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    cfg = apical.DendriteConfig(mode="pb", patience=1, seed=0, candidates=2, min_dendrite_epochs=1)
    apical.perforate(model, cfg)
    ctl = apical.Controller(model, cfg)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(ctl.parameters(), lr=0.0)
    for _ in range(3):  # a constant score: improved, plateau (dendrite phase), a dendrite epoch
        nn.functional.cross_entropy(model(x), y).backward()
        if ctl.step(0.5).restructured:
            opt = torch.optim.SGD(ctl.parameters(), lr=0.0)
    path = tmp_path / "ck.safetensors"
    apical.save(path, model, ctl, opt)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "DendriticLinear" in out and "candidates" in out
    assert f"total parameters: {apical.parameter_count(model)}" in out
    assert "dendrite_phase" in out and "controller: epoch 3, dendrite phase" in out


def test_progress_bar_is_optional(monkeypatch):
    from apical.cli import _progress_callback

    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    on_epoch, close = _progress_callback("pb")
    assert on_epoch is None
    close()


def test_demo_shows_a_plain_network_of_pbs_size(capsys):
    assert main(["demo", "--modes", "none,pb", "--patience", "2", "--lr", "1e-2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if len(line.split()) == 8
            and line.split()[0] in ("none", "none-matched", "pb")}
    assert set(rows) == {"none", "none-matched", "pb"}

    def count(h):  # MLP 64-h-10, by hand
        return 64 * h + h + 10 * h + 10

    pb_params = int(rows["pb"][3].replace(",", ""))
    hidden = int(rows["none-matched"][1])
    assert int(rows["none-matched"][3].replace(",", "")) == count(hidden)
    assert hidden == min(range(1, 100), key=lambda h: (abs(count(h) - pb_params), h))
    assert any(line.startswith("pb vs none-matched") for line in lines)
