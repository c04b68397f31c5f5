"""How fast the cache's shard sink (stackwise/data/cache/sink.py) writes, with 1 vs several hash threads.

Writes `--gb` GB of bf16-sized rows through `ShardSink` into `--dir` (a tmpfs by default, so the
disk is not what is measured: what is left is the copy into the files and the sha256 of every
byte), once per hash-thread count, and prints GB/s beside the same bytes written with no hash at
all (pwrite alone). The sink hashes each complete shard on one thread (read back from the page
cache), different shards on different threads at once: several threads pay once a few shards are
written, whatever the batch (`--shard-rows` against the bytes written).

    python benchmarks/sink_hash.py                         # 2 GB into /dev/shm, 1 and 4 hash threads
    python benchmarks/sink_hash.py --gb 8 --threads 1,2,4,8 --dir /mnt/nvme/tmp

A CPU measurement, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from stackwise.data.cache.fileio import create_file, write_at
from stackwise.data.cache.layout import npy_header
from stackwise.data.cache.sink import ShardSink


def through_sink(folder: Path, batch: np.ndarray, batches: int, shard_rows: int, threads: int) -> float:
    """Seconds to write `batches` copies of `batch` as one split of shards of `shard_rows` rows."""
    (folder / "train").mkdir(parents=True)
    t0 = time.perf_counter()
    sink = ShardSink(
        folder,
        storage={"hidden": str(batch.dtype)},
        shard_size=shard_rows,
        rank=0,
        convert=dict,  # the rows are already in their storage dtype
        rows={"train": batches * len(batch)},
        hash_threads=threads,
    )
    for _ in range(batches):
        sink.put("train", {"hidden": batch})
    sink.finish()
    return time.perf_counter() - t0


def raw_writes(folder: Path, batch: np.ndarray, batches: int, shard_rows: int) -> float:
    """The same files, written in place with no hashing (and one fsync each): the sink's floor."""
    folder.mkdir(parents=True)
    rows, row_bytes = batches * len(batch), batch[0].nbytes
    t0 = time.perf_counter()
    fds, written = [], 0
    for shard in range(-(-rows // shard_rows)):
        n = min(shard_rows, rows - shard * shard_rows)
        header = npy_header(batch.dtype, (n, *batch.shape[1:]))
        fd = create_file(folder / f"s{shard:05d}.npy", header, len(header) + n * row_bytes)
        at = 0
        while at < n:
            take = min(n - at, len(batch) - written % len(batch))
            lo = written % len(batch)
            write_at(fd, batch[lo : lo + take], len(header) + at * row_bytes)
            at, written = at + take, written + take
        fds.append(fd)
    for fd in fds:
        os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="GB written per measurement")
    ap.add_argument("--row-mib", type=float, default=1.0, help="MiB per row (bf16: T * D * 2 bytes)")
    ap.add_argument("--batch-rows", type=int, default=64, help="rows per put (the caching pass's batch)")
    ap.add_argument("--shard-rows", type=int, default=16, help="rows per shard (cache.shard_size)")
    ap.add_argument("--threads", default=f"1,{min(4, os.cpu_count() or 1)}", help="hash-thread counts to time")
    ap.add_argument("--dir", default="/dev/shm", help="where to write (removed after each measurement)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per setting; the fastest is printed")
    args = ap.parse_args()

    row_elems = int(args.row_mib * 2**20 // 2)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 2**16, size=(args.batch_rows, row_elems), dtype=np.uint16)  # bf16 bits
    batches = max(1, round(args.gb * 1e9 / batch.nbytes))
    nbytes = batches * batch.nbytes
    print(
        f"{nbytes / 1e9:.2f} GB into {args.dir}: {batches} batches of {args.batch_rows} rows x "
        f"{args.row_mib:g} MiB, shards of {args.shard_rows} rows, {os.cpu_count()} CPUs"
    )

    def best(fn) -> float:
        times = []
        for _ in range(args.repeat):
            folder = Path(tempfile.mkdtemp(prefix="stackwise-sinkbench-", dir=args.dir))
            try:
                times.append(fn(folder / "acts"))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        return min(times)

    secs = best(lambda f: raw_writes(f, batch, batches, args.shard_rows))
    print(f"  pwrite alone, no hash        {nbytes / 1e9 / secs:6.2f} GB/s")
    for threads in (int(t) for t in args.threads.split(",")):
        secs = best(lambda f, n=threads: through_sink(f, batch, batches, args.shard_rows, n))
        print(f"  ShardSink, {threads} hash thread(s) {nbytes / 1e9 / secs:6.2f} GB/s")


if __name__ == "__main__":
    main()
