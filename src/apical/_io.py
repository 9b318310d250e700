"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never a part.

Every file apical writes that a later process reads back (checkpoints, run records, trial
records, benchmark JSON, the dataset cache) goes through :func:`atomic_write`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any

__all__ = ["atomic_write"]


def _write_file(f: Any, data: bytes) -> None:
    """Write the whole file and push it to stable storage."""
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX); a file system that cannot sync a directory is tolerated."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # the file itself was synced
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Replace ``path`` by ``data`` atomically and durably.

    The data goes to a temporary file beside ``path`` whose name is unique to this process and call
    (``.NAME.PID.RANDOM.tmp``, created exclusively with the usual ``0o666 & ~umask`` mode), is
    flushed and ``fsync``-ed, moved over ``path`` with ``os.replace`` and the directory is synced.
    If anything fails or the process is interrupted before the rename, ``path`` keeps its old
    content and the temporary file is removed. Text is written as UTF-8 with no newline translation.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = path.parent
    tmp = directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as f:
            _write_file(f, data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
