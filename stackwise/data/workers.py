"""How DataLoader worker processes start: `worker_context(num_workers)`, for every loader of a stage.

A worker is forked from the rank's process by default, and under torch.distributed that process has
native threads (gloo's or NCCL's) that take a Python thread state of their own whenever they drop a
finished collective's tensors. CPython before 3.12 (issue gh-112275; CI's 3.11.7 has it) can fork
while such a thread holds the interpreter's thread-list lock, and the child then waits on that lock
forever, before running any Python: the rank waits on a worker that never starts, the other ranks
wait in their next collective, and the run hangs. On those interpreters the workers start from a
fork server instead: one clean, single-threaded process per rank forks them, with torch and the
datasets' modules imported once (imported by each worker, a 2-core CPU run's stages took 20x
longer). Datasets reach such workers pickled, so they must pickle small: memmaps go by file
(MaskedTokenDataset.__getstate__, ActivationDataset.__getstate__).
"""

from __future__ import annotations

import multiprocessing
import sys
from multiprocessing.context import BaseContext

FORK_CAN_DEADLOCK = sys.version_info < (3, 12)
# imported once by the fork server, not by every worker: what a stage's datasets and collate functions need
PRELOAD = ["torch", "numpy", "stackwise.data.stage_data", "stackwise.data.cache.datamodule"]


def worker_context(num_workers: int) -> BaseContext | None:
    """The start method of a loader's workers: None (the default: fork) or the fork server."""
    if num_workers <= 0 or not FORK_CAN_DEADLOCK or not _forks():
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # no effect once the server runs (then it has them already)
    return context


def _forks() -> bool:
    """Whether workers would be forked: the start method set for this process, else the platform's
    default (fork on Linux; macOS and Windows spawn)."""
    method = multiprocessing.get_start_method(allow_none=True)
    return method == "fork" or (method is None and sys.platform.startswith("linux"))
