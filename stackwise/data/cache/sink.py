"""Shard files written at disk speed: the caller hands over batches, threads write and hash them.

`ShardSink.put(split, arrays)` runs on the caller's thread and only decides where each row goes: a
shard's files are created there, preallocated to their final size with their .npy header in place
(so a full disk stops the caller at once, naming the file), and the batch goes on a bounded queue.
Threads do the rest:

    io      waits until the batch is on the host (a CUDA event), converts it to the storage dtypes,
            writes each field's rows at their offset in the shard's files (pwrite, in place) and
            gives the batch's buffers back; a shard whose last rows it wrote goes to the hashers;
    hash    `hash_threads` of them: the sha256 of each complete shard's files, read back from the
            page cache (just written; `artifacts.sha256_file` maps them). sha256 is sequential, so
            a file is one thread's work, but shards written one after the other hash at once on
            different threads (hashlib releases the GIL), and no batch buffer waits for a hash;
    close   once a shard is written: one fsync per file, then, once it is hashed, its record.

One core hashes about 0.5-2 GB/s. The hashers were once fed the rows as io wrote them, which held
each batch's buffers until its shard's one hash stream had taken them: a caching pass whose
batches fill one shard after the other (4 x 512 at the seed's sizes: 16 batches a shard) then ran
at one core's sha256 rate, 0.66-0.74 GB/s on the H200 host against its disk's 1.05 GB/s
(benchmarks/RESULTS.md, "Seventh lease set"). Reading back costs a copy from the page cache.

No file is renamed: a cache folder is trusted only through its manifest, written after every
shard is complete and fsync'ed (the per-split folders are fsync'ed once at the end, so the names
are durable before it). An error in a thread (a full disk, a bad batch) is kept and raised in the
caller at its next `put` or at `finish`; every file this sink created is removed first, so nothing
half-written stays. The threads keep draining their queues after an error, so the caller never
blocks on a dead consumer.

One module over 300 lines on purpose: the sink and its threads share one queue discipline and one
error path, and are read together (the file I/O beneath them is fileio.py).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stackwise.artifacts import sha256_file, write_errors
from stackwise.artifacts.atomic import fsync_dir
from stackwise.data.cache.fileio import create_file, write_at
from stackwise.data.cache.layout import npy_header, padded_npy_header, shard_stem

# batches between the caller and the disk: one being written, two queued (their buffers come back
# once written; the hashers read the shard files)
MAX_IN_FLIGHT = 3
# hash threads: shards hashed at once (one core each)
HASH_THREADS = max(1, min(4, os.cpu_count() or 1))
_STOP = object()


# ------------------------------------------------------------------------------------- shards
@dataclass
class _File:
    path: Path  # final name (what errors name)
    rel: str  # relative to the cache folder (what the manifest records)
    dtype: np.dtype
    row_shape: tuple[int, ...]
    header: bytes
    fd: int = -1

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    def size(self, rows: int) -> int:
        return len(self.header) + rows * self.row_bytes


@dataclass
class _Shard:
    split: str
    number: int
    stem: str
    planned: int  # rows its files were sized for
    files: dict[str, _File]
    assigned: int = 0  # rows handed to it so far (caller's thread)
    sha256: dict[str, str] = field(default_factory=dict)  # per field, once hashed
    hashed: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Job:
    arrays: Mapping[str, Any] | None  # host tensors (maybe still being copied into) per field
    ready: Any  # None, or an object whose .synchronize() returns once `arrays` hold the batch
    release: Callable[[], None] | None  # gives the caller's buffers back
    segments: list[tuple[_Shard, int, int, int]]  # (shard, first row in shard, first row in batch, rows)
    completes: list[_Shard]  # shards whose last rows this job carries
    shrink: bool = False  # a shard that ends short of `planned` (its rows are all written)

    def done(self, sink: ShardSink) -> None:
        """io is done with the batch: its buffers go back to the caller."""
        self.arrays = None
        if self.release is not None:
            self.release()
        sink._slots.release()


class ShardSink:
    """Rows of each split into shards of `shard_size` rows, one .npy file per field.

    `storage`: numpy dtype on disk per field, in the order each shard's files are created.
    `rows`: the rows each split will receive (as far as known): a split's last shard is sized for
    what is left; a shard that ends short of its size (an unknown or wrong count) is shrunk at
    `finish`. Every shard is hashed from its files once complete. `convert(arrays) -> {field:
    np.ndarray}` runs on the io thread, after the batch is on the host: host tensors to the
    storage dtypes (and any check).
    `hash_threads`: files sha256'ed at once; the files and records are the same for any number.
    """

    def __init__(
        self,
        acts_dir: Path,
        *,
        storage: Mapping[str, str],
        shard_size: int,
        rank: int,
        convert: Callable[[Mapping[str, Any]], dict[str, np.ndarray]],
        rows: Mapping[str, int | None] | None = None,
        max_in_flight: int = MAX_IN_FLIGHT,
        hash_threads: int = HASH_THREADS,
    ):
        self.dir, self.rank, self.shard_size = Path(acts_dir), int(rank), int(shard_size)
        self.storage = {f: np.dtype(dt) for f, dt in storage.items()}
        self.convert = convert
        self.remaining: dict[str, int | None] = dict(rows or {})
        self.row_shapes: dict[str, tuple[int, ...]] | None = None
        self._open: dict[str, _Shard] = {}
        self._count: dict[str, int] = {}
        self._created: list[_File] = []  # every file made, for the cleanup after an error
        self._records: list[tuple[str, int, dict[str, Any]]] = []
        self._split_order: list[str] = []
        self._error: BaseException | None = None
        self._failed = threading.Event()
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._io_q: queue.Queue = queue.Queue(maxsize=max_in_flight)
        self._hash_q: queue.Queue = queue.Queue()  # complete shards, to hash
        self._close_q: queue.Queue = queue.Queue()
        self._n_hash = max(1, int(hash_threads))
        loops = [("io", self._io), *((f"hash{i}", self._hash) for i in range(self._n_hash)), ("close", self._close)]
        self._threads = [
            threading.Thread(target=loop, name=f"stackwise-cache-{name}", daemon=True) for name, loop in loops
        ]
        for t in self._threads:
            t.start()
        self._finished = False
        # where the threads' time went (seconds): io waiting for the GPU's copy, converting, writing;
        # close fsync'ing; the hashers, summed. Read by `summary()` for the caching pass's log line.
        self.seconds: Counter[str] = Counter()
        self._seconds_lock = threading.Lock()

    def summary(self) -> str:
        """One line: "io: waited for the device 0.1 s, converted 0.2 s, wrote 7.9 s; fsync 0.4 s; sha256
        9.1 s over 4 thread(s)" (the hash time summed over the threads)."""
        s = self.seconds
        return (
            f"io: waited for the device {s['ready']:.1f} s, converted {s['convert']:.1f} s, wrote {s['write']:.1f} s; "
            f"fsync {s['fsync']:.1f} s; sha256 {s['hash']:.1f} s over {self._n_hash} thread(s)"
        )

    # ------------------------------------------------------------------ the caller's side
    def put(
        self,
        split: str,
        arrays: Mapping[str, Any],
        ready: Any = None,
        release: Callable[[], None] | None = None,
    ) -> None:
        """Queue one batch (`arrays`: a (B, ...) host tensor or array per field of `storage`). Blocks
        while MAX_IN_FLIGHT batches are in the threads' hands; raises a thread's error."""
        self.raise_if_failed()
        shapes = {f: tuple(arrays[f].shape) for f in self.storage}
        n = shapes["hidden"][0] if "hidden" in shapes else next(iter(shapes.values()))[0]
        rows = {f: s[1:] for f, s in shapes.items()}
        bad = [f for f, s in shapes.items() if s[0] != n]
        if bad:
            raise ValueError(f"every field of a batch must have {n} rows; {bad} do not ({shapes})")
        if self.row_shapes is None:
            self.row_shapes = rows
        elif rows != self.row_shapes:
            raise ValueError(f"a batch's row shapes {rows} differ from the first batch's {self.row_shapes}")
        if split not in self._split_order:
            self._split_order.append(split)
        segments, completes, at = [], [], 0
        try:
            while at < n:
                shard = self._open.get(split) or self._new_shard(split)
                take = min(n - at, shard.planned - shard.assigned)
                segments.append((shard, shard.assigned, at, take))
                shard.assigned += take
                at += take
                if shard.assigned == shard.planned:
                    completes.append(shard)
                    del self._open[split]
        except BaseException:
            self.abort()  # a full disk while creating a shard: nothing of this cache stays
            raise
        while not self._slots.acquire(timeout=0.1):
            self.raise_if_failed()
        self._io_q.put(_Job(arrays, ready, release, segments, completes))

    def _new_shard(self, split: str) -> _Shard:
        left = self.remaining.get(split)
        planned = self.shard_size if left is None or left <= 0 else min(self.shard_size, left)
        if left is not None:
            self.remaining[split] = left - planned
        number = self._count.get(split, 0)
        self._count[split] = number + 1
        stem = shard_stem(split, self.rank, number)
        assert self.row_shapes is not None
        files = {}
        with write_errors(self.dir / split):
            (self.dir / split).mkdir(parents=True, exist_ok=True)
        for f, dt in self.storage.items():
            rel = f"{stem}.{f}.npy"
            shape = self.row_shapes[f]
            files[f] = _File(self.dir / rel, rel, dt, shape, npy_header(dt, (planned, *shape)))
        shard = _Shard(split, number, stem, planned, files)
        for fh in files.values():
            with write_errors(fh.path):
                fh.fd = create_file(fh.path, fh.header, fh.size(planned))
            self._created.append(fh)
        self._open[split] = shard
        return shard

    def finish(self) -> list[dict[str, Any]]:
        """Wait for every shard to be written, hashed and fsync'ed; return their records in row
        order (split by split, shard by shard). Raises a thread's error, after removing every file."""
        self.raise_if_failed()
        for shard in list(self._open.values()):  # short of their size: shrink them to their rows
            self._slots.acquire()
            self._io_q.put(_Job(None, None, None, [], [shard], shrink=True))
        self._open.clear()
        self._stop()
        self.raise_if_failed()
        for split in self._split_order:
            fsync_dir(self.dir / split)
        order = {s: i for i, s in enumerate(self._split_order)}
        return [rec for _, _, rec in sorted(self._records, key=lambda r: (order[r[0]], r[1]))]

    def raise_if_failed(self) -> None:
        if self._error is not None:
            err = self._error
            self.abort()
            raise err

    def abort(self) -> None:
        """Stop the threads and remove every file this sink created (a cache that cannot complete)."""
        self._failed.set()
        self._stop()
        for fh in self._created:
            if fh.fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fh.fd)
                fh.fd = -1
            with contextlib.suppress(OSError):
                fh.path.unlink(missing_ok=True)
        self._created.clear()

    def _stop(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._io_q.put(_STOP)
        for t in self._threads:
            t.join()

    # ------------------------------------------------------------------ the threads
    def _fail(self, e: BaseException) -> None:
        if self._error is None:
            self._error = e
        self._failed.set()

    def _io(self) -> None:
        while True:
            job = self._io_q.get()
            if job is _STOP:
                for _ in range(self._n_hash):
                    self._hash_q.put(_STOP)
                self._close_q.put(_STOP)
                return
            try:
                if not self._failed.is_set():
                    if job.shrink:
                        self._shrink(job.completes[0])
                    else:
                        self._write(job)
            except BaseException as e:
                self._fail(e)
            finally:
                job.done(self)
                for shard in job.completes:  # its rows are all in its files: hash it, fsync it
                    self._hash_q.put(shard)
                    self._close_q.put(shard)

    def _write(self, job: _Job) -> None:
        t0 = time.perf_counter()
        if job.ready is not None:
            job.ready.synchronize()
        t1 = time.perf_counter()
        stored = self.convert(job.arrays)
        t2 = time.perf_counter()
        for f, dt in self.storage.items():
            if stored[f].dtype != dt or not stored[f].flags.c_contiguous:
                raise ValueError(f"convert gave field {f} as {stored[f].dtype}, expected C-contiguous {dt}")
        for shard, at, first, n in job.segments:
            for f, fh in shard.files.items():
                with write_errors(fh.path):
                    write_at(fh.fd, stored[f][first : first + n], len(fh.header) + at * fh.row_bytes)
        self.seconds.update(ready=t1 - t0, convert=t2 - t1, write=time.perf_counter() - t2)

    def _shrink(self, shard: _Shard) -> None:
        """Rewrite the headers for the rows the shard holds (same length: the data stays where it is)."""
        rows = shard.assigned
        for fh in shard.files.values():
            with write_errors(fh.path):
                write_at(fh.fd, padded_npy_header(fh.dtype, (rows, *fh.row_shape), len(fh.header)), 0)
                os.ftruncate(fh.fd, fh.size(rows))
        shard.planned = rows

    def _hash(self) -> None:
        while True:
            shard = self._hash_q.get()
            if shard is _STOP:
                return
            try:
                t0 = time.perf_counter()
                for f, fh in shard.files.items():
                    if not self._failed.is_set():
                        with write_errors(fh.path):
                            shard.sha256[f] = sha256_file(fh.path)
                with self._seconds_lock:  # several hashers add to it
                    self.seconds["hash"] += time.perf_counter() - t0
            except BaseException as e:
                self._fail(e)
            finally:
                shard.hashed.set()

    def _close(self) -> None:
        while True:
            shard = self._close_q.get()
            if shard is _STOP:
                return
            try:
                t0 = time.perf_counter()
                for fh in shard.files.values():
                    if not self._failed.is_set():
                        with write_errors(fh.path):
                            os.fsync(fh.fd)
                    os.close(fh.fd)
                    fh.fd = -1
                self.seconds["fsync"] += time.perf_counter() - t0
                shard.hashed.wait()
                if not self._failed.is_set():
                    self._records.append((shard.split, shard.number, self._record(shard, shard.sha256)))
            except BaseException as e:
                self._fail(e)

    def _record(self, shard: _Shard, sha256: Mapping[str, str]) -> dict[str, Any]:
        files = {
            f: {
                "path": fh.rel,
                "sha256": sha256[f],
                "bytes": fh.size(shard.planned),
                "shape": [shard.planned, *fh.row_shape],
                "dtype": str(fh.dtype),
            }
            for f, fh in shard.files.items()
        }
        return {"split": shard.split, "stem": shard.stem, "rank": self.rank, "rows": shard.planned, "files": files}
