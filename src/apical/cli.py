"""The ``apical`` command line: demo, bench, plot, inspect.

Exit codes: 0 success, 1 failure (one line on stderr; ``--debug`` for the traceback),
2 usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    from apical import DendriteConfig, datasets, models
    from apical.training import fit

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes:
        raise CliError("--modes is empty; give e.g. none,pb")
    # validate every mode's config before any training
    # "none-long": early stopping with 4x the patience, so that a pb gain is not just longer training
    configs = {
        mode: DendriteConfig(mode="none" if mode == "none-long" else mode, seed=args.seed,
                             patience=args.patience * (4 if mode == "none-long" else 1))
        for mode in modes
    }
    recorded = "pb" if "pb" in modes else modes[-1]
    torch.set_num_threads(args.threads)
    split = datasets.load("digits", seed=args.seed)
    n_in = split.input_shape()[0]
    print(f"apical demo: scikit-learn digits ({split.sizes()[0]} train / {split.sizes()[1]} val / "
          f"{split.sizes()[2]} test), MLP {n_in}-{args.width}-{split.n_outputs}, Adam lr {args.lr}, "
          f"seed {args.seed}, {args.threads} thread(s)", flush=True)
    rows = []
    for mode, cfg in configs.items():
        on_epoch, close = _progress_callback(mode) if args.progress else (None, lambda: None)
        try:
            result = fit(lambda: models.MLP(n_in, [args.width], split.n_outputs), split, cfg,
                         lr=args.lr, seed=args.seed, batch_size=64, on_epoch=on_epoch,
                         run_dir=args.run_dir if mode == recorded else None)
        finally:
            close()
        rows.append(dataclasses.replace(result, mode=mode))
    header = ("mode", "dendrites", "parameters", "val acc", "test acc", "epochs", "seconds")
    table = [header] + [
        (r.mode, str(r.dendrites), str(r.parameters), f"{r.val_score:.4f}", f"{r.test_score:.4f}",
         str(r.epochs), f"{r.seconds:.1f}")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if args.run_dir is not None:
        print(f"run record of the {recorded} run: {args.run_dir} (apical plot {args.run_dir})")


def _bench(args: argparse.Namespace) -> None:
    from apical.bench import run_suite

    run_suite(args.suite, args.rest)


def _plot(args: argparse.Namespace) -> None:
    try:
        from apical.record import plot_run
    except ImportError as err:
        raise CliError(f"plotting is unavailable: {err}") from None
    for path in plot_run(args.run_dir):
        print(path)


def _inspect(args: argparse.Namespace) -> None:
    from apical.record import inspect_text

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
                                     "networks. Commands: demo, bench, plot, inspect.",
                                     epilog="Exit codes: 0 success, 1 failure, 2 usage error.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("-v", "--verbose", action="store_true", help="log one line per phase change (INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", parents=[common], help="train a small model with and without dendrites, "
                          "print a table", description="Train an MLP on scikit-learn digits once per mode "
                          "and print a table of dendrites, parameters, accuracy and time.")
    demo.add_argument("--modes", default="none,none-long,pb",
                      help="comma-separated modes: none, none-long (4x patience), gd, pb (default: none,none-long,pb)")
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
