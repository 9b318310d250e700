"""The files a trial writes at its end: ``trial.md`` (tables, paired CIs, verdicts) and PNG plots."""

from __future__ import annotations

import datetime
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from apical.bench.common import machine, markdown_table
from apical.trials.modes import BASELINES, MATCHED
from apical.trials.stats import summary


def _pm(ms: tuple[float, float], digits: int = 4) -> str:
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def _int_pm(ms: tuple[float, float]) -> str:
    return f"{ms[0]:,.0f} ± {ms[1]:,.0f}"


def mode_table(records: Sequence[Mapping[str, Any]], modes: Sequence[str], width: float) -> str:
    """One row per mode at trial width ``width``: runs, test, val, parameters, width trained,
    dendrites, epochs, seconds (mean ± std over seeds)."""
    rows = []
    for mode in modes:
        s = summary(records, mode, width)
        if s is not None:
            rows.append([mode, str(s["n"]), _pm(s["test"]), _pm(s["val"]), _int_pm(s["parameters"]),
                         f"{s['width'][0]:.4g}", f"{s['dendrites'][0]:.1f}", _int_pm(s["epochs"]),
                         f"{s['seconds'][0]:.1f} ± {s['seconds'][1]:.1f}"])
    return markdown_table(["mode", "runs", "test", "val", "parameters", "width", "dendrites", "epochs", "seconds"],
                          rows)


def compression_verdict(records: Sequence[Mapping[str, Any]], widths: Sequence[float], mode: str = "pb",
                        higher_is_better: bool = True) -> str:
    """Does ``mode`` at a narrower width match ``none`` at the widest width with at most half its
    parameters? And at equal parameters, is it better than ``none-matched``? One paragraph."""
    lines = []
    wide = max(widths)
    ref = summary(records, "none", wide)
    narrow = [(w, s) for w in sorted(widths) if w < wide and (s := summary(records, mode, w)) is not None]
    if ref is not None and narrow:
        def ok(s: Mapping[str, Any]) -> bool:
            good = s["test"][0] >= ref["test"][0] if higher_is_better else s["test"][0] <= ref["test"][0]
            return good and s["parameters"][0] <= ref["parameters"][0] / 2

        hits = [(w, s) for w, s in narrow if ok(s)]
        if hits:
            w, s = min(hits, key=lambda t: t[1]["parameters"][0])
            lines.append(f"Compression: yes: {mode} at width {w:g} scores {s['test'][0]:.4f} against "
                         f"{ref['test'][0]:.4f} for none at width {wide:g}, with {s['parameters'][0]:,.0f} parameters "
                         f"({s['parameters'][0] / ref['parameters'][0]:.0%} of {ref['parameters'][0]:,.0f}).")
        else:
            lines.append(f"Compression: no {mode} width below {wide:g} matches none at width {wide:g} "
                         f"({ref['test'][0]:.4f}, {ref['parameters'][0]:,.0f} parameters) with at most half its "
                         "parameters.")
    return " ".join(lines)


def _equal_parameters_line(result: Any, width: float, mode: str) -> str | None:
    found = [c for c in result.comparisons(width) if c.mode == mode and c.baseline == MATCHED]
    if not found:
        return None
    c = found[0]
    s = summary(result.records, MATCHED, width)
    return (f"At equal parameters ({mode} {summary(result.records, mode, width)['parameters'][0]:,.0f} against a plain "
            f"network of width {s['width'][0]:.4g} with {s['parameters'][0]:,.0f}): {c.line()}.")


def render(result: Any, pngs: Mapping[str, str]) -> str:
    """The Markdown report of a finished trial."""
    task = result.task
    direction = "higher is better" if task.higher_is_better else "lower is better"
    m = machine()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# apical trial: {task.name}\n", f"- command: `{result.command}`",
             f"- machine: {m['cores']} cores, torch {m['torch']}, Python {m['python']}"
             f"{', GPU ' + m['gpu'] if 'gpu' in m else ''}; device {task.device}", f"- date: {when}"]
    lines.append(f"- seeds: {result.seeds}; modes: {', '.join(result.modes)}; widths: "
                 f"{', '.join(f'{w:g}' for w in result.widths)}; torch threads: {torch.get_num_threads()}")
    lines.append(f"- score: test {task.metric_name} ({direction}) of the network with the best validation score")
    lines.append(f"- training: {task.optimizer if isinstance(task.optimizer, str) else 'custom optimizer'} lr "
                 f"{task.lr:g}, weight decay {task.weight_decay:g}, batch {task.batch_size}, patience P = "
                 f"{task.patience} (none-long and none-matched: {4 * task.patience}), at most {task.max_epochs} "
                 f"epochs per run{'; gd and pb set ' + str(dict(task.dendrites)) if task.dendrites else ''}")
    lines.append(f"- none-matched: plain training (patience {4 * task.patience}) at the width whose parameter "
                 "count is closest to pb's mean (gd's without pb)")
    lines.append("")
    for width in result.widths:
        lines.append(f"## Width {width:g}\n")
        lines.append(mode_table(result.records, result.modes, width))
        comps = result.comparisons(width)
        if comps:
            base = next((c.baseline for c in comps if c.baseline in BASELINES), None)
            note = f"; {base} is the better plain baseline" if base else ""
            lines.append(f"Paired over seeds, mean test difference (mode - vs){note}:\n")
            lines.append(markdown_table(
                ["mode", "vs", "seeds", "mean diff", "95% CI low", "95% CI high", "seeds better", "verdict"],
                [[c.mode, c.baseline, str(c.n), f"{c.diff:+.4f}", "n/a" if math.isnan(c.lo) else f"{c.lo:+.4f}",
                  "n/a" if math.isnan(c.hi) else f"{c.hi:+.4f}", f"{c.wins}/{c.n}", c.verdict] for c in comps]))
        for mode in ("pb", "gd"):
            line = _equal_parameters_line(result, width, mode)
            if line:
                lines.append(f"- {line}")
        lines.append("")
    if len(result.widths) > 1:
        for mode in ("pb", "gd"):
            if mode in result.modes:
                verdict = compression_verdict(result.records, result.widths, mode, task.higher_is_better)
                if verdict:
                    lines.append(verdict + "\n")
    for name, png in pngs.items():
        lines.append(f"![{name}]({png})\n")
    return "\n".join(lines).rstrip() + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(result: Any, path: Path) -> None:
    """Validation score per epoch of the first seed, one line per mode, at the first width."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width, seed = result.widths[0], result.seeds[0]
    for mode in result.modes:
        run = next((r for r in result.records if r["mode"] == mode and int(r["seed"]) == seed
                    and float(r["for_width"]) == width), None)
        if run is None or not run.get("history"):
            continue
        hist = run["history"]
        (line,) = ax.plot([h["epoch"] for h in hist], [h["score"] for h in hist], label=mode,
                          lw=3.0 if mode == "none" else 1.2, alpha=0.4 if mode == "none" else 1.0)
        ins = [h for h in hist if "installed" in str(h.get("event", "")) or "added" in str(h.get("event", ""))]
        if ins:
            ax.plot([h["epoch"] for h in ins], [h["score"] for h in ins], "v", color=line.get_color(), ms=7)
    ax.set_title(f"{result.task.name}: validation {result.task.metric_name}, seed {seed}, width {width:g} "
                 "(v: dendrites installed)", fontsize=9)
    ax.set_xlabel("epoch")
    ax.set_ylabel(result.task.metric_name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_compression(result: Any, path: Path) -> None:
    """Mean test score against mean parameters (log x), one curve per mode over the widths."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode in result.modes:
        pts = [s for w in result.widths if (s := summary(result.records, mode, w)) is not None]
        if pts:
            pts.sort(key=lambda s: s["parameters"][0])
            ax.errorbar([s["parameters"][0] for s in pts], [s["test"][0] for s in pts],
                        yerr=[s["test"][1] for s in pts], marker="o", capsize=3, label=mode)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"test {result.task.metric_name} (mean ± std over seeds)")
    ax.set_title(f"{result.task.name}: score against parameters", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: Any) -> dict[str, Path]:
    """Write ``trial.md`` and the PNGs (when matplotlib is there) into ``result.out``; their paths."""
    out: Path = result.out
    files: dict[str, Path] = {"records": out / "trial.jsonl"}
    pngs: dict[str, str] = {}
    try:
        plot_curves(result, out / "curves.png")
        plot_compression(result, out / "compression.png")
        pngs = {"validation curves": "curves.png", "score against parameters": "compression.png"}
        files.update(curves=out / "curves.png", compression=out / "compression.png")
    except ImportError as err:
        warnings.warn(f"apical.trial: PNG plots skipped, matplotlib is not available ({err})", stacklevel=2)
    (out / "trial.md").write_text(render(result, pngs))
    files["report"] = out / "trial.md"
    return files
