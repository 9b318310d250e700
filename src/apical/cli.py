"""The ``apical`` command line: demo, bench, plot, inspect.

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


def _demo(args: argparse.Namespace) -> None:
    from apical import DendriteConfig, datasets, models
    from apical.training import fit

    torch.set_num_threads(args.threads)
    split = datasets.load("digits", seed=args.seed)
    n_in = split.input_shape()[0]
    print(f"apical demo: scikit-learn digits ({split.sizes()[0]} train / {split.sizes()[1]} val / "
          f"{split.sizes()[2]} test), MLP {n_in}-{args.width}-{split.n_outputs}, Adam lr {args.lr}, "
          f"seed {args.seed}, {args.threads} thread(s)")
    rows = []
    for mode in args.modes.split(","):
        cfg = DendriteConfig(mode=mode, seed=args.seed, patience=args.patience)
        result = fit(lambda: models.MLP(n_in, [args.width], split.n_outputs), split, cfg,
                     lr=args.lr, seed=args.seed, batch_size=64)
        rows.append(result)
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
    from apical.checkpoint import inspect_text

    print(inspect_text(args.checkpoint))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apical", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", help="train a small model with and without dendrites, print a table")
    demo.add_argument("--modes", default="none,pb", help="comma-separated modes (none, gd, pb)")
    demo.add_argument("--width", type=int, default=4, help="hidden width of the MLP")
    demo.add_argument("--patience", type=int, default=10)
    demo.add_argument("--lr", type=float, default=3e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="run a benchmark suite (apical bench SUITE --help)")
    bench.add_argument("suite", help="suite name: digits, mnist1d, mnist5k, tox21, speed, grapes")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the suite's own options")
    bench.set_defaults(func=_bench)

    plot = sub.add_parser("plot", help="write PNG plots of a run directory")
    plot.add_argument("run_dir")
    plot.set_defaults(func=_plot)

    insp = sub.add_parser("inspect", help="print a checkpoint's layers, dendrites and history")
    insp.add_argument("checkpoint")
    insp.set_defaults(func=_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s")
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
        print(f"apical {args.command}: error: {err}", file=sys.stderr)
        return 1
    logging.getLogger("apical").debug("done in %.1f s", time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
