"""Token data for the stages that read tokens (embed, e2e, fusion fine-tune, and stage 1's cache).

Masks are drawn here, in the DataLoader, on the CPU, so the GPU never waits on them and every
mask is a pure function of (seed, example index, view):
  - training: view = -(1 + pass over the data), a fresh mask each time an example comes back,
    and the training progress (for the curriculum schedule) is the stream position / budget;
  - validation and caching: `views` fixed views per sequence (view 0..views-1), at progress 1.
So stage 1's validation set, its cached validation activations and the fused model's validation
set are the same masked sequences, which is what invariants 2 and 3 compare.

Items have the same keys as the activation cache's, with `ids` (masked input) in place of `hidden`.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from stackwise.data.sampling import RankSliceSampler, RankStepSampler, per_device_batch, sharded_fit, trainer_state
from stackwise.data.token_file import MappedTokens, by_file
from stackwise.data.workers import worker_context
from stackwise.objective.masking import mask_batch
from stackwise.utils import generator


class MaskedTokenDataset(Dataset):
    """Sequences of a token split, masked per (seed, index, view).

    fixed views: item i is example rows[i // views] under view i % views.
    training (views=None): items are (stream position, example) pairs from a StepSampler.
    `rate_layer(view)` gives the stage index the schedule uses for a fixed view (per_layer: view+1).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        seed: int,
        schedule,
        mask_id: int,
        pad_id: int,
        k: int,
        views: int | None = None,
        rows: Sequence[int] | None = None,
        total_positions: int = 1,
        per_layer_views: bool = False,
        n_layers: int = 1,
    ):
        self.tokens, self.seed, self.schedule = tokens, seed, schedule
        self.mask_id, self.pad_id, self.k = mask_id, pad_id, k
        self.views = views
        self.rows = np.arange(len(tokens)) if rows is None else np.asarray(rows)
        self.total_positions = max(1, total_positions)
        self.per_layer_views, self.n_layers = per_layer_views, n_layers

    def __len__(self) -> int:
        return len(self.rows) * (self.views or 1)

    def __getstate__(self) -> dict:
        # a worker started by the fork server gets the dataset pickled: the token file's rows go by file
        return {**self.__dict__, "tokens": by_file(self.tokens)}

    def __setstate__(self, state: dict) -> None:
        tokens = state["tokens"]
        self.__dict__.update(state, tokens=tokens.open() if isinstance(tokens, MappedTokens) else tokens)

    def __getitem__(self, item) -> dict:
        if self.views is None:  # training: (position in the stream, example index)
            pos, index = item
            view = -(1 + pos // len(self.tokens))
            progress = min(1.0, pos / self.total_positions)
            # per_layer in a multi-layer stage (e2e, fine-tune): cycle the layer rates over examples
            k = (index + pos) % self.n_layers + 1 if self.per_layer_views and self.k == 0 else max(self.k, 1)
        else:
            index, view = int(self.rows[item // self.views]), item % self.views
            progress = 1.0
            k = view + 1 if self.per_layer_views else max(self.k, 1)
        ids = torch.from_numpy(np.asarray(self.tokens[index], dtype=np.int64))[None]  # (1, T)
        masked, mask, t = mask_batch(
            ids,
            torch.tensor([index]),
            torch.tensor([view]),
            seed=self.seed,
            schedule=self.schedule,
            k=k,
            progress=progress,
            mask_id=self.mask_id,
            pad_id=self.pad_id,
        )
        return {
            "ids": masked[0],
            "targets": ids[0],
            "mask": mask[0],
            "t": t[0],
            "index": torch.tensor(index),
            "view": torch.tensor(view),
        }


class TokenStageData(L.LightningDataModule):
    """Train (resumable seeded stream), validation (fixed views) and caching (fixed views) loaders."""

    def __init__(
        self,
        train: np.ndarray,
        val: np.ndarray,
        *,
        batch_size: int,
        seed: int,
        schedule,
        mask_id: int,
        pad_id: int,
        k: int,
        max_steps: int,
        views: int,
        num_workers: int = 0,
        cache_rows: Sequence[int] | None = None,
        cache_batch_size: int = 64,
        per_layer_views: bool = False,
        n_layers: int = 1,
        train_schedule=None,
    ):
        super().__init__()
        # the training stream's own schedule (the fusion fine-tune's fusion.mask_fraction_min/max); None = `schedule`
        self.train_schedule = train_schedule
        self.train_tokens, self.val_tokens = train, val
        self.batch_size, self.seed, self.max_steps, self.views = batch_size, seed, max_steps, views
        self.num_workers, self.cache_rows, self.cache_batch_size = num_workers, cache_rows, cache_batch_size
        common = dict(
            seed=seed,
            schedule=schedule,
            mask_id=mask_id,
            pad_id=pad_id,
            k=k,
            per_layer_views=per_layer_views,
            n_layers=n_layers,
        )
        self._common = common

    def _loader(self, ds: Dataset, batch_size: int, sampler=None, drop_last: bool | None = None) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            drop_last=sampler is not None if drop_last is None else drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            multiprocessing_context=worker_context(self.num_workers),
        )

    def train_dataloader(self) -> DataLoader:
        step, accum, rank, world, _ = trainer_state(self)
        batch = per_device_batch(self.batch_size, world, accum)  # self.batch_size: the global batch
        total = self.max_steps * accum  # batches: with gradient accumulation a step is `accum` of them
        common = self._common if self.train_schedule is None else {**self._common, "schedule": self.train_schedule}
        ds = MaskedTokenDataset(self.train_tokens, total_positions=self.max_steps * self.batch_size, **common)
        sampler = RankStepSampler(
            ds,
            batch,
            self.seed,
            start_step=step * accum,
            total_steps=total,
            rank=rank,
            world_size=world,
            with_position=True,
        )
        return self._loader(ds, batch, sampler)

    def val_dataloader(self) -> DataLoader:
        _, accum, _, world, _ = trainer_state(self)
        ds = MaskedTokenDataset(self.val_tokens, views=self.views, **self._common)
        # each rank its own rows, none twice: the summed metrics then count every row once
        return self._loader(
            ds, -(-self.batch_size // (world * accum)), RankSliceSampler(ds, equal=sharded_fit(self)), drop_last=False
        )

    def predict_dataloader(self) -> list[DataLoader]:
        """[train, val] in order, every cached view: the input of the activation cache."""
        train = MaskedTokenDataset(self.train_tokens, views=self.views, rows=self.cache_rows, **self._common)
        val = MaskedTokenDataset(self.val_tokens, views=self.views, **self._common)
        # under DDP each rank caches its own contiguous slice, none twice: the ranks' shards, in rank
        # order, are the rows in order (Lightning's sampler would pad with repeats and interleave)
        return [self._loader(ds, self.cache_batch_size, RankSliceSampler(ds), drop_last=False) for ds in (train, val)]


def cache_rows(n_train: int, limit: int | None, seed: int) -> np.ndarray:
    """Which training sequences get cached: all, or a seeded subset of `limit` (kept in order)."""
    if limit is None or limit >= n_train:
        return np.arange(n_train)
    return np.sort(torch.randperm(n_train, generator=generator(seed, "cache_rows"))[:limit].numpy())
