"""Shared pieces of the benchmarks: machine description, tables, statistics, output paths."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from apical._io import atomic_write
from apical.stats import mean_std, paired_ci, t95

__all__ = ["DEFAULT_OUT", "header", "machine", "markdown_table", "mean_std", "paired_ci", "t95", "write_json"]

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


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=1, default=float))


@torch.no_grad()
def eval_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Classification accuracy of ``model`` on ``(x, y)`` in eval mode (the model is left in train mode)."""
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc
