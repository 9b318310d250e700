"""Checkpoints that resume training exactly and are safe to load from an untrusted source.

Format
------
One `safetensors <https://github.com/huggingface/safetensors>`_ file. Every tensor (the model's
state, the controller's best/accepted snapshots and dendrite-phase snapshot, the candidates'
running correlation statistics, the controller's generator state, the optimiser's state and any
tensor in ``extra``) is a named entry of the file under a namespace (``model/...``,
``controller/...``, ``stats/...``, ``optimizer/...``, ``extra/...``). Everything else is JSON, one
string per entry of the safetensors ``__metadata__``:

``format`` (``"apical.checkpoint"``), ``format_version`` (``"1"``), ``apical_version``,
``torch_version``, ``structure`` (the growth record, :func:`apical.structure`), ``config`` (the
:class:`DendriteConfig`, ``to_dict()``), ``layers`` (per dendritic layer: activation, normaliser,
centring), ``model``, ``controller``, ``stats``, ``optimizer``, ``extra``, ``coverage`` (the rows of
:func:`apical.coverage`, for ``apical inspect``; absent from files of apical before it) and ``sha256``.

Inside the JSON a tensor is written ``{"__tensor__": "<entry name>"}``; tuples, dicts whose keys
are not plain strings (the optimiser's integer parameter ids) and non-finite floats have tags of
the same form (``__tuple__``, ``__dict__``, ``__float__``), so that values come back with their
types. ``sha256`` is a digest of every other metadata entry and of every tensor (name, dtype,
shape and bytes), so a truncated, corrupted or edited file is refused before anything is read
into the model. (A checksum detects damage; it does not authenticate the writer, which is why
every value is also validated against the model.)

Why a single safetensors file rather than a directory: one file is replaced atomically with
``os.replace`` (a directory cannot be), safetensors holds raw little-endian tensor bytes behind
a JSON header, so loading needs no ``pickle`` and cannot run code, and the file opens with any
safetensors reader (the model weights are the ``model/`` entries).

Writes are atomic: the file is written to a temporary file in the same directory, flushed and
``fsync``-ed, moved over the target with ``os.replace`` and the directory is ``fsync``-ed; a
crash in the middle of :func:`save` leaves the previous checkpoint as it was (and, at worst, a
``.<name>.*.tmp`` file beside it).

Resume recipe (same code as a fresh start, plus one call)::

    model = Net()
    cfg = apical.DendriteConfig(mode="pb", seed=0)
    apical.perforate(model, cfg)
    ctl = apical.Controller(model, cfg, maximize=True)
    opt = torch.optim.Adam(ctl.parameters(), lr=1e-3)
    if resume:
        extra = apical.load(path, model, ctl, opt)   # model, controller and optimiser restored
    for epoch in range(start, epochs):
        ...train, score...
        step = ctl.step(score)
        if step.restructured:
            opt = torch.optim.Adam(ctl.parameters(), lr=1e-3)
        apical.save(path, model, ctl, opt, extra={"epoch": epoch + 1})

For inference only, ``apical.load(path, Net())`` perforates the fresh model with the saved
configuration, replays the growth record and loads the weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import os
import re
import stat
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from apical._io import atomic_write
from apical.dendrites.config import ACTIVATIONS, CENTRING, NORMALISERS, DendriteConfig
from apical.dendrites.controller import _COUNTERS, STATE_VERSION, Controller
from apical.dendrites.correlation import CorrelationStats
from apical.dendrites.coverage import coverage
from apical.dendrites.layer import DendriticLayer
from apical.dendrites.model import (
    PerforationError,
    apply_structure,
    dendritic_layers,
    perforate,
    planned_layers,
    roots_for,
    structure,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "CheckpointError", "load", "save"]

FORMAT = "apical.checkpoint"
FORMAT_VERSION = 1

_JSON_KEYS = ("structure", "config", "layers", "model", "controller", "stats", "optimizer", "extra")
_META_KEYS = ("format", "format_version", "apical_version", "torch_version", *_JSON_KEYS, "sha256")
# entries a file may lack (written by an older apical); read only by ``apical inspect``
_OPTIONAL_META_KEYS = ("coverage",)
_DENDRITE_ATTRS = ("dendrite_weight", "dendrite_bias", "dendrite_cascade", "dendrite_out", "dendrite_proj")
_CANDIDATE_ATTRS = ("candidate_weight", "candidate_bias", "candidate_cascade", "candidate_proj")
_LAYER_INFO = ("activation", "normaliser", "centring")
_STAT_FIELDS = ("shift_a", "shift_d", *CorrelationStats.FIELDS)
_TAGS = ("__tensor__", "__float__", "__tuple__", "__dict__")
# torch optimisers whose every non-scalar state tensor has its parameter's shape
_ELEMENTWISE = {
    f"torch.optim.{n.lower()}.{n}" for n in (
        "SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "ASGD", "Rprop",
    )
}


class CheckpointError(ValueError):
    """A checkpoint cannot be written, or a file is not a valid checkpoint for this model.

    Raised before anything in memory (model, controller, optimiser) has changed.
    """


# ---------------------------------------------------------------------------------- encoding
class _Packer:
    """Turns nested Python values into JSON with references to a flat table of tensors."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}
        self._views: dict[tuple, str] = {}
        self._storages: set[int] = set()

    def tensor(self, t: Tensor, path: str) -> str:
        t = t.detach()
        sig = None
        if t.numel():
            sig = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
                   t.dtype)
            if sig in self._views:  # the same view twice (tied weights, a shared snapshot): store once
                return self._views[sig]
        out = t.to("cpu").contiguous()
        if out.numel():
            ptr = out.untyped_storage().data_ptr()
            if ptr in self._storages:  # overlaps another stored tensor: safetensors needs its own copy
                out = out.clone()
                ptr = out.untyped_storage().data_ptr()
            self._storages.add(ptr)
        key, n = path, 1
        while key in self.tensors:
            n += 1
            key = f"{path}#{n}"
        self.tensors[key] = out
        if sig is not None:
            self._views[sig] = key
        return key

    def encode(self, obj: Any, path: str) -> Any:
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return float(obj) if math.isfinite(obj) else {"__float__": repr(float(obj))}
        if isinstance(obj, Tensor):
            return {"__tensor__": self.tensor(obj, path)}
        if isinstance(obj, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: self.encode(v, f"{path}/{k}") for k, v in obj.items()}
            for k in obj:
                if _holds_tensor(k):
                    raise CheckpointError(f"cannot save {path!r}: a dict key holds a tensor ({type(k).__name__}); "
                                          "keys must be None, bool, int, float, str or tuples of them")
            return {"__dict__": [[self.encode(k, f"{path}/key"), self.encode(v, f"{path}/{k}")]
                                 for k, v in obj.items()]}
        if isinstance(obj, list):
            return [self.encode(v, f"{path}/{i}") for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return {"__tuple__": [self.encode(v, f"{path}/{i}") for i, v in enumerate(obj)]}
        raise CheckpointError(
            f"cannot save {path!r}: a {type(obj).__name__} is neither a tensor nor a JSON value "
            "(None, bool, int, float, str, list, tuple, dict)"
        )


def _holds_tensor(key: Any) -> bool:
    """A dict key that is a tensor or a tuple holding one (a load could not rebuild it)."""
    return isinstance(key, Tensor) or isinstance(key, tuple) and any(_holds_tensor(k) for k in key)


def _unpack(obj: Any, tensors: dict[str, Tensor], used: set[str]) -> Any:
    """Inverse of :meth:`_Packer.encode`; raises ValueError on anything malformed."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [_unpack(v, tensors, used) for v in obj]
    if not isinstance(obj, dict):
        raise ValueError(f"unexpected JSON value of type {type(obj).__name__}")
    if not any(k.startswith("__") for k in obj):
        return {k: _unpack(v, tensors, used) for k, v in obj.items()}
    if len(obj) != 1 or next(iter(obj)) not in _TAGS:
        raise ValueError(f"unknown tagged value with keys {sorted(obj)[:3]}")
    tag, val = next(iter(obj.items()))
    if tag == "__tensor__":
        if not isinstance(val, str) or val not in tensors:
            raise ValueError(f"reference to a tensor {val!r} that the file does not hold")
        used.add(val)
        return tensors[val]
    if tag == "__float__":
        if val not in ("nan", "inf", "-inf"):
            raise ValueError(f"bad float tag {val!r}")
        return float(val)
    if not isinstance(val, list):
        raise ValueError(f"{tag} needs a list")
    if tag == "__tuple__":
        return tuple(_unpack(v, tensors, used) for v in val)
    out: dict = {}
    for pair in val:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ValueError("__dict__ entries must be [key, value] pairs")
        key = _unpack(pair[0], tensors, used)
        if isinstance(key, (list, dict)) or _holds_tensor(key) or key in out:
            raise ValueError(f"bad or repeated dict key {key!r}")
        out[key] = _unpack(pair[1], tensors, used)
    return out


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"repeated JSON key {k!r}")
        out[k] = v
    return out


def _json_loads(text: str | bytes) -> Any:
    """Strict JSON: no NaN/Infinity, no overflowing numbers, no repeated keys."""
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float,
                      object_pairs_hook=_unique_keys)


def _json_dumps(obj: Any) -> str:
    return json.dumps(obj, allow_nan=False, separators=(",", ":"), ensure_ascii=True)


def _digest(metadata: Mapping[str, str], tensors: Mapping[str, Tensor]) -> str:
    """sha256 over every metadata entry but ``sha256`` and every tensor's name, dtype, shape, bytes."""
    h = hashlib.sha256()

    def put(data: bytes | memoryview) -> None:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    put(f"{FORMAT}/digest/1".encode())
    for key in sorted(metadata):
        if key != "sha256":
            put(key.encode())
            put(metadata[key].encode())
    for key in sorted(tensors):
        t = tensors[key]
        put(key.encode())
        put(f"{t.dtype}{tuple(t.shape)}".encode())
        put(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


# ---------------------------------------------------------------------------------- save
def _layer_info(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {
        name: {"activation": layer.activation, "normaliser": layer.normaliser, "centring": layer.centring,
               **({} if layer.rank is None else {"rank": layer.rank})}
        for name, layer in dendritic_layers(model)
    }


def _config_for(model: nn.Module, controller: Controller | None) -> DendriteConfig:
    if controller is not None:
        return controller.config
    layers = dendritic_layers(model)
    if not layers:
        return DendriteConfig(mode="none")
    first = layers[0][1]
    return DendriteConfig(
        mode="pb" if first.perforated else "gd", activation=first.activation, normaliser=first.normaliser,
        centring=first.centring, candidate_lr_scale=first.candidate_scale, dendrite_rank=first.rank,
        include=[re.escape(name) for name, _ in layers],  # names, not patterns: "fc.1" must not match "fcx1"
    )


def save(path: str | os.PathLike, model: nn.Module, controller: Controller | None = None,
         optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None) -> None:
    """Write a checkpoint of ``model`` (and of ``controller``, ``optimizer``) to ``path``, atomically.

    ``extra`` is returned by :func:`load`: a dict with string keys whose values are JSON values
    (None, bool, int, float, str, lists, tuples, dicts) or tensors, at any depth; e.g. the epoch,
    an LR scheduler's ``state_dict()``, ``torch.get_rng_state()`` or a data generator's state.

    Save between epochs (after ``controller.step``) for an exact resume; the candidates' running
    correlation statistics are saved too, so a save in the middle of a dendrite-phase epoch
    resumes exactly as well, provided the data loader also resumes at the same batch.

    The optimiser's parameters must belong to ``model``; they are recorded by name.
    Raises :class:`CheckpointError` when something cannot be stored; the previous file at
    ``path`` is then left as it was.
    """
    import apical  # late: apical/__init__ imports this module

    path = Path(os.fspath(path))
    if path.is_dir():
        raise CheckpointError(f"cannot save to {str(path)!r}: it is a directory; give a file name")
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot save to {str(path)!r}: directory {str(path.parent)!r} does not exist")
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"save expects an nn.Module, got {type(model).__name__}")
    if controller is not None and controller.model is not model:
        raise CheckpointError("the controller drives another model than the one given to save")
    if extra is not None and not (isinstance(extra, Mapping) and all(isinstance(k, str) for k in extra)):
        raise CheckpointError("extra must be a dict with string keys")

    packer = _Packer()
    record = structure(model)
    model_json = packer.encode(model.state_dict(), "model")
    controller_json = None
    if controller is not None:
        controller_json = packer.encode(controller.state_dict(), "controller")
    stats_json: dict[str, Any] = {}
    for name, layer in dendritic_layers(model):
        stats = layer.stats
        if stats is not None and not stats.empty:
            entry = {"n": float(stats.n)}
            entry.update({f: packer.encode(getattr(stats, f), f"stats/{name}/{f}") for f in _STAT_FIELDS})
            stats_json[name] = entry
    optimizer_json = None
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        groups = []
        for i, group in enumerate(optimizer.param_groups):
            missing = [j for j, p in enumerate(group["params"]) if id(p) not in names]
            if missing:
                raise CheckpointError(
                    f"optimizer group {i} holds a parameter (index {missing[0]}) that is not a parameter of "
                    "the model; build the optimiser from controller.parameters() or model.parameters()"
                )
            groups.append([names[id(p)] for p in group["params"]])
        optimizer_json = {
            "class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
            "names": groups,
            "state_dict": packer.encode(optimizer.state_dict(), "optimizer"),
        }
    extra_json = packer.encode(dict(extra or {}), "extra")

    try:
        config_json = _json_dumps(_config_for(model, controller).to_dict())
    except ValueError as err:  # a field set to inf / nan after the config was validated
        raise CheckpointError(f"cannot save {os.fspath(path)!r}: the configuration holds a value JSON cannot "
                              f"store ({err}); DendriteConfig fields must be finite") from None
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "apical_version": str(apical.__version__),
        "torch_version": str(torch.__version__),
        "structure": _json_dumps(record),
        "config": config_json,
        "layers": _json_dumps(_layer_info(model)),
        "model": _json_dumps(model_json),
        "controller": _json_dumps(controller_json),
        "stats": _json_dumps(stats_json),
        "optimizer": _json_dumps(optimizer_json),
        "extra": _json_dumps(extra_json),
        "coverage": _json_dumps(coverage(model, controller.config if controller is not None else None).to_rows()),
    }
    metadata["sha256"] = _digest(metadata, packer.tensors)
    atomic_write(path, safetensors.torch.save(packer.tensors, metadata=metadata))


# ---------------------------------------------------------------------------------- read
class _Invalid(Exception):
    """Internal: a validation failure, turned into CheckpointError with the file name."""


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _read(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Read, parse and checksum the file: metadata strings and tensors."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise _Invalid("does not exist") from None
    except OSError as err:
        raise _Invalid(f"cannot be read ({err.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise _Invalid("is a directory, not a checkpoint file")
    if not stat.S_ISREG(info.st_mode):
        raise _Invalid("is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise _Invalid(f"cannot be read ({err.strerror})") from None
    if not data:
        raise _Invalid("is empty")
    if len(data) < 8:
        raise _Invalid(f"is not a safetensors file ({len(data)} bytes, too short for a header)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise _Invalid(f"is truncated or not a safetensors file (header of {n} bytes, file of {len(data)})")
    try:
        header = _json_loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _Invalid(f"is not a safetensors file (unreadable header: {err})") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise _Invalid("is not an apical checkpoint (no safetensors metadata)")
    metadata = header.pop("__metadata__")
    if not all(isinstance(v, str) for v in metadata.values()):
        raise _Invalid("has non-string metadata values")
    end = 0
    for key, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise _Invalid(f"has a malformed header entry for tensor {key!r}")
        end = max(end, offsets[1])
    if 8 + n + end != len(data):
        what = "truncated" if 8 + n + end > len(data) else "longer than its header says"
        raise _Invalid(f"is {what} ({len(data)} bytes, the header describes {8 + n + end})")
    if metadata.get("format") != FORMAT:
        raise _Invalid(f"is not an apical checkpoint (format {metadata.get('format')!r}, expected {FORMAT!r})")
    version = metadata.get("format_version")
    if not (isinstance(version, str) and version.isascii() and version.isdigit() and len(version) < 10):
        raise _Invalid(f"has an invalid format_version {version!r}")
    if int(version) != FORMAT_VERSION:
        newer = " (written by a newer apical: upgrade apical)" if int(version) > FORMAT_VERSION else ""
        raise _Invalid(f"has format version {int(version)}; this apical reads version {FORMAT_VERSION}{newer}")
    missing = [k for k in _META_KEYS if k not in metadata]
    if missing:
        raise _Invalid(f"has no {missing[0]!r} metadata entry")
    unknown = sorted(set(metadata) - set(_META_KEYS) - set(_OPTIONAL_META_KEYS))
    if unknown:
        raise _Invalid(f"has an unknown metadata entry {unknown[0]!r}")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as err:  # the parser's own error type varies across safetensors versions
        raise _Invalid(f"is not a valid safetensors file ({type(err).__name__}: {err})") from None
    digest = metadata["sha256"]
    if not hmac.compare_digest(_digest(metadata, tensors).encode(), str(digest).encode()):
        raise _Invalid("is corrupt or was modified (sha256 checksum mismatch)")
    return metadata, tensors


# ---------------------------------------------------------------------------------- validation
def _int(value: Any, what: str, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise _Invalid(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _opt_number(value: Any, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Invalid(f"{what} must be a finite number or null, got {value!r}")


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """A dendritic layer's shape: ``O`` neurons reading ``tail``; low-rank sets (``rank``) project
    to ``rows`` features (``rank`` per group of the wrapped op)."""

    o: int
    tail: tuple[int, ...]
    rank: int | None = None
    rows: int = 0


def _layer_shapes(geo: _Geometry, d: int, c: int) -> dict[str, tuple[int, ...]]:
    """Shapes of a dendritic layer's own tensors with d installed and c candidate sets, in the
    layer's state-dict order."""
    o, inputs = geo.o, geo.tail if geo.rank is None else (geo.rank,)
    shapes = {"dendrite_weight": (d, o, *inputs), "dendrite_bias": (d, o), "dendrite_cascade": (d, d, o),
              "dendrite_out": (d, o)}
    if c:
        shapes.update({"candidate_weight": (c, o, *inputs), "candidate_bias": (c, o),
                       "candidate_cascade": (c, d, o)})
    if geo.rank is not None:
        shapes["dendrite_proj"] = (d, geo.rows, *geo.tail)
        if c:
            shapes["candidate_proj"] = (1, geo.rows, *geo.tail)
    return shapes


@dataclasses.dataclass
class _Slot:
    """What the prepared model holds under one state-dict key."""

    shape: tuple[int, ...] | None  # None: not a tensor (extra state)
    dtype: torch.dtype | None
    device: torch.device | None
    layer: str | None = None  # dendritic layer owning a dendrite/candidate tensor
    attr: str | None = None


@dataclasses.dataclass
class _Plan:
    perforate_config: DendriteConfig | None
    record: dict[str, dict[str, int]]
    layer_info: dict[str, dict[str, str]]
    model_state: dict[str, Any]
    controller_state: dict[str, Any] | None
    stats: dict[str, dict[str, Any]]
    optimizer_names: list[list[str]] | None
    optimizer_state: dict[str, Any] | None
    extra: dict[str, Any]


def _check_record(record: Any) -> dict[str, dict[str, int]]:
    if not isinstance(record, dict):
        raise _Invalid("structure must be a JSON object")
    for name, entry in record.items():
        if not (isinstance(entry, dict) and set(entry) == {"dendrites", "candidates"}):
            raise _Invalid(f"structure entry for {name!r} must hold exactly 'dendrites' and 'candidates'")
        _int(entry["dendrites"], f"structure[{name!r}].dendrites")
        _int(entry["candidates"], f"structure[{name!r}].candidates")
    return record


def _check_layer_info(info: Any, record: dict) -> dict[str, dict[str, str]]:
    if not isinstance(info, dict) or set(info) != set(record):
        raise _Invalid("layers metadata does not name the same layers as the structure")
    for name, entry in info.items():
        if not (isinstance(entry, dict) and set(entry) - {"rank"} == set(_LAYER_INFO)):
            raise _Invalid(f"layers[{name!r}] must hold activation, normaliser and centring (and rank, if low-rank)")
        for key, choices in (("activation", ACTIVATIONS), ("normaliser", NORMALISERS), ("centring", CENTRING)):
            if entry[key] not in choices:
                raise _Invalid(f"layers[{name!r}].{key} is {entry[key]!r}, not one of {choices}")
        if "rank" in entry:
            _int(entry["rank"], f"layers[{name!r}].rank", minimum=1)
    return info


def _expected_model(model: nn.Module, record: dict[str, dict[str, int]], info: dict[str, dict[str, str]],
                    config_dict: dict) -> tuple[dict[str, _Slot], set[str], DendriteConfig | None]:
    """The state-dict layout the model will have once perforated and restructured as recorded.

    Returns the slots by key (in state-dict order), the parameter names, and the config to
    perforate with (None when the model is already perforated or nothing is recorded).
    """
    current = dict(dendritic_layers(model))
    perforate_config = None
    if current:
        if set(current) != set(record):
            only_model = [n for n in current if n not in record]
            only_file = [n for n in record if n not in current]
            raise _Invalid(
                f"the model's dendritic layers differ from the checkpoint's: model only {only_model[:3]}, "
                f"checkpoint only {only_file[:3]}"
            )
        for name, layer in current.items():
            if layer.activation != info[name]["activation"]:
                raise _Invalid(f"layer {name!r} uses activation {layer.activation!r}, the checkpoint's "
                               f"uses {info[name]['activation']!r}")
            if layer.rank != info[name].get("rank"):
                raise _Invalid(f"layer {name!r} has dendrite rank {layer.rank!r}, the checkpoint's "
                               f"{info[name].get('rank')!r}: perforate with the checkpoint's dendrite_rank")
        geometry = {n: (_Geometry(layer.out_channels, layer.weight_tail, layer.rank,
                                  layer.projection_groups * (layer.rank or 0)), layer.neuron_weight())
                    for n, layer in current.items()}
    elif record:
        activations = {entry["activation"] for entry in info.values()}
        data = dict(config_dict, include=[re.escape(n) for n in roots_for(model, record)], exclude=[])
        try:
            perforate_config = DendriteConfig.from_dict(data)
        except (ValueError, TypeError) as err:
            raise _Invalid(f"config is invalid: {err}") from None
        if activations != {perforate_config.activation}:
            raise _Invalid(f"layers use activations {sorted(activations)}, the config says "
                           f"{perforate_config.activation!r}: perforate the model as it was, then load")
        if isinstance(model, DendriticLayer):
            raise _Invalid("the model is itself a dendritic layer")
        try:
            planned = planned_layers(model, perforate_config)
        except PerforationError as err:
            raise _Invalid(f"the model cannot be perforated as recorded: {err}") from None
        if set(planned) != set(record):
            raise _Invalid(f"the model cannot be perforated as recorded (would wrap {sorted(planned)[:3]})")
        ranks = {entry.get("rank") for entry in info.values()}
        if ranks != {perforate_config.dendrite_rank}:
            raise _Invalid(f"layers use dendrite ranks {sorted(ranks, key=str)}, the config says "
                           f"{perforate_config.dendrite_rank!r}: perforate the model as it was, then load")
        geometry = {}
        for n in record:
            _, w = planned[n]
            rank = info[n].get("rank")
            try:  # a grouped convolution projects per group; so does a registered layer that is one
                groups = int(getattr(model.get_submodule(n), "groups", 1))
            except AttributeError:  # a layer made from part of its root (attention projections, recurrent gates)
                groups = 1
            geometry[n] = (_Geometry(int(w.shape[0]), tuple(int(s) for s in w.shape[1:]), rank,
                                     groups * (rank or 0)), w)
    else:
        geometry = {}
    by_length = sorted(record, key=len, reverse=True)

    def owner(key: str) -> str | None:
        return next((n for n in by_length if key.startswith(n + ".")), None)

    def rename(key: str) -> str:
        n = owner(key) if perforate_config is not None else None
        return key if n is None else f"{n}.base.{key[len(n) + 1:]}"

    slots: dict[str, _Slot] = {}
    seen: set[str] = set()
    for key, value in model.state_dict(keep_vars=True).items():
        n = owner(key)
        if n is not None and n not in seen:  # the layer's own tensors come first in state-dict order
            seen.add(n)
            geo, w = geometry[n]
            for attr, shape in _layer_shapes(geo, record[n]["dendrites"], record[n]["candidates"]).items():
                slots[f"{n}.{attr}"] = _Slot(shape, w.dtype, w.device, n, attr)
        if n is not None and key[len(n) + 1:] in (*_DENDRITE_ATTRS, *_CANDIDATE_ATTRS) and perforate_config is None:
            continue
        if isinstance(value, Tensor):
            slots[rename(key)] = _Slot(_shape(value), value.dtype, value.device)
        else:
            slots[rename(key)] = _Slot(None, None, None)
    for n in record:  # layers that own no tensor of the un-perforated model (attention projections)
        if n not in seen:
            geo, w = geometry[n]
            for attr, shape in _layer_shapes(geo, record[n]["dendrites"], record[n]["candidates"]).items():
                slots[f"{n}.{attr}"] = _Slot(shape, w.dtype, w.device, n, attr)
    params = {rename(k) for k, _ in model.named_parameters()}
    params |= {k for k, s in slots.items() if s.layer is not None}
    return slots, params, perforate_config


def _describe(slot: _Slot, record: dict) -> str:
    if slot.layer is None:
        return "the model needs"
    entry = record[slot.layer]
    return (f"the growth record ({entry['dendrites']} dendrites, {entry['candidates']} candidates in "
            f"{slot.layer!r}) needs")


def _check_tensor(key: str, value: Any, slot: _Slot, what: str, record: dict) -> None:
    if not isinstance(value, Tensor):
        raise _Invalid(f"{what} {key!r} is not a tensor")
    if _shape(value) != slot.shape:
        raise _Invalid(f"{what} {key!r} has shape {_shape(value)} but {_describe(slot, record)} {slot.shape}")
    if value.dtype != slot.dtype:
        raise _Invalid(f"{what} {key!r} has dtype {value.dtype} but the model's is {slot.dtype}")


def _check_model_state(state: Any, slots: dict[str, _Slot], record: dict) -> dict[str, Any]:
    if not isinstance(state, dict):
        raise _Invalid("model state must be a JSON object")
    # the wrapped modules' own tensors first: a model of another architecture is named as such
    for key, slot in sorted(slots.items(), key=lambda item: item[1].layer is not None):
        if key not in state:
            raise _Invalid(f"model key {key!r} is missing from the checkpoint (another architecture?)")
        if slot.shape is not None:
            _check_tensor(key, state[key], slot, "model tensor", record)
    for key in state:
        if key not in slots:
            raise _Invalid(f"the checkpoint holds {key!r}, which the model does not have (another architecture?)")
    return state


def _check_snapshot(label: str, snap: Any, slots: dict[str, _Slot], record: dict) -> None:
    """A weight snapshot of the controller: the model's keys without candidates, any dendrite count
    up to the recorded one."""
    if snap is None:
        return
    if not isinstance(snap, dict):
        raise _Invalid(f"controller {label} must be a JSON object")
    wanted = {k: s for k, s in slots.items() if s.attr not in _CANDIDATE_ATTRS}
    for key in snap:
        if key not in wanted:
            raise _Invalid(f"controller {label} holds {key!r}, which the model does not have")
    counts: dict[str, int] = {}
    for layer, entry in record.items():
        first = snap.get(f"{layer}.dendrite_weight")
        if not (isinstance(first, Tensor) and first.dim() >= 1):
            raise _Invalid(f"controller {label} has no dendrite weights for {layer!r}")
        counts[layer] = int(first.shape[0])
        if counts[layer] > entry["dendrites"]:
            raise _Invalid(f"controller {label} holds {counts[layer]} dendrites in {layer!r}, more than the "
                           f"{entry['dendrites']} recorded")
    for key, slot in wanted.items():
        if key not in snap:
            raise _Invalid(f"controller {label} has no {key!r}")
        if slot.shape is None:
            continue
        if slot.layer is not None:  # snapshots may predate the latest dendrite set
            geo = _geometry(slots, slot.layer)
            slot = dataclasses.replace(slot, shape=_layer_shapes(geo, counts[slot.layer], 0)[slot.attr])
        _check_tensor(key, snap[key], slot, f"controller {label} tensor", record)


def _check_controller(state: Any, controller: Controller, model: nn.Module, record: dict,
                      slots: dict[str, _Slot], perforating: bool, config_dict: dict) -> dict[str, Any]:
    if state is None:
        raise _Invalid("holds no controller state (it was saved without a controller)")
    if controller.model is not model:
        raise _Invalid("the controller drives another model than the one given to load")
    if perforating:
        raise _Invalid("the controller was created on the un-perforated model: call apical.perforate(model, "
                       "config) before creating the Controller, or load the model alone first")
    ours = [(n, id(layer)) for n, layer in controller.layers]
    if ours != [(n, id(layer)) for n, layer in dendritic_layers(model)] or {n for n, _ in ours} != set(record):
        raise _Invalid("the controller's dendritic layers are not the model's: create the Controller after "
                       "apical.perforate")
    if not isinstance(state, dict):
        raise _Invalid("controller state must be a JSON object")
    required = ("version", "config", "maximize", "counters", "history", "structure", "best_state",
                "accepted_state", "dp_snapshot", "generator")
    for key in required:
        if key not in state:
            raise _Invalid(f"controller state has no {key!r}")
    if state["version"] != STATE_VERSION:
        raise _Invalid(f"controller state version {state['version']!r} is not {STATE_VERSION}")
    if state["config"] != config_dict:
        raise _Invalid("controller config differs from the checkpoint's config")
    try:
        saved = DendriteConfig.from_dict(state["config"])
    except (ValueError, TypeError) as err:
        raise _Invalid(f"controller config is invalid: {err}") from None
    if saved.mode != controller.config.mode:
        raise _Invalid(f"controller state is for mode {saved.mode!r}, this controller runs "
                       f"{controller.config.mode!r}")
    if not isinstance(state["maximize"], bool):
        raise _Invalid("controller maximize must be true or false")
    counters = state["counters"]
    if not isinstance(counters, dict) or set(counters) != set(_COUNTERS):
        raise _Invalid("controller counters do not match this apical's")
    for key, value in counters.items():
        if key == "phase":
            if value not in ("neuron", "dendrite"):
                raise _Invalid(f"controller phase {value!r} is unknown")
        elif key == "done":
            if not isinstance(value, bool):
                raise _Invalid("controller counter 'done' must be true or false")
        elif key in ("best", "accepted_score", "dp_best"):
            _opt_number(value, f"controller counter {key!r}")
        elif key == "best_epoch":
            if value is not None:
                _int(value, "controller counter 'best_epoch'")
        else:
            _int(value, f"controller counter {key!r}")
    if state["structure"] != record:
        raise _Invalid("controller structure differs from the checkpoint's structure")
    most = max((e["dendrites"] for e in record.values()), default=0)
    if counters.get("dendrites") != most:
        raise _Invalid(f"controller counts {counters.get('dendrites')} dendrites, the structure holds {most}")
    dendrite_phase = counters["phase"] == "dendrite"
    for name, entry in record.items():
        if (entry["candidates"] > 0) != dendrite_phase:
            raise _Invalid(f"layer {name!r} holds {entry['candidates']} candidates in the "
                           f"{counters['phase']} phase")
    history = state["history"]
    if not (isinstance(history, list) and all(isinstance(h, dict) for h in history)):
        raise _Invalid("controller history must be a list of objects")
    _check_snapshot("best_state", state["best_state"], slots, record)
    _check_snapshot("accepted_state", state["accepted_state"], slots, record)
    snap = state["dp_snapshot"]
    if snap is not None:
        if not dendrite_phase:
            raise _Invalid("controller holds a dendrite-phase snapshot outside the dendrite phase")
        if not isinstance(snap, dict) or set(snap) != set(record):
            raise _Invalid("controller dp_snapshot does not name the dendritic layers")
        for name, fields in snap.items():
            geo = _geometry(slots, name)
            names = ["weight", "bias", "cascade", "scores", "signs", *(["proj"] if geo.rank is not None else [])]
            if not (isinstance(fields, dict) and set(fields) == set(names)):
                raise _Invalid(f"controller dp_snapshot[{name!r}] must hold {', '.join(names)}")
            shapes = _layer_shapes(geo, record[name]["dendrites"], record[name]["candidates"])
            dtype = slots[f"{name}.dendrite_weight"].dtype
            wanted = {"weight": (shapes["candidate_weight"], dtype), "bias": (shapes["candidate_bias"], dtype),
                      "cascade": (shapes["candidate_cascade"], dtype), "scores": (shapes["candidate_bias"],
                      torch.float64), "signs": (shapes["candidate_bias"], torch.float64)}
            if geo.rank is not None:
                wanted["proj"] = (shapes["candidate_proj"], dtype)
            for field, (shape, dt) in wanted.items():
                _check_tensor(field, fields[field], _Slot(shape, dt, None), f"controller dp_snapshot[{name!r}]",
                              record)
    gen = state["generator"]
    if gen is not None:
        if not (isinstance(gen, Tensor) and gen.dtype == torch.uint8 and gen.dim() == 1):
            raise _Invalid("controller generator state must be a 1-d uint8 tensor")
        try:
            torch.Generator().set_state(gen)
        except RuntimeError as err:
            raise _Invalid(f"controller generator state is invalid: {err}") from None
    return state


def _geometry(slots: dict[str, _Slot], layer: str) -> _Geometry:
    shape = slots[f"{layer}.dendrite_weight"].shape
    proj = slots.get(f"{layer}.dendrite_proj")
    if proj is None:
        return _Geometry(shape[1], shape[2:])
    return _Geometry(shape[1], proj.shape[2:], shape[2], proj.shape[1])


def _check_stats(stats: Any, record: dict, slots: dict[str, _Slot]) -> dict[str, dict[str, Any]]:
    if not isinstance(stats, dict):
        raise _Invalid("stats must be a JSON object")
    for name, entry in stats.items():
        if name not in record or record[name]["candidates"] == 0:
            raise _Invalid(f"stats for {name!r}, which holds no candidates")
        if not (isinstance(entry, dict) and set(entry) == {"n", *_STAT_FIELDS}):
            raise _Invalid(f"stats[{name!r}] must hold n and {list(_STAT_FIELDS)}")
        _opt_number(entry["n"], f"stats[{name!r}].n")
        if entry["n"] is None or entry["n"] <= 0:
            raise _Invalid(f"stats[{name!r}].n must be positive")
        o = _geometry(slots, name).o
        c = record[name]["candidates"]
        for field in _STAT_FIELDS:
            value = entry[field]
            shape = (o,) if field in ("shift_d", "s_d", "s_dd") else (c, o)
            if not (isinstance(value, Tensor) and value.is_floating_point() and _shape(value) == shape):
                raise _Invalid(f"stats[{name!r}].{field} must be a float tensor of shape {shape}")
            if field.startswith("s_") and value.dtype != torch.float64:
                raise _Invalid(f"stats[{name!r}].{field} must be float64")
    return stats


def _check_optimizer(entry: Any, optimizer: torch.optim.Optimizer, params: set[str],
                     slots: dict[str, _Slot]) -> tuple[list[list[str]], dict[str, Any]]:
    if entry is None:
        raise _Invalid("holds no optimizer state (it was saved without an optimizer)")
    if not (isinstance(entry, dict) and set(entry) == {"class", "names", "state_dict"}):
        raise _Invalid("optimizer entry must hold class, names and state_dict")
    cls = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
    if entry["class"] != cls:
        raise _Invalid(f"optimizer state is for {entry['class']!r}, the optimizer given is {cls!r}")
    names, sd = entry["names"], entry["state_dict"]
    if not (isinstance(names, list) and all(isinstance(g, list) and all(isinstance(n, str) for n in g)
                                            for g in names)):
        raise _Invalid("optimizer names must be lists of parameter names")
    if not (isinstance(sd, dict) and set(sd) == {"state", "param_groups"} and isinstance(sd["state"], dict)
            and isinstance(sd["param_groups"], list) and len(sd["param_groups"]) == len(names)):
        raise _Invalid("optimizer state_dict is malformed")
    flat: dict[int, str] = {}
    for i, (group, group_names) in enumerate(zip(sd["param_groups"], names, strict=True)):
        if not (isinstance(group, dict) and isinstance(group.get("params"), list)):
            raise _Invalid(f"optimizer param group {i} is malformed")
        if len(group["params"]) != len(group_names):
            raise _Invalid(f"optimizer param group {i} lists {len(group['params'])} ids for "
                           f"{len(group_names)} names")
        for pid, name in zip(group["params"], group_names, strict=True):
            if type(pid) is not int or pid in flat:
                raise _Invalid(f"optimizer param group {i} has a bad or repeated parameter id {pid!r}")
            if name not in params:
                raise _Invalid(f"optimizer state is for parameter {name!r}, which the model does not have")
            if name in flat.values():
                raise _Invalid(f"optimizer lists parameter {name!r} twice")
            flat[pid] = name
    elementwise = cls in _ELEMENTWISE
    for pid, values in sd["state"].items():
        if pid not in flat:
            raise _Invalid(f"optimizer state for parameter id {pid!r}, which no group lists")
        if not isinstance(values, dict):
            raise _Invalid(f"optimizer state for {flat[pid]!r} is malformed")
        shape = slots[flat[pid]].shape
        for key, value in values.items():
            if isinstance(value, Tensor):
                if not (value.is_floating_point() or value.is_complex()) and key != "step":
                    raise _Invalid(f"optimizer state {key!r} of {flat[pid]!r} has dtype {value.dtype}")
                if elementwise and value.dim() > 0 and _shape(value) != shape:
                    raise _Invalid(f"optimizer state {key!r} of {flat[pid]!r} has shape {_shape(value)}, the "
                                   f"parameter {shape}")
    return names, sd


def _plan(path: Path, model: nn.Module, controller: Controller | None,
          optimizer: torch.optim.Optimizer | None) -> _Plan:
    metadata, tensors = _read(path)
    sections: dict[str, Any] = {}
    used: set[str] = set()
    for key in _JSON_KEYS:
        try:
            sections[key] = _unpack(_json_loads(metadata[key]), tensors, used)
        except (ValueError, RecursionError) as err:
            raise _Invalid(f"metadata {key!r} is malformed: {err}") from None
    orphans = sorted(set(tensors) - used)
    if orphans:
        raise _Invalid(f"holds tensor {orphans[0]!r}, which nothing refers to")
    if not isinstance(sections["extra"], dict):
        raise _Invalid("extra must be a JSON object")
    record = _check_record(sections["structure"])
    info = _check_layer_info(sections["layers"], record)
    config_dict = sections["config"]
    if not isinstance(config_dict, dict):
        raise _Invalid("config must be a JSON object")
    try:
        DendriteConfig.from_dict(dict(config_dict, include=None, exclude=[]))
    except (ValueError, TypeError) as err:
        raise _Invalid(f"config is invalid: {err}") from None
    slots, params, perforate_config = _expected_model(model, record, info, config_dict)
    model_state = _check_model_state(sections["model"], slots, record)
    controller_state = None
    if controller is not None:
        controller_state = _check_controller(sections["controller"], controller, model, record, slots,
                                             perforate_config is not None, config_dict)
        controller_state = dict(controller_state)
        for label in ("best_state", "accepted_state"):  # back to the model's devices
            if controller_state[label] is not None:
                controller_state[label] = {
                    k: v.to(slots[k].device) if isinstance(v, Tensor) else v
                    for k, v in controller_state[label].items()
                }
        if controller_state["dp_snapshot"] is not None:
            controller_state["dp_snapshot"] = {
                name: {f: t.to(slots[f"{name}.dendrite_weight"].device) for f, t in fields.items()}
                for name, fields in controller_state["dp_snapshot"].items()
            }
    stats = _check_stats(sections["stats"], record, slots)
    names = sd = None
    if optimizer is not None:
        names, sd = _check_optimizer(sections["optimizer"], optimizer, params, slots)
    return _Plan(perforate_config, record, info, model_state, controller_state, stats, names, sd,
                 sections["extra"])


# ---------------------------------------------------------------------------------- load
def _apply(plan: _Plan, model: nn.Module, controller: Controller | None,
           optimizer: torch.optim.Optimizer | None) -> None:
    if plan.perforate_config is not None:
        perforate(model, plan.perforate_config)
    if controller is not None and plan.controller_state is not None:
        controller.load_state_dict(plan.controller_state)  # replays the structure
    elif structure(model) != plan.record:
        apply_structure(model, plan.record)
    layers = dict(dendritic_layers(model))
    for name, entry in plan.layer_info.items():
        layers[name].normaliser = entry["normaliser"]
        layers[name].centring = entry["centring"]
    model.load_state_dict(plan.model_state)
    for name, entry in plan.stats.items():
        layer = layers[name]
        device = layer.neuron_weight().device
        layer.stats = CorrelationStats(layer.num_candidates, layer.out_channels)
        layer.stats.n = float(entry["n"])
        for field in _STAT_FIELDS:
            setattr(layer.stats, field, entry[field].to(device))
    if optimizer is not None and plan.optimizer_state is not None:
        named = dict(model.named_parameters())
        optimizer.state = defaultdict(dict)
        optimizer.param_groups = [{"params": [named[n] for n in group]} for group in plan.optimizer_names]
        if isinstance(getattr(optimizer, "_params", None), list) and optimizer.param_groups:  # LBFGS
            optimizer._params = optimizer.param_groups[0]["params"]
        optimizer.load_state_dict(plan.optimizer_state)


def load(path: str | os.PathLike, model: nn.Module, controller: Controller | None = None,
         optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore a checkpoint written by :func:`save` into ``model`` (and ``controller``, ``optimizer``).

    Returns the ``extra`` dict given to :func:`save` (tensors come back on the CPU).

    * ``model``: a fresh, un-perforated instance of the saved architecture is perforated with
      the saved configuration and grown to the saved structure; an already perforated one (the
      usual resume code: ``perforate`` then ``Controller``) is resized to the saved structure.
      Then its weights are loaded. Resizing replaces the dendrite Parameter objects.
    * ``controller``: counters, history, best/accepted snapshots, dendrite-phase snapshot and
      generator state. It must be the controller of ``model``, created after ``perforate``, in
      the same mode. It keeps its own config: create it with the same config for an exact resume.
    * ``optimizer``: an optimiser of the saved class, built in any way over the model (e.g.
      ``torch.optim.Adam(ctl.parameters())`` right after creating the controller, before
      ``load``). Its parameter groups are pointed, by parameter name, at the restored model's
      parameters exactly as they were at save time (so a controller phase or structure change
      since it was built does not matter), and its state and hyper-parameters are restored.
      Keep using this same object after ``load``; build LR schedulers on it after ``load`` or
      restore their ``state_dict`` from ``extra``.
    * Random state outside the controller is not saved: when the training loop draws from
      torch's global generator (dropout, shuffling, or ``DendriteConfig(seed=None)``, whose
      candidates are drawn from it), save ``torch.get_rng_state()`` and any data generator's
      ``get_state()`` in ``extra`` and restore them after ``load``.

    Everything is validated before anything is changed: a missing, empty, truncated, corrupted
    or edited file, an unknown format version, a model of another architecture, inconsistent
    structure, wrong shapes or dtypes, or a controller/optimiser that does not fit raise
    :class:`CheckpointError` naming the first problem, and leave model, controller and
    optimiser untouched. Loading never unpickles anything, so an untrusted file cannot run code.
    """
    path = Path(os.fspath(path))
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"load expects an nn.Module, got {type(model).__name__}")
    try:
        plan = _plan(path, model, controller, optimizer)
    except _Invalid as err:
        raise CheckpointError(f"checkpoint {str(path)!r} {_sentence(err)}") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, OverflowError) as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is malformed ({type(err).__name__}: {_one_line(str(err))})"
        ) from None
    _apply(plan, model, controller, optimizer)
    return plan.extra


def _one_line(text: str) -> str:
    return " ".join(text.split())


_FIT = ("model ", "the model", "the checkpoint holds", "the controller", "layer ", "optimizer state is for")


def _sentence(err: _Invalid) -> str:
    text = _one_line(str(err))
    if text.split(" ", 1)[0] in ("is", "has", "holds", "cannot", "does"):
        return text
    return f"does not fit: {text}" if text.startswith(_FIT) else f"is invalid: {text}"
