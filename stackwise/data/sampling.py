"""A resumable training order: the batch at optimizer step s is a pure function of (seed, s).

Lightning restarts a dataloader from the top of the epoch when it resumes from a mid-epoch
checkpoint. To make a resumed stage bit-identical to one that never stopped, the training
stream is an endless chain of seeded permutations ("epochs") and the sampler starts at
`start_step * batch_size`: the DataModule passes `trainer.global_step` when it builds the loader.

Block shuffle (`block` > 1): each epoch permutes blocks of `block` consecutive rows and keeps the
rows of a block in order, so a batch of a row-ordered store (the activation cache) is read as a
few contiguous runs instead of one seek per row. `block=1` is the plain shuffle, row for row.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from stackwise.errors import StackWiseError
from stackwise.utils import generator


class StepSampler(Sampler[int]):
    """Indices of an endless seeded shuffle of `range(n)`, from example `start_step * batch_size`.

    `total_steps` bounds the stream so an epoch-based loop still ends; Lightning's `max_steps`
    is what stops training in practice. `block`: shuffle blocks of that many consecutive indices.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        total_steps: int = 1 << 30,
        with_position: bool = False,
        block: int = 1,
    ):
        if n <= 0:
            raise ValueError("StepSampler needs a non-empty dataset")
        if block < 1:
            raise ValueError(f"StepSampler's block must be >= 1, got {block}")
        self.n, self.batch_size, self.seed, self.block = n, batch_size, seed, int(block)
        # with_position: yield (stream position, index) so a dataset can key on-the-fly masks by
        # the pass over the data (position // n) and know the training progress.
        self.with_position = with_position
        self.start, self.stop = start_step * batch_size, total_steps * batch_size

    def __len__(self) -> int:
        # the WHOLE stream (see RankStepSampler.__len__): Lightning ends an epoch at len(loader)
        return self.stop

    def __iter__(self) -> Iterator[int]:
        pos = self.start
        epoch, offset = divmod(pos, self.n)
        while pos < self.stop:
            for i in self.epoch(epoch)[offset:]:
                if pos >= self.stop:
                    return
                yield (pos, i) if self.with_position else i
                pos += 1
            epoch, offset = epoch + 1, 0

    def epoch(self, epoch: int) -> list[int]:
        """The order of pass `epoch` over the data: a permutation of range(n)."""
        gen = generator(self.seed, "order", epoch)
        if self.block == 1:
            return torch.randperm(self.n, generator=gen).tolist()
        blocks = torch.randperm(-(-self.n // self.block), generator=gen)
        rows = (blocks[:, None] * self.block + torch.arange(self.block)).reshape(-1)
        return rows[rows < self.n].tolist()  # the last block may be short


class RankStepSampler(DistributedSampler):
    """StepSampler over the global batch (`batch_size * world_size`), sliced to this rank.

    Step s's global batch is a pure function of (seed, s, global batch size), so a resumed stage
    sees the batches it would have seen (on the same number of ranks). Subclassing DistributedSampler tells Lightning the
    sampler is already distributed, so it neither wraps it (which would materialise the stream)
    nor reshuffles it. With one process it yields exactly `StepSampler(n, batch_size, ...)`.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        start_step: int,
        total_steps: int,
        rank: int = 0,
        world_size: int = 1,
        with_position: bool = False,
        block: int = 1,
    ):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=True)
        self.batch_size, self.world, self.total_steps = batch_size, world_size, total_steps
        n = getattr(dataset, "n_examples", None) or len(dataset)  # type: ignore[arg-type]
        self.inner = StepSampler(n, batch_size * world_size, seed, start_step, total_steps, with_position, block)

    def __len__(self) -> int:
        # The length of the WHOLE stream, steps before `start_step` included. On a mid-epoch resume
        # Lightning counts the restored batch index into the epoch (the fetcher starts at
        # `batch_progress.current.ready`) and ends the epoch at len(loader); reporting only the
        # remaining batches would end the epoch early and restart the stream, repeating batches.
        return self.total_steps * self.batch_size

    def __iter__(self) -> Iterator[int]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        global_batch: list[int] = []
        for i in self.inner:
            global_batch.append(i)
            if len(global_batch) == self.batch_size * self.world:
                yield from global_batch[lo:hi]
                global_batch = []


def trainer_state(module: Any) -> tuple[int, int, int, int, int | None]:
    """(global_step, accumulate_grad_batches, rank, world_size, trainer max_steps) of a DataModule's trainer."""
    tr = getattr(module, "trainer", None)
    if tr is None:
        return 0, 1, 0, 1, None
    max_steps = getattr(tr, "max_steps", None)
    return (
        int(tr.global_step),
        int(getattr(tr, "accumulate_grad_batches", 1) or 1),
        int(getattr(tr, "global_rank", 0)),
        int(getattr(tr, "world_size", 1)),
        max_steps if max_steps is not None and max_steps > 0 else None,
    )


def sharded_fit(module: Any) -> bool:
    """Whether a DataModule's trainer is fitting a sharded stage (hardware=fsdp): its validation
    loaders must give every rank as many batches (`RankSliceSampler(equal=True)`)."""
    from stackwise.stages.sharding import is_sharded_strategy

    tr = getattr(module, "trainer", None)
    # running: after the fit the trainer keeps fn "fit", and the stage's final score needs every row
    return tr is not None and tr.state.fn == "fit" and tr.state.status == "running" and is_sharded_strategy(tr.strategy)


def per_device_batch(global_batch: int, world_size: int, accumulate: int) -> int:
    """The batch one rank loads per forward: `data.batch_size` is the global batch of an optimizer
    step, so 1 and N ranks (and any gradient accumulation) train on the same rows per step."""
    split = world_size * accumulate
    if global_batch % split:
        raise StackWiseError(
            f"data.batch_size={global_batch} (the global batch) must be a multiple of world size {world_size}"
            f" x trainer.accumulate_grad_batches {accumulate} = {split}"
        )
    return global_batch // split


class RankSliceSampler(DistributedSampler):
    """This rank's contiguous slice of `range(len(dataset))`: the slices of all ranks are disjoint
    and cover every row once, with no padding (DistributedSampler repeats rows to even out the
    ranks, which would count them twice in a summed validation metric).

    Rank and world size are read from torch.distributed when iterated, so a loader built before
    the process group exists (or outside the trainer) still splits correctly. Subclassing
    DistributedSampler keeps Lightning from replacing it with its own padded one.
    """

    def __init__(self, dataset: Dataset, equal: bool = False):
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False, drop_last=False)
        self.n = len(dataset)  # type: ignore[arg-type]
        # equal: every rank n // world rows, the last n % world left out. A sharded fit's forward is
        # a collective (each block's weights are gathered), so every rank must run as many batches
        self.equal = equal

    def _bounds(self) -> tuple[int, int]:
        rank, world = (
            (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        )
        if self.equal:
            return self.n // world * rank, self.n // world * (rank + 1)
        return self.n * rank // world, self.n * (rank + 1) // world

    def __len__(self) -> int:
        lo, hi = self._bounds()
        return hi - lo

    def __iter__(self) -> Iterator[int]:
        return iter(range(*self._bounds()))
