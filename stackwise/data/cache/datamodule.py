"""`ActivationDataModule`: the batches of an activation cache for stage k+1 and for the caching pass of layer k+1."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from stackwise.artifacts import PathLike
from stackwise.data.cache.reader import ActivationCache, ActivationDataset, ready_batch
from stackwise.data.sampling import RankStepSampler, trainer_state
from stackwise.errors import StackWiseError


class ActivationDataModule(L.LightningDataModule):
    """Batches of a cache for stage k+1: a resumable shuffled train stream, in-order val and predict.

    `max_steps` is the stage's optimizer-step budget (None: the trainer's max_steps). The train
    loader starts at the batch after the trainer's `global_step` (times gradient accumulation),
    so a stage resumed from a mid-stage checkpoint continues the same stream. `shuffle_block`
    > 1 shuffles blocks of that many consecutive rows (stackwise/data/sampling.py): fewer, longer
    reads per batch, another order. `predict_dataloader()` is [train in order, val in order],
    every view: the caching pass of layer k+1 (pair it with `CacheWriter(splits=("train", "val"))`).
    Every loader reads whole batches (`ActivationDataset.__getitems__`); `num_workers` > 0 keeps
    its worker processes between epochs; `pin_memory` puts batches in page-locked memory for a
    faster, asynchronous copy to the GPU; `prefetch_factor` batches per worker are read ahead.
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
        shuffle_block: int = 1,
        prefetch_factor: int | None = None,
    ):
        super().__init__()
        self.cache = cache if isinstance(cache, ActivationCache) else ActivationCache.open(cache)
        self.batch_size, self.seed, self.num_workers = int(batch_size), int(seed), int(num_workers)
        self.train_views = None if train_views is None else list(train_views)
        self.max_steps = max_steps
        self.predict_batch_size = int(predict_batch_size or batch_size)
        self.pin_memory, self.shuffle_block, self.prefetch_factor = (
            bool(pin_memory),
            int(shuffle_block),
            prefetch_factor,
        )
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
        workers = self.num_workers > 0
        return DataLoader(
            ds,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=workers,
            collate_fn=ready_batch,
            **({"prefetch_factor": self.prefetch_factor} if workers and self.prefetch_factor else {}),
            **kw,
        )

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
            block=self.shuffle_block,
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
