"""Which process writes: under DDP every rank holds the same weights and metrics, so files (and the
console's summaries) come from global rank 0 only. `write_once` is the one way the pipeline gates
work by rank."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from stackwise.errors import StackWiseError


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_global_zero() -> bool:
    return not _distributed() or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def write_once(write: Callable[[], object]) -> None:
    """Run `write` on global rank 0 only; the other ranks wait for it (none reads an artifact before
    it exists) and learn whether it failed: rank 0 raises its error (a full disk: one line), every
    other rank a StackWiseError, at once. (Before, they waited at a barrier for a rank that had
    exited, until the process group's timeout.)"""
    failure: BaseException | None = None
    if is_global_zero():
        try:
            write()
        except BaseException as e:  # re-raised below, once the other ranks are told
            failure = e
    if _distributed():
        # a broadcast from rank 0 is the barrier: every other rank waits for the write to end
        flag = torch.tensor([failure is not None], dtype=torch.int32, device=_collective_device())
        dist.broadcast(flag, src=0)
        if failure is None and bool(flag.item()):
            raise StackWiseError(f"rank {dist.get_rank()}: stopped, rank 0 could not write its files (its error above)")
    if failure is not None:
        raise failure


def _collective_device() -> torch.device:
    """Where a collective's tensor lives: the rank's GPU under NCCL, the host under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
