"""Scores and losses of a :class:`~apical.trial.Task`, with NaN targets read as missing labels.

Every metric takes the model's outputs and the targets of a whole split (concatenated over
batches) and returns a float. A NaN target is a missing label (multi-task data): it is left out
of ``roc_auc``, ``mse``, ``mae`` and ``r2`` and of the masked losses.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

Metric = Callable[[Tensor, Tensor], float]


def _numpy(a: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def accuracy(outputs: Tensor, targets: Tensor) -> float:
    """Share of correct labels: argmax over classes, or logit > 0 for one output column."""
    if outputs.ndim >= 2 and outputs.shape[-1] > 1:
        predicted = outputs.argmax(-1)
    else:
        predicted = (outputs.reshape(targets.shape) > 0).to(targets.dtype)
    return float((predicted == targets).float().mean())


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks of ``s`` with ties given their average rank."""
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]  # exclusive
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def roc_auc_per_task(outputs: Tensor | np.ndarray, targets: Tensor | np.ndarray) -> np.ndarray:
    """ROC-AUC of each column (Mann-Whitney rank statistic) over its labelled rows.

    A column with no known positive or no known negative gets NaN.
    """
    s, t = _numpy(outputs), _numpy(targets)
    if s.shape != t.shape:
        raise ValueError(f"roc_auc: outputs {s.shape} and targets {t.shape} differ in shape")
    if s.ndim == 1:
        s, t = s[:, None], t[:, None]
    out = np.full(s.shape[1], np.nan)
    for j in range(s.shape[1]):
        known = ~np.isnan(t[:, j])
        sj, tj = s[known, j], t[known, j] > 0.5
        n_pos = int(tj.sum())
        n_neg = len(tj) - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = _average_ranks(sj)
        out[j] = (ranks[tj].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return out


def roc_auc(outputs: Tensor | np.ndarray, targets: Tensor | np.ndarray) -> float:
    """Mean ROC-AUC over the tasks (columns) that have both classes among their labelled rows
    (NaN if none has)."""
    auc = roc_auc_per_task(outputs, targets)
    ok = ~np.isnan(auc)
    return float(auc[ok].mean()) if ok.any() else float("nan")


def _labelled(outputs: Tensor, targets: Tensor) -> tuple[np.ndarray, np.ndarray]:
    pred = _numpy(outputs).reshape(targets.shape) if outputs.numel() == targets.numel() else None
    if pred is None:
        raise ValueError(f"outputs {tuple(outputs.shape)} do not match targets {tuple(targets.shape)}")
    y = _numpy(targets)
    return pred, y


def mse(outputs: Tensor, targets: Tensor) -> float:
    """Mean squared error over the labelled entries."""
    pred, y = _labelled(outputs, targets)
    keep = ~np.isnan(y)
    return float(((pred[keep] - y[keep]) ** 2).mean())


def mae(outputs: Tensor, targets: Tensor) -> float:
    """Mean absolute error over the labelled entries."""
    pred, y = _labelled(outputs, targets)
    keep = ~np.isnan(y)
    return float(np.abs(pred[keep] - y[keep]).mean())


def r2(outputs: Tensor, targets: Tensor) -> float:
    """Coefficient of determination, averaged over output columns (each over its labelled rows)."""
    pred, y = _labelled(outputs, targets)
    pred, y = pred.reshape(len(y), -1), y.reshape(len(y), -1)
    scores = []
    for t in range(y.shape[1]):
        keep = ~np.isnan(y[:, t])
        yt, pt = y[keep, t], pred[keep, t]
        total = ((yt - yt.mean()) ** 2).sum()
        scores.append(1.0 - ((yt - pt) ** 2).sum() / total if total > 0 else float("nan"))
    return float(np.mean(scores))


METRICS: dict[str, tuple[Metric, bool]] = {
    "accuracy": (accuracy, True),
    "roc_auc": (roc_auc, True),
    "mse": (mse, False),
    "mae": (mae, False),
    "r2": (r2, True),
}
"""Built-in metrics by name, with whether a higher score is better."""


def masked_bce_with_logits(outputs: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy with logits over the labelled entries (NaN targets are missing).

    A batch without any label gives a zero that is still attached to ``outputs``.
    """
    mask = ~torch.isnan(targets)
    target = torch.where(mask, targets, torch.zeros_like(targets)).to(outputs.dtype)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(outputs, target, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp_min(1)


def masked_mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error over the labelled entries (NaN targets are missing)."""
    mask = ~torch.isnan(targets)
    diff = torch.where(mask, outputs.reshape(targets.shape) - targets, torch.zeros_like(targets))
    return (diff**2).sum() / mask.sum().clamp_min(1)
