"""``apical inspect``: describe a checkpoint written by :func:`apical.save` from the file alone."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apical.record import _QUIET_EVENTS

_CONV = {3: "Conv1d", 4: "Conv2d", 5: "Conv3d"}
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_CANDIDATES = ("candidate_weight", "candidate_bias", "candidate_cascade", "candidate_proj")


def _kind(tensors: dict[str, Any], dendritic: bool) -> str:
    # a dendritic layer's full sets: [D, O, *tail]; a low-rank layer's projection [D, g * r, *tail]
    w = tensors.get(("dendrite_proj" if "dendrite_proj" in tensors else "dendrite_weight") if dendritic else "weight")
    shape = tuple(getattr(w, "shape", ()))
    if dendritic:
        return "Dendritic" + ("Linear" if len(shape) == 3 else _CONV.get(len(shape) - 1, "?"))
    if "running_mean" in tensors:
        return "BatchNorm"
    if "in_proj_weight" in tensors or "q_proj_weight" in tensors:
        return "MultiheadAttention"
    if len(shape) == 2:
        return "Linear" if "bias" in tensors else "Linear/Embedding"
    if len(shape) in _CONV:
        return _CONV[len(shape)]
    if len(shape) == 1:
        return "Norm"
    return "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) if r else str(c).ljust(w)
                         for c, w, r in zip(cells, widths, right, strict=True)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *[line(r) for r in rows]]


def inspect_text(checkpoint_path: str | os.PathLike[str]) -> str:
    """A description of an apical checkpoint, read from the file alone (no model class needed).

    Layers (name, type inferred from the tensor shapes, neurons, dendrite sets, parameters),
    the total parameter count (candidates and BatchNorm running statistics excluded, as
    :func:`apical.parameter_count` does), the configuration and the controller's history: its
    counters and every phase change. Raises :class:`apical.CheckpointError` for a file that is
    not a valid checkpoint.
    """
    from apical.checkpoint import _JSON_KEYS, CheckpointError, _Invalid, _json_loads, _read, _sentence, _unpack

    path = Path(os.fspath(checkpoint_path))
    try:
        metadata, tensors = _read(path)
        used: set[str] = set()
        sections = {k: _unpack(_json_loads(metadata[k]), tensors, used) for k in _JSON_KEYS}
    except _Invalid as err:
        raise CheckpointError(f"checkpoint {str(path)!r} {_sentence(err)}") from None
    except (ValueError, TypeError, RecursionError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is malformed ({type(err).__name__}: {err})") from None
    record = sections["structure"] if isinstance(sections["structure"], dict) else {}
    state = sections["model"] if isinstance(sections["model"], dict) else {}
    config = sections["config"] if isinstance(sections["config"], dict) else {}
    by_length = sorted(record, key=len, reverse=True)

    modules: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        owner = next((n for n in by_length if key.startswith(n + ".")), None)
        if owner is None:
            owner, _, attr = key.rpartition(".")
        else:
            attr = key[len(owner) + 1:]
        modules.setdefault(owner, {})[attr] = value

    rows, total, candidates = [], 0, 0
    for name, entries in modules.items():
        dendritic = name in record
        params = 0
        for attr, t in entries.items():
            numel = int(t.numel()) if hasattr(t, "numel") else 0
            if attr in _CANDIDATES:
                candidates += numel
            elif attr.rsplit(".", 1)[-1] not in _BUFFERS:
                params += numel
        total += params
        w = entries.get("dendrite_weight" if dendritic else "weight")  # a dendritic layer's: [D, O, ...]
        axis = 1 if dendritic else 0
        neurons = str(int(w.shape[axis])) if getattr(w, "dim", lambda: 0)() > axis else "-"
        if dendritic:
            entry = record[name]
            dend = str(entry.get("dendrites"))
            if entry.get("candidates"):
                dend += f" (+{entry['candidates']} candidates)"
        else:
            dend = "-"
        rows.append((name or "(root)", _kind(entries, dendritic), neurons, dend, str(params)))

    out = [f"checkpoint {path}",
           f"  written by apical {metadata.get('apical_version')} with torch {metadata.get('torch_version')}"]
    if config:
        keys = ("mode", "activation", "candidates", "max_dendrites", "patience", "max_tries", "seed")
        out.append("  config: " + ", ".join(f"{k}={config[k]!r}" for k in keys if k in config))
    out += ["", "layers (types inferred from tensor shapes):"]
    out += ["  " + line for line in _table(("name", "type", "neurons", "dendrites", "parameters"), rows,
                                            (False, False, True, True, True))]
    out.append("")
    dendrites = max((e.get("dendrites", 0) for e in record.values() if isinstance(e, dict)), default=0)
    out.append(f"total parameters: {total}" + (f" (+{candidates} candidate parameters)" if candidates else ""))
    out.append(f"dendritic layers: {len(record)}, dendrite sets installed: {dendrites}")
    if sections["optimizer"]:
        out.append(f"optimizer: {sections['optimizer'].get('class')}")
    extra = sections["extra"] if isinstance(sections["extra"], dict) else {}
    if extra:
        shown = ", ".join(f"{k}={v!r}" if isinstance(v, (int, float, str, bool)) and len(repr(v)) < 30 else k
                          for k, v in extra.items())
        out.append(f"extra: {shown}")
    out += _coverage_lines(metadata.get("coverage"))
    out.append("")
    out += _controller_lines(sections["controller"])
    return "\n".join(out)


def _coverage_lines(text: str | None) -> list[str]:
    """The coverage report saved with the checkpoint: a summary and the layer modules left out."""
    from apical.checkpoint import _json_loads
    from apical.dendrites.coverage import Coverage

    if text is None:
        return ["coverage: not recorded (a checkpoint of an older apical)"]
    try:
        report = Coverage.from_rows(_json_loads(text))
    except (ValueError, TypeError):
        return ["coverage: unreadable"]
    out = [f"coverage: {report.summary()}"]
    left = report.left_out
    if left:
        rows = [(e.name, e.kind, f"{e.parameters:,}", e.reason) for e in left[:20]]
        out += ["  " + line for line in _table(("left out", "type", "parameters", "reason"), rows,
                                                (False, False, True, False))]
        if len(left) > 20:
            out.append(f"  ... and {len(left) - 20} more")
    return out


def _controller_lines(ctl: Any) -> list[str]:
    if not isinstance(ctl, dict):
        return ["controller: not saved (model only)"]
    counters = ctl.get("counters") or {}
    history = [h for h in ctl.get("history") or [] if isinstance(h, dict)]
    state = "done" if counters.get("done") else f"{counters.get('phase')} phase"
    out = [f"controller: epoch {counters.get('epoch')}, {state}, {counters.get('dendrites')} dendrite set(s), "
           f"accepted score {_num(counters.get('accepted_score'))}, best score {_num(counters.get('best'))}"
           f" ({'maximize' if ctl.get('maximize') else 'minimize'})"]
    changes = []
    for h in history:
        events = [e for e in str(h.get("event") or "").split(",") if e and e not in _QUIET_EVENTS]
        if events:
            changes.append((str(h.get("epoch")), h.get("phase", ""), ", ".join(events), _num(h.get("score")),
                            str(h.get("dendrites")), str(h.get("parameters"))))
    if not history:
        out.append("history: empty")
    elif not changes:
        out.append(f"history: {len(history)} epoch(s), no phase change yet")
    else:
        out.append(f"history: {len(history)} epoch(s); phase changes:")
        out += ["  " + line for line in _table(("epoch", "phase", "events", "score", "dendrites", "parameters"),
                                                changes, (True, False, False, True, True, True))]
    if counters.get("done") and history and "done" not in str(history[-1].get("event")):
        out.append(f"ended by Controller.finish() after epoch {counters.get('epoch')} "
                   f"({counters.get('dendrites')} dendrite set(s) kept)")
    return out


def _num(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"
