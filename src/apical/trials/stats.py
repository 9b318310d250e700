"""Summaries and paired comparisons of a trial's records."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from apical.stats import mean_std, paired_ci
from apical.trials.modes import BASELINES


@dataclass(frozen=True)
class Comparison:
    """Paired over seeds: mean of ``mode - baseline`` in the metric's units, its 95% CI, and the
    number of seeds on which ``mode`` was better (in the metric's direction)."""

    mode: str
    baseline: str
    width: float
    n: int
    diff: float
    lo: float
    hi: float
    wins: int
    seeds: tuple[int, ...]
    higher_is_better: bool = True

    @property
    def verdict(self) -> str:
        """``better``, ``worse``, ``no significant difference`` or ``too few seeds``."""
        if self.n < 2 or math.isnan(self.lo):
            return "too few seeds"
        good, bad = (self.lo > 0, self.hi < 0) if self.higher_is_better else (self.hi < 0, self.lo > 0)
        return "better" if good else "worse" if bad else "no significant difference"

    def line(self) -> str:
        """One sentence for a report."""
        def signed(x: float) -> str:
            return "n/a" if math.isnan(x) else f"{x:+.4f}"

        return (f"{self.mode} vs {self.baseline} (width {self.width:g}): {signed(self.diff)} (95% CI {signed(self.lo)} "
                f"to {signed(self.hi)}, {self.wins}/{self.n} seeds better): {self.verdict}")

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "baseline": self.baseline, "width": self.width, "n": self.n, "diff": self.diff,
                "lo": self.lo, "hi": self.hi, "wins": self.wins, "seeds": list(self.seeds), "verdict": self.verdict}


def runs(records: Sequence[Mapping[str, Any]], mode: str, width: float) -> list[Mapping[str, Any]]:
    """The records of ``mode`` at trial width ``width`` (none-matched: the runs matched to it)."""
    return [r for r in records if r["mode"] == mode and float(r["for_width"]) == float(width)]


def summary(records: Sequence[Mapping[str, Any]], mode: str, width: float) -> dict[str, Any] | None:
    """Mean and std over seeds of test, val, parameters, dendrites, epochs, seconds (None without runs)."""
    mine = runs(records, mode, width)
    if not mine:
        return None
    out: dict[str, Any] = {"n": len(mine), "width": mean_std([float(r["width"]) for r in mine])}
    for key in ("test", "val", "parameters", "dendrites", "epochs", "seconds"):
        out[key] = mean_std([float(r[key]) for r in mine])
    return out


def _test_by_seed(records: Sequence[Mapping[str, Any]], mode: str, width: float) -> dict[int, float]:
    return {int(r["seed"]): float(r["test"]) for r in runs(records, mode, width)}


def compare(records: Sequence[Mapping[str, Any]], mode: str, baseline: str, width: float,
            higher_is_better: bool = True) -> Comparison | None:
    """Paired comparison of ``mode`` with ``baseline`` at ``width`` over their common seeds (None if none)."""
    a, b = _test_by_seed(records, mode, width), _test_by_seed(records, baseline, width)
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        return None
    xs, ys = [a[s] for s in seeds], [b[s] for s in seeds]
    diff, lo, hi = paired_ci(xs, ys)
    wins = sum((x > y) if higher_is_better else (x < y) for x, y in zip(xs, ys, strict=True))
    return Comparison(mode, baseline, float(width), len(seeds), diff, lo, hi, wins, seeds, higher_is_better)


def better_baseline(records: Sequence[Mapping[str, Any]], width: float, higher_is_better: bool = True) -> str | None:
    """Whichever of none / none-long has the better mean test score at ``width``: over the seeds
    both have when they share any (a partial table must not favour the mode with fewer seeds)."""
    scores = {m: _test_by_seed(records, m, width) for m in BASELINES}
    scores = {m: by_seed for m, by_seed in scores.items() if by_seed}
    if not scores:
        return None
    common = set.intersection(*(set(by_seed) for by_seed in scores.values()))
    means = {m: sum(by_seed[k] for k in (common or by_seed)) / len(common or by_seed) for m, by_seed in scores.items()}
    return (max if higher_is_better else min)(means, key=means.__getitem__)
