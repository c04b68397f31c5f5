"""One run at a time per experiment folder.

Two `stackwise-train` runs on one folder (a second terminal, a job submitted twice) would train the
same stages twice over, write every record twice and, on a GPU where runs are not bit-identical,
train one run's layer on the other's cache. So a run holds an exclusive lock on `run.lock` in the
experiment folder (`ExperimentPaths.lock_file`) from start to end, and a second run stops with one
line naming the holder's pid and host.

The lock is `fcntl.flock`: the kernel drops it when its holder's last file descriptor closes, also
when the process is killed with SIGKILL, so no stale lock ever needs removing by hand. (A DataLoader
worker forked by the holder shares the descriptor and keeps the lock until it exits too.) Linux maps
flock onto NFS byte-range locks, so runs on two hosts sharing an NFS folder should exclude each other
too (not tested).
The file stays after a run: only the lock on it counts, and deleting a lock file races with a run
opening it. While held it holds one JSON line: pid, host, start time and command.

Under DDP the ranks of one run must not fight for it: Lightning re-executes the script for each
rank > 0 with LOCAL_RANK (and NODE_RANK) set, torchrun sets RANK, SLURM sets SLURM_PROCID. A
process that one of these names as a rank other than 0 belongs to the run that holds the lock
(global rank 0, the launching process) and takes none.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from stackwise.artifacts import ExperimentPaths, write_errors
from stackwise.errors import ExperimentBusyError

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("stackwise")

# environment variables that name this process's rank when a launcher started it as one of several
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def launched_as_other_rank() -> bool:
    """True in a process that a distributed launcher started as a rank other than global rank 0."""
    return any(os.environ.get(v, "0").strip() not in ("", "0") for v in RANK_VARIABLES)


@contextlib.contextmanager
def experiment_lock(paths: ExperimentPaths) -> Iterator[None]:
    """Hold the experiment folder's lock for the block; ExperimentBusyError when another run has it.

    The folder must exist. Ranks > 0 of a distributed run pass through (see the module docstring).
    """
    if launched_as_other_rank():
        yield
        return
    if fcntl is None:
        log.warning("no fcntl.flock on this platform: %s is not protected against a second run", paths.root)
        yield
        return
    path = paths.lock_file
    with write_errors(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = _try_lock(fd, paths)
        if locked:
            with contextlib.suppress(OSError):  # the holder line is for the next run; the lock is what counts
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(_holder()) + "\n").encode(), 0)
        try:
            yield
        finally:
            if locked:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _try_lock(fd: int, paths: ExperimentPaths) -> bool:
    """Take the lock (True), or find it unsupported here (False); ExperimentBusyError when it is held."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ExperimentBusyError(_busy_message(paths.root, fd)) from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        # some network and FUSE file systems have no locks: run unprotected rather than not at all
        log.warning("%s cannot be locked (%s): not protected against a second run", paths.lock_file, e.strerror)
        return False
    return True


def _holder() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "",
    }


def _busy_message(folder: Path, fd: int) -> str:
    holder = _read_holder(fd)
    who = (
        f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
        if holder
        else "a process that has not written its pid yet"
    )
    return (
        f"{folder} is in use by another run ({who}): wait for it to finish or stop it, "
        f"or use name=NAME for another folder"
    )


def _read_holder(fd: int, wait: float = 2.0) -> dict:
    """The holder's line; a holder that has just taken the lock writes it a moment later."""
    deadline = time.monotonic() + wait
    while True:
        try:
            text = os.pread(fd, 4096, 0).decode(errors="replace")
            holder = json.loads(text)
            if isinstance(holder, dict):
                return holder
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.05)
