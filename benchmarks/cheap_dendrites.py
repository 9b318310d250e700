"""Cheaper dendrites, measured: low-rank sets (``dendrite_rank``) against full sets and against widening.

    python benchmarks/cheap_dendrites.py --suites digits,mnist1d-mlp --seeds 5
    python benchmarks/cheap_dendrites.py --report-only          # rebuild the table from the JSON lines

For each suite (a built-in task of :mod:`apical.tasks`) and seed, on the task's own split and
settings, it trains:

- ``none@1`` and ``none-long@1``: plain training at width 1 (patience P and 4P), the score to reach;
- at the suite's narrow width: ``pb`` (full sets), ``pb-r1``, ``pb-r2``, ``pb-r4``, ``pb-r8`` (low-rank
  sets) and ``pb-loss`` (full sets, every controller decision on the validation loss instead of the
  metric);
- ``matched:V`` for each pb variant V: plain training (patience 4P) at the width whose parameter count
  is closest to that seed's V run (the same parameters spent on width instead of dendrites).

One JSON line per finished run goes to ``benchmarks/results/cheap-dendrites.jsonl`` at once; a rerun
skips the runs already there, so the table can be finished over several sessions. The report
(``cheap-dendrites.md``) pairs runs over seeds (mean difference, 95% t interval) and asks the
compression question: does a narrow network with pb reach the width-1 plain mean score with at
most half its parameters, and does the plain network at the same parameter count (``matched``)?
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from apical import stats as st
from apical import tasks
from apical.trials.run import check_splits, train
from apical.trials.runner import matched_width

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RECORDS = RESULTS / "cheap-dendrites.jsonl"
REPORT = RESULTS / "cheap-dendrites.md"

#: the narrow width each suite compares at (its bench suite's; tox21 and mnist5k at 1/8)
SUITES = {"digits": 0.25, "mnist1d-mlp": 0.25, "mnist1d-cnn": 0.25, "tox21": 0.125, "digits-gru": 0.25,
          "mnist5k": 0.125, "tox21-gnn": 0.25}
#: suites whose width-1 references (``none``, ``none-long``) another benchmark already ran with the
#: same task, seed and settings: those records are copied (marked ``reused_from``) instead of rerun
REFERENCE_RECORDS = {"tox21-gnn": RESULTS / "tox21-gnn" / "trial.jsonl"}
#: pb variants: DendriteConfig overrides and the controller's selection signal
VARIANTS: dict[str, tuple[dict, str]] = {
    "pb": ({}, "metric"),
    "pb-r1": ({"dendrite_rank": 1}, "metric"),
    "pb-r2": ({"dendrite_rank": 2}, "metric"),
    "pb-r4": ({"dendrite_rank": 4}, "metric"),
    "pb-r8": ({"dendrite_rank": 8}, "metric"),
    "pb-loss": ({}, "loss"),
}
#: suites that plan fewer pb variants than all of them, for cost: a tox21-gnn pb run takes about 15-25
#: minutes of one core at width 1/4, so full sets, the cheapest rank and a middle one (2 x 3 runs a seed)
PLANNED_VARIANTS: dict[str, tuple[str, ...]] = {"tox21-gnn": ("pb", "pb-r1", "pb-r4")}
REFERENCES = ("none@1", "none-long@1")
#: seeds per suite the sweep plans (``--seeds 5``)
PLANNED_SEEDS = 5


def _read() -> list[dict]:
    if not RECORDS.exists():
        return []
    out = []
    for line in RECORDS.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut off by a kill: that run is redone
            continue
    return out


def _append(record: dict) -> None:
    with RECORDS.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _reused_reference(name: str, mode: str, seed: int, settings: dict) -> dict | None:
    """The width-1 ``mode`` run of ``seed`` from the suite's other benchmark, if it ran it with the
    same settings (so it is the very run this sweep would make)."""
    path = REFERENCE_RECORDS.get(name)
    if path is None or not path.exists():
        return None
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (r.get("task"), r.get("mode"), r.get("seed"), r.get("width")) == (name, mode, seed, 1.0) and \
                r.get("settings") == settings:
            return {k: r[k] for k in ("test", "val", "parameters", "dendrites", "epochs", "seconds")}
    return None


def run_suite(name: str, seeds: list[int], variants: list[str], log=print) -> None:
    narrow = SUITES[name]
    done = {(r["suite"], r["variant"], r["seed"]) for r in _read()}
    base = tasks.get(name)
    for seed in seeds:
        splits = None
        plan: list[tuple[str, str, float, dict, str]] = [
            ("none@1", "none", 1.0, {}, "metric"), ("none-long@1", "none-long", 1.0, {}, "metric")]
        plan += [(v, "pb", narrow, *VARIANTS[v]) for v in variants]
        plan += [(f"matched:{v}", "none-matched", narrow, {}, "metric") for v in variants]
        for variant, mode, width, overrides, select_on in plan:
            if (name, variant, seed) in done:
                continue
            if variant in REFERENCES:
                reused = _reused_reference(name, mode, seed, base.settings())
                if reused is not None:
                    source = str(REFERENCE_RECORDS[name].relative_to(ROOT))
                    _append({"suite": name, "variant": variant, "seed": seed, "mode": mode, "width": 1.0,
                             "rank": None, "select_on": "metric", "matched_to": None, **reused,
                             "settings": base.settings(), "reused_from": source})
                    log(f"{name} {variant} seed {seed}: test {reused['test']:.4f}, reused from {source}")
                    continue
            if splits is None:
                splits = check_splits(base, seed, base.data(seed))
            matched_to = None
            if mode == "none-matched":
                target = next((r for r in _read() if (r["suite"], r["variant"], r["seed"]) ==
                               (name, variant.split(":", 1)[1], seed)), None)
                if target is None:
                    continue
                matched_to = target["parameters"]
                width = matched_width(base, narrow, matched_to)
            task = base.with_settings(**overrides) if overrides else base
            start = time.perf_counter()
            out = train(task, mode, seed, width, splits, select_on=select_on)
            out.pop("history")
            record = {"suite": name, "variant": variant, "seed": seed, "mode": mode, "width": width,
                      "rank": overrides.get("dendrite_rank"), "select_on": select_on, "matched_to": matched_to,
                      **out, "settings": task.settings()}
            _append(record)
            log(f"{name} {variant} seed {seed} width {width:.4g}: test {out['test']:.4f}, "
                f"{out['parameters']:,} parameters, {out['dendrites']} dendrites, {out['epochs']} epochs, "
                f"{time.perf_counter() - start:.1f} s")


# ------------------------------------------------------------------------------------- report
def _by(records: list[dict], suite: str, variant: str) -> dict[int, dict]:
    return {r["seed"]: r for r in records if r["suite"] == suite and r["variant"] == variant}


def _fmt_ci(c: tuple[float, float, float] | None, n: int) -> str:
    if c is None or n < 2:
        return f"n/a ({n} seed{'s' if n != 1 else ''})"
    return f"{c[0]:+.4f} [{c[1]:+.4f}, {c[2]:+.4f}]"


def _paired(a: dict[int, dict], b: dict[int, dict]) -> tuple[tuple[float, float, float] | None, int, int]:
    seeds = sorted(set(a) & set(b))
    xa, xb = [a[s]["test"] for s in seeds], [b[s]["test"] for s in seeds]
    better = sum(x > y for x, y in zip(xa, xb, strict=True))
    return (st.paired_ci(xa, xb) if len(seeds) >= 2 else None), len(seeds), better


def _verdict(c: tuple[float, float, float] | None) -> str:
    if c is None:
        return "too few seeds"
    if c[1] > 0:
        return "better"
    if c[2] < 0:
        return "worse"
    return "no significant difference"


def report(argv: list[str]) -> str:
    records = _read()
    suites = [s for s in SUITES if any(r["suite"] == s for r in records)]
    lines = ["# Cheaper dendrites: low-rank sets against full sets and against widening\n",
             f"- command: `python benchmarks/cheap_dendrites.py {' '.join(argv)}` (the runs: "
             "`python benchmarks/cheap_dendrites.py --suites SUITE[,SUITE...] --seeds 5`, two processes at once; "
             "`--report-only` rebuilds this table from the records)",
             f"- machine: {platform.machine()}, torch {torch.__version__}, Python {platform.python_version()}, "
             "1 torch thread per process, at most 2 processes",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             "- records: `benchmarks/results/cheap-dendrites.jsonl` (one line per finished run)\n",
             "Each suite is its built-in task (`apical.tasks`), with its own split, optimiser and patience P. "
             "`pb` has full dendrite sets (a copy of the layer's weights each); `pb-rR` low-rank sets of rank R "
             "(`DendriteConfig(dendrite_rank=R)`, about R x (fan-in + neurons) parameters per set); `pb-loss` full "
             "sets with every controller decision (best network, switching, keep or revert) on the validation "
             "loss instead of the metric. `matched:V` is plain training (patience 4P) at the width whose "
             "parameter count is closest to the same seed's V run. Test score of the best validation network; "
             "differences are paired over seeds with a 95% t interval. tox21-gnn's width-1 references are the "
             "same runs as issue 14's trial (`tox21-gnn/trial.jsonl`, same task, seed and settings), copied "
             "with `reused_from` in their records rather than trained twice.\n"]
    compass: dict[str, list[str]] = {}
    for suite in suites:
        narrow = SUITES[suite]
        variants = [v for v in VARIANTS if _by(records, suite, v)]
        lines.append(f"## {suite} (pb at width {narrow:g})\n")
        seeds = sorted({r["seed"] for r in records if r["suite"] == suite})
        plan = PLANNED_VARIANTS.get(suite, tuple(VARIANTS))
        if plan != tuple(VARIANTS):
            lines.append(f"Planned for this suite, for cost: {', '.join(plan)} and their `matched:` runs.\n")
        planned = len(REFERENCES) + 2 * len(plan)
        missing = [v for v in (*REFERENCES, *plan, *(f"matched:{v}" for v in plan))
                   if not _by(records, suite, v)]
        names = (*REFERENCES, *plan, *(f"matched:{v}" for v in plan))
        complete = [s for s in seeds if all(s in _by(records, suite, v) for v in names)]
        if len(complete) < PLANNED_SEEDS or missing:
            lines.append(f"**Partial**: {len(seeds)} seed(s) started, {len(complete)} of {PLANNED_SEEDS} planned "
                         f"complete, {planned - len(missing)} of {planned} variants with a run"
                         f"{'; not run yet: ' + ', '.join(missing) if missing else ''}. "
                         "Rerun the command to continue it.\n")
        lines.append("| variant | runs | test | parameters | width | dendrites | epochs | seconds |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for v in (*REFERENCES, *variants, *(f"matched:{v}" for v in variants)):
            rows = list(_by(records, suite, v).values())
            if not rows:
                continue
            t = st.mean_std([r["test"] for r in rows])
            p = sum(r["parameters"] for r in rows) / len(rows)
            w = sum(r["width"] for r in rows) / len(rows)
            d = sum(r["dendrites"] for r in rows) / len(rows)
            e = sum(r["epochs"] for r in rows) / len(rows)
            s = sum(r["seconds"] for r in rows) / len(rows)
            lines.append(f"| {v} | {len(rows)} | {t[0]:.4f} ± {t[1]:.4f} | {p:,.0f} | {w:.3g} | {d:.1f} | {e:.0f} | "
                         f"{s:.1f} |")
        lines.append("")
        lines.append("| comparison | seeds | mean diff [95% CI] | seeds better | verdict |")
        lines.append("|---|---|---|---|---|")
        pairs = [(v, f"matched:{v}") for v in variants] + [(v, "pb") for v in variants if v != "pb"]
        for a, b in pairs:
            c, n, better = _paired(_by(records, suite, a), _by(records, suite, b))
            if n:
                lines.append(f"| {a} - {b} | {n} | {_fmt_ci(c, n)} | {better}/{n} | {_verdict(c)} |")
        lines.append("")
        # the compression question, on means
        ref = {k: list(_by(records, suite, k).values()) for k in REFERENCES}
        if all(ref.values()):
            ref_score = {k: sum(r["test"] for r in rows) / len(rows) for k, rows in ref.items()}
            ref_params = ref["none@1"][0]["parameters"]
            lines.append(f"Compression question: width-1 plain scores {ref_score['none@1']:.4f} (none) and "
                         f"{ref_score['none-long@1']:.4f} (none-long) with {ref_params:,} parameters; "
                         f"half is {ref_params / 2:,.0f}.\n")
            lines.append("| variant | parameters | <= half | test | reaches none@1 | reaches none-long@1 |")
            lines.append("|---|---|---|---|---|---|")
            for v in (*variants, *(f"matched:{v}" for v in variants)):
                rows = list(_by(records, suite, v).values())
                if not rows:
                    continue
                p = sum(r["parameters"] for r in rows) / len(rows)
                t = sum(r["test"] for r in rows) / len(rows)
                half = p <= ref_params / 2
                a, b = t >= ref_score["none@1"], t >= ref_score["none-long@1"]
                lines.append(f"| {v} | {p:,.0f} | {'yes' if half else 'no'} | {t:.4f} | {'yes' if a else 'no'} | "
                             f"{'yes' if b else 'no'} |")
                if half and a:
                    compass.setdefault(suite, []).append(v)
            lines.append("")
    lines.append("## The compression question, over suites\n")
    if not suites:
        lines.append("No runs yet.\n")
    for suite in suites:
        found = compass.get(suite, [])
        pb = [v for v in found if not v.startswith("matched:")]
        plain = [v for v in found if v.startswith("matched:")]
        ran_plain = any(_by(records, suite, f"matched:{v}") for v in VARIANTS)
        lines.append(f"- {suite}: narrow + pb reaching width-1 `none` with <= half its parameters: "
                     f"{', '.join(pb) or 'none'}; plain networks of those sizes that do too: "
                     f"{(', '.join(plain) or 'none') if ran_plain else 'not run yet'}")
    lines.append("")
    REPORT.write_text("\n".join(lines))
    return str(REPORT)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", default=",".join(SUITES))
    parser.add_argument("--seeds", type=int, default=5, help="run seeds first-seed .. seeds-1")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="skip the seeds below this one (to split a sweep over two processes)")
    parser.add_argument("--variants", default=None,
                        help="pb variants to run (default: the suite's planned ones, all but for tox21-gnn)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if not args.report_only:
        given = [v.strip() for v in args.variants.split(",")] if args.variants else []
        bad = [v for v in given if v not in VARIANTS] + [s for s in args.suites.split(",") if s not in SUITES]
        if bad:
            raise SystemExit(f"unknown suite(s) or variant(s): {bad}")
        for suite in args.suites.split(","):
            variants = given or list(PLANNED_VARIANTS.get(suite, VARIANTS))
            run_suite(suite, list(range(args.first_seed, args.seeds)), variants, log=lambda m: print(m, flush=True))
            report(argv)
    print(report(argv))


if __name__ == "__main__":
    main()
