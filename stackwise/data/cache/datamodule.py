"""The batches stage k+1 reads and the caching pass of layer k+1 writes from: `ActivationDataModule` (the
rows of an activation cache) and `RecomputedDataModule` (the same rows as token batches, for a stage that
recomputes its input), both `RowsDataModule`s: one sampling, one set of loaders."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from stackwise.artifacts import PathLike
from stackwise.data.cache.reader import ActivationCache, ActivationDataset, decode_batch, ready_batch
from stackwise.data.sampling import RankSliceSampler, RankStepSampler, per_device_batch, sharded_fit, trainer_state
from stackwise.data.workers import worker_context
from stackwise.errors import StackWiseError


class RowsDataModule(L.LightningDataModule, abc.ABC):
    """The batches stage k+1 reads, whatever holds its rows: a resumable shuffled train stream, in-order
    val and predict. A subclass says what the rows are (`dataset(split, views)`), how a batch is
    collated (`collate`) and where they come from (`source`, for messages).

    `max_steps` is the stage's optimizer-step budget (None: the trainer's max_steps). The train
    loader starts at the batch after the trainer's `global_step` (times gradient accumulation),
    so a stage resumed from a mid-stage checkpoint continues the same stream. `shuffle_block`
    > 1 shuffles blocks of that many consecutive rows (stackwise/data/sampling.py): fewer, longer
    reads per batch, another order. `predict_dataloader()` is [train in order, val in order],
    every view: the caching pass of layer k+1 (pair it with `CacheWriter(splits=("train", "val"))`).
    `num_workers` > 0 keeps its worker processes between epochs; `pin_memory` puts batches in
    page-locked memory for a faster, asynchronous copy to the GPU; `prefetch_factor` batches per
    worker are read ahead. `to_device`: on a CUDA trainer, the train and predict loaders hand out
    batches already on the GPU, copied one batch ahead on a side stream (`DeviceLoader`), so the
    copy overlaps compute.
    """

    collate: Callable[[Any], Any] | None = None  # None: torch's default collate
    # what a loader that copies batches to the GPU applies to each batch there, after its copy
    on_device: Callable[[Any], Any] | None = None

    def __init__(
        self,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        train_views: Sequence[int] | None = None,
        max_steps: int | None = None,
        predict_batch_size: int | None = None,
        pin_memory: bool = False,
        shuffle_block: int = 1,
        prefetch_factor: int | None = None,
        to_device: bool = False,
    ):
        super().__init__()
        self.batch_size, self.seed, self.num_workers = int(batch_size), int(seed), int(num_workers)
        self.train_views = None if train_views is None else list(train_views)
        self.max_steps = max_steps
        self.predict_batch_size = int(predict_batch_size or batch_size)
        self.pin_memory, self.to_device = bool(pin_memory), bool(to_device)
        self.shuffle_block, self.prefetch_factor = int(shuffle_block), prefetch_factor
        self._train: Dataset | None = None
        self._train_all: Dataset | None = None
        self._val: Dataset | None = None

    @abc.abstractmethod
    def dataset(self, split: str, views: Sequence[int] | None = None) -> Dataset:
        """The rows of `split` ("train" or "val") whose view is in `views` (None: all), in their order."""

    @property
    @abc.abstractmethod
    def source(self) -> str:
        """Where the rows come from, for messages."""

    @property
    def train_set(self) -> Dataset:
        if self._train is None:
            self._train = self.dataset("train", self.train_views)
            if len(self._train) == 0:  # type: ignore[arg-type]
                views = "" if self.train_views is None else f" with views {self.train_views}"
                raise StackWiseError(
                    f"{self.source} has no training rows{views}; check cache.views and the stage's views"
                )
        return self._train

    @property
    def val_set(self) -> Dataset:
        if self._val is None:
            self._val = self.dataset("val")
        return self._val

    def _device(self) -> torch.device | None:
        """The CUDA device batches go to ahead of time (None: Lightning moves them, as usual)."""
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None and self.to_device else None
        return device if device is not None and device.type == "cuda" else None

    def _loader(self, ds: Dataset, batch_size: int, to_device: torch.device | None = None, **kw: Any) -> DataLoader:
        workers = self.num_workers > 0
        # A batch the loader itself puts on the GPU reaches the stage's on_before_batch_transfer
        # there: the stage's host-side preparation (pad flag, masked index) must run before the copy.
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        if to_device is not None:
            ds = self.device_dataset(ds)
        return DeviceLoader(
            ds,
            to_device=to_device,
            prepare=getattr(module, "prepare_batch", None) if to_device is not None else None,
            on_device=type(self).on_device if to_device is not None else None,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=workers,
            multiprocessing_context=worker_context(self.num_workers),
            collate_fn=type(self).collate,
            **({"prefetch_factor": self.prefetch_factor} if workers and self.prefetch_factor else {}),
            **kw,
        )

    def device_dataset(self, ds: Dataset) -> Dataset:
        """The rows a loader that copies its batches to the GPU reads (`on_device` finishes them there)."""
        return ds

    def train_dataloader(self) -> DataLoader:
        step, accum, rank, world, trainer_max = trainer_state(self)
        max_steps = self.max_steps if self.max_steps is not None else trainer_max
        total = (max_steps * accum) if max_steps is not None else 1 << 30
        # StepSampler counts batches: with gradient accumulation an optimizer step is `accum` of them
        batch = per_device_batch(self.batch_size, world, accum)  # self.batch_size: the global batch
        sampler = RankStepSampler(
            self.train_set,
            batch,
            self.seed,
            start_step=step * accum,
            total_steps=total,
            rank=rank,
            world_size=world,
            block=self.shuffle_block,
        )
        return self._loader(self.train_set, batch, self._device(), sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        _, accum, _, world, _ = trainer_state(self)
        # each rank its own rows, none twice: the summed metrics then count every row once
        return self._loader(
            self.val_set,
            -(-self.batch_size // (world * accum)),
            sampler=RankSliceSampler(self.val_set, equal=sharded_fit(self)),
        )

    def predict_dataloader(self) -> list[DataLoader]:
        if self._train_all is None:
            self._train_all = (
                self._train if self.train_views is None and self._train is not None else self.dataset("train")
            )
        device = self._device()
        return [
            # each rank its own contiguous slice, none twice: the ranks' shards in rank order are the rows in order
            self._loader(self._train_all, self.predict_batch_size, device, sampler=RankSliceSampler(self._train_all)),
            self._loader(self.val_set, self.predict_batch_size, device, sampler=RankSliceSampler(self.val_set)),
        ]


class ActivationDataModule(RowsDataModule):
    """Batches of a cache for stage k+1 (see `RowsDataModule`), each read whole
    (`ActivationDataset.__getitems__`)."""

    collate = staticmethod(ready_batch)
    on_device = staticmethod(decode_batch)

    def __init__(self, cache: ActivationCache | PathLike, batch_size: int, seed: int, **kwargs: Any):
        super().__init__(batch_size, seed, **kwargs)
        self.cache = cache if isinstance(cache, ActivationCache) else ActivationCache.open(cache)

    def dataset(self, split: str, views: Sequence[int] | None = None) -> ActivationDataset:
        return ActivationDataset(self.cache, split, views)

    def device_dataset(self, ds: Dataset) -> Dataset:
        # an fp8 cache is copied as its bits and decoded on the GPU (on_device)
        return ds.undecoded() if isinstance(ds, ActivationDataset) else ds

    @property
    def source(self) -> str:
        return str(self.cache.dir)


class RecomputedDataModule(RowsDataModule):
    """The rows a cache of layer k would hold, as masked token batches (`cache.store=recompute`): the
    stage runs the frozen layers 1..k itself (stackwise/model/prefix.py) where it would read hidden states.

    `train` / `val`: the token datasets the first caching pass read (stackwise/data/stage_data.py
    `MaskedTokenDataset` with fixed views: item i is sequence rows[i // views] under view i % views,
    its mask a function of (seed, sequence, view)), so row i here is row i of any cache of the run:
    the same sequence, view, mask, targets and t. A batch holds `ids` (masked) in place of `hidden`.
    """

    def __init__(self, train: Dataset, val: Dataset, batch_size: int, seed: int, **kwargs: Any):
        super().__init__(batch_size, seed, **kwargs)
        self.splits = {"train": train, "val": val}

    def dataset(self, split: str, views: Sequence[int] | None = None) -> Dataset:
        ds = self.splits[split]
        if views is None:
            return ds
        view_of = np.arange(len(ds)) % ds.views  # type: ignore[arg-type, attr-defined]
        return Subset(ds, np.flatnonzero(np.isin(view_of, list(views))).tolist())

    @property
    def source(self) -> str:
        return "the recomputed token rows (cache.store=recompute)"


class DeviceLoader(DataLoader):
    """A DataLoader whose batches arrive on `to_device` (CUDA; None or another device: the plain
    DataLoader), each copied while the batch before it is in use: `prepare` runs on the host batch
    before its copy, `on_device` on the copied batch (on the copy's stream). Keywords of `__init__`
    (not only attributes) so that Lightning, which rebuilds predict loaders, keeps them."""

    def __init__(
        self,
        *args: Any,
        to_device: torch.device | None = None,
        prepare: Callable[[Any], Any] | None = None,
        on_device: Callable[[Any], Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.to_device, self.prepare, self.on_device = to_device, prepare, on_device

    def __iter__(self) -> Iterator[Any]:
        batches = super().__iter__()
        if self.to_device is None or self.to_device.type != "cuda":
            return batches
        copier = _CudaCopier(self.to_device, self.on_device)
        prepare = self.prepare or (lambda b: b)  # on the host batch, before its copy starts
        return one_ahead(batches, lambda b: copier.start(prepare(b)), copier.finish)


_B = TypeVar("_B")
_S = TypeVar("_S")
_R = TypeVar("_R")


def one_ahead(batches: Iterable[_B], start: Callable[[_B], _S], finish: Callable[[_S], _R]) -> Iterator[_R]:
    """finish(start(b)) for every batch b, in order, with the next batch started before a batch is
    finished and returned: its copy runs while the consumer computes on the one returned."""
    it = iter(batches)
    pending = _NONE = object()
    for batch in it:
        started = start(batch)
        if pending is not _NONE:
            yield finish(pending)
        pending = started
    if pending is not _NONE:
        yield finish(pending)


class _CudaCopier:
    """start: copy a batch's tensors to the GPU on a side stream; finish: make the consumer's stream
    wait for that copy (on the GPU, the host does not wait) and tell the allocator who uses them."""

    def __init__(self, device: torch.device, on_device: Callable[[Any], Any] | None = None):
        self.device, self.stream = device, torch.cuda.Stream(device)
        self.on_device = on_device

    def start(self, batch: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        with torch.cuda.stream(self.stream):
            moved = {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
            if self.on_device is not None:
                moved = self.on_device(moved)
        done = torch.cuda.Event()
        done.record(self.stream)
        return moved, done

    def finish(self, started: tuple[dict[str, Any], Any]) -> dict[str, Any]:
        moved, done = started
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(done)
        for v in moved.values():
            if isinstance(v, Tensor):
                v.record_stream(consumer)
        return moved
