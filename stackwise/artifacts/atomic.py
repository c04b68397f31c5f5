"""Atomic writes: a file is the old one or the new one, never half of one.

Every file is written under a temporary name in the same folder, fsync'ed, then `os.replace`d over
the final name. An OS error while writing (a full disk, a read-only file system) is an
ArtifactWriteError naming the file: the temporary is removed and the old file, if any, stays.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

from stackwise.artifacts.messages import one_line
from stackwise.artifacts.paths import PathLike
from stackwise.errors import ArtifactWriteError


def fsync_dir(folder: Path) -> None:
    """Make the names of the files created or renamed in `folder` durable; not every platform can
    open a folder, which is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def os_error_in(exc: BaseException) -> OSError | None:
    """The OS error behind `exc`: itself, the one it was raised from or while handling (torch.save
    reports a failed write as a RuntimeError raised while handling the OSError), or the `(os error N)`
    that Rust libraries (safetensors) put in their message. None when there is none."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    m = re.search(r"\(os error (\d+)\)", str(exc))
    return OSError(int(m.group(1)), os.strerror(int(m.group(1)))) if m else None


@contextlib.contextmanager
def write_errors(path: PathLike) -> Iterator[None]:
    """Turn an OS error while writing `path` (no space, quota, read-only, permission, file too large)
    into an ArtifactWriteError naming `path`: a full disk is the user's to fix, not a traceback.

    An OS error about another file (one the writer was reading, say) passes unchanged, as does
    every other exception.
    """
    try:
        yield
    except ArtifactWriteError:
        raise
    except Exception as e:
        err = os_error_in(e)
        if err is None or not _is_about(err, Path(path)):
            raise
        raise ArtifactWriteError(path, err.errno, one_line(err.strerror or err)) from e


def _is_about(err: OSError, path: Path) -> bool:
    """Whether `err` names no file, or `path`, one of its folders, or a file beside it (its temporary)."""
    if err.filename is None:
        return True
    named = Path(os.fsdecode(err.filename)).absolute()
    target = path.absolute()
    return named == target or named in target.parents or named.parent == target.parent


@contextlib.contextmanager
def mode_kept(path: Path) -> Iterator[None]:
    """The permissions `path` has now are the ones it has after the block, even if a writer in it
    made the file again with its own (safetensors' `save_file` makes every file 0600)."""
    mode = path.stat().st_mode & 0o777
    yield
    if path.stat().st_mode & 0o777 != mode:
        os.chmod(path, mode)


def _create_empty(path: Path) -> None:
    """Create `path` (it must not exist) with the permissions any new file gets: 0666 less the umask."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))


def new_file(path: Path) -> Path:
    """`path` made empty with the permissions any new file gets (0666 less the umask)."""
    path.unlink(missing_ok=True)
    _create_empty(path)
    return path


def _new_temporary(final: Path) -> Path:
    """A new empty file beside `final`, `.<name>.<random>.tmp`, with the permissions any new file
    gets (0666 less the umask: readable by the group as the user's other files are; mkstemp's
    0600 would have stayed on every artifact after the rename)."""
    for _ in range(100):
        tmp = final.parent / f".{final.name}.{secrets.token_hex(4)}.tmp"
        try:
            _create_empty(tmp)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(final.parent))


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    For writers that want a file name (safetensors' `save_file`). On any exception the temporary
    file is removed and `path` is left exactly as it was; an OS error (a full disk...) is raised as
    an ArtifactWriteError naming `path`.
    """
    final = Path(path)
    tmp: Path | None = None
    try:
        with write_errors(final):
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = _new_temporary(final)
            with mode_kept(tmp):
                yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_open(path: PathLike) -> Iterator[IO[bytes]]:
    """Yield a binary file object whose bytes replace `path` atomically when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(data: bytes, path: PathLike) -> None:
    """Replace `path` with `data` atomically."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_json(obj: Any, path: PathLike) -> None:
    """Replace `path` with `obj` as indented JSON atomically (serialised first: a bad value writes nothing)."""
    atomic_write_bytes((json.dumps(obj, indent=2) + "\n").encode(), path)


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """`torch.save(obj, path)`, atomically."""
    with atomic_open(path) as f:
        torch.save(obj, f)


class HashingWriter:
    """A write-only file wrapper that hashes what passes through, so a shard is hashed while it
    is written instead of being read back."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self._h = hashlib.sha256()
        self.nbytes = 0

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        self._h.update(mv)
        self._f.write(mv)
        self.nbytes += mv.nbytes
        return mv.nbytes

    def flush(self) -> None:
        self._f.flush()

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def atomic_write_stream(path: PathLike, write: Callable[[IO[bytes]], None]) -> tuple[str, int]:
    """Atomically write `path` through `write(fileobj)`; return (sha256, size in bytes)."""
    with atomic_open(path) as f:
        hw = HashingWriter(f)
        write(hw)  # type: ignore[arg-type]
    return hw.hexdigest(), hw.nbytes


def sha256_file(path: PathLike, chunk: int = 8 << 20) -> str:
    """Hex sha256 of a file's bytes (files can be many GiB), `chunk` bytes per hashlib call (it
    releases the GIL meanwhile). Hashed from a read-only mapping of the file: the page cache's pages
    themselves, without the copy a read() makes; read in chunks where the file cannot be mapped."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except (OSError, ValueError):  # a file system that cannot map files
            m = None
        if m is None:
            while block := f.read(chunk):
                h.update(block)
            return h.hexdigest()
        with m:
            view = memoryview(m)
            try:
                for at in range(0, size, chunk):
                    h.update(view[at : at + chunk])
            finally:
                view.release()
    return h.hexdigest()
