"""Perforated Backpropagation under ``torch.distributed`` (DistributedDataParallel).

Nothing changes in the training loop but three lines (see ``docs/distributed.md``)::

    apical.perforate(model, cfg)
    ctl = apical.Controller(model, cfg)              # on the plain module, before wrapping
    ddp = apical.distributed.wrap(model, device_ids=[local_rank])
    opt = torch.optim.Adam(ctl.parameters(), lr=1e-3)
    for epoch in range(epochs):
        ...train ddp on this rank's shard, score on this rank's validation shard...
        step = ctl.step(score)                       # the mean score over ranks decides
        if step.done:
            break
        if step.restructured:
            ddp = apical.distributed.rewrap(ddp, device_ids=[local_rank])
            opt = torch.optim.Adam(ctl.parameters(), lr=1e-3)
        apical.distributed.save_on_main("run.safetensors", model, ctl, opt)

What apical reduces, and when (all on a process group of its own, in float64):

* every backward of a dendrite phase, per dendritic layer: the batch's correlation sums (one
  buffer), so that every rank holds the statistics of the global batches and the candidates'
  gradient, after DDP's averaging, is exactly the single-process gradient of the global batch;
* every :meth:`~apical.Controller.step`: the validation score (mean over ranks) and a small
  consistency record, so that every rank takes the same decisions.

Restructures therefore happen on every rank at the same epoch, identically; DDP must then be
rebuilt (its reducer was built for the previous set of trainable parameters), and so must the
optimiser and its schedule.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from apical.dendrites import _dist

__all__ = [
    "barrier",
    "is_distributed",
    "is_main_process",
    "rank",
    "release",
    "rewrap",
    "save_on_main",
    "set_synchronised",
    "world_size",
    "wrap",
]


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 when torch.distributed is not initialised)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on global rank 0, and in a process that is not distributed."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier(group=_dist.group())


def release() -> None:
    """Free apical's own process group. Call it on every rank before
    ``torch.distributed.destroy_process_group()`` at the end of a run (apical creates the group
    again if it is needed later); without it the group goes at interpreter exit."""
    _dist.release()


def set_synchronised(enabled: bool) -> None:
    """Whether apical reduces its statistics and decisions over ranks (default: yes, whenever
    torch.distributed is initialised with more than one rank). Turn it off only when each rank
    trains its own, independent model (e.g. one seed per rank), never under DDP."""
    _dist.set_enabled(enabled)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _ignore_empty_parameters(module: nn.Module) -> None:
    """Tell DDP to skip zero-size parameters (e.g. ``dendrite_out`` before the first set is
    installed): they take no part in the forward pass, and DDP without
    ``find_unused_parameters`` fails at the second iteration, waiting for their gradients."""
    names = [n for n, p in module.named_parameters() if p.numel() == 0]
    for p in module.parameters():
        if hasattr(p, "_ddp_ignored") and p.numel() > 0:
            del p._ddp_ignored
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)


def wrap(model: nn.Module, **ddp_kwargs: Any) -> DistributedDataParallel:
    """``DistributedDataParallel(model, **ddp_kwargs)`` for a perforated model.

    Identical to wrapping by hand, except that parameters of size zero (the empty dendrite
    tensors of a layer that has no dendrite set yet) are left out of DDP's reduction.
    Create the :class:`~apical.Controller` on ``model`` itself (not on the wrapper).
    """
    if isinstance(model, DistributedDataParallel):
        raise TypeError("wrap expects the plain module; use rewrap() on a DistributedDataParallel")
    _ignore_empty_parameters(model)
    if _dist.world_size() > 1:
        _dist.group()  # apical's process group, created here on the main thread rather than in a backward
    return DistributedDataParallel(model, **ddp_kwargs)


def rewrap(model: nn.Module, **ddp_kwargs: Any) -> DistributedDataParallel:
    """Rebuild DDP around ``model.module`` after ``ctl.step(score).restructured``.

    A restructure (dendrite phase starts, dendrites installed or removed, best weights
    reloaded) changes which parameters require grad and replaces some Parameter objects; DDP's
    reducer was built for the previous set, so it is detached from the parameters and a new
    DDP is built (which also broadcasts rank 0's parameters and buffers, a no-op when the ranks
    are in step, as apical keeps them). Pass the same ``ddp_kwargs`` as at the first wrap, and
    rebuild the optimiser (and LR schedule) from ``ctl.parameters()`` afterwards.

    The :class:`~apical.Controller` must have been created on the inner module
    (``Controller(ddp.module, cfg)`` or before the first wrap); it keeps working unchanged.
    Restructures happen at the same epoch on every rank, because every rank takes the same
    decisions from the same (reduced) score and statistics: call ``rewrap`` on every rank.
    Accepts a plain module too (then it is the same as :func:`wrap`).
    """
    if isinstance(model, DistributedDataParallel):
        reducer = getattr(model, "reducer", None)
        if reducer is not None:  # the old reducer must not fire on parameters the new one owns
            model._remove_autograd_hooks()
        model = model.module
    return wrap(model, **ddp_kwargs)


def save_on_main(path: str | os.PathLike, model: nn.Module, controller: Any = None,
                 optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None) -> None:
    """Write an :func:`apical.checkpoint.save` checkpoint from global rank 0 only, then wait
    for every rank (so that no rank reads or overwrites the file before it is complete).

    ``model`` may be the DDP wrapper or the plain module. Every rank must call it. If the save
    fails on rank 0, every rank raises (rank 0 its own error, the others a RuntimeError).
    """
    from apical.checkpoint import save  # late: optional piece, and it imports the controller

    module = _unwrap(model)
    error: BaseException | None = None
    if is_main_process():
        try:
            save(path, module, controller, optimizer, extra=extra)
        except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks heard of it
            error = err
    if is_distributed():
        flags = _dist.all_gather(torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64))
        if error is None and bool(flags[0, 0]):
            raise RuntimeError(f"apical: saving the checkpoint {os.fspath(path)!r} failed on rank 0")
    if error is not None:
        raise error
