"""Shared pieces of the benchmarks: machine description, tables, statistics, output paths."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUT = Path("benchmarks") / "results"


def machine() -> dict[str, Any]:
    """Where a benchmark ran: cores, threads, torch version, device."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def header(title: str, argv: Sequence[str] | None = None) -> str:
    """Markdown preamble: title, command, machine, date."""
    m = machine()
    cmd = "apical " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    where = f"{m['cores']} cores, torch {m['torch']} ({m['torch_threads']} thread(s)), Python {m['python']}"
    if "gpu" in m:
        where += f", GPU {m['gpu']}"
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"# {title}\n\n- command: `{cmd}`\n- machine: {where}\n- date: {date}\n"


def markdown_table(header_row: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table from a header and rows (cells are str()-ed)."""
    lines = ["| " + " | ".join(header_row) + " |", "|" + "---|" * len(header_row)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


# two-sided 95% Student t quantiles by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(dof: int) -> float:
    """Two-sided 95% t quantile (nearest tabulated dof at or below, normal beyond 30)."""
    if dof < 1:
        return float("nan")
    if dof > 30:
        return 1.96
    return _T95[max(k for k in _T95 if k <= dof)]


def paired_ci(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Mean of a - b over paired runs and its 95% confidence interval (t distribution)."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_ci needs two equally long, non-empty sequences")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean, sd = mean_std(diffs)
    half = t95(len(diffs) - 1) * sd / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return mean, mean - half, mean + half


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, path)
