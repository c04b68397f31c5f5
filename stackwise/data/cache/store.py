"""Where stage k's input lives (`cache.store`), and how `auto` picks it.

    disk       acts_layer{k-1}/ under the experiment folder: written once by the caching pass of
               layer k-1, read by stage k; outlives the process (the default)
    memory     the same files in a RAM-backed folder (cache.memory_dir, a tmpfs): no disk bandwidth
    recompute  no cache: stage k runs the frozen layers 1..k-1 on its token batches
               (stackwise/model/prefix.py), every time it reads a row

`auto` prices each store for the whole run, from rates and sizes, and takes the cheapest:

    f  tokens/s of one layer's forward on the device     b  bytes per cached token (cache.dtype)
    C  tokens one cache holds (its rows x seq_len)        R  tokens one layer stage reads
       (training batches, validation passes)              w  bytes/s the store writes (and reads)

    recompute  sum over k = 2..L of  R * (k - 1) / f           (layers 1..k-1 again for every read)
    disk       (L - 1) * ( C / f  +  C * b / w  +  (R + C) * b / w )
    memory     the same with the tmpfs's w                    (caching pass: layer k-1 over the cache,
                                                              its write; stage k's reads, the next pass's)

A store is a candidate only where it fits: disk and memory need the caches kept at once (two with
`cache.keep=last`, all of them with `keep=all`) on the disk, or in half the tmpfs's free RAM (the
rest is the page cache's and the pinned buffers'); recompute needs the frozen layers 1..L-1 in half
of the accelerator's free memory. A tie goes to disk, then memory. On a CPU `auto` is always disk:
there a layer's forward is about as slow as reading its row, and nothing is measured, so the default
CPU run is unchanged. The rule is a pure function of `StoreRates` and `StorePlan` (`choose_store`);
the rates are measured once per experiment folder and the choice kept beside it
(`ExperimentPaths.store_choice`), so a resumed run and every DDP rank use the same store.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

STORES = ("disk", "memory", "recompute")  # what `auto` resolves to
PROBE_BYTES = 256 * 2**20  # written (and fsync'ed) once per store to measure its bandwidth


@dataclass(frozen=True)
class StoreRates:
    """What the machine does: measured (see `probe_write_rate`, stackwise/model/prefix.py `forward_rate`)."""

    device: str  # "cpu", "cuda", ...
    layer_tokens_per_s: float = 0.0  # one layer's forward, no grad, in the stages' precision
    disk_bytes_per_s: float = 0.0  # sequential write + fsync of the disk under the experiment folder
    memory_bytes_per_s: float = 0.0  # the same into cache.memory_dir
    free_disk: int = 0
    free_memory: int = 0  # free bytes of cache.memory_dir's file system (a tmpfs: RAM)
    free_device: int = 0  # free accelerator memory


@dataclass(frozen=True)
class StorePlan:
    """What the run needs: sizes from its config."""

    n_layers: int
    cache_tokens: int  # C
    read_tokens: int  # R
    bytes_per_token: float  # b
    caches_kept: int  # caches on the store at once
    prefix_bytes: int  # the frozen layers 1..L-1 (and the embedding) in the stages' dtype


def store_costs(rates: StoreRates, plan: StorePlan) -> dict[str, float]:
    """Estimated seconds each candidate store costs the run (stores that do not fit are left out)."""
    f, b, c, r, n = rates.layer_tokens_per_s, plan.bytes_per_token, plan.cache_tokens, plan.read_tokens, plan.n_layers
    costs: dict[str, float] = {}
    if n < 2 or f <= 0:
        return costs
    kept = plan.caches_kept * c * b
    if plan.prefix_bytes <= rates.free_device // 2:
        costs["recompute"] = sum(k - 1 for k in range(2, n + 1)) * r / f
    for store, w, room in (
        ("disk", rates.disk_bytes_per_s, rates.free_disk),
        ("memory", rates.memory_bytes_per_s, rates.free_memory // 2),
    ):
        if w > 0 and kept <= room:
            costs[store] = (n - 1) * (c / f + c * b / w + (r + c) * b / w)
    return costs


def choose_store(rates: StoreRates, plan: StorePlan) -> tuple[str, str]:
    """(store, why) for `cache.store=auto`: the cheapest candidate (module docstring), disk on a CPU."""
    if rates.device == "cpu":
        return "disk", "the device is a CPU (a layer's forward costs about what reading its row does)"
    if plan.n_layers < 2:
        return "disk", "the model has one layer: no stage reads a cache"
    costs = store_costs(rates, plan)
    if not costs:
        return "disk", "no store fits (the free-space check says how much is missing)"
    best = min(STORES, key=lambda s: costs.get(s, float("inf")))  # STORES' order breaks ties
    priced = ", ".join(f"{s} {costs[s]:.0f} s" for s in STORES if s in costs)
    left_out = [s for s in STORES if s not in costs]
    rates_text = (
        f"one layer {rates.layer_tokens_per_s / 1e3:,.0f}k tokens/s, disk {rates.disk_bytes_per_s / 1e9:.2f} GB/s, "
        f"memory {rates.memory_bytes_per_s / 1e9:.2f} GB/s, {plan.bytes_per_token:,.0f} B/token"
    )
    why = f"it costs least: {priced} ({rates_text})"
    if left_out:
        why += f"; {' and '.join(left_out)} would not fit"
    return best, why


def probe_write_rate(folder: Path, nbytes: int = PROBE_BYTES) -> float:
    """Bytes/s of writing `nbytes` into a new file under `folder` and fsync'ing it (the file is removed).
    0.0 when the folder cannot be written or has no room for the probe."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        nbytes = min(nbytes, shutil.disk_usage(folder).free // 8)
        if nbytes < 2**20:
            return 0.0
        block = os.urandom(2**20) * 16  # 16 MiB
        path = folder / f".stackwise-probe-{os.getpid()}"
        t0 = time.perf_counter()
        with open(path, "wb", buffering=0) as fh:
            left = nbytes
            while left > 0:
                left -= fh.write(block[: min(left, len(block))])
            os.fsync(fh.fileno())
        seconds = time.perf_counter() - t0
        path.unlink(missing_ok=True)
    except OSError:
        return 0.0
    return nbytes / max(seconds, 1e-9)


def free_bytes(path: Path) -> int:
    """Free bytes of the file system that holds `path` (which may not exist yet)."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return 0
