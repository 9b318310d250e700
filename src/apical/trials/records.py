"""The JSON-lines file of a trial: one line per finished run, appended and synced as it finishes."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from apical._io import atomic_write


def read(path: Path) -> list[dict[str, Any]]:
    """The complete records of ``path``; a torn or garbled line (a run killed while writing) is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def rewrite(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Replace ``path`` by exactly ``records`` (atomically: a kill leaves the old or the new file).

    A file that already holds exactly these lines is left alone, so that processes starting side by
    side on one trial (disjoint seeds) do not replace each other's file.
    """
    text = "".join(json.dumps(record, default=float) + "\n" for record in records)
    if path.is_file() and path.read_text() == text:
        return
    atomic_write(path, text)


def append(path: Path, record: Mapping[str, Any]) -> None:
    """Append one record as one line and sync it to disk."""
    with path.open("a") as fh:
        fh.write(json.dumps(record, default=float) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
