"""A user's task for :func:`apical.trial`: how to build the model, load the data, train and score."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from apical.dendrites import DendriteConfig
from apical.metrics import METRICS

OPTIMIZERS = ("adam", "adamw", "sgd")


class TaskError(ValueError):
    """A Task, or what one of its functions returned, is not usable; the message names the field."""


@dataclass(frozen=True)
class Task:
    """Everything :func:`apical.trial` needs to train and score a model on the user's data.

    Args:
        name: label of the task in tables and file names.
        model: ``model(width) -> nn.Module``; width 1.0 is the model as designed, other widths
            scale its hidden sizes (used by the width sweep and by ``none-matched``).
        data: ``data(seed) -> (train, val, test)``, three torch Datasets of ``(input, target)``
            pairs; the split may depend on the seed or not.
        loss: ``loss(output, target) -> scalar tensor`` (see :mod:`apical.metrics` for
            NaN-masked ones).
        metric: ``"accuracy"``, ``"roc_auc"``, ``"mse"``, ``"mae"``, ``"r2"`` or
            ``callable(outputs, targets) -> float`` over a whole split.
        maximize: whether a higher score is better (default: the metric's own; True for a callable).
        batch_size, lr, optimizer, weight_decay: training (optimizer ``"adam"``, ``"adamw"``,
            ``"sgd"`` (momentum 0.9) or ``callable(params, lr) -> Optimizer``).
        max_epochs: cap on epochs per run, every mode.
        patience: P, epochs without improvement before a plateau (none, gd, pb; none-long: 4P).
        device: where the runs train (``"cpu"``, ``"cuda"``...).
        collate_fn: batches for a DataLoader (e.g. graph batches); default: stacked tensors.
        eval_batch_size: batch size of scoring.
        dendrites: DendriteConfig fields that gd and pb use (e.g. ``{"max_dendrites": 3}``).
    """

    name: str
    model: Callable[[float], nn.Module]
    data: Callable[[int], tuple[Dataset, Dataset, Dataset]]
    loss: Callable[[Any, Any], torch.Tensor]
    metric: str | Callable[[torch.Tensor, torch.Tensor], float] = "accuracy"
    maximize: bool | None = None
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str | Callable[..., torch.optim.Optimizer] = "adam"
    weight_decay: float = 0.0
    max_epochs: int = 1000
    patience: int = 10
    device: str = "cpu"
    collate_fn: Callable[[list], Any] | None = None
    eval_batch_size: int = 1024
    dendrites: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise TaskError(f"Task.name must be a non-empty string, got {self.name!r}")
        for name in ("model", "data", "loss"):
            if not callable(getattr(self, name)):
                raise TaskError(f"Task.{name} must be callable, got {type(getattr(self, name)).__name__}")
        if isinstance(self.metric, str):
            if self.metric not in METRICS:
                raise TaskError(f"Task.metric {self.metric!r} is unknown; use one of {', '.join(METRICS)} "
                                "or a callable(outputs, targets) -> float")
        elif not callable(self.metric):
            raise TaskError(f"Task.metric must be a name or a callable, got {type(self.metric).__name__}")
        for name in ("batch_size", "max_epochs", "patience", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TaskError(f"Task.{name} must be a positive int, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise TaskError(f"Task.lr must be a positive number, got {self.lr!r}")
        if isinstance(self.optimizer, str) and self.optimizer not in OPTIMIZERS:
            raise TaskError(f"Task.optimizer {self.optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)} "
                            "or a callable(params, lr) -> torch.optim.Optimizer")
        if self.collate_fn is not None and not callable(self.collate_fn):
            raise TaskError("Task.collate_fn must be callable or None")
        fields = {f.name for f in dataclasses.fields(DendriteConfig)}
        bad = sorted(set(self.dendrites) - fields) + sorted({"mode", "seed"} & set(self.dendrites))
        if bad:
            raise TaskError(f"Task.dendrites sets {bad}: not DendriteConfig fields that a task may set "
                            "(mode and seed come from the trial)")
        try:
            torch.device(self.device)
        except RuntimeError as err:
            raise TaskError(f"Task.device {self.device!r} is not a torch device: {err}") from None

    @property
    def higher_is_better(self) -> bool:
        """Whether the trial maximises the metric."""
        if self.maximize is not None:
            return bool(self.maximize)
        return METRICS[self.metric][1] if isinstance(self.metric, str) else True

    @property
    def metric_name(self) -> str:
        return self.metric if isinstance(self.metric, str) else getattr(self.metric, "__name__", "metric")

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        """The task's metric over a whole split."""
        fn = METRICS[self.metric][0] if isinstance(self.metric, str) else self.metric
        return float(fn(outputs, targets))

    def with_settings(self, **changes: Any) -> Task:
        """A copy with some fields changed; a DendriteConfig field goes into ``dendrites``
        (this is what ``apical trial --set KEY=VALUE`` does)."""
        own = {f.name for f in dataclasses.fields(self)}
        mine = {k: v for k, v in changes.items() if k in own}
        rest = {k: v for k, v in changes.items() if k not in own}
        fields = {f.name for f in dataclasses.fields(DendriteConfig)}
        unknown = sorted(set(rest) - fields)
        if unknown:
            raise TaskError(f"--set {unknown[0]}: neither a Task field ({', '.join(sorted(own))}) nor a "
                            f"DendriteConfig field ({', '.join(sorted(fields))})")
        if rest:
            mine["dendrites"] = {**dict(self.dendrites), **dict(mine.get("dendrites", {})), **rest}
        return dataclasses.replace(self, **mine)

    def settings(self) -> dict[str, Any]:
        """The JSON-friendly fields that a run's result depends on (kept in each record)."""
        def label(value: Any) -> Any:
            if value is None or isinstance(value, (str, int, float, bool)):
                return value
            return getattr(value, "__qualname__", type(value).__name__)

        return {"task": self.name, "metric": self.metric_name, "maximize": self.higher_is_better,
                "batch_size": self.batch_size, "lr": self.lr, "optimizer": label(self.optimizer),
                "weight_decay": self.weight_decay, "max_epochs": self.max_epochs, "patience": self.patience,
                "loss": label(self.loss), "dendrites": {k: label(v) if not isinstance(v, (list, tuple)) else list(v)
                                                        for k, v in sorted(dict(self.dendrites).items())}}


def load_task_file(path: str | os.PathLike[str], name: str = "task") -> Task:
    """The :class:`Task` called ``name`` in a Python file (``apical trial path/to/task.py``)."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {os.fspath(path)!r} does not exist")
    module_name = f"_apical_task_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise TaskError(f"task file {os.fspath(path)!r} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(module_name, None)
        raise TaskError(f"task file {os.fspath(path)!r} failed to import: {type(err).__name__}: {err}") from err
    found = getattr(module, name, None)
    if not isinstance(found, Task):
        tasks = sorted(k for k, v in vars(module).items() if isinstance(v, Task))
        what = "is not an apical.Task" if found is not None else "is not defined"
        hint = f"; it defines {', '.join(tasks)} (pick one with --task NAME)" if tasks else \
            "; define task = apical.Task(...) in it"
        raise TaskError(f"task file {os.fspath(path)!r}: {name!r} {what}{hint}")
    return found
