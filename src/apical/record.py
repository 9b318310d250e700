"""Run records (``history.csv`` + ``summary.json``) and their plots.

A :class:`RunRecord` is created by ``apical.Controller(..., run_dir=DIR)`` (opt-in: nothing is
written without ``run_dir``). It writes

``DIR/history.csv``
    one row per :meth:`Controller.step <apical.Controller.step>`, appended and flushed as the
    run goes: the controller's history record (epoch, phase, score, best_score, dendrites,
    parameters, event, correlation) and ``seconds``, the wall-clock time of that epoch as the
    record measured it (from the previous ``step``, or from the controller's creation). Empty
    cells are ``None``. Resuming into the same directory continues the file; when the file
    does not match the controller's history (a checkpoint older than the file, or another run)
    it is rewritten from the history, keeping the ``seconds`` of the epochs that match.
``DIR/summary.json``
    the state of the run: best score, dendrites, parameters, epochs, seconds per phase, the
    list of events (plateaus, dendrite phases, installed / kept / reverted sets) with their
    epochs, one entry per architecture tried, and ``done``. Replaced atomically (temporary
    file + ``os.replace``) at the first epoch, at every phase change or event, at the end, and
    at least once a minute.

Under ``torch.distributed`` only rank 0 writes. :func:`plot_run` draws the record (it needs
matplotlib: ``pip install apical[plot]``); it reads only the two files and is never called
during training. (:func:`apical.inspection.inspect_text` describes a checkpoint.)
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from apical._io import atomic_write

__all__ = ["RunRecord", "plot_run", "read_history", "read_summary"]

HISTORY_FILE = "history.csv"
SUMMARY_FILE = "summary.json"
SUMMARY_FORMAT = "apical.run"
SUMMARY_VERSION = 1
_TEXT_COLUMNS = ("phase", "event")
_QUIET_EVENTS = ("improved", "correlation_improved")
_SUMMARY_EVERY_S = 60.0


# ---------------------------------------------------------------------------------- files
def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return str(value)


def _parse(column: str, text: str) -> Any:
    if column in _TEXT_COLUMNS:
        return text
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _csv_text(rows: Iterable[Sequence[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerows(rows)
    return buf.getvalue()


def _read_raw(path: Path) -> tuple[list[str] | None, list[list[str]]]:
    """Header and rows (strings) of a history.csv; (None, []) when absent or unreadable."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            lines = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None, []
    if not lines:
        return None, []
    header, rows = lines[0], lines[1:]
    if any(len(r) != len(header) for r in rows):
        return None, []
    return header, rows


def read_history(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of ``run_dir/history.csv`` with their types (int, float, str; None for empty)."""
    path = Path(os.fspath(run_dir)) / HISTORY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: is {str(run_dir)!r} a run directory "
                                "(Controller(..., run_dir=...))?")
    header, rows = _read_raw(path)
    if header is None:
        raise ValueError(f"{str(path)!r} is empty or malformed")
    return [{c: _parse(c, v) for c, v in zip(header, row, strict=True)} for row in rows]


def read_summary(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``run_dir/summary.json`` as a dict, or None when it is absent or unreadable."""
    try:
        data = json.loads((Path(os.fspath(run_dir)) / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_main_process() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed
        return True
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ---------------------------------------------------------------------------------- analysis
def _events_of(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every event but score improvements, with the epoch, score and architecture after it."""
    out = []
    for row in rows:
        for event in str(row.get("event") or "").split(","):
            if event and event not in _QUIET_EVENTS:
                out.append({"epoch": row.get("epoch"), "event": event, "score": row.get("score"),
                            "dendrites": row.get("dendrites"), "parameters": row.get("parameters")})
    return out


def _better(a: float, b: float, maximize: bool) -> bool:
    return a > b if maximize else a < b


def _architectures(rows: Sequence[dict[str, Any]], finish_events: Sequence[str] = (),
                   maximize: bool = True) -> list[dict[str, Any]]:
    """One entry per architecture tried: dendrites, parameters, best neuron-phase score, epochs,
    outcome ("kept", "reverted", or "training" while undecided)."""
    archs: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None

    def new(row: dict[str, Any], first_epoch: int) -> dict[str, Any]:
        arch = {"dendrites": row.get("dendrites"), "parameters": row.get("parameters"), "best_score": None,
                "best_epoch": None, "first_epoch": first_epoch, "last_epoch": first_epoch, "epochs": 0,
                "outcome": "training"}
        archs.append(arch)
        return arch

    for row in rows:
        epoch = row.get("epoch")
        events = str(row.get("event") or "").split(",")
        if cur is None and not archs:
            cur = new(row, epoch)
        if cur is not None and row.get("phase") == "neuron":
            cur["epochs"] += 1
            cur["last_epoch"] = epoch
            score = row.get("score")
            if isinstance(score, (int, float)) and (cur["best_score"] is None
                                                    or _better(score, cur["best_score"], maximize)):
                cur["best_score"], cur["best_epoch"] = score, epoch
        if cur is not None:
            if "reverted" in events:
                cur["outcome"] = "reverted"
                cur = None
            elif "kept" in events or "plateau" in events:  # the first plateau accepts the baseline
                cur["outcome"] = "kept"
        if "installed" in events or "added" in events:
            cur = new(row, epoch + 1)
    if cur is not None and cur["outcome"] == "training" and finish_events:
        cur["outcome"] = "reverted" if "reverted" in finish_events else "kept"
    return archs


# ---------------------------------------------------------------------------------- RunRecord
class RunRecord:
    """Writes ``history.csv`` and ``summary.json`` for one controller (see the module docstring).

    Created by ``Controller(..., run_dir=...)``; :meth:`on_step` runs after every
    ``Controller.step`` and :meth:`on_finish` from ``Controller.finish``.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(os.fspath(run_dir))
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ValueError(f"run_dir {str(self.run_dir)!r} exists and is not a directory")
        self.history_path = self.run_dir / HISTORY_FILE
        self.summary_path = self.run_dir / SUMMARY_FILE
        self._main = _is_main_process()
        if self._main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._header, self._rows = _read_raw(self.history_path) if self._main else (None, [])
        self._verified = False  # the first step compares the whole file with the history
        self._finish_events: list[str] = []
        self._finish_epoch: int | None = None
        self._last = time.perf_counter()
        self._last_summary = -math.inf
        self._last_dendrites: int | None = None
        self._last_accepted: int | None = None

    # ------------------------------------------------------------------ hooks
    def on_step(self, controller: Any) -> None:
        """Append the controller's newest history record (rewrite the file if it does not match)."""
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        self._last_dendrites = controller.dendrites
        self._last_accepted = controller.accepted_dendrites
        if not self._main:
            return
        history = controller.history
        record = history[-1]
        header = [*record.keys(), "seconds"]
        row = self._format(record, header, seconds)
        if self._continues(history, header) and self.history_path.is_file():
            self._append([row])
            self._rows.append(row)
        else:
            self._rewrite(history, header, row)
        self._header = header
        self._verified = True
        events = [e for e in str(record.get("event") or "").split(",") if e and e not in _QUIET_EVENTS]
        phase_change = len(history) < 2 or history[-2].get("phase") != record.get("phase")
        if events or phase_change or controller.done or now - self._last_summary >= _SUMMARY_EVERY_S:
            self._write_summary(controller)

    def on_finish(self, controller: Any) -> None:
        """Record the end of training by ``Controller.finish`` (its keep / revert decision)."""
        events = ["finish"]
        if self._last_dendrites is not None:
            if controller.dendrites < self._last_dendrites:
                events.append("reverted")
            elif self._last_accepted is not None and self._last_accepted < controller.dendrites:
                events.append("kept")
        events.append("done")
        self._finish_events = events
        self._finish_epoch = controller.epoch
        if self._main:
            self._write_summary(controller)

    # ------------------------------------------------------------------ history.csv
    @staticmethod
    def _format(record: dict[str, Any], header: Sequence[str], seconds: float | None) -> list[str]:
        return [_cell(record.get(c)) for c in header[:-1]] + [_cell(seconds)]

    def _continues(self, history: Sequence[dict[str, Any]], header: list[str]) -> bool:
        """Does the file hold exactly the history's records before the newest one? (An absent
        or unreadable file does not: it is written anew.)"""
        if self._header != header or len(self._rows) != len(history) - 1:
            return False
        if not self._rows:
            return True
        check = range(len(self._rows)) if not self._verified else [len(self._rows) - 1]
        return all(self._rows[i][:-1] == self._format(history[i], header, None)[:-1] for i in check)

    def _rewrite(self, history: Sequence[dict[str, Any]], header: list[str], row: list[str]) -> None:
        old: dict[tuple[str, ...], str] = {}
        if self._header == header:  # keep the measured seconds of the epochs that still match
            old = {tuple(r[:-1]): r[-1] for r in self._rows}
        rows = []
        for record in history[:-1]:
            cells = self._format(record, header, None)
            cells[-1] = old.get(tuple(cells[:-1]), "")
            rows.append(cells)
        rows.append(row)
        atomic_write(self.history_path, _csv_text([header, *rows]))
        self._rows = rows

    def _append(self, lines: list[list[str]]) -> None:
        with open(self.history_path, "a", encoding="utf-8", newline="") as f:
            f.write(_csv_text(lines))
            f.flush()

    # ------------------------------------------------------------------ summary.json
    def _parsed_rows(self) -> list[dict[str, Any]]:
        header = self._header or []
        return [{c: _parse(c, v) for c, v in zip(header, row, strict=True)} for row in self._rows]

    def summary(self, controller: Any) -> dict[str, Any]:
        """The summary.json content for the current state of ``controller``."""
        from apical.dendrites.model import parameter_count

        rows = self._parsed_rows()
        seconds: dict[str, float] = {"neuron": 0.0, "dendrite": 0.0}
        for row in rows:
            if isinstance(row.get("seconds"), (int, float)):
                seconds[str(row.get("phase"))] = seconds.get(str(row.get("phase")), 0.0) + row["seconds"]
        seconds["total"] = sum(seconds.values())
        events = _events_of(rows)
        if self._finish_events:
            last = rows[-1] if rows else {}
            events += [{"epoch": self._finish_epoch, "event": e, "score": last.get("score"),
                        "dendrites": controller.dendrites, "parameters": parameter_count(controller.model)}
                       for e in self._finish_events]
        best = controller.accepted_score if controller.accepted_score is not None else controller.best
        return {
            "format": SUMMARY_FORMAT,
            "version": SUMMARY_VERSION,
            "mode": controller.config.mode,
            "maximize": controller.maximize,
            "best_score": best,
            "dendrites": controller.dendrites,
            "parameters": parameter_count(controller.model),
            "epochs": controller.epoch,
            "phase": controller.phase,
            "done": bool(controller.done),
            "seconds": {k: round(v, 6) for k, v in seconds.items()},
            "events": events,
            "architectures": _architectures(rows, self._finish_events, controller.maximize),
            "config": controller.config.to_dict(),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def _write_summary(self, controller: Any) -> None:
        text = json.dumps(_finite(self.summary(controller)), indent=2, allow_nan=False, default=str)
        atomic_write(self.summary_path, text + "\n")
        self._last_summary = time.perf_counter()


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------- plots
_COLOURS = {"kept": "tab:green", "reverted": "tab:red", "installed": "tab:blue", "added": "tab:purple",
            "training": "tab:gray", "done": "black"}


def _figure(width: float = 8.0, height: float = 4.5, dpi: int = 100):
    """A matplotlib Figure on its own Agg canvas (pyplot's global state is left alone)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install apical[plot]") from None
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _spans(rows: Sequence[dict[str, Any]], phase: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for row in rows:
        if row.get("phase") != phase:
            continue
        e = row["epoch"]
        if spans and spans[-1][1] == e - 1:
            spans[-1] = (spans[-1][0], e)
        else:
            spans.append((e, e))
    return spans


def plot_run(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``scores.png`` and ``architectures.png`` into ``run_dir``; return their paths.

    ``scores.png``: the validation score per epoch, dendrite phases shaded, installed / kept /
    reverted sets marked. ``architectures.png``: parameters against the best score of each
    architecture tried, kept and reverted ones distinguished. Reads only ``history.csv`` and
    ``summary.json``; needs matplotlib (``pip install apical[plot]``).
    """
    run_dir = Path(os.fspath(run_dir))
    rows = [r for r in read_history(run_dir) if isinstance(r.get("epoch"), int)]
    if not rows:
        raise ValueError(f"{str(run_dir / HISTORY_FILE)!r} holds no epochs yet")
    summary = read_summary(run_dir) or {}
    maximize = bool(summary.get("maximize", True))
    events = summary.get("events")
    if not isinstance(events, list):
        events = _events_of(rows)
    archs = summary.get("architectures")
    if not isinstance(archs, list):
        archs = _architectures(rows, maximize=maximize)
    paths = [run_dir / "scores.png", run_dir / "architectures.png"]
    _plot_scores(rows, events, summary, paths[0])
    _plot_architectures(archs, summary, paths[1])
    return paths


def _plot_scores(rows: list[dict[str, Any]], events: list[dict[str, Any]], summary: dict[str, Any],
                 path: Path) -> None:
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for i, (a, b) in enumerate(_spans(rows, "dendrite")):
        ax.axvspan(a - 0.5, b + 0.5, color="tab:orange", alpha=0.18, lw=0,
                   label="dendrite phase" if i == 0 else None)
    epochs = [r["epoch"] for r in rows]
    scores = [r.get("score") for r in rows]
    ax.plot(epochs, scores, color="tab:blue", lw=1.4, marker="o", ms=2.5, label="validation score", zorder=3)
    best = [(r["epoch"], r["best_score"]) for r in rows if isinstance(r.get("best_score"), (int, float))]
    if best:
        ax.plot(*zip(*best, strict=True), ls="none", marker="_", ms=6, color="tab:cyan",
                label="best of architecture", zorder=2)
    score_at = {r["epoch"]: r.get("score") for r in rows}
    seen: set[str] = set()

    def label(name: str) -> str | None:
        if name in seen:
            return None
        seen.add(name)
        return name

    for ev in events:
        kind, epoch = ev.get("event"), ev.get("epoch")
        if not isinstance(epoch, (int, float)):
            continue
        if kind in ("installed", "added"):
            ax.axvline(epoch + 0.5, color=_COLOURS[kind], ls="--", lw=1.2, label=label(f"dendrite set {kind}"))
        elif kind in ("kept", "reverted"):
            y = ev.get("score") if ev.get("score") is not None else score_at.get(epoch)
            ax.axvline(epoch, color=_COLOURS[kind], ls=":", lw=1.0, alpha=0.8)
            ax.plot([epoch], [y], ls="none", marker="^" if kind == "kept" else "X", ms=10,
                    color=_COLOURS[kind], markeredgecolor="black", zorder=5, label=label(f"set {kind}"))
    corr = [(r["epoch"], r["correlation"]) for r in rows if isinstance(r.get("correlation"), (int, float))]
    if corr:
        ax2 = ax.twinx()
        ax2.plot(*zip(*corr, strict=True), ls="none", marker=".", ms=3, color="tab:brown", alpha=0.6)
        ax2.set_ylabel("mean candidate correlation", color="tab:brown")
        ax2.tick_params(axis="y", colors="tab:brown")
        ax.plot([], [], ls="none", marker=".", color="tab:brown", label="candidate correlation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation score")
    ax.set_xlim(min(epochs) - 1, max(epochs) + 1)
    ax.grid(alpha=0.3)
    ax.set_title(_title(summary, rows), fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=100)


def _title(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    mode = summary.get("mode", "?")
    best = summary.get("best_score")
    state = "done" if summary.get("done") else "running"
    parts = [f"mode {mode}", f"{summary.get('epochs', len(rows))} epochs ({state})"]
    if isinstance(best, (int, float)):
        parts.append(f"best {best:.4g}")
    if "dendrites" in summary:
        parts.append(f"{summary['dendrites']} dendrite set(s), {summary.get('parameters')} parameters")
    return ", ".join(parts)


def _plot_architectures(archs: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    points = [a for a in archs if isinstance(a, dict) and isinstance(a.get("best_score"), (int, float))
              and isinstance(a.get("parameters"), (int, float))]
    kept = [a for a in points if a.get("outcome") == "kept"]
    if len(kept) > 1:
        ax.plot([a["parameters"] for a in kept], [a["best_score"] for a in kept], color=_COLOURS["kept"],
                lw=1, alpha=0.6, zorder=1)
    styles = {"kept": ("o", "kept"), "reverted": ("X", "reverted"), "training": ("s", "undecided")}
    for outcome, (marker, name) in styles.items():
        group = [a for a in points if a.get("outcome") == outcome]
        if group:
            ax.scatter([a["parameters"] for a in group], [a["best_score"] for a in group], s=90, marker=marker,
                       color=_COLOURS[outcome], edgecolors="black", zorder=3, label=name)
    final = kept[-1] if kept and summary.get("done") else None
    if final is not None:
        ax.scatter([final["parameters"]], [final["best_score"]], s=300, marker="o", facecolors="none",
                   edgecolors=_COLOURS["kept"], linewidths=2, zorder=2, label="final network")
    stacked: dict[Any, int] = {}
    for a in points:  # labels of architectures with the same parameter count are stacked
        k = stacked[a["parameters"]] = stacked.get(a["parameters"], -1) + 1
        text = f"{a.get('dendrites')} set(s), epochs {a.get('first_epoch')}-{a.get('last_epoch')}"
        ax.annotate(text, (a["parameters"], a["best_score"]), textcoords="offset points",
                    xytext=(9, 6 - 12 * k), fontsize=8, va="center")
    if not points:
        ax.text(0.5, 0.5, "no architecture has a neuron-phase score yet", ha="center", va="center",
                transform=ax.transAxes)
    ax.margins(x=0.25, y=0.25)
    ax.set_xlabel("parameters")
    ax.set_ylabel("best validation score")
    ax.grid(alpha=0.3)
    if points:
        ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"architectures tried (mode {summary.get('mode', '?')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
