"""apical._io.atomic_write, and that every writer of a file read back later goes through it."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import apical._io as apical_io
from apical._io import atomic_write
from apical.bench.common import write_json
from apical.checkpoint import save
from apical.datasets import _save_atomic
from apical.trials import records


def test_bytes_and_text_are_written_exactly(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, b"\x00\x01\r\n")
    assert path.read_bytes() == b"\x00\x01\r\n"
    atomic_write(str(path), "a\r\nb\n\u00e9")  # no newline translation, UTF-8
    assert path.read_bytes() == "a\r\nb\n\u00e9".encode()
    assert os.listdir(tmp_path) == ["f.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    atomic_write(path, "old")

    def half_then_crash(f, data):
        f.write(data[: len(data) // 2])
        f.flush()
        raise OSError("No space left on device")

    with monkeypatch.context() as m:
        m.setattr(apical_io, "_write_file", half_then_crash)
        with pytest.raises(OSError, match="No space"):
            atomic_write(path, "new content")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]

    def interrupted(src, dst):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            atomic_write(path, "new content")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes and directory fsync")
def test_temporary_name_mode_and_syncs(tmp_path, monkeypatch):
    synced, replaced = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda s, d: (replaced.append(Path(s)), real_replace(s, d)))
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.json", "{}")
        atomic_write(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o640
    assert synced == [False, True, False, True]  # the file, then its directory, each time
    assert len(replaced) == 2 and replaced[0] != replaced[1]  # unique per call, not only per process
    for src in replaced:
        assert re.fullmatch(rf"\.a\.json\.{os.getpid()}\.[0-9a-f]{{8}}\.tmp", src.name), src.name


def _writers(tmp_path: Path):
    model = nn.Linear(2, 1)
    return {
        "checkpoint.save": (tmp_path / "c.safetensors", lambda p: save(p, model)),
        "trials.records.rewrite": (tmp_path / "trial.jsonl", lambda p: records.rewrite(p, [{"seed": 1}])),
        "bench.common.write_json": (tmp_path / "r.json", lambda p: write_json(p, {"a": 1})),
        "datasets cache": (tmp_path / "d.npz", lambda p: _save_atomic(p, {"x": np.arange(3)})),
    }


@pytest.mark.parametrize("name", ["checkpoint.save", "trials.records.rewrite", "bench.common.write_json",
                                  "datasets cache"])
def test_every_writer_is_atomic(tmp_path, monkeypatch, name):
    torch.manual_seed(0)
    path, write = _writers(tmp_path)[name]
    path.write_bytes(b"previous")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            write(path)
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == [path.name]
    write(path)
    assert path.read_bytes() != b"previous" and os.listdir(tmp_path) == [path.name]
    if path.suffix == ".json":
        assert json.loads(path.read_text()) == {"a": 1}
