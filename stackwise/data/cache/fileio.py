"""File I/O beneath the shard writer (stackwise/data/cache/sink.py): files created at their final
size with space reserved up front, so a full disk fails when a shard starts, naming its file, not
halfway through it; rows written in place at their offset."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _libc_fallocate() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (AttributeError, OSError):  # not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    fn.restype = ctypes.c_int
    return fn


_FALLOCATE = _libc_fallocate()


def preallocate(fd: int, nbytes: int) -> None:
    """Reserve `nbytes` for the file (its size becomes `nbytes`): a full disk fails here, before any data.

    fallocate(2) itself, not posix_fallocate: glibc emulates the latter by writing every block where
    the file system lacks it, which would write the shard twice. There a sparse ftruncate does.
    """
    if _FALLOCATE is not None and nbytes > 0:
        if _FALLOCATE(fd, 0, 0, nbytes) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err))
    os.ftruncate(fd, nbytes)


def write_at(fd: int, data: Any, offset: int) -> None:
    """All of `data` (bytes-like) at `offset` of the file."""
    mv = memoryview(data).cast("B")
    while mv.nbytes:
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n


def create_file(path: Path, header: bytes, nbytes: int) -> int:
    """Create `path` (replacing any file there) at its final size `nbytes` with `header` at its
    start; return its descriptor. The one place a shard file is created."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        preallocate(fd, nbytes)
        write_at(fd, header, 0)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return fd
