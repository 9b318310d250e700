"""``apical.trial``: every mode of a task on the same seeds, resumable, with paired statistics."""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apical.dendrites import parameter_count
from apical.trials import records as jsonl
from apical.trials.modes import DENDRITIC, MATCHED, MODES, with_matched
from apical.trials.run import Splits, build, check_splits, train
from apical.trials.stats import Comparison, better_baseline, compare, summary
from apical.trials.task import Task, TaskError

RECORDS = "trial.jsonl"


@dataclass
class TrialResult:
    """The finished runs of a trial (one dict per run, as in ``trial.jsonl``) and where its files are."""

    task: Task
    modes: list[str]
    seeds: list[int]
    widths: list[float]
    records: list[dict[str, Any]]
    out: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    command: str = ""
    """How the trial was started (for the report)."""

    def summary(self, mode: str, width: float | None = None) -> dict[str, Any] | None:
        """Mean and std over seeds of test, val, parameters, dendrites, epochs, seconds of ``mode``."""
        return summary(self.records, mode, self.widths[0] if width is None else width)

    def compare(self, mode: str, baseline: str | None = None, width: float | None = None) -> Comparison:
        """Paired over seeds: ``mode`` against ``baseline`` (default: the better of none / none-long),
        test scores at trial width ``width`` (default: the first)."""
        width = self.widths[0] if width is None else float(width)
        higher = self.task.higher_is_better
        if baseline is None:
            baseline = better_baseline(self.records, width, higher)
            if baseline is None:
                raise ValueError(f"no none or none-long runs at width {width:g} to compare {mode!r} with")
        found = compare(self.records, mode, baseline, width, higher)
        if found is None:
            raise ValueError(f"no seed has both a {mode!r} and a {baseline!r} run at width {width:g}; "
                             f"modes run: {', '.join(self.modes)}")
        return found

    def comparisons(self, width: float) -> list[Comparison]:
        """Every mode against the better plain baseline, and gd / pb against none-matched."""
        higher = self.task.higher_is_better
        base = better_baseline(self.records, width, higher)
        out = []
        if base is not None:
            out += [c for m in self.modes if m != base
                    if (c := compare(self.records, m, base, width, higher)) is not None]
        out += [c for m in self.modes if m in DENDRITIC
                if (c := compare(self.records, m, MATCHED, width, higher)) is not None]
        return out


def matched_width(task: Task, width: float, parameters: float, limit: float = 1024.0) -> float:
    """The width whose ``task.model(width)`` parameter count is closest to ``parameters`` (searched
    upward from ``width``; counts are taken to grow with width)."""
    def count(w: float) -> int:
        return parameter_count(build(task, w))

    lo = width
    if count(lo) >= parameters:
        return lo
    hi = lo * 2
    while count(hi) < parameters:
        if hi > limit * width:
            raise TaskError(f"task {task.name!r}: no width up to {hi:g} reaches {parameters:,.0f} parameters "
                            "(does Task.model(width) scale the hidden sizes with width?)")
        lo, hi = hi, hi * 2
    for _ in range(40):  # lo: below the target, hi: at or above it
        mid = (lo + hi) / 2
        if count(mid) >= parameters:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-9 * hi:
            break
    return lo if parameters - count(lo) < count(hi) - parameters else hi


def _progress(total: int, enabled: bool):
    """A tqdm bar over runs on stderr (off when stderr is not a terminal), or None without tqdm."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="run", desc="trial", leave=False, dynamic_ncols=True, disable=None)


def trial(task: Task, modes: Sequence[str] = ("none", "none-long", "gd", "pb"), seeds: int | Sequence[int] = 5,
          widths: Sequence[float] = (1.0,), out: str | os.PathLike[str] | None = "trial-out", *,
          progress: bool = True, report: bool = True, log: Callable[[str], None] | None = None,
          command: str | None = None,
          run_options: Callable[[str, int, float], Mapping[str, Any]] | None = None,
          report_only: bool = False, matched: bool = True,
          matched_to: Sequence[int] | None = None) -> TrialResult:
    """Train ``task`` in every mode on the same seeds, at every width, and compare the modes.

    ``none-matched`` is added whenever gd or pb runs: plain training (none-long's patience) at the
    width whose parameter count is closest to pb's mean parameters (gd's without pb), per width.
    With ``out``, each finished run is appended to ``out/trial.jsonl`` at once, and a rerun of the
    same call skips the runs already there (a run cut off by a kill, even mid-line, is redone); at
    the end ``out`` gets ``trial.md`` (tables, paired CIs, verdicts) and, with matplotlib, the
    curves and compression plots. ``seeds``: a count (seeds 0..N-1) or the seeds themselves.
    ``run_options(mode, seed, width)``: extra keyword arguments of a run's training (``on_epoch``,
    ``run_dir``: see :func:`apical.trials.run.train`). ``report_only``: train nothing; write the
    report of the runs already in ``out`` (a partial table of an unfinished trial). ``matched=False``:
    train no ``none-matched`` run in this call, only report those already in ``out``; its width
    depends on every seed's pb runs, so a trial filled in piece by piece trains it once, last.
    ``matched_to``: the seeds whose pb (or gd) runs set ``none-matched``'s width (default: this call's
    seeds); their runs must already be in ``out``. Processes taking disjoint seeds of one trial then
    train their ``none-matched`` runs side by side, at the width the whole trial's call would use.
    """
    if not isinstance(task, Task):
        raise TaskError(f"trial() needs an apical.Task, got {type(task).__name__}")
    modes = with_matched([m.strip() for m in modes])
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"unknown mode(s) {bad}; known: {', '.join(MODES)}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise ValueError(f"seeds must be a positive count or distinct seeds, got {seeds!r}")
    match_seeds = seed_list if matched_to is None else [int(s) for s in matched_to]
    if not match_seeds or len(set(match_seeds)) != len(match_seeds):
        raise ValueError(f"matched_to must be distinct seeds, got {matched_to!r}")
    if matched_to is not None and out is None:
        raise ValueError("matched_to needs out: the runs of its seeds are read from out/trial.jsonl")
    width_list = [float(w) for w in widths]
    if not width_list or any(not (math.isfinite(w) and w > 0) for w in width_list):
        raise ValueError(f"widths must be positive numbers, got {list(widths)!r}")
    say = log or (lambda _msg: None)
    settings = task.settings()
    path = None
    done: dict[tuple[str, int, float], dict[str, Any]] = {}
    if out is not None:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / RECORDS
        found = jsonl.read(path)
        kept = [r for r in found if r.get("settings") == settings]
        if not report_only:  # a report leaves the records alone (another process may be appending)
            if len(kept) < len(found):
                shutil.copyfile(path, path.with_name(RECORDS + ".previous"))
                say(f"{len(found) - len(kept)} record(s) of other settings moved aside to {RECORDS}.previous")
            jsonl.rewrite(path, kept)  # drops a torn last line, so appends start on a fresh line
        done = {(r["mode"], int(r["seed"]), float(r["for_width"])): r for r in kept}

    first = [(m, s, w) for w in width_list for s in seed_list for m in modes if m != MATCHED]
    total = len(first) + (len(seed_list) * len(width_list) if MATCHED in modes and matched else 0)
    bar = _progress(total, progress)
    if bar is not None and log is not None and not bar.disable:
        say = bar.write  # log lines above the bar
    split_cache: dict[int, Splits] = {}
    results: dict[tuple[str, int, float], dict[str, Any]] = {}

    def run(mode: str, seed: int, for_width: float, width: float) -> None:
        key = (mode, seed, for_width)
        if key in done:
            results[key] = done[key]
        elif report_only or (mode == MATCHED and not matched):
            return
        else:
            if seed not in split_cache:
                split_cache.clear()  # one seed's data in memory at a time
                split_cache[seed] = check_splits(task, seed, task.data(seed))
            start = time.perf_counter()
            extra = dict(run_options(mode, seed, width)) if run_options is not None else {}
            out_ = train(task, mode, seed, width, split_cache[seed], **extra)
            record = {"task": task.name, "mode": mode, "seed": seed, "width": width, "for_width": for_width,
                      **out_, "settings": settings}
            if path is not None:
                jsonl.append(path, record)
            results[key] = record
            say(f"{mode} seed {seed} width {width:g}: test {record['test']:.4f}, {record['parameters']:,} "
                f"parameters, {record['dendrites']} dendrites, {record['epochs']} epochs, "
                f"{time.perf_counter() - start:.1f} s")
        if bar is not None:
            bar.update(1)

    try:
        for mode, seed, width in first:
            run(mode, seed, width, width)
        if MATCHED in modes:
            for width in width_list:
                target_mode = "pb" if "pb" in modes else "gd"
                known = {**done, **results}
                counts = [known[(target_mode, s, width)]["parameters"] for s in match_seeds
                          if (target_mode, s, width) in known]
                missing = [s for s in match_seeds if (target_mode, s, width) not in known]
                if matched_to is not None and missing and matched and not report_only:
                    raise ValueError(f"matched_to: seed(s) {missing} have no {target_mode} run at width {width:g} "
                                     f"in {path}; train them first (matched=False), then the none-matched runs")
                target = (None if report_only or not matched
                          else matched_width(task, width, sum(counts) / len(counts)))
                for seed in seed_list:
                    key = (MATCHED, seed, width)
                    if target is not None and key in done and float(done[key]["width"]) != target:
                        del done[key]  # matched to other pb runs (fewer seeds then): trained again
                    run(MATCHED, seed, width, target if target is not None else width)
    finally:
        if bar is not None:
            bar.close()
    order = {(m, s, w): i for i, (m, s, w) in enumerate(
        [(m, s, w) for w in width_list for s in seed_list for m in modes])}
    ordered = sorted(results.values(), key=lambda r: order[(r["mode"], int(r["seed"]), float(r["for_width"]))])
    if command is None:
        command = (f"apical.trial({task.name!r}, modes={tuple(modes)}, seeds={seed_list}, "
                   f"widths={tuple(width_list)}, out={None if out is None else os.fspath(out)!r})")
    result = TrialResult(task, modes, seed_list, width_list, ordered, Path(out) if out is not None else None,
                         command=command)
    if out is not None and report:
        from apical.trials.report import write_report

        result.files = write_report(result)
    return result


__all__ = ["RECORDS", "TrialResult", "matched_width", "trial"]
