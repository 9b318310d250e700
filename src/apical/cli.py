"""The ``apical`` command line: demo, trial, bench, plot, inspect.

Exit codes: 0 success, 1 failure (one line on stderr; ``--debug`` for the traceback),
2 usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

import torch


class CliError(Exception):
    """A failure reported to the user as one line (exit code 1)."""


def _progress_callback(mode: str):
    """A tqdm bar over epochs (on stderr) and its closer, or (None, no-op) without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None, lambda: None
    bar = tqdm(desc=f"{mode:>4}", unit="epoch", leave=False, file=sys.stderr, dynamic_ncols=True,
               disable=None)  # off when stderr is not a terminal

    def on_epoch(model, ctl) -> None:
        bar.update(1)
        bar.set_postfix(phase=ctl.phase, dendrites=ctl.dendrites, refresh=False)

    return on_epoch, bar.close


def _demo(args: argparse.Namespace) -> None:
    from apical import tasks
    from apical.trials import mode_config, trial
    from apical.trials.modes import MATCHED, with_matched

    modes = with_matched([m.strip() for m in args.modes.split(",") if m.strip()])
    if not modes:
        raise CliError("--modes is empty; give e.g. none,pb")
    for mode in modes:  # every mode's config is checked before any training
        mode_config(mode, args.patience, args.seed)
    recorded = "pb" if "pb" in modes else modes[-1]
    torch.set_num_threads(args.threads)
    task = tasks.digits_demo(hidden=args.width, lr=args.lr, patience=args.patience)
    train_set, val_set, test_set = task.data(args.seed)
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"apical demo: scikit-learn digits ({len(train_set)} train / {len(val_set)} val / {len(test_set)} test), "
          f"MLP 64-{args.width}-10, Adam lr {args.lr}, seed{'s' if len(seeds) > 1 else ''} "
          f"{', '.join(map(str, seeds))}, {args.threads} thread(s)", flush=True)
    bars: list = []

    def options(mode: str, seed: int, width: float) -> dict:
        for close in bars:
            close()
        bars.clear()
        opts: dict = {}
        if args.progress:
            on_epoch, close = _progress_callback(mode)
            bars.append(close)
            opts["on_epoch"] = on_epoch
        if args.run_dir is not None and mode == recorded and seed == seeds[0]:
            opts["run_dir"] = args.run_dir
        return opts

    try:
        result = trial(task, modes=modes, seeds=seeds, widths=(1.0,), out=args.out, run_options=options,
                       command="apical demo", progress=False)
    finally:
        for close in bars:
            close()
    header = ("mode", "hidden", "dendrites", "parameters", "val acc", "test acc", "epochs", "seconds")
    table = [header]
    for mode in result.modes:
        s = result.summary(mode)
        if s is not None:
            table.append((mode, f"{models_hidden(args.width, s['width'][0])}", f"{s['dendrites'][0]:g}",
                          f"{s['parameters'][0]:,.0f}", f"{s['val'][0]:.4f}", f"{s['test'][0]:.4f}",
                          f"{s['epochs'][0]:.0f}", f"{s['seconds'][0]:.1f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if len(seeds) > 1:
        print(f"(means over {len(seeds)} seeds)")
    for mode in ("pb", "gd"):
        if mode in result.modes and MATCHED in result.modes:
            d, m = result.summary(mode), result.summary(MATCHED)
            verdict = "a plain network of the same size does as well or better" if m["test"][0] >= d["test"][0] \
                else "dendrites beat a plain network of the same size"
            print(f"{mode} vs none-matched (a plain network with about {mode}'s parameters): test "
                  f"{d['test'][0]:.4f} against {m['test'][0]:.4f}: {verdict}"
                  f"{'' if len(seeds) > 1 else ' on this one seed; apical trial gives paired CIs over seeds'}")
    if args.run_dir is not None:
        print(f"run record of the {recorded} run: {args.run_dir} (apical plot {args.run_dir})")
    if args.out is not None:
        print(f"report: {result.files.get('report')}")


def models_hidden(hidden: int, width: float) -> int:
    """Hidden units of the demo's MLP at a width."""
    from apical.models import scaled

    return scaled(hidden, width)


def _bench(args: argparse.Namespace) -> None:
    from apical.bench import run_suite

    run_suite(args.suite, args.rest)


def _parse_value(text: str):
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _trial(args: argparse.Namespace) -> None:
    import shlex
    from pathlib import Path

    from apical import tasks
    from apical.trials import load_task_file, trial

    source = args.task_file
    if Path(source).suffix == ".py" or Path(source).exists():
        task = load_task_file(source, args.task)
    elif source in tasks.TASKS:
        task = tasks.get(source)
    else:
        raise CliError(f"{source!r} is neither a task file nor a built-in task ({', '.join(tasks.TASKS)})")
    changes = {}
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--set {item!r}: expected KEY=VALUE (a Task or DendriteConfig field)")
        changes[key.strip()] = _parse_value(text)
    if args.device is not None:
        changes["device"] = args.device
    if changes:
        task = task.with_settings(**changes)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    try:
        widths = [float(w) for w in args.widths.split(",") if w.strip()]
    except ValueError:
        raise CliError(f"--widths {args.widths!r}: expected comma-separated numbers, e.g. 0.5,1") from None
    torch.set_num_threads(args.threads)
    command = "apical trial " + " ".join(shlex.quote(a) for a in args.argv)
    result = trial(task, modes=modes, seeds=args.seeds, widths=widths, out=args.out, progress=args.progress,
                   log=lambda msg: print(msg, flush=True), command=command)
    for width in result.widths:
        for c in result.comparisons(width):
            print(c.line())
    print(f"report: {result.files.get('report')}")


def _plot(args: argparse.Namespace) -> None:
    try:
        from apical.record import plot_run
    except ImportError as err:
        raise CliError(f"plotting is unavailable: {err}") from None
    for path in plot_run(args.run_dir):
        print(path)


def _inspect(args: argparse.Namespace) -> None:
    from apical.inspection import inspect_text

    print(inspect_text(args.checkpoint))


def build_parser() -> argparse.ArgumentParser:
    # --debug / --verbose are accepted before or after the command: the sub-parsers' copies
    # default to SUPPRESS so that they do not overwrite a value given before the command
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and debug logging")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log one line per phase change (INFO)")
    parser = argparse.ArgumentParser(prog="apical", description="apical: artificial dendrites for PyTorch "
                                     "networks. Commands: demo, trial, bench, plot, inspect.",
                                     epilog="Exit codes: 0 success, 1 failure, 2 usage error.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("-v", "--verbose", action="store_true", help="log one line per phase change (INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", parents=[common], help="train a small model with and without dendrites, "
                          "print a table", description="A short trial: an MLP on scikit-learn digits in each mode, "
                          "and a plain network with about pb's parameters (none-matched); prints a table of "
                          "dendrites, parameters, accuracy and time.")
    demo.add_argument("--modes", default="none,none-long,pb",
                      help="comma-separated modes: none, none-long (4x patience), none-matched (a plain network "
                      "with about pb's parameters; added whenever gd or pb runs), gd, pb (default: %(default)s)")
    demo.add_argument("--seeds", type=int, default=1, help="number of seeds, from --seed on (default: 1)")
    demo.add_argument("--out", default=None, help="also write the trial's files (trial.md, trial.jsonl, "
                      "plots) here")
    demo.add_argument("--width", type=int, default=4, help="hidden width of the MLP (default: 4)")
    demo.add_argument("--patience", type=int, default=10, help="epochs without improvement before a "
                      "plateau (default: 10)")
    demo.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: 3e-3)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the split and the runs (default: 0)")
    demo.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    demo.add_argument("--run-dir", metavar="DIR", help="write the pb run's history.csv and summary.json "
                      "here (without pb in --modes: the last mode's run); plot with apical plot DIR")
    demo.add_argument("--progress", action="store_true", help="show a progress bar per run (needs tqdm: "
                      "pip install apical[progress]; silently off without it)")
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="run a benchmark suite (apical bench SUITE --help)",
                           description="Run a benchmark suite; options after SUITE go to the suite.")
    bench.add_argument("suite", help="suite name: digits, mnist1d, mnist5k, tox21, speed, grapes")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the suite's own options")
    bench.set_defaults(func=_bench)

    tri = sub.add_parser("trial", parents=[common], help="do dendrites help my model? every mode on the same "
                         "seeds, paired CIs, a parameter-matched plain network",
                         description="Train a task (a Python file defining task = apical.Task(...), or a "
                         "built-in task name) in every mode on the same seeds and compare them: a Markdown "
                         "table with paired 95%% CIs, one JSON line per run, plots. Rerun the same command "
                         "to resume.")
    tri.add_argument("task_file", metavar="TASK", help="path/to/task.py, or a built-in task: digits, digits-demo, "
                     "mnist1d-mlp, mnist1d-cnn, mnist5k, tox21")
    tri.add_argument("--task", default="task", help="name of the Task in the file (default: task)")
    tri.add_argument("--modes", default="none,none-long,gd,pb", help="comma-separated modes from none, "
                     "none-long, none-matched, gd, pb; none-matched is added with gd or pb (default: %(default)s)")
    tri.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default: 5)")
    tri.add_argument("--widths", default="1", help="comma-separated widths passed to model(width) (default: 1)")
    tri.add_argument("--out", default="trial-out", help="output folder (default: %(default)s)")
    tri.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    tri.add_argument("--device", default=None, help="torch device of the runs (default: the task's)")
    tri.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="change a Task field (lr, max_epochs...) or a DendriteConfig field for gd and pb "
                     "(max_dendrites...); VALUE is read as JSON, else as a string; repeatable")
    tri.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bar (shown on a terminal when tqdm is installed)")
    tri.set_defaults(func=_trial)

    plot = sub.add_parser("plot", parents=[common], help="write PNG plots of a run directory",
                          description="Write RUN_DIR/scores.png and RUN_DIR/architectures.png from the "
                          "run's history.csv and summary.json, and print their paths (needs matplotlib: "
                          "pip install apical[plot]).")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a directory given as Controller(run_dir=...)")
    plot.set_defaults(func=_plot)

    insp = sub.add_parser("inspect", parents=[common], help="print a checkpoint's layers, dendrites and history",
                          description="Describe an apical checkpoint (apical.save) from the file alone: "
                          "layers, parameters, configuration and the controller's phase changes.")
    insp.add_argument("checkpoint", metavar="CKPT", help="a .safetensors file written by apical.save")
    insp.set_defaults(func=_inspect)
    return parser


def _setup_logging(level: int) -> tuple[logging.Handler, int]:
    """Show the ``apical`` logger's records at ``level`` on stderr; returns what to undo."""
    logger = logging.getLogger("apical")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("apical: %(message)s"))
    handler.setLevel(level)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler, old_level


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (argparse exits with 2 on a usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[2:] if argv is None else argv[1:])
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    handler, old_level = _setup_logging(level)
    start = time.perf_counter()
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("apical: interrupted", file=sys.stderr)
        return 1
    except SystemExit:
        raise
    except Exception as err:  # one line for the user, the traceback with --debug
        if args.debug:
            raise
        print(f"apical {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    finally:
        logger = logging.getLogger("apical")
        logger.debug("done in %.1f s", time.perf_counter() - start)
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
