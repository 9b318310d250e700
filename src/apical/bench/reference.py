"""The ``perforatedai`` package (the reference library) on the suites' data, model, optimiser, split, seeds.

``apical bench SUITE --modes ...,perforatedai`` trains each seed once more through perforatedai's own
documented API (``UPA.perforate_model``, ``GPA.pai_tracker.setup_optimizer``, ``add_extra_score``,
``add_validation_score``) in a child process (``python -m apical.bench.reference``) with stdin closed,
a timeout and a temporary working directory, because the package writes files every epoch and can stop
to wait for keyboard input or a debugger when it is unhappy. The training loop is ``apical.training.fit``'s: same seeded
initial weights, same batch order, Adam with the suite's learning rate, the validation score after
every epoch, the test score once on the network the library returns.

Installation (the plain ``pip install perforatedai`` pulls a CUDA torch)::

    pip install --no-deps perforatedai==3.2.9 torchvision==<the one matching torch>
    pip install pandas cryptography pyyaml requests matplotlib safetensors

Status with perforatedai 3.2.9 (Python 3.11, torch 2.13 CPU, torchvision 0.28 with ``--no-deps``):
it runs. Without the closed ``perforatedbp`` add-on it prints "Building dendrites without Perforated
Backpropagation": this is its open variant, dendrites trained jointly by gradient descent, i.e. our
``gd`` mode. Settings mirrored from ``mode_config("gd", P, seed)``: ``n_epochs_to_switch = P``,
``max_dendrites``, ``max_dendrite_tries``, ``improvement_threshold`` (+ raw); everything else is the
library's default (candidate init ``randn * 0.01``, sigmoid dendrites). What it needs to run unattended:

- ``set_testing_dendrite_capacity(False)``: otherwise it runs its 3-dendrite smoke test and stops;
- ``set_configuration_confirmed(True)``: otherwise ``perforate_model`` raises ("Perforation
  configuration has not been confirmed, and it cannot be done interactively here");
- ``making_graphs=True`` and ``drawing_pai`` left on: with ``making_graphs=False`` the first switch
  fails with ``KeyError: 'neuron_accuracies'`` (``utils_perforatedai.change_learning_modes``), with
  ``set_drawing_pai(False)`` with ``IndexError`` in ``generate_accuracy_plots``;
- one ``add_extra_score`` per epoch (we add the mean training loss), as its examples do.

Cost: with graphs on it draws a 28x14-inch figure and writes a dozen CSV files after every epoch
(``save_graphs``), about 1 s per epoch on this machine whatever the model; the report gives the
total wall time per epoch and the part spent in our train/evaluate loop separately. ``test_saves``
is turned off (no ``latest`` checkpoint per epoch); it still saves ``best_model`` on improvements.
Parameters are ``UPA.count_params`` (which also counts the superseded ``dendrites_to_top`` rows).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from apical.dendrites import DendriteConfig

PACKAGE = "perforatedai"
TESTED_VERSION = "3.2.9"


def installed_version() -> str | None:
    """Version of the installed perforatedai package, or None."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_config(cfg: DendriteConfig) -> dict[str, Any]:
    """The perforatedai settings mirrored from ``cfg`` (our "gd" config)."""
    thr = cfg.improvement_threshold
    return {
        "package": PACKAGE,
        "version": installed_version(),
        "n_epochs_to_switch": cfg.patience,
        "max_dendrites": cfg.max_dendrites,
        "max_dendrite_tries": cfg.max_tries,
        "improvement_threshold": list(thr) if not isinstance(thr, (int, float)) else [float(thr)],
        "improvement_threshold_raw": cfg.improvement_threshold_raw,
        "other": "library defaults; testing_dendrite_capacity False, test_saves False, graphs on",
    }


def run_reference(suite: str, model: str, width: float, seed: int, *, lr: float, batch_size: int, patience: int,
                  max_epochs: int, quick: bool = False, timeout: float = 3600.0,
                  threads: int | None = None) -> dict[str, Any]:
    """Train one perforatedai run in a child process.

    Returns ``{"result": {...}}`` (RunResult-like fields plus timing details) or ``{"failed": reason}``.
    """
    version = installed_version()
    if version is None:
        return {"failed": f"{PACKAGE} is not installed (pip install --no-deps {PACKAGE}=={TESTED_VERSION}, "
                          "then its requirements without torch)"}
    threads = threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="apical-pai-") as tmp:
        result_path = Path(tmp) / "result.json"
        log_path = Path(tmp) / "log.txt"
        cmd = [sys.executable, "-m", "apical.bench.reference", "--suite", suite, "--model", model,
               "--width", repr(width), "--seed", str(seed), "--lr", repr(lr), "--batch-size", str(batch_size),
               "--patience", str(patience),
               "--max-epochs", str(max_epochs), "--threads", str(threads), "--result", str(result_path)]
        if quick:
            cmd.append("--quick")
        env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        start = time.perf_counter()
        try:
            with log_path.open("w") as log:
                proc = subprocess.run(cmd, cwd=tmp, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      env=env, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"failed": f"timed out after {timeout:.0f} s ({_last_epoch(log_path)})"}
        if proc.returncode != 0 or not result_path.is_file():
            return {"failed": f"exit code {proc.returncode} after {time.perf_counter() - start:.0f} s: "
                              f"{_error_line(log_path)}"}
        return {"result": json.loads(result_path.read_text())}


def _tail(path: Path, n: int = 60) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def _error_line(path: Path) -> str:
    """The exception line of a traceback in the child's log (or its last line)."""
    lines = [ln.strip() for ln in _tail(path) if ln.strip()]
    for ln in reversed(lines):
        if ln.split(":")[0].endswith(("Error", "Exception", "Exit", "Interrupt", "BdbQuit")):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def _last_epoch(path: Path) -> str:
    for ln in reversed(_tail(path, 400)):
        if ln.startswith("APICAL-EPOCH"):
            return "last epoch " + ln.split()[1]
    return "no epoch finished"


# ----------------------------------------------------------------------------------------------------
# child process


def _train(args: argparse.Namespace) -> dict[str, Any]:
    """Train through perforatedai's API with fit()'s loop; runs in the child, cwd = a temporary dir."""
    from perforatedai import globals_perforatedai as GPA
    from perforatedai import utils_perforatedai as UPA

    from apical.bench.definitions import SUITES, build_model, load_split
    from apical.training import evaluate, loss_fn
    from apical.trials.modes import mode_config

    suite = SUITES[args.suite]
    spec = next(s for s in suite.models if s.name == args.model)
    split = load_split(suite, args.seed, args.quick)
    cfg = mode_config("perforatedai", args.patience, args.seed)
    torch.manual_seed(args.seed)
    model = build_model(spec, split, args.width)

    pc = GPA.pc
    pc.set_testing_dendrite_capacity(False)
    pc.set_configuration_confirmed(True)
    pc.set_verbose(False)
    pc.set_silent(True)
    pc.set_test_saves(False)
    if hasattr(pc, "set_dashboard_events_enabled"):
        pc.set_dashboard_events_enabled(False)
    pc.set_n_epochs_to_switch(cfg.patience)
    pc.set_max_dendrites(cfg.max_dendrites)
    pc.set_max_dendrite_tries(cfg.max_tries)
    thr = cfg.improvement_threshold
    pc.set_improvement_threshold(list(thr) if not isinstance(thr, (int, float)) else [float(thr)])
    pc.set_improvement_threshold_raw(cfg.improvement_threshold_raw)
    variant = "perforated backpropagation" if pc.get_perforated_backpropagation() else "gradient descent (open)"

    model = UPA.perforate_model(model, save_name="pai", making_graphs=True, maximizing_score=True)
    GPA.pai_tracker.set_optimizer(torch.optim.Adam)

    def make_opt(net: torch.nn.Module) -> torch.optim.Optimizer:
        opt, _ = GPA.pai_tracker.setup_optimizer(net, {"params": net.parameters(), "lr": args.lr}, {})
        return opt

    opt = make_opt(model)
    criterion = loss_fn(split.task)
    gen = torch.Generator().manual_seed(args.seed)
    n = len(split.x_train)
    history: list[dict[str, Any]] = []
    loop_seconds = 0.0
    complete = False
    start = time.perf_counter()
    epochs = 0
    for epoch in range(1, args.max_epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=gen)
        total, batches = 0.0, 0
        for i in range(0, n, args.batch_size):
            idx = order[i : i + args.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = criterion(model(split.x_train[idx]), split.y_train[idx])
            loss.backward()
            opt.step()
            total, batches = total + float(loss), batches + 1
        score = evaluate(model, split.x_val, split.y_val, split.task)
        loop_seconds += time.perf_counter() - t0
        before = GPA.pai_tracker.member_vars["num_dendrites_added"]
        GPA.pai_tracker.add_extra_score(total / max(batches, 1), "train loss")
        model, restructured, complete = GPA.pai_tracker.add_validation_score(score, model)
        after = GPA.pai_tracker.member_vars["num_dendrites_added"]
        event = []
        if restructured:
            event.append("restructured")
        if after > before:
            event.append("added")
        elif after < before:
            event.append("reverted")
        if complete:
            event.append("done")
        history.append({"epoch": epoch, "phase": str(GPA.pai_tracker.member_vars.get("mode")), "score": score,
                        "dendrites": int(after), "parameters": int(UPA.count_params(model)), "event": ",".join(event)})
        print(f"APICAL-EPOCH {epoch} {score:.6f} {','.join(event)}", flush=True)
        epochs = epoch
        if complete:
            break
        if restructured:
            opt = make_opt(model)
    seconds = time.perf_counter() - start
    if not complete:  # epoch cap: take the best network of the current architecture, as fit() does
        try:
            model = UPA.load_system(model, "pai", "best_model", True)
        except Exception as err:  # keep the current weights, say so
            print(f"APICAL-NOTE could not reload best_model: {err}", flush=True)
    return {
        "mode": "perforatedai",
        "seed": args.seed,
        "dendrites": int(GPA.pai_tracker.member_vars["num_dendrites_added"]),
        "parameters": int(UPA.count_params(model)),
        "val_score": evaluate(model, split.x_val, split.y_val, split.task),
        "test_score": evaluate(model, split.x_test, split.y_test, split.task),
        "epochs": epochs,
        "seconds": seconds,
        "loop_seconds": loop_seconds,
        "completed": bool(complete),
        "variant": variant,
        "version": installed_version(),
        "history": history,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Child entry point: train one run and write its result JSON."""
    p = argparse.ArgumentParser(prog="python -m apical.bench.reference")
    p.add_argument("--suite", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--width", type=float, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--patience", type=int, required=True)
    p.add_argument("--max-epochs", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = _train(args)
    args.result.write_text(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
