"""The activation cache: hidden states after layer k, written once, memory-mapped by stage k+1.

Layout of one cache folder (`ExperimentPaths.acts_dir(k)`, file names come from here only):

    train/r{rank}_s{shard:05d}.{field}.npy     one .npy per field per shard, fields below
    val/r{rank}_s{shard:05d}.{field}.npy
    records_r{rank}.json                       what each rank wrote (gathered into the manifest)
    manifest.json                              written LAST: its presence marks the cache complete

Per cached row (one masked view of one sequence):

    hidden  (T, D)  float32 | float16 | bfloat16 (stored as uint16 bits: numpy has no bf16)
    targets (T,)    uint16 when vocab_size <= 65536 else int32 (read back as int64)
    mask    (T,)    bool, True where the input id was replaced by [MASK]
    t       ()      float32 masking rate
    index   ()      int64 example index in its split
    view    ()      int16 mask view (read back as int64)

Why .npy shards: `np.load(mmap_mode="r")` maps them without reading (a split is never loaded
whole), the format has no pickle, and every file is written under a temporary name, hashed while
written and renamed, so a crash leaves only files that no manifest lists. Each rank names its
own shards (`r{rank}_`), so DDP ranks never collide and no cross-rank gather (which would pickle)
is needed: ranks leave their shard records in JSON files that rank 0 folds into the manifest.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import shutil
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from stackwise.artifacts import (
    PathLike,
    atomic_write_json,
    atomic_write_stream,
    check_expected,
    manifest_path,
    one_line,
    sha256_file,
    write_errors,
)
from stackwise.data.sampling import RankStepSampler, trainer_state
from stackwise.errors import ArtifactError, ArtifactWriteError, StackWiseError

MANIFEST_FORMAT = "stackwise.activations"
MANIFEST_VERSION = 1
FIELDS = ("hidden", "targets", "mask", "t", "index", "view")
SPLITS = ("train", "val")
HIDDEN_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# meta keys every manifest must carry: they tie the cache to the checkpoint and config that made it
REQUIRED_META = ("k", "config_hash", "producer_sha256", "views")


# ------------------------------------------------------------------------------ dtypes on disk
def targets_storage(vocab_size: int) -> str:
    """Smallest numpy dtype that holds every token id of the vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def _storage_dtypes(hidden_dtype: str, vocab_size: int) -> dict[str, str]:
    """numpy dtype on disk per field (bf16 hidden states are their uint16 bit patterns)."""
    return {
        "hidden": "uint16" if hidden_dtype == "bfloat16" else hidden_dtype,
        "targets": targets_storage(vocab_size),
        "mask": "bool",
        "t": "float32",
        "index": "int64",
        "view": "int16",
    }


def _logical_dtypes(hidden_dtype: str) -> dict[str, str]:
    """dtype of the tensors a reader gets back per field."""
    return {
        "hidden": hidden_dtype,
        "targets": "int64",
        "mask": "bool",
        "t": "float32",
        "index": "int64",
        "view": "int64",
    }


def _hidden_to_numpy(h: Tensor, hidden_dtype: str) -> np.ndarray:
    """(B, T, D) tensor -> numpy in the storage dtype (a cast to the cache dtype, then bits for bf16)."""
    h = h.detach().to("cpu", HIDDEN_DTYPES[hidden_dtype]).contiguous()
    if hidden_dtype == "bfloat16":
        # int16 view works on every torch >= 2.1 (torch.uint16 arrived in 2.3); same bits as uint16
        return h.view(torch.int16).numpy().view(np.uint16)
    return h.numpy()


def _hidden_from_numpy(a: np.ndarray, hidden_dtype: str) -> Tensor:
    """Storage array (a private copy) -> tensor in the cache dtype, bit for bit."""
    if hidden_dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def estimate_cache_bytes(n_rows: int, seq_len: int, d_model: int, dtype: str, vocab_size: int | None = None) -> int:
    """Bytes the shards of `n_rows` rows take on disk (headers excluded: < 1 KiB per file).

    Without `vocab_size` targets are counted at 4 bytes, the larger of the two storages.
    """
    if dtype not in HIDDEN_DTYPES:
        raise StackWiseError(f"cache.dtype: must be one of {sorted(HIDDEN_DTYPES)}, got {dtype!r}")
    hidden = seq_len * d_model * HIDDEN_DTYPES[dtype].itemsize
    targets = seq_len * (np.dtype(targets_storage(vocab_size)).itemsize if vocab_size else 4)
    per_row = hidden + targets + seq_len + 4 + 8 + 2  # + mask, t, index, view
    return int(n_rows) * per_row


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_free_space(path: PathLike, needed_bytes: int) -> None:
    """Stop before caching when the disk under `path` (which may not exist yet) cannot hold it."""
    free = shutil.disk_usage(_existing_ancestor(Path(path))).free
    if needed_bytes > free:
        raise StackWiseError(
            f"not enough disk space for the activation cache at {path}: needs "
            f"{_human_bytes(needed_bytes)}, {_human_bytes(free)} free (lower cache.train_sequences "
            f"or cache.views, use cache.dtype=bfloat16, or free some space)"
        )


def _human_bytes(n: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


# ------------------------------------------------------------------------------------- writer
def _shard_stem(split: str, rank: int, shard: int) -> str:
    return f"{split}/r{rank}_s{shard:05d}"


def _records_path(acts_dir: Path, rank: int) -> Path:
    return acts_dir / f"records_r{rank}.json"


class CacheWriter(BasePredictionWriter):
    """Streams `trainer.predict` outputs into fixed-size shards, one split per predict dataloader.

    `predict_step` returns per batch {"hidden" (B,T,D), "targets" (B,T) long, "mask" (B,T) bool,
    "t" (B,) float, "index" (B,) long, "view" (B,) long}. At most `shard_size` + one batch of rows
    is held in memory per split; use `trainer.predict(..., return_predictions=False)` so Lightning
    does not keep them all either. After predict, `records()` (every rank's shards) feeds
    `write_manifest`, which the caller runs on global rank 0 once the stage's checks pass.
    """

    def __init__(
        self,
        acts_dir: PathLike,
        *,
        shard_size: int,
        vocab_size: int,
        dtype: str = "float32",
        splits: Sequence[str] = SPLITS,
    ):
        super().__init__(write_interval="batch")
        if dtype not in HIDDEN_DTYPES:
            raise StackWiseError(f"cache.dtype: must be one of {sorted(HIDDEN_DTYPES)}, got {dtype!r}")
        if shard_size < 1:
            raise StackWiseError(f"cache.shard_size: must be >= 1, got {shard_size}")
        self.acts_dir = Path(acts_dir)
        self.shard_size, self.vocab_size, self.hidden_dtype = int(shard_size), int(vocab_size), dtype
        self.splits = tuple(splits)
        self.storage = _storage_dtypes(dtype, self.vocab_size)
        self.rank = 0
        self.local_records: list[dict[str, Any]] = []  # this rank's shards, in write order
        self._buffers: dict[str, list[dict[str, np.ndarray]]] = {}
        self._buffered: dict[str, int] = {}
        self._next_shard: dict[str, int] = {}

    # -- lifecycle
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":  # only a predict run writes; never touch the folder otherwise
            return
        if manifest_path(self.acts_dir).exists():
            raise ArtifactError(
                f"{self.acts_dir} already holds a complete activation cache; discard it first "
                f"(overwrite=true) instead of writing over it"
            )
        self.rank = trainer.global_rank
        if self.rank == 0:  # leftovers of an interrupted run, every rank's: no manifest trusts them
            discard_incomplete(self.acts_dir)
        trainer.strategy.barrier("stackwise_cache_setup")
        for split in self.splits:
            with write_errors(self.acts_dir / split):
                (self.acts_dir / split).mkdir(parents=True, exist_ok=True)
        self.local_records = []
        self._buffers = {s: [] for s in self.splits}
        self._buffered = dict.fromkeys(self.splits, 0)
        self._next_shard = dict.fromkeys(self.splits, 0)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.predict_loop.return_predictions:
            rank_zero_warn(
                "CacheWriter: call trainer.predict(..., return_predictions=False), or Lightning keeps "
                "every cached activation in memory as well"
            )

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not 0 <= dataloader_idx < len(self.splits):
            raise ValueError(f"CacheWriter got predict dataloader {dataloader_idx} but knows splits {self.splits}")
        split = self.splits[dataloader_idx]
        rows = self._to_numpy(prediction)
        self._buffers[split].append(rows)
        self._buffered[split] += len(rows["index"])
        while self._buffered[split] >= self.shard_size:
            self._write_shard(split, self.shard_size)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for split in self.splits:  # the last, smaller shard of each split
            if self._buffered[split]:
                self._write_shard(split, self._buffered[split])
        atomic_write_json(self.local_records, _records_path(self.acts_dir, self.rank))
        trainer.strategy.barrier("stackwise_cache_written")

    # -- rows and shards
    def _to_numpy(self, pred: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
        missing = [f for f in FIELDS if f not in pred]
        if missing:
            raise ValueError(f"predict_step must return {FIELDS}; missing {missing}")
        hidden = pred["hidden"]
        if hidden.ndim != 3:
            raise ValueError(f"predict_step's 'hidden' must be (B, T, D), got {tuple(hidden.shape)}")
        b, t_len = hidden.shape[:2]
        targets = pred["targets"].detach().to("cpu")
        if tuple(targets.shape) != (b, t_len) or tuple(pred["mask"].shape) != (b, t_len):
            raise ValueError(
                f"'targets'/'mask' must be (B, T) = {(b, t_len)}, got "
                f"{tuple(targets.shape)}/{tuple(pred['mask'].shape)}"
            )
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= self.vocab_size):
            raise ValueError(f"'targets' outside [0, {self.vocab_size}): the cache's vocab_size is wrong")
        out = {
            "hidden": _hidden_to_numpy(hidden, self.hidden_dtype),  # (B, T, D)
            "targets": targets.numpy().astype(self.storage["targets"]),  # (B, T)
            "mask": pred["mask"].detach().to("cpu", torch.bool).numpy(),  # (B, T)
            "t": pred["t"].detach().to("cpu", torch.float32).reshape(b).numpy(),  # (B,)
            "index": pred["index"].detach().to("cpu", torch.int64).reshape(b).numpy(),  # (B,)
            "view": pred["view"].detach().to("cpu", torch.int64).reshape(b).numpy().astype(np.int16),  # (B,)
        }
        return out

    def _write_shard(self, split: str, n: int) -> None:
        """Write the first `n` buffered rows of `split` as one shard; keep the rest buffered."""
        merged = {f: np.concatenate([r[f] for r in self._buffers[split]]) for f in FIELDS}
        shard = {f: merged[f][:n] for f in FIELDS}
        rest = {f: merged[f][n:] for f in FIELDS}
        self._buffers[split] = [rest] if len(rest["index"]) else []
        self._buffered[split] -= n

        stem = _shard_stem(split, self.rank, self._next_shard[split])
        self._next_shard[split] += 1
        files = {}
        try:
            for f in FIELDS:
                rel = f"{stem}.{f}.npy"
                arr = np.ascontiguousarray(shard[f])
                sha, size = atomic_write_stream(
                    self.acts_dir / rel, lambda fh, a=arr: np.save(fh, a, allow_pickle=False)
                )
                files[f] = {
                    "path": rel,
                    "sha256": sha,
                    "bytes": size,
                    "shape": list(arr.shape),
                    "dtype": str(arr.dtype),
                }
        except ArtifactWriteError:
            # a full disk: give back what this rank wrote of a cache that can no longer be completed
            # (no manifest will list it; the rerun starts the cache afresh)
            self._remove_written([*self.local_records, {"files": files}])
            raise
        self.local_records.append({"split": split, "stem": stem, "rank": self.rank, "rows": n, "files": files})

    def _remove_written(self, records: Sequence[Mapping[str, Any]]) -> None:
        for rec in records:
            for info in rec["files"].values():
                with contextlib.suppress(OSError):
                    (self.acts_dir / info["path"]).unlink(missing_ok=True)

    def records(self) -> list[dict[str, Any]]:
        """Every rank's shard records, for `write_manifest` (read from the per-rank files, which
        predict's final barrier guarantees are all written)."""
        return gather_records(self.acts_dir)


def gather_records(acts_dir: PathLike) -> list[dict[str, Any]]:
    """Shard records of all ranks, ordered by rank then write order (the dataset's row order)."""
    out: list[dict[str, Any]] = []
    files = sorted(Path(acts_dir).glob("records_r*.json"), key=lambda p: int(p.stem[len("records_r") :]))
    for p in files:
        out.extend(json.loads(p.read_text()))
    return out


# ----------------------------------------------------------------------------------- manifest
def write_manifest(
    acts_dir: PathLike, records: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], splits: Sequence[str] = SPLITS
) -> Path:
    """Write manifest.json (atomically, and last): the cache is complete from this moment.

    `meta` must hold k, config_hash, producer_sha256 (of layer_k.pt) and views; it may add any
    JSON value (seed, vocab_size...). seq_len, d_model, dtypes and counts come from the shards.
    Schema (version 1):
        format, version, k, config_hash, producer_sha256, views, seq_len, d_model, hidden_dtype,
        fields: {name: {dtype (as read), storage (numpy, on disk), row_shape}},
        splits: {split: {rows, shards: [{stem, rank, rows, files: {field: {path, sha256, bytes}}}]}},
        total_bytes, meta: {every key of `meta`}
    """
    acts = Path(acts_dir)
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"write_manifest needs meta keys {missing}")
    if not records:
        raise ValueError(f"write_manifest: no shards were written to {acts} (empty predict dataloaders?)")
    row_shapes: dict[str, list[int]] = {}
    storage: dict[str, str] = {}
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in splits}
    total = 0
    for rec in records:
        if rec["split"] not in by_split:
            raise ValueError(f"shard {rec['stem']} is of split {rec['split']!r}, not one of {tuple(splits)}")
        for f in FIELDS:
            info = rec["files"][f]
            rs, dt = list(info["shape"][1:]), info["dtype"]
            if info["shape"][0] != rec["rows"] or row_shapes.setdefault(f, rs) != rs or storage.setdefault(f, dt) != dt:
                raise ValueError(
                    f"shard {rec['stem']}: field {f} is {info['shape']} {dt}, expected "
                    f"[{rec['rows']}, *{row_shapes[f]}] {storage[f]}"
                )
            total += int(info["bytes"])
        by_split[rec["split"]].append(
            {
                "stem": rec["stem"],
                "rank": rec["rank"],
                "rows": int(rec["rows"]),
                "files": {f: {k: rec["files"][f][k] for k in ("path", "sha256", "bytes")} for f in FIELDS},
            }
        )
    hidden_dtype = "bfloat16" if storage["hidden"] == "uint16" else storage["hidden"]
    logical = _logical_dtypes(hidden_dtype)
    seq_len, d_model = row_shapes["hidden"]
    for key, got in (("seq_len", seq_len), ("d_model", d_model), ("dtype", hidden_dtype)):
        if key in meta and meta[key] != got:
            raise ValueError(f"write_manifest: meta says {key}={meta[key]!r} but the shards hold {key}={got!r}")
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "k": meta["k"],
        "config_hash": meta["config_hash"],
        "producer_sha256": meta["producer_sha256"],
        "views": meta["views"],
        "seq_len": seq_len,
        "d_model": d_model,
        "hidden_dtype": hidden_dtype,
        "fields": {f: {"dtype": logical[f], "storage": storage[f], "row_shape": row_shapes[f]} for f in FIELDS},
        "splits": {s: {"rows": sum(sh["rows"] for sh in shs), "shards": shs} for s, shs in by_split.items()},
        "total_bytes": total,
        "meta": json.loads(json.dumps(dict(meta))),
    }
    path = manifest_path(acts)
    atomic_write_json(manifest, path)
    return path


def discard_incomplete(acts_dir: PathLike) -> bool:
    """Remove a cache folder that has no readable manifest (an interrupted write); True if removed.

    A folder whose manifest reads is left alone: if its shards are damaged, `ActivationCache.open`
    says so, naming the file, rather than this silently deleting evidence.
    """
    acts = Path(acts_dir)
    if not acts.exists():
        return False
    mpath = manifest_path(acts)
    if mpath.is_file():
        try:
            m = json.loads(mpath.read_text())
            if isinstance(m, dict) and m.get("format") == MANIFEST_FORMAT:
                return False
        except (OSError, ValueError):
            pass
    discard_cache(acts)
    return True


def discard_cache(acts_dir: PathLike) -> None:
    """Remove a cache folder, manifest first, so an interrupted removal never leaves a trusted cache."""
    acts = Path(acts_dir)
    manifest_path(acts).unlink(missing_ok=True)
    shutil.rmtree(acts, ignore_errors=True)


# ------------------------------------------------------------------------------------- reader
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


class ActivationDataset(Dataset):
    """Rows of one split of a cache, read one at a time from memory-mapped shards.

    Item i (of the rows whose view is in `views`, all rows when None) is a dict of tensors:
    hidden (T, D) in the stored dtype (the stage casts), targets (T,) int64, mask (T,) bool,
    t () float32, index () int64, view () int64. Memmaps open lazily in the process that reads
    (each DataLoader worker opens its own) and at most `max_open_shards` shards stay open.
    """

    def __init__(
        self, cache: ActivationCache, split: str, views: Sequence[int] | None = None, max_open_shards: int = 32
    ):
        self.cache, self.split = cache, split
        self.hidden_dtype = cache.hidden_dtype
        self.shards = cache.shards(split)
        self.row_shapes = {f: tuple(cache.manifest["fields"][f]["row_shape"]) for f in FIELDS}
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

    def __len__(self) -> int:
        return len(self.selected) if self.selected is not None else (self._ends[-1] if self._ends else 0)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers (spawn) receive the dataset without its memmaps: sending one would copy the shard
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def locate(self, i: int) -> tuple[int, int]:
        """Item i -> (shard number, row within the shard), by a bisect on cumulative row counts."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows of {self.split}")
        g = int(self.selected[i]) if self.selected is not None else i % n
        j = bisect.bisect_right(self._ends, g)
        return j, g - (self._ends[j - 1] if j else 0)

    def _shard(self, j: int) -> dict[str, np.ndarray]:
        """Memmaps of shard j, opened on first use, least recently used closed beyond the limit."""
        if j in self._open:
            self._open.move_to_end(j)
            return self._open[j]
        shard = self.shards[j]
        arrays = {}
        for f in FIELDS:
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

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        j, r = self.locate(i)
        a = self._shard(j)
        return {
            "hidden": _hidden_from_numpy(np.array(a["hidden"][r]), self.hidden_dtype),  # (T, D), copied off the map
            "targets": torch.from_numpy(a["targets"][r].astype(np.int64)),  # (T,)
            "mask": torch.from_numpy(np.array(a["mask"][r])),  # (T,)
            "t": torch.tensor(float(a["t"][r]), dtype=torch.float32),  # ()
            "index": torch.tensor(int(a["index"][r]), dtype=torch.int64),  # ()
            "view": torch.tensor(int(a["view"][r]), dtype=torch.int64),  # ()
        }


# ------------------------------------------------------------------------------- data module
class ActivationDataModule(L.LightningDataModule):
    """Batches of a cache for stage k+1: a resumable shuffled train stream, in-order val and predict.

    `max_steps` is the stage's optimizer-step budget (None: the trainer's max_steps). The train
    loader starts at the batch after the trainer's `global_step` (times gradient accumulation),
    so a stage resumed from a mid-stage checkpoint continues the same stream.
    `predict_dataloader()` is [train in order, val in order], every view: the caching pass of
    layer k+1 (pair it with `CacheWriter(splits=("train", "val"))`).
    """

    def __init__(
        self,
        cache: ActivationCache | PathLike,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        train_views: Sequence[int] | None = None,
        max_steps: int | None = None,
        predict_batch_size: int | None = None,
        pin_memory: bool = False,
    ):
        super().__init__()
        self.cache = cache if isinstance(cache, ActivationCache) else ActivationCache.open(cache)
        self.batch_size, self.seed, self.num_workers = int(batch_size), int(seed), int(num_workers)
        self.train_views = None if train_views is None else list(train_views)
        self.max_steps = max_steps
        self.predict_batch_size = int(predict_batch_size or batch_size)
        self.pin_memory = pin_memory
        self._train: ActivationDataset | None = None
        self._train_all: ActivationDataset | None = None
        self._val: ActivationDataset | None = None

    @property
    def train_set(self) -> ActivationDataset:
        if self._train is None:
            self._train = ActivationDataset(self.cache, "train", self.train_views)
            if len(self._train) == 0:
                views = "" if self.train_views is None else f" with views {self.train_views}"
                raise StackWiseError(
                    f"{self.cache.dir} has no training rows{views}; check cache.views and the stage's views"
                )
        return self._train

    @property
    def val_set(self) -> ActivationDataset:
        if self._val is None:
            self._val = ActivationDataset(self.cache, "val")
        return self._val

    def _loader(self, ds: Dataset, batch_size: int, **kw: Any) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory, **kw)

    def train_dataloader(self) -> DataLoader:
        step, accum, rank, world, trainer_max = trainer_state(self)
        max_steps = self.max_steps if self.max_steps is not None else trainer_max
        total = (max_steps * accum) if max_steps is not None else 1 << 30
        # StepSampler counts batches: with gradient accumulation an optimizer step is `accum` of them
        sampler = RankStepSampler(
            self.train_set,
            self.batch_size,
            self.seed,
            start_step=step * accum,
            total_steps=total,
            rank=rank,
            world_size=world,
        )
        return self._loader(self.train_set, self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.batch_size, shuffle=False)

    def predict_dataloader(self) -> list[DataLoader]:
        if self._train_all is None:
            self._train_all = (
                self._train
                if self.train_views is None and self._train is not None
                else ActivationDataset(self.cache, "train")
            )
        return [
            self._loader(self._train_all, self.predict_batch_size, shuffle=False),
            self._loader(self.val_set, self.predict_batch_size, shuffle=False),
        ]
