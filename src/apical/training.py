"""A plain training loop around :class:`apical.Controller`, shared by the demo and the benchmarks.

It is the loop the README shows a user writing; nothing in the library depends on it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from apical.datasets import Split, masked_bce_loss, roc_auc_mean
from apical.dendrites import Controller, DendriteConfig, dendrite_count, parameter_count, perforate


@dataclass
class RunResult:
    """What one training run measured."""

    mode: str
    seed: int
    dendrites: int
    parameters: int
    val_score: float
    test_score: float
    epochs: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, with_history: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not with_history:
            out.pop("history")
        return out


def loss_fn(task: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The training loss for a task kind."""
    if task == "classification":
        return nn.functional.cross_entropy
    if task == "multilabel":
        return masked_bce_loss
    if task == "regression":
        return nn.functional.mse_loss
    raise ValueError(f"unknown task {task!r}")


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, task: str, batch_size: int = 1024) -> float:
    """Score to maximise: accuracy, mean ROC-AUC (multilabel) or negative MSE (regression)."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    if task == "classification":
        return float((out.argmax(1) == y).float().mean())
    if task == "multilabel":
        return roc_auc_mean(out, y)
    return -float(nn.functional.mse_loss(out, y))


def fit(
    model: nn.Module | Callable[[], nn.Module],
    split: Split,
    config: DendriteConfig,
    *,
    lr: float = 1e-3,
    batch_size: int = 64,
    max_epochs: int = 2000,
    seed: int = 0,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    candidate_lr: float | None = None,
    on_epoch: Callable[[nn.Module, Controller], None] | None = None,
    run_dir: str | os.PathLike[str] | None = None,
) -> RunResult:
    """Perforate ``model`` per ``config``, train it with a Controller, return what happened.

    ``model`` may be a module or a zero-argument factory; a factory is called after seeding,
    so that every mode starts from the same initial weights for a given seed. The validation
    score drives the controller; the test score is measured once, on the best network found.
    """
    torch.manual_seed(seed)
    if not isinstance(model, nn.Module):
        model = model()
    if config.mode != "none":
        perforate(model, config)
    ctl = Controller(model, config, maximize=True, run_dir=run_dir)
    make_opt = _optimizer_factory(optimizer, lr, weight_decay, candidate_lr)
    opt = make_opt(ctl.parameters())
    criterion = loss_fn(split.task)
    gen = torch.Generator().manual_seed(seed)
    n = len(split.x_train)
    start = time.perf_counter()
    for _ in range(max_epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            criterion(model(split.x_train[idx]), split.y_train[idx]).backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(model, ctl)
        step = ctl.step(evaluate(model, split.x_val, split.y_val, split.task))
        if step.done:
            break
        if step.restructured:
            opt = make_opt(ctl.parameters())
    else:
        ctl.finish()
    seconds = time.perf_counter() - start
    ctl.close()
    return RunResult(
        mode=config.mode,
        seed=seed,
        dendrites=dendrite_count(model),
        parameters=parameter_count(model),
        val_score=evaluate(model, split.x_val, split.y_val, split.task),
        test_score=evaluate(model, split.x_test, split.y_test, split.task),
        epochs=ctl.epoch,
        seconds=seconds,
        history=list(ctl.history),
    )


def _optimizer_factory(name: str, lr: float, weight_decay: float, candidate_lr: float | None = None):
    """Optimiser builder; candidates (dendrite phase) get ``candidate_lr`` when given."""
    if name not in ("adam", "sgd"):
        raise ValueError(f"unknown optimizer {name!r}; use 'adam' or 'sgd'")

    def make(params):
        params = list(params)
        groups: list[dict] = [{"params": params}]
        if candidate_lr is not None:
            cand = [p for p in params if getattr(p, "_apical_candidate", False)]
            rest = [p for p in params if not getattr(p, "_apical_candidate", False)]
            groups = [g for g in ({"params": rest}, {"params": cand, "lr": candidate_lr}) if g["params"]]
        if name == "adam":
            return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)

    return make
