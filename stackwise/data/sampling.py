"""A resumable training order: the batch at optimizer step s is a pure function of (seed, s).

Lightning restarts a dataloader from the top of the epoch when it resumes from a mid-epoch
checkpoint. To make a resumed stage bit-identical to one that never stopped, the training
stream is an endless chain of seeded permutations ("epochs") and the sampler starts at
`start_step * batch_size`: the DataModule passes `trainer.global_step` when it builds the loader.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from stackwise.utils import generator


class StepSampler(Sampler[int]):
    """Indices of an endless seeded shuffle of `range(n)`, from example `start_step * batch_size`.

    `total_steps` bounds the stream so an epoch-based loop still ends; Lightning's `max_steps`
    is what stops training in practice.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, total_steps: int = 1 << 30,
                 with_position: bool = False):
        if n <= 0:
            raise ValueError("StepSampler needs a non-empty dataset")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        # with_position: yield (stream position, index) so a dataset can key on-the-fly masks by
        # the pass over the data (position // n) and know the training progress.
        self.with_position = with_position
        self.start, self.stop = start_step * batch_size, total_steps * batch_size

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[int]:
        pos = self.start
        epoch, offset = divmod(pos, self.n)
        while pos < self.stop:
            perm = torch.randperm(self.n, generator=generator(self.seed, "order", epoch))
            for i in perm[offset:].tolist():
                if pos >= self.stop:
                    return
                yield (pos, i) if self.with_position else i
                pos += 1
            epoch, offset = epoch + 1, 0
