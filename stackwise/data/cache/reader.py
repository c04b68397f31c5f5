"""Reading an activation cache: `ActivationCache` (a checked folder) and `ActivationDataset` (its rows).

A batch is read whole (`__getitems__`, which torch's DataLoader calls with a batch's indices):
its rows are grouped into runs of consecutive rows and each run is copied, one slice per shard
and field, from the memory-mapped shards straight into the batch's tensors. Pair the dataset with
`collate=ready_batch` (the batch needs no collating). An fp8 cache's batch is decoded to bfloat16
where it is read, or, from `dataset.undecoded()`, later by `decode_batch` where the batch is then (a
loader that copies batches to the GPU decodes them there: half the bytes copied, no CPU pass over them).
"""

from __future__ import annotations

import bisect
import copy
import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from stackwise.artifacts import PathLike, check_expected, manifest_path, one_line, sha256_file
from stackwise.data.cache.layout import FP8, MANIFEST_FORMAT, MANIFEST_VERSION, SCALE, decode_fp8, read_dtype
from stackwise.errors import ArtifactError, StackWiseError


class StaleCacheError(ArtifactError):
    """A readable cache made from another checkpoint or other settings than expected (rebuild it),
    as opposed to a damaged one (a shard missing, truncated or changed: a plain ArtifactError)."""


@dataclass(frozen=True)
class Shard:
    stem: str
    rows: int
    files: dict[str, dict[str, Any]]  # field -> {path (relative to the cache dir), sha256, bytes}


class ActivationCache:
    """A complete, checked activation cache folder (open it with `ActivationCache.open`)."""

    def __init__(self, acts_dir: Path, manifest: dict[str, Any]):
        self.dir, self.manifest = acts_dir, manifest
        self.k: int = manifest["k"]
        self.seq_len: int = manifest["seq_len"]
        self.d_model: int = manifest["d_model"]
        self.views: int = manifest["views"]
        self.hidden_dtype: str = manifest["hidden_dtype"]
        self.config_hash: str = manifest["config_hash"]
        self.producer_sha256: str = manifest["producer_sha256"]
        self.splits: tuple[str, ...] = tuple(manifest["splits"])
        self.fields: tuple[str, ...] = tuple(manifest["fields"])

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.rows(s)}" for s in self.splits)
        return (
            f"ActivationCache({str(self.dir)!r}, k={self.k}, {counts}, T={self.seq_len}, D={self.d_model}, "
            f"{self.hidden_dtype})"
        )

    @classmethod
    def open(cls, acts_dir: PathLike, expect: Mapping[str, Any] | None = None, verify: bool = False) -> ActivationCache:
        """Read and check manifest.json and the presence and size (sha256 too with `verify`) of every shard.

        `expect` holds what this run requires of the cache (config_hash, producer_sha256, k,
        d_model, seq_len, views...): any difference is an ArtifactError naming the manifest.
        """
        acts = Path(acts_dir)
        mpath = manifest_path(acts)
        if not mpath.is_file():
            where = acts if acts.exists() else f"{acts} (missing)"
            raise ArtifactError(
                f"{where} has no manifest.json: the cache is incomplete; rerun the stage that writes it"
            )
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise ArtifactError(
                f"{mpath} is not valid JSON ({one_line(e, 120)}); rerun the stage that writes it (overwrite=true)"
            ) from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise ArtifactError(f"{mpath} is not a StackWise activation manifest; rerun the stage that writes it")
        if manifest.get("version") != MANIFEST_VERSION:
            raise ArtifactError(
                f"{mpath} has version {manifest.get('version')!r} but this StackWise reads version "
                f"{MANIFEST_VERSION}; rerun the stage that writes it (overwrite=true)"
            )
        # expect may name any top-level key (config_hash, d_model...) or any key the producer put in meta
        try:
            check_expected(mpath, {**manifest.get("meta", {}), **manifest}, expect)
        except ArtifactError as e:
            raise StaleCacheError(str(e)) from None
        cache = cls(acts, manifest)
        for split in cache.splits:
            for shard in cache.shards(split):
                for info in shard.files.values():
                    cache._check_file(info, verify)
        return cache

    def _check_file(self, info: Mapping[str, Any], verify: bool) -> None:
        p = self.dir / info["path"]
        hint = f"the cache is corrupt; rerun stage k={self.k} (overwrite=true)"
        if not p.is_file():
            raise ArtifactError(f"{p} is missing but {manifest_path(self.dir).name} lists it: {hint}")
        size = p.stat().st_size
        if size != info["bytes"]:
            raise ArtifactError(f"{p} is {size} bytes but the manifest records {info['bytes']}: {hint}")
        if verify and sha256_file(p) != info["sha256"]:
            raise ArtifactError(f"{p} does not match the sha256 in the manifest: {hint}")

    def rows(self, split: str) -> int:
        return int(self._split(split)["rows"])

    def shards(self, split: str) -> list[Shard]:
        return [Shard(s["stem"], int(s["rows"]), s["files"]) for s in self._split(split)["shards"]]

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self.manifest["splits"]:
            raise StackWiseError(f"{self.dir} has no split {split!r}; it has {list(self.manifest['splits'])}")
        return self.manifest["splits"][split]


def ready_batch(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The DataLoader's collate_fn for `ActivationDataset`: its `__getitems__` returns a whole batch."""
    return batch


def decode_batch(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """A batch of an undecoded fp8 dataset (hidden: (B, T, D) uint8 e4m3 bits, scale: (B, T) float32)
    -> the batch a decoding dataset gives (hidden in bfloat16), computed on the device the batch is
    on; any other batch as it is. One fp32 product rounded once: the same bits on a CPU and a GPU."""
    if SCALE not in batch:
        return batch
    out = {k: v for k, v in batch.items() if k != SCALE}
    bits = batch["hidden"]
    dest = _empty(bits.shape, getattr(torch, read_dtype(FP8))) if bits.device.type == "cpu" else None
    out["hidden"] = decode_fp8(bits, batch[SCALE], out=dest)
    return out


class ActivationDataset(Dataset):
    """Rows of one split of a cache, read from memory-mapped shards a batch at a time.

    `__getitems__(items)` (what torch's DataLoader calls) returns the batch of the rows `items`
    (positions among the rows whose view is in `views`, all rows when None) as a dict:
    hidden (B, T, D) in the read dtype (the stored one; bfloat16 for an fp8 cache, dequantised
    here; the stage casts), targets (B, T) int64, mask (B, T) bool, t (B,) float32, index (B,)
    int64, view (B,) int64; `undecoded()` is the same rows with an fp8 cache's hidden states left as
    their uint8 bits and a `scale` (B, T) float32 (see `decode_batch`). `ds[i]` is row i (decoded)
    with the batch dimension dropped. Memmaps open lazily in the process that reads (each
    DataLoader worker opens its own) and at most `max_open_shards` shards stay open.
    """

    def __init__(
        self, cache: ActivationCache, split: str, views: Sequence[int] | None = None, max_open_shards: int = 32
    ):
        self.cache, self.split = cache, split
        self.hidden_dtype = cache.hidden_dtype
        self.decode = True  # fp8: decode in __getitems__ (False: `undecoded()`)
        self.fields = cache.fields
        self.shards = cache.shards(split)
        self.row_shapes = {f: tuple(cache.manifest["fields"][f]["row_shape"]) for f in self.fields}
        self.storage = {f: np.dtype(cache.manifest["fields"][f]["storage"]) for f in self.fields}
        self._ends = np.cumsum([s.rows for s in self.shards]).tolist()  # shard j holds rows [ends[j-1], ends[j])
        self.max_open_shards = max(1, max_open_shards)
        self._open: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self.selected: np.ndarray | None = None  # global rows kept by the view filter
        if views is not None:
            keep = np.asarray(sorted({int(v) for v in views}), dtype=np.int64)
            view_col = (
                np.concatenate([np.asarray(self._shard(j)["view"]) for j in range(len(self.shards))])
                if self.shards
                else np.zeros(0, np.int16)
            )
            self.selected = np.flatnonzero(np.isin(view_col, keep)).astype(np.int64)
            self._open.clear()

    def undecoded(self) -> ActivationDataset:
        """These rows with an fp8 cache's hidden states left undecoded (`decode_batch` decodes them)."""
        if self.hidden_dtype != FP8:
            return self
        other = copy.copy(self)
        other._open = OrderedDict()
        other.decode = False
        return other

    def __len__(self) -> int:
        return len(self.selected) if self.selected is not None else (self._ends[-1] if self._ends else 0)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers (spawn) receive the dataset without its memmaps: sending one would copy the shard
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def rows_of(self, items: Sequence[int]) -> np.ndarray:
        """Items (negative ones count from the end) -> global rows of the split."""
        n = len(self)
        idx = np.asarray(items, dtype=np.int64).reshape(-1)
        bad = idx[(idx < -n) | (idx >= n)]
        if bad.size:
            raise IndexError(f"row {int(bad[0])} out of range for {n} rows of {self.split}")
        idx = idx % n if n else idx
        return self.selected[idx] if self.selected is not None else idx

    def locate(self, i: int) -> tuple[int, int]:
        """Item i -> (shard number, row within the shard), by a bisect on cumulative row counts."""
        g = int(self.rows_of([i])[0])
        j = bisect.bisect_right(self._ends, g)
        return j, g - (self._ends[j - 1] if j else 0)

    def _shard(self, j: int) -> dict[str, np.ndarray]:
        """Memmaps of shard j, opened on first use, least recently used closed beyond the limit."""
        if j in self._open:
            self._open.move_to_end(j)
            return self._open[j]
        shard = self.shards[j]
        arrays = {}
        for f in self.fields:
            p = self.cache.dir / shard.files[f]["path"]
            try:
                arr = np.load(p, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise ArtifactError(
                    f"{p} is not a readable shard ({one_line(e, 120)}): the cache is corrupt; "
                    f"rerun stage k={self.cache.k} (overwrite=true)"
                ) from None
            if arr.shape != (shard.rows, *self.row_shapes[f]):
                raise ArtifactError(
                    f"{p} has shape {arr.shape} but the manifest records "
                    f"{(shard.rows, *self.row_shapes[f])}: the cache is corrupt; rerun stage "
                    f"k={self.cache.k} (overwrite=true)"
                )
            arrays[f] = arr
        self._open[j] = arrays
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return arrays

    def runs(self, rows: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Global rows (in batch order) -> copies (shard, first row in shard, first row in batch, rows):
        each a run of consecutive rows within one shard, as few as the order allows."""
        out = []
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for lo, hi in zip([0, *breaks.tolist()], [*breaks.tolist(), len(rows)], strict=True):
            g, at = int(rows[lo]), lo
            while at < hi:
                j = bisect.bisect_right(self._ends, g)
                start = self._ends[j - 1] if j else 0
                n = min(hi - at, self._ends[j] - g)
                out.append((j, g - start, at, n))
                at, g = at + n, g + n
        return out

    def __getitems__(self, items: Sequence[int]) -> dict[str, Tensor]:
        rows = self.rows_of(items)
        b = len(rows)
        fp8 = self.hidden_dtype == FP8
        decode = fp8 and self.decode
        batch = {
            # fp8 bits decoded here go to a private buffer: the bf16 they decode to is what leaves the worker
            "hidden": _empty((b, *self.row_shapes["hidden"]), _torch_dtype(self.storage["hidden"]), shared=not decode),
            "targets": _empty((b, *self.row_shapes["targets"]), torch.int64),
            "mask": _empty((b, *self.row_shapes["mask"]), torch.bool),
            "t": _empty((b,), torch.float32),
            "index": _empty((b,), torch.int64),
            "view": _empty((b,), torch.int64),
        }
        if fp8:
            batch[SCALE] = _empty((b, *self.row_shapes[SCALE]), torch.float32, shared=not decode)
        # numpy views of the batch's tensors, in the storage dtypes where the two share their bits
        dest = {f: t.numpy() for f, t in batch.items()}
        if self.storage["hidden"] == np.uint16:
            dest["hidden"] = dest["hidden"].view(np.uint16)
        for j, r, at, n in self.runs(rows):
            src = self._shard(j)
            for f, d in dest.items():
                np.copyto(d[at : at + n], src[f][r : r + n], casting="safe")
        if self.storage["hidden"] == np.uint16:
            batch["hidden"] = batch["hidden"].view(torch.bfloat16)
        return decode_batch(batch) if decode else batch

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {f: t[0] for f, t in decode_batch(self.__getitems__([i])).items()}


def _empty(shape: Sequence[int], dtype: torch.dtype, shared: bool = True) -> Tensor:
    """An uninitialised tensor; in a DataLoader worker, in shared memory (as torch's default_collate
    does), so sending the batch to the main process does not copy it once more."""
    if not shared or get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    numel = int(np.prod(shape, dtype=np.int64))
    return proto.new(proto._typed_storage()._new_shared(numel, device=proto.device)).resize_(tuple(shape))


def _torch_dtype(storage: np.dtype) -> torch.dtype:
    """The torch dtype a storage array is copied into (bf16 bits into int16, viewed back after)."""
    return {np.dtype("uint16"): torch.int16, np.dtype("uint8"): torch.uint8}.get(
        storage, torch.from_numpy(np.zeros(0, storage)).dtype
    )
