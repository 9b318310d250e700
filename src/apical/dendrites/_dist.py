"""The few ``torch.distributed`` calls apical makes itself (private; the user API is
:mod:`apical.distributed`).

apical reduces only small float64 buffers, on a process group of its own (created once per
default group, lazily, at the same point on every rank), so its collectives never interleave
with DistributedDataParallel's gradient buckets on the default group.
"""

from __future__ import annotations

import atexit
import weakref

import torch
import torch.distributed as dist
from torch import Tensor

_state: dict = {"enabled": True}
# default group -> apical's group over the same ranks. Weak keys: when the user destroys the
# default group, apical's group goes with it, rather than living on until the interpreter's
# teardown (where destroying a gloo group can abort the process).
_groups: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
atexit.register(_groups.clear)


def set_enabled(enabled: bool) -> None:
    """Turn apical's cross-rank reductions on (default) or off (independent runs per rank)."""
    _state["enabled"] = bool(enabled)


def world_size() -> int:
    """Ranks taking part in apical's reductions: 1 unless torch.distributed is initialised."""
    if not (_state["enabled"] and dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def group():
    """apical's own process group over every rank (created on first use)."""
    world = dist.group.WORLD
    mine = _groups.get(world)
    if mine is None:
        mine = _groups[world] = dist.new_group()
    return mine


def release() -> None:
    """Destroy apical's group for the current default group, on every rank at the same point
    (after a barrier on it, so no rank still has a collective in flight on it). Idempotent."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    mine = _groups.pop(dist.group.WORLD, None)
    if mine is not None:
        dist.barrier(group=mine)
        dist.destroy_process_group(mine)


def _device(tensor: Tensor) -> torch.device:
    """Where a collective on apical's group needs its tensor (NCCL: the current GPU)."""
    backend = str(dist.get_backend(group()))
    if "nccl" in backend and ":" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_sum(buf: Tensor) -> Tensor:
    """Sum ``buf`` over every rank, in place (and returned)."""
    dev = _device(buf)
    if dev == buf.device:
        dist.all_reduce(buf, group=group())
        return buf
    work = buf.to(dev)
    dist.all_reduce(work, group=group())
    buf.copy_(work)
    return buf


def all_gather(vec: Tensor) -> Tensor:
    """``[world, len]``: every rank's ``vec`` (same length everywhere), identical on every rank."""
    work = vec.to(_device(vec))
    rows = [torch.empty_like(work) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, work, group=group())
    return torch.stack(rows).to(vec.device)
