"""Paired statistics over seeds: means, standard deviations and t confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence

# two-sided 95% Student t quantiles by degrees of freedom (standard tables, 3 decimals)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101,
        19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052,
        28: 2.048, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def t95(dof: int) -> float:
    """Two-sided 95% t quantile: exact (3 decimals) up to 30 degrees of freedom; beyond, the nearest
    tabulated dof at or below (40, 60, 120), so never too narrow."""
    if dof < 1:
        return float("nan")
    return _T95[max(k for k in _T95 if k <= dof)]


def paired_ci(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Mean of a - b over paired runs and its 95% confidence interval (t distribution)."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_ci needs two equally long, non-empty sequences")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean, sd = mean_std(diffs)
    half = t95(len(diffs) - 1) * sd / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return mean, mean - half, mean + half
