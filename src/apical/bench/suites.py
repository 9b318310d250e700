"""Benchmark suites (issue 3): ``apical bench SUITE [options]`` for digits, mnist1d, mnist5k, tox21.

For every model of a suite, each mode (``none``, ``none-long``, ``gd``, ``pb``, optionally
``perforatedai``) trains on ``--seeds`` seeds at the suite's default width. The report gives mean and
std of the test score, parameters, epochs and seconds per mode, and a paired comparison (95% CI over
seeds) of ``pb``, ``gd`` (and ``perforatedai``) against the better of the two plain baselines.
A compression sweep (``--sweep``) trains ``none`` at every width of ``--widths`` and ``pb`` at the
narrow ones, and says whether a narrow network with dendrites matches the full-width one with at most
half its parameters.

Every finished run is appended to ``SUITE.jsonl`` at once; ``--resume`` skips the runs already there.
The end of a run writes ``SUITE.md``, ``SUITE.json``, ``SUITE.png`` and ``SUITE-compression.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from apical import tasks
from apical.bench.common import DEFAULT_OUT, header, markdown_table, mean_std, paired_ci, write_json
from apical.bench.definitions import SUITES, ModelSpec, Suite, build_model, describe, load_split
from apical.dendrites import DendriteConfig
from apical.trials import records
from apical.trials.modes import BASELINES, DEFAULT_MODES, MATCHED, mode_config, with_matched
from apical.trials.run import train
from apical.trials.runner import matched_width

KNOWN_MODES = (*DEFAULT_MODES, "none-matched", "perforatedai")
CHALLENGERS = (MATCHED, "pb", "gd", "perforatedai")
DEFAULT_WIDTHS = (0.125, 0.25, 0.5, 1.0)
SWEEP_MODES = ("none", "none-long", "pb")
"""Modes the compression sweep reports (none-long only where it was trained: default width, --sweep-long)."""
QUICK_EPOCHS = 60
QUICK_DENDRITE_EPOCHS = 6


# ----------------------------------------------------------------------------------------------------
# runs


@dataclass(frozen=True)
class Job:
    """One training run: model, mode, width, seed."""

    model: str
    mode: str
    width: float
    seed: int

    def key(self) -> tuple[str, str, float, int]:
        return (self.model, self.mode, self.width, self.seed)


@dataclass(frozen=True)
class Settings:
    """Everything a run's result depends on besides the job itself."""

    patience: int
    max_epochs: int
    lr: float
    batch_size: int
    quick: bool
    exclude: tuple[str, ...] = ()
    """Layers that gd/pb leave without dendrites (``--exclude``)."""
    overrides: tuple[tuple[str, Any], ...] = ()
    """DendriteConfig fields that gd/pb set (``--set KEY=VALUE``)."""

    def to_dict(self) -> dict[str, Any]:
        out = {**dataclasses.asdict(self), "exclude": list(self.exclude)}  # as JSON stores it
        out.pop("overrides")
        if self.overrides:  # absent when empty, so results made before --set existed still resume
            out["overrides"] = dict(self.overrides)
        return out


def run_settings(spec: ModelSpec, quick: bool, max_epochs: int | None, exclude: Sequence[str] = (),
                 overrides: Mapping[str, Any] | None = None) -> Settings:
    """The effective settings of ``spec``: ``--quick`` shrinks patience and epochs and raises the lr
    (``quick_lr``, default 5x) so that a smoke run reaches its plateaus and dendrite phases in a few epochs."""
    variant = (tuple(exclude), tuple(sorted((overrides or {}).items())))
    if not quick:
        return Settings(spec.patience, max_epochs or spec.max_epochs, spec.lr, spec.batch_size, quick, *variant)
    lr = spec.quick_lr if spec.quick_lr is not None else 5 * spec.lr
    return Settings(min(spec.patience, 2), max_epochs or QUICK_EPOCHS, lr, spec.batch_size, quick, *variant)


def plan(suite: Suite, modes: Sequence[str], seeds: Sequence[int], widths: Sequence[float], sweep: bool,
         pb_widths: Sequence[float] | None = None, sweep_long: bool = False) -> list[Job]:
    """Every run of a suite invocation, seed by seed (so partial results stay balanced), no duplicates.

    The sweep trains "none" at every width and "pb" at ``pb_widths`` (default: the model's
    ``pb_widths`` that are in ``widths``); widths >= 1 never get a pb sweep run. ``sweep_long`` adds
    "none-long" at the pb widths: the control for pb's longer training.
    """
    jobs: list[Job] = []
    seen: set[tuple[str, str, float, int]] = set()
    for seed in seeds:
        wanted = []
        for spec in suite.models:
            # none-matched needs pb's parameter counts first: main() runs it after the rest
            wanted += [Job(spec.name, mode, spec.default_width, seed) for mode in modes if mode != MATCHED]
            if sweep and spec.sweep:
                pbw = pb_widths if pb_widths is not None else [w for w in widths if w in spec.pb_widths]
                wanted += [Job(spec.name, "none", float(w), seed) for w in widths]
                wanted += [Job(spec.name, "pb", float(w), seed) for w in pbw if w < 1.0]
                if sweep_long:
                    wanted += [Job(spec.name, "none-long", float(w), seed) for w in pbw if w < 1.0]
        for job in wanted:
            if job.key() not in seen:
                seen.add(job.key())
                jobs.append(job)
    return jobs


def _record_base(suite: Suite, job: Job, settings: Settings, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "suite": suite.name,
        "model": job.model,
        "mode": job.mode,
        "width": job.width,
        "seed": job.seed,
        "settings": settings.to_dict(),
        "config": config,
    }


def suite_task(spec: ModelSpec, settings: Settings) -> tasks.Task:
    """The built-in task of ``spec`` with the run settings of a suite invocation."""
    overrides = dict(settings.overrides)
    if settings.exclude:
        overrides.setdefault("exclude", tuple(settings.exclude))
    if settings.quick:  # smoke run: short dendrite phases so that pb installs within the epoch cap
        default = DendriteConfig().max_dendrite_epochs
        overrides["max_dendrite_epochs"] = min(overrides.get("max_dendrite_epochs", default), QUICK_DENDRITE_EPOCHS)
    return tasks.get(spec.task, rows=1000 if settings.quick else None).with_settings(
        lr=settings.lr, batch_size=settings.batch_size, patience=settings.patience,
        max_epochs=settings.max_epochs, dendrites=overrides)


def run_job(suite: Suite, job: Job, settings: Settings, timeout: float,
            train_width: float | None = None) -> dict[str, Any]:
    """Train one job with the trial runner's loop; returns a JSON-friendly record (``result``: the
    scores, sizes and time of the run, and the controller's history). ``train_width``: the width
    actually trained when it is not ``job.width`` (none-matched, recorded as ``trained_width``)."""
    spec = next(s for s in suite.models if s.name == job.model)
    cfg = mode_config(job.mode, settings.patience, job.seed, settings.exclude, dict(settings.overrides))
    if job.mode == "perforatedai":
        from apical.bench import reference

        record = _record_base(suite, job, settings, {"reference": reference.describe_config(cfg)})
        outcome = reference.run_reference(
            suite.name, job.model, job.width, job.seed, lr=settings.lr, batch_size=settings.batch_size,
            patience=settings.patience,
            max_epochs=settings.max_epochs, quick=settings.quick, timeout=timeout,
        )
        record.update(outcome)
        return record
    if settings.quick:
        cfg = dataclasses.replace(cfg, max_dendrite_epochs=min(cfg.max_dendrite_epochs, QUICK_DENDRITE_EPOCHS))
    record = _record_base(suite, job, settings, cfg.to_dict())
    if train_width is not None:
        record["trained_width"] = train_width
    task = suite_task(spec, settings)
    try:
        out = train(task, job.mode, job.seed, job.width if train_width is None else train_width,
                    task.data(job.seed))
    except Exception as err:  # one broken run must not lose a long suite: record it, go on
        record["failed"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
        return record
    record["result"] = {"mode": job.mode, "seed": job.seed, "dendrites": out["dendrites"],
                        "parameters": out["parameters"], "val_score": out["val"], "test_score": out["test"],
                        "epochs": out["epochs"], "seconds": out["seconds"], "history": out["history"]}
    return record


def _key_of(record: Mapping[str, Any]) -> tuple[str, str, float, int]:
    return (record["model"], record["mode"], float(record["width"]), int(record["seed"]))


read_jsonl = records.read
"""Records of a results file; a torn or garbled line (an interrupted write) is skipped."""
append_jsonl = records.append
"""Append one record as one line and sync it to disk."""


# ----------------------------------------------------------------------------------------------------
# statistics


def scores_by_seed(records: Sequence[Mapping[str, Any]], model: str, mode: str, width: float) -> dict[int, float]:
    """Test score per seed of the successful runs of (model, mode, width)."""
    return {
        int(r["seed"]): float(r["result"]["test_score"])
        for r in records
        if r["model"] == model and r["mode"] == mode and float(r["width"]) == float(width) and "result" in r
    }


def summarise(records: Sequence[Mapping[str, Any]], model: str, mode: str, width: float) -> dict[str, Any] | None:
    """Mean/std of test score, parameters, dendrites, epochs, seconds over seeds (None if no run)."""
    runs = [r["result"] for r in records
            if r["model"] == model and r["mode"] == mode and float(r["width"]) == float(width) and "result" in r]
    if not runs:
        return None
    out: dict[str, Any] = {"n": len(runs)}
    for name in ("test_score", "val_score", "parameters", "dendrites", "epochs", "seconds"):
        out[name] = mean_std([float(r[name]) for r in runs])
    out["seconds_per_epoch"] = mean_std([float(r["seconds"]) / max(int(r["epochs"]), 1) for r in runs])
    out["loop_seconds_per_epoch"] = mean_std(
        [float(r.get("loop_seconds", r["seconds"])) / max(int(r["epochs"]), 1) for r in runs])
    return out


def compare(records: Sequence[Mapping[str, Any]], model: str, width: float,
            challengers: Sequence[str] = CHALLENGERS) -> list[dict[str, Any]]:
    """Paired comparison of each challenger with the better baseline (by mean test score).

    The baseline is whichever of none / none-long has the higher mean test score; pairs are the seeds
    both modes have. Each entry: mode, baseline, n, diff, lo, hi (95% CI of the mean difference), wins.
    """
    base_scores = {m: scores_by_seed(records, model, m, width) for m in BASELINES}
    present = {m: s for m, s in base_scores.items() if s}
    if not present:
        return []
    baseline = max(present, key=lambda m: sum(present[m].values()) / len(present[m]))
    return [c for c in (compare_pair(records, model, width, mode, baseline) for mode in challengers) if c]


def _signed(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.4f}"


def compare_pair(records: Sequence[Mapping[str, Any]], model: str, width: float, mode: str,
                 baseline: str) -> dict[str, Any] | None:
    """Paired comparison of ``mode`` with an explicit ``baseline`` mode (None without common seeds)."""
    mine, base = scores_by_seed(records, model, mode, width), scores_by_seed(records, model, baseline, width)
    seeds = sorted(set(mine) & set(base))
    if not seeds:
        return None
    a, b = [mine[s] for s in seeds], [base[s] for s in seeds]
    diff, lo, hi = paired_ci(a, b)
    return {"mode": mode, "baseline": baseline, "n": len(seeds), "diff": diff, "lo": lo, "hi": hi,
            "wins": sum(x > y for x, y in zip(a, b, strict=True)), "seeds": seeds}


def comparison_verdict(c: Mapping[str, Any]) -> str:
    """One line saying what a paired comparison shows."""
    ci = f"{_signed(c['diff'])} (95% CI {_signed(c['lo'])} to {_signed(c['hi'])}, {c['wins']}/{c['n']} seeds better)"
    if c["n"] < 2 or math.isnan(c["lo"]):
        verdict = "too few seeds for a confidence interval"
    elif c["lo"] > 0:
        verdict = f"{c['mode']} is better"
    elif c["hi"] < 0:
        verdict = f"{c['mode']} is worse"
    else:
        verdict = "no significant difference"
    return f"{c['mode']} vs {c['baseline']}: {ci}: {verdict}"


def compression_verdict(points: Mapping[tuple[str, float], tuple[float, float]], reference_width: float = 1.0,
                        mode: str = "pb") -> tuple[bool, str]:
    """Does ``mode`` at a narrower width match or beat ``none`` at ``reference_width`` with <= half its parameters?

    ``points`` maps (mode, width) to (mean test score, mean parameters). Returns (answer, one-line reason).
    """
    ref = points.get(("none", reference_width))
    if ref is None:
        return False, f"cannot tell: no 'none' run at width {reference_width:g}"
    ref_score, ref_params = ref
    narrow = sorted((w, s, p) for (m, w), (s, p) in points.items() if m == mode and w < reference_width)
    if not narrow:
        return False, f"cannot tell: no '{mode}' run narrower than width {reference_width:g}"
    hits = [(w, s, p) for w, s, p in narrow if s >= ref_score and p <= ref_params / 2]
    if hits:
        w, s, p = min(hits, key=lambda t: t[2])
        return True, (f"yes: {mode} at width {w:g} scores {s:.4f} >= {ref_score:.4f} (none at width "
                      f"{reference_width:g}) with {p:,.0f} parameters ({p / ref_params:.0%} of {ref_params:,.0f})")
    w, s, p = max(narrow, key=lambda t: t[1])
    why = "scores lower" if s < ref_score else "has more than half the parameters"
    return False, (f"no: the best narrow {mode} (width {w:g}: {s:.4f}, {p:,.0f} parameters) {why} than none at "
                   f"width {reference_width:g} ({ref_score:.4f}, {ref_params:,.0f} parameters)")


def compression_points(records: Sequence[Mapping[str, Any]],
                       model: str) -> dict[tuple[str, float], tuple[float, float]]:
    """(mode, width) -> (mean test score, mean parameters) for the sweep modes of ``model``."""
    points = {}
    widths = sorted({float(r["width"]) for r in records if r["model"] == model})
    for mode in SWEEP_MODES:
        for w in widths:
            s = summarise(records, model, mode, w)
            if s is not None:
                points[(mode, w)] = (s["test_score"][0], s["parameters"][0])
    return points


# ----------------------------------------------------------------------------------------------------
# report


def _pm(ms: tuple[float, float], digits: int = 4) -> str:
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def _int_pm(ms: tuple[float, float]) -> str:
    return f"{ms[0]:,.0f} ± {ms[1]:,.0f}"


def _score_name(suite: Suite) -> str:
    return "mean ROC-AUC" if suite.dataset == "tox21" else "accuracy"


def mode_table(records: Sequence[Mapping[str, Any]], model: str, width: float, modes: Sequence[str]) -> str:
    """Markdown table: one row per mode at ``width`` (and a 'failed' row per failed run)."""
    rows: list[list[str]] = []
    for mode in modes:
        s = summarise(records, model, mode, width)
        if s is not None:
            rows.append([mode, str(s["n"]), _pm(s["test_score"]), _pm(s["val_score"]), _int_pm(s["parameters"]),
                         f"{s['dendrites'][0]:.1f}", _int_pm(s["epochs"]),
                         f"{s['seconds'][0]:.1f} ± {s['seconds'][1]:.1f}",
                         f"{s['seconds_per_epoch'][0]:.3f}", f"{s['loop_seconds_per_epoch'][0]:.3f}"])
        for r in records:
            if r["model"] == model and r["mode"] == mode and float(r["width"]) == float(width) and "failed" in r:
                rows.append([f"{mode}: failed: {r['failed']} (seed {r['seed']})"] + [""] * 9)
    head = ["mode", "runs", "test", "val", "parameters", "dendrites", "epochs", "seconds", "s/epoch",
            "train+eval s/epoch"]
    return markdown_table(head, rows)


def comparison_table(comps: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of paired comparisons (4 decimals: the test recomputes them from the JSON)."""
    rows = [[c["mode"], c["baseline"], str(c["n"]), _signed(c["diff"]), _signed(c["lo"]), _signed(c["hi"]),
             f"{c['wins']}/{c['n']}"] for c in comps]
    return markdown_table(["mode", "vs", "seeds", "mean diff", "95% CI low", "95% CI high",
                           "seeds better"], rows)


def sweep_table(records: Sequence[Mapping[str, Any]], model: str) -> str:
    """Markdown table of the compression sweep: (mode, width) -> test score and parameters."""
    rows = []
    widths = sorted({float(r["width"]) for r in records if r["model"] == model})
    for mode in SWEEP_MODES:
        for w in widths:
            s = summarise(records, model, mode, w)
            if s is not None:
                rows.append([mode, f"{w:g}", str(s["n"]), _pm(s["test_score"]), _int_pm(s["parameters"]),
                             f"{s['dendrites'][0]:.1f}", f"{s['epochs'][0]:.0f}", f"{s['seconds'][0]:.1f}"])
    return markdown_table(["mode", "width", "runs", "test", "parameters", "dendrites", "epochs", "seconds"], rows)


def _reference_lines(records: Sequence[Mapping[str, Any]], model: str, width: float) -> list[str]:
    """What the perforatedai rows are: version, variant, where its time goes."""
    runs = [r for r in records if r["model"] == model and r["mode"] == "perforatedai"
            and float(r["width"]) == float(width)]
    ok = [r["result"] for r in runs if "result" in r]
    if not runs:
        return []
    if not ok:
        return [f"perforatedai: failed on every seed ({runs[0].get('failed')}).\n"]
    s = summarise(records, model, "perforatedai", width)
    assert s is not None
    return [f"perforatedai {ok[0].get('version')} ({ok[0].get('variant')}), settings mirrored from gd; "
            f"{s['seconds_per_epoch'][0]:.3f} s/epoch in all, of which {s['loop_seconds_per_epoch'][0]:.3f} s in "
            f"the shared train/evaluate loop and the rest in the library's per-epoch bookkeeping (graphs, CSV "
            f"files, checkpoints); {sum(not r.get('completed', True) for r in ok)} of {len(ok)} runs hit the epoch "
            "cap.\n"]


def render(suite: Suite, records: Sequence[Mapping[str, Any]], argv: Sequence[str], modes: Sequence[str],
           seeds: Sequence[int], sweep: bool, descriptions: Mapping[str, str], settings: Mapping[str, Settings],
           elapsed: float, pngs: Mapping[str, str | None]) -> tuple[str, dict[str, Any]]:
    """The Markdown report and the computed summary (comparisons, sweep verdicts) for the JSON."""
    lines = [header(f"apical bench {suite.name}", ["bench", suite.name, *argv])]
    lines.append(f"- threads: {torch.get_num_threads()}; seeds: {list(seeds)}; modes: {', '.join(modes)}; "
                 f"score: test {_score_name(suite)} of the best validation network")
    lines.append(f"- split: {'one fixed split (seed 0)' if suite.fixed_split else 'split by seed'}; "
                 f"wall time of this invocation: {elapsed / 60:.1f} min (runs resumed from the JSONL not included)")
    lines.append(f"- estimated cost of the default run (5 seeds, 1 thread): ~{suite.estimate_minutes:g} min, from "
                 "timed single runs on the 2-core machine shared with other jobs (load average about 5)")
    lines.append(f"- suite notes: {suite.notes}")
    lines.append("")
    summary: dict[str, Any] = {"comparisons": {}, "compression": {}}
    for spec in suite.models:
        st = settings[spec.name]
        lines.append(f"## {spec.name}: {descriptions.get(spec.name, spec.kind)} (width {spec.default_width:g})\n")
        lines.append(f"Adam lr {st.lr:g}, batch {st.batch_size}, patience P = {st.patience} (none-long: "
                     f"{4 * st.patience}), at most {st.max_epochs} epochs per run"
                     f"{' (--quick: 1,000 training rows)' if st.quick else ''}"
                     f"{'; gd and pb put no dendrites on ' + ', '.join(st.exclude) if st.exclude else ''}"
                     f"{'; gd and pb set ' + json.dumps(dict(st.overrides)) if st.overrides else ''}.\n")
        lines.append(mode_table(records, spec.name, spec.default_width, modes))
        trained = sorted({float(r["trained_width"]) for r in records if r["model"] == spec.name
                          and r["mode"] == MATCHED and "trained_width" in r})
        if trained:
            lines.append(f"none-matched: plain training (patience {4 * st.patience}) at width "
                         f"{', '.join(f'{w:.4g}' for w in trained)}, the width whose parameter count is closest "
                         "to pb's mean.\n")
        lines += _reference_lines(records, spec.name, spec.default_width)
        comps = compare(records, spec.name, spec.default_width)
        extra = [compare_pair(records, spec.name, spec.default_width, "gd", "perforatedai")]
        extra += [compare_pair(records, spec.name, spec.default_width, m, MATCHED) for m in ("pb", "gd")]
        comps += [c for c in extra if c]
        summary["comparisons"][spec.name] = comps
        if comps:
            lines.append("Paired over seeds, mean test-score difference (mode - vs); vs is the better of none and "
                         "none-long by mean test score, unless it names another mode:\n")
            lines.append(comparison_table(comps))
            lines += [f"- {comparison_verdict(c)}" for c in comps]
            lines.append("")
        if sweep and spec.sweep:
            points = compression_points(records, spec.name)
            ok, why = compression_verdict(points)
            summary["compression"][spec.name] = {
                "answer": ok, "verdict": why,
                "points": [{"mode": m, "width": w, "test_score": s, "parameters": p}
                           for (m, w), (s, p) in points.items()],
            }
            lines.append(f"### Compression sweep ({spec.name})\n")
            lines.append(sweep_table(records, spec.name))
            lines.append(f"Does a narrow width + pb match or beat the width-1 'none' mean score with at most half its "
                         f"parameters? {why}\n")
            if any(m == "none-long" and w < 1.0 for m, w in points):
                _, why_long = compression_verdict(points, mode="none-long")
                summary["compression"][spec.name]["none_long_verdict"] = why_long
                lines.append(f"The same question for none-long, the control for pb's longer training: {why_long}\n")
    if pngs.get("curves"):
        lines.append(f"![validation score per epoch]({pngs['curves']})\n")
    if pngs.get("compression"):
        lines.append(f"![compression]({pngs['compression']})\n")
    for w in pngs.get("warnings", ()) or ():
        lines.append(f"- note: {w}")
    return "\n".join(lines).rstrip() + "\n", summary


# ----------------------------------------------------------------------------------------------------
# plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# "none" is drawn wide and pale: every mode shares its curve up to its first plateau
_LINE_STYLES: dict[str, dict[str, Any]] = {"none": {"lw": 4.0, "alpha": 0.35}, "none-long": {"lw": 1.0, "ls": "--"}}


def plot_curves(suite: Suite, records: Sequence[Mapping[str, Any]], modes: Sequence[str], path: Path) -> None:
    """Validation score per epoch of the first seed, one line per mode, insertions marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(suite.models), figsize=(6.5 * len(suite.models), 4.2), squeeze=False)
    for ax, spec in zip(axes[0], suite.models, strict=True):
        shown: list[tuple[int, float]] = []
        plateau = math.inf
        for mode in modes:
            runs = sorted((r for r in records if r["model"] == spec.name and r["mode"] == mode
                           and float(r["width"]) == spec.default_width and "result" in r), key=lambda r: r["seed"])
            if not runs or not runs[0]["result"].get("history"):
                continue
            hist = runs[0]["result"]["history"]
            x = [h["epoch"] for h in hist]
            shown += [(h["epoch"], h["score"]) for h in hist]
            plateau = min([plateau] + [h["epoch"] for h in hist if "plateau" in str(h.get("event", ""))])
            style = _LINE_STYLES.get(mode, {"lw": 1.0})
            (line,) = ax.plot(x, [h["score"] for h in hist], label=f"{mode} (seed {runs[0]['seed']})", **style)
            ins = [h for h in hist if any(e in str(h.get("event", "")) for e in ("installed", "added"))]
            if ins:
                ax.plot([h["epoch"] for h in ins], [h["score"] for h in ins], "v", color=line.get_color(), ms=7)
        late = [sc for ep, sc in shown if ep >= plateau / 2 and math.isfinite(sc)]
        if late:  # zoom on the part after the first climb, where the modes differ
            lo, hi = min(late), max(sc for _, sc in shown if math.isfinite(sc))
            ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
        ax.set_title(f"{suite.name} {spec.name} (width {spec.default_width:g}); v = dendrites inserted")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {_score_name(suite)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_compression(suite: Suite, records: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Mean test score against mean parameter count (log x), one curve per mode."""
    plt = _pyplot()
    specs = [s for s in suite.models if s.sweep]
    fig, axes = plt.subplots(1, len(specs), figsize=(6.5 * len(specs), 4.2), squeeze=False)
    for ax, spec in zip(axes[0], specs, strict=True):
        widths = sorted({float(r["width"]) for r in records if r["model"] == spec.name})
        for mode in SWEEP_MODES:
            pts = [(w, summarise(records, spec.name, mode, w)) for w in widths]
            pts = [(w, s) for w, s in pts if s is not None]
            if not pts:
                continue
            ax.errorbar([s["parameters"][0] for _, s in pts], [s["test_score"][0] for _, s in pts],
                        yerr=[s["test_score"][1] for _, s in pts], marker="o", capsize=3, label=mode)
            for w, s in pts:
                ax.annotate(f"x{w:g}", (s["parameters"][0], s["test_score"][0]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(f"test {_score_name(suite)} (mean ± std over seeds)")
        ax.set_title(f"{suite.name} {spec.name}: compression sweep")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# command line


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` -> DendriteConfig overrides, checked against the config's fields."""
    fields = {f.name for f in dataclasses.fields(DendriteConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in fields or key in ("mode", "seed", "exclude"):
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY a DendriteConfig field other than mode, "
                             f"seed and exclude (set by the suite and --exclude); fields: {', '.join(sorted(fields))}")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    DendriteConfig(**out)  # a bad value fails here, before any run
    return out


def build_parser(suite_name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"apical bench {suite_name}", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1), default 5")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help=f"comma-separated modes from {', '.join(KNOWN_MODES)} (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--widths", type=_floats, default=list(DEFAULT_WIDTHS),
                   help="sweep widths (default 0.125,0.25,0.5,1)")
    p.add_argument("--pb-widths", type=_floats, default=None,
                   help="widths at which the sweep trains pb (default: the suite's, listed in the report)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: patience 2, 60 epochs, higher lr, dendrite phases <= 6 epochs, 1,000 training rows")
    p.add_argument("--max-epochs", type=int, default=None, help="cap on epochs per run (overrides the suite's)")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=None,
                   help="compression sweep (default: on for mnist1d, mnist5k, tox21)")
    p.add_argument("--resume", action="store_true", help="keep SUITE.jsonl and skip the runs already in it")
    p.add_argument("--exclude", default="",
                   help="comma-separated layer names (or regexes over named_modules()) that gd and pb leave "
                   "without dendrites, e.g. fc1 (default: none; every Linear/Conv layer gets dendrites)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a DendriteConfig field for gd and pb, e.g. --set freeze_base_after_install=true "
                   "(repeatable; VALUE is read as JSON, else as a string)")
    p.add_argument("--sweep-long", action="store_true",
                   help="the sweep also trains none-long at the pb widths (the control for pb's longer training)")
    p.add_argument("--reference-timeout", type=float, default=3600.0,
                   help="seconds allowed to one perforatedai run (default 3600)")
    return p


def main(argv: Sequence[str]) -> None:
    """``apical bench SUITE [options]``: ``argv[0]`` is the suite name."""
    if not argv or argv[0] not in SUITES:
        raise ValueError(f"unknown suite {argv[0] if argv else ''!r}; known: {', '.join(SUITES)}")
    suite = SUITES[argv[0]]
    args = build_parser(suite.name).parse_args(list(argv[1:]))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in KNOWN_MODES]
    if bad or not modes:
        raise ValueError(f"unknown mode(s) {bad}; known: {', '.join(KNOWN_MODES)}")
    modes = with_matched(modes)  # a plain network of pb's size whenever gd or pb runs
    if args.seeds < 1:
        raise ValueError("--seeds must be at least 1")
    sweep = suite.sweep_default if args.sweep is None else args.sweep
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    exclude = tuple(t.strip() for t in args.exclude.split(",") if t.strip())
    overrides = parse_overrides(args.overrides)
    if (exclude or overrides) and "perforatedai" in modes:
        raise ValueError("--exclude and --set apply to apical's gd and pb only: run perforatedai without them")
    settings = {s.name: run_settings(s, args.quick, args.max_epochs, exclude, overrides) for s in suite.models}
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / f"{suite.name}.jsonl"
    if not args.resume and jsonl.exists():
        jsonl.unlink()
    jobs = plan(suite, modes, seeds, args.widths, sweep, args.pb_widths, args.sweep_long)
    done = {}
    for r in read_jsonl(jsonl):  # a record counts only if it was made with the same settings
        stored = {"exclude": [], **(r.get("settings") or {})}  # records from before --exclude lack it
        if r.get("suite") == suite.name and r.get("model") in settings and \
                stored == settings[r["model"]].to_dict():
            done[_key_of(r)] = r
    matched = [Job(s.name, MATCHED, s.default_width, seed) for seed in seeds for s in suite.models] \
        if MATCHED in modes else []
    records = [done[j.key()] for j in jobs if j.key() in done]
    start = time.perf_counter()
    todo = [j for j in jobs if j.key() not in done]
    left = todo + [j for j in matched if j.key() not in done]
    print(f"apical bench {suite.name}: {len(jobs) + len(matched)} runs, {len(jobs) + len(matched) - len(left)} "
          f"already done, {torch.get_num_threads()} thread(s), results in {out}", flush=True)

    def execute(job: Job, i: int, train_width: float | None = None) -> None:
        record = run_job(suite, job, settings[job.model], args.reference_timeout, train_width)
        append_jsonl(jsonl, record)
        records.append(record)
        if "result" in record:
            r = record["result"]
            what = (f"test {r['test_score']:.4f}, {r['parameters']:,} params, {r['dendrites']} dendrites, "
                    f"{r['epochs']} epochs, {r['seconds']:.1f} s")
        else:
            what = f"failed: {record.get('failed')}"
        at = f" (trained at width {train_width:.4g})" if train_width is not None else ""
        print(f"[{i}/{len(left)}] {job.model} {job.mode} width {job.width:g}{at} seed {job.seed}: {what}", flush=True)

    for i, job in enumerate(todo, 1):
        execute(job, i)
    count = len(todo)
    for spec in suite.models:  # none-matched: plain, at the width with about pb's mean parameter count
        mine = [j for j in matched if j.model == spec.name]
        if not mine:
            continue
        target = next((m for m in ("pb", "gd") if m in modes), "pb")
        counts = [r["result"]["parameters"] for r in records if r["model"] == spec.name and r["mode"] == target
                  and float(r["width"]) == spec.default_width and "result" in r]
        if not counts:
            print(f"{spec.name} none-matched: skipped, no {target} run succeeded", flush=True)
            continue
        width = matched_width(suite_task(spec, settings[spec.name]), spec.default_width, sum(counts) / len(counts))
        for job in mine:  # a run matched to other pb counts (fewer seeds then) is trained again
            if job.key() in done and done[job.key()].get("trained_width") == width:
                records.append(done[job.key()])
            else:
                count += 1
                execute(job, count, width)
    elapsed = time.perf_counter() - start
    descriptions = {s.name: describe(build_model(s, load_split(suite, 0, args.quick), s.default_width))
                    for s in suite.models}
    pngs: dict[str, Any] = {"warnings": []}
    try:
        plot_curves(suite, records, modes, out / f"{suite.name}.png")
        pngs["curves"] = f"{suite.name}.png"
        if sweep and any(s.sweep for s in suite.models):
            plot_compression(suite, records, out / f"{suite.name}-compression.png")
            pngs["compression"] = f"{suite.name}-compression.png"
    except ImportError as err:
        msg = f"PNG plots skipped: matplotlib is not available ({err})"
        warnings.warn(msg, stacklevel=1)
        pngs["warnings"].append(msg)
    md, summary = render(suite, records, argv[1:], modes, seeds, sweep, descriptions, settings, elapsed, pngs)
    (out / f"{suite.name}.md").write_text(md)
    write_json(out / f"{suite.name}.json", {
        "suite": suite.name,
        "command": ["apical", "bench", *argv],
        "machine_threads": torch.get_num_threads(),
        "suite_definition": dataclasses.asdict(suite),
        "settings": {k: v.to_dict() for k, v in settings.items()},
        "modes": modes,
        "seeds": seeds,
        "sweep": sweep,
        "widths": list(args.widths) if sweep else [],
        "summary": summary,
        "runs": records,
    })
    print(f"wrote {out / (suite.name + '.md')}", flush=True)
