"""`CacheWriter`: `trainer.predict` outputs into an activation cache, at the disk's speed.

Per batch, on the caller's (the predict loop's) thread: the hidden states are cast to the cache
dtype on their device (fp8: quantised there), then every field is copied to the host. On CUDA
the copies are `non_blocking` into pinned buffers reused batch after batch (MAX_IN_FLIGHT of
them, so the GPU computes the next batch while earlier ones go to disk) and a CUDA event says
when they have landed; nothing here waits for the GPU. The batch then goes to a `ShardSink`
(sink.py), whose threads write, hash and fsync the shard files.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import BatchSampler

from stackwise.artifacts import PathLike, atomic_write_json, manifest_path, write_errors
from stackwise.data.cache.layout import (
    FIELDS,
    SPLITS,
    check_dtype,
    discard_incomplete,
    encode_hidden,
    fields,
    gather_records,
    records_path,
    storage_dtypes,
    tensor_to_numpy,
)
from stackwise.data.cache.sink import MAX_IN_FLIGHT, ShardSink
from stackwise.errors import ArtifactError, StackWiseError


class CacheWriter(BasePredictionWriter):
    """Streams `trainer.predict` outputs into fixed-size shards, one split per predict dataloader.

    `predict_step` returns per batch {"hidden" (B,T,D), "targets" (B,T) long, "mask" (B,T) bool,
    "t" (B,) float, "index" (B,) long, "view" (B,) long}. At most MAX_IN_FLIGHT batches are held
    in memory; use `trainer.predict(..., return_predictions=False)` so Lightning does not keep them
    all either. After predict, `records()` (every rank's shards) feeds `write_manifest`, which the
    caller runs on global rank 0 once the stage's checks pass.
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
        check_dtype(dtype)
        if shard_size < 1:
            raise StackWiseError(f"cache.shard_size: must be >= 1, got {shard_size}")
        self.acts_dir = Path(acts_dir)
        self.shard_size, self.vocab_size, self.hidden_dtype = int(shard_size), int(vocab_size), dtype
        self.splits = tuple(splits)
        full = storage_dtypes(dtype, self.vocab_size)
        self.storage = {f: full[f] for f in fields(dtype)}
        self.rank = 0
        self.local_records: list[dict[str, Any]] = []  # this rank's shards, in row order
        self._sink: ShardSink | None = None
        self._staging: _PinnedStaging | None = None
        self._marks: dict[str, float] = {}  # host clock: predict start, first and last batch, all on disk
        self.timing = ""  # the caching pass's time, one line for the log (after predict)

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

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.predict_loop.return_predictions:
            rank_zero_warn(
                "CacheWriter: call trainer.predict(..., return_predictions=False), or Lightning keeps "
                "every cached activation in memory as well"
            )
        self._sink = ShardSink(
            self.acts_dir,
            storage=self.storage,
            shard_size=self.shard_size,
            rank=self.rank,
            convert=self._to_storage,
            rows=self._planned_rows(trainer),
        )
        cuda = trainer.strategy.root_device.type == "cuda"
        self._staging = _PinnedStaging(MAX_IN_FLIGHT) if cuda else None
        self._marks = {"start": time.perf_counter()}

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
        assert self._sink is not None, "CacheWriter: on_predict_start did not run"
        self._marks.setdefault("first", time.perf_counter())
        self._marks["batches"] = self._marks.get("batches", 0) + 1
        encoded = self._encode(prediction)
        if self._staging is None:
            self._sink.put(self.splits[dataloader_idx], encoded)
        else:
            host, ready, release = self._staging.to_host(encoded, self._sink)
            self._sink.put(self.splits[dataloader_idx], host, ready, release)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self._sink is not None
        m, last = self._marks, time.perf_counter()
        self.local_records = self._sink.finish()
        if "first" in m:
            self.timing = (
                f"first batch after {m['first'] - m['start']:.1f} s, {int(m['batches'])} batches queued in "
                f"{last - m['first']:.1f} s, drained in {time.perf_counter() - last:.1f} s ({self._sink.summary()})"
            )
        self._sink = self._staging = None
        atomic_write_json(self.local_records, records_path(self.acts_dir, self.rank))
        trainer.strategy.barrier("stackwise_cache_written")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # a cache that cannot complete: stop the threads and give back what this rank wrote
        if self._sink is not None:
            self._sink.abort()
            self._sink = self._staging = None

    # -- rows
    def _planned_rows(self, trainer: L.Trainer) -> dict[str, int | None]:
        """Rows this rank will write per split, as far as its loaders tell (shards are sized by it)."""
        loaders = trainer.predict_dataloaders
        if loaders is None or trainer.limit_predict_batches != 1.0:
            return {}
        if not isinstance(loaders, (list, tuple)):
            loaders = [loaders]
        return {split: _loader_rows(dl) for split, dl in zip(self.splits, loaders, strict=False)}

    def _encode(self, pred: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Checks of shapes only (no value is read here: that would wait for the GPU), then the
        storage bits of the hidden states, on their device."""
        missing = [f for f in FIELDS if f not in pred]
        if missing:
            raise ValueError(f"predict_step must return {FIELDS}; missing {missing}")
        hidden = pred["hidden"]
        if hidden.ndim != 3:
            raise ValueError(f"predict_step's 'hidden' must be (B, T, D), got {tuple(hidden.shape)}")
        b, t_len = hidden.shape[:2]
        if tuple(pred["targets"].shape) != (b, t_len) or tuple(pred["mask"].shape) != (b, t_len):
            raise ValueError(
                f"'targets'/'mask' must be (B, T) = {(b, t_len)}, got "
                f"{tuple(pred['targets'].shape)}/{tuple(pred['mask'].shape)}"
            )
        out = encode_hidden(hidden, self.hidden_dtype)  # (B, T, D)[, scale (B, T)]
        # the dtypes numpy converts from (a bf16-true run hands t over in bf16: exact in fp32)
        out["targets"] = pred["targets"].detach().to(torch.int64)  # (B, T)
        out["mask"] = pred["mask"].detach().to(torch.bool)  # (B, T)
        out["t"] = pred["t"].detach().reshape(b).to(torch.float32)  # (B,)
        for f in ("index", "view"):
            out[f] = pred[f].detach().reshape(b).to(torch.int64)  # (B,)
        return out

    def _to_storage(self, host: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
        """Host tensors -> numpy arrays in the storage dtypes; runs on the sink's io thread."""
        out = {}
        for f, dt in self.storage.items():
            a = tensor_to_numpy(host[f].detach())
            if f == "targets" and a.size and (int(a.min()) < 0 or int(a.max()) >= self.vocab_size):
                raise ValueError(f"'targets' outside [0, {self.vocab_size}): the cache's vocab_size is wrong")
            out[f] = np.ascontiguousarray(a.astype(dt, copy=False))
        return out

    def records(self) -> list[dict[str, Any]]:
        """Every rank's shard records, for `write_manifest` (read from the per-rank files, which
        predict's final barrier guarantees are all written)."""
        return gather_records(self.acts_dir)


def _loader_rows(loader: Any) -> int | None:
    """Rows a predict loader yields, from its batch sampler (Lightning wraps it, and for DDP puts a
    distributed sampler inside it); None when it cannot tell."""
    bs = getattr(loader, "batch_sampler", None)
    bs = getattr(bs, "_batch_sampler", bs)
    if not isinstance(bs, BatchSampler):
        return None
    try:
        n = len(bs.sampler)  # type: ignore[arg-type]
    except TypeError:
        return None
    return n - n % bs.batch_size if bs.drop_last else n


class _PinnedStaging:
    """Pinned host buffers for `n` batches in flight (CUDA only): a batch's device tensors are
    copied in without waiting, and the buffers come back once the sink has written and hashed them."""

    def __init__(self, n: int):
        self._free: queue.Queue[dict[str, Tensor]] = queue.Queue()
        for _ in range(n):
            self._free.put({})

    def to_host(self, arrays: Mapping[str, Tensor], sink: ShardSink) -> tuple[dict[str, Tensor], Any, Any]:
        while True:
            try:
                slot = self._free.get(timeout=0.1)
                break
            except queue.Empty:
                sink.raise_if_failed()
        host = {}
        for f, t in arrays.items():
            buf = slot.get(f)
            if buf is None or buf.dtype != t.dtype or buf.shape[1:] != t.shape[1:] or buf.shape[0] < t.shape[0]:
                buf = slot[f] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host[f] = buf[: t.shape[0]]
            host[f].copy_(t, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host, ready, lambda: self._free.put(slot)
