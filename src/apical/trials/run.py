"""One run of a trial: build the model at a width, train it with a Controller in one mode, score it."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

from apical.dendrites import Controller, dendrite_count, parameter_count, perforate
from apical.trials.modes import mode_config
from apical.trials.task import Task, TaskError

Splits = tuple[Dataset, Dataset, Dataset]


def check_splits(task: Task, seed: int, splits: Any) -> Splits:
    """``task.data(seed)`` must give three Datasets (train, val, test)."""
    if not (isinstance(splits, (tuple, list)) and len(splits) == 3):
        size = f" of length {len(splits)}" if isinstance(splits, (tuple, list)) else ""
        raise TaskError(f"Task.data({seed}) of task {task.name!r} must return (train, val, test), got "
                        f"{type(splits).__name__}{size}")
    for part, ds in zip(("train", "val", "test"), splits, strict=True):
        if not isinstance(ds, Dataset) or not hasattr(ds, "__len__"):
            raise TaskError(f"Task.data({seed}) of task {task.name!r}: the {part} split must be a sized "
                            f"torch.utils.data.Dataset of (input, target) pairs, got {type(ds).__name__}")
        if len(ds) == 0:
            raise TaskError(f"Task.data({seed}) of task {task.name!r}: the {part} split is empty")
    return tuple(splits)  # type: ignore[return-value]


def build(task: Task, width: float) -> nn.Module:
    """``task.model(width)``, checked."""
    model = task.model(width)
    if not isinstance(model, nn.Module):
        raise TaskError(f"Task.model({width:g}) of task {task.name!r} must return an nn.Module, "
                        f"got {type(model).__name__}")
    return model


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor) or hasattr(obj, "to") and not isinstance(obj, (list, tuple, dict)):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _call(model: nn.Module, inputs: Any) -> Any:
    """A tuple or list input is the model's positional arguments; anything else its one argument."""
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def _fast(task: Task, ds: Dataset) -> bool:
    """A TensorDataset of (input, target) without a collate_fn is batched by indexing its tensors."""
    return task.collate_fn is None and isinstance(ds, TensorDataset) and len(ds.tensors) == 2


def batches(task: Task, ds: Dataset, batch_size: int, generator: torch.Generator | None) -> Iterator[tuple[Any, Any]]:
    """(input, target) batches, shuffled by ``generator`` (the same order a RandomSampler draws) or in order."""
    if _fast(task, ds):
        x, y = ds.tensors  # type: ignore[attr-defined]
        n = len(x)
        order = torch.randperm(n, generator=generator) if generator is not None else None
        for i in range(0, n, batch_size):
            if order is None:
                yield x[i : i + batch_size], y[i : i + batch_size]
            else:
                idx = order[i : i + batch_size]
                yield x[idx], y[idx]
        return
    sampler = RandomSampler(ds, generator=generator) if generator is not None else None
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False, collate_fn=task.collate_fn)
    for batch in loader:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TaskError(f"task {task.name!r}: a batch must be an (input, target) pair, got "
                            f"{type(batch).__name__}; datasets give (input, target) items, or collate_fn "
                            "returns (inputs, targets)")
        yield batch[0], batch[1]


def _cat(parts: list[Tensor]) -> Tensor:
    return torch.cat([p.reshape(1) if p.ndim == 0 else p for p in parts])


@torch.no_grad()
def predict(task: Task, model: nn.Module, ds: Dataset, device: torch.device) -> tuple[Tensor, Tensor]:
    """The model's outputs (float32, on the CPU) and the targets over a whole split, in eval mode."""
    was_training = model.training
    model.eval()
    outputs, targets = [], []
    for x, y in batches(task, ds, task.eval_batch_size, None):
        outputs.append(_call(model, _to(x, device)).detach().float().cpu())
        targets.append(y.cpu() if isinstance(y, Tensor) else torch.as_tensor(y))
    model.train(was_training)
    return torch.cat(outputs), _cat(targets)


def evaluate(task: Task, model: nn.Module, ds: Dataset, device: torch.device) -> float:
    """The task's metric over a whole split, in eval mode."""
    return task.score(*predict(task, model, ds, device))


def make_optimizer(task: Task) -> Callable[[Any], torch.optim.Optimizer]:
    """The task's optimiser over the parameters the controller trains."""
    def make(params: Any) -> torch.optim.Optimizer:
        params = list(params)
        if callable(task.optimizer):
            return task.optimizer(params, task.lr)
        if task.optimizer == "adam":
            return torch.optim.Adam(params, lr=task.lr, weight_decay=task.weight_decay)
        if task.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=task.lr, weight_decay=task.weight_decay)
        return torch.optim.SGD(params, lr=task.lr, momentum=0.9, weight_decay=task.weight_decay)

    return make


def train(task: Task, mode: str, seed: int, width: float, splits: Splits,
          on_epoch: Callable[[nn.Module, Controller], None] | None = None,
          run_dir: str | os.PathLike[str] | None = None, select_on: str = "metric") -> dict[str, Any]:
    """Train ``task.model(width)`` in ``mode`` on ``splits`` with ``seed``; the result as a dict:
    test and val (the task's metric on the best validation network), parameters, dendrites, epochs,
    seconds, history (the controller's per-epoch records). ``on_epoch(model, controller)`` runs after
    each training epoch; ``run_dir`` gets the controller's run record. ``select_on``: what the
    controller's decisions (best network, switching, keep or revert) read, the validation metric
    (``"metric"``) or the validation loss (``"loss"``, lower is better)."""
    if select_on not in ("metric", "loss"):
        raise ValueError(f"select_on must be 'metric' or 'loss', got {select_on!r}")
    device = torch.device(task.device)
    cfg = mode_config(mode, task.patience, seed, overrides=task.dendrites)
    torch.manual_seed(seed)
    model = build(task, width).to(device)
    if cfg.mode != "none":
        perforate(model, cfg)
    maximize = task.higher_is_better if select_on == "metric" else False
    ctl = Controller(model, cfg, maximize=maximize, run_dir=run_dir)
    make_opt = make_optimizer(task)
    opt = make_opt(ctl.parameters())
    gen = torch.Generator().manual_seed(seed)
    train_set, val_set, test_set = splits
    start = time.perf_counter()
    for epoch in range(task.max_epochs):
        model.train()
        for x, y in batches(task, train_set, task.batch_size, gen):
            opt.zero_grad(set_to_none=True)
            task.loss(_call(model, _to(x, device)), _to(y, device)).backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(model, ctl)
        out, target = predict(task, model, val_set, device)
        score = task.score(out, target)
        if not math.isfinite(score):
            raise TaskError(f"task {task.name!r}, mode {mode}, seed {seed}: the validation {task.metric_name} "
                            f"is {score} after epoch {epoch + 1} (a diverged model, or a metric that cannot "
                            "score this split, e.g. roc_auc without both classes)")
        step = ctl.step(score if select_on == "metric" else float(task.loss(out, target)))
        if step.done:
            break
        if step.restructured:
            opt = make_opt(ctl.parameters())
    else:
        ctl.finish()
    seconds = time.perf_counter() - start
    ctl.close()
    return {
        "test": evaluate(task, model, test_set, device),
        "val": evaluate(task, model, val_set, device),
        "parameters": parameter_count(model),
        "dendrites": dendrite_count(model),
        "epochs": ctl.epoch,
        "seconds": seconds,
        "history": list(ctl.history),
    }
