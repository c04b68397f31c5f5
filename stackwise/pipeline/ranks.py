"""Which process writes: under DDP every rank holds the same weights and metrics, so files (and the
console's summaries) come from global rank 0 only. `write_once` is the one way the pipeline gates
work by rank."""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_global_zero() -> bool:
    return not _distributed() or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def write_once(write: Callable[[], object]) -> None:
    """Run `write` on global rank 0 only; then every rank waits at a barrier, so none reads an
    artifact before it exists."""
    if is_global_zero():
        write()
    if _distributed():
        dist.barrier()
