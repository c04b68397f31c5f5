"""The masks of one evaluation: fixed rates (one nested view) and the stratified bound draws.

Every mask is a function of (seed, validation index, view) through `mask_batch`, at views far from
those training and caching use (see the package doc, stackwise/evaluation/__init__.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from stackwise.objective.masking import FixedSchedule, Schedule, UniformSchedule, mask_batch
from stackwise.utils import generator

# Views of the eval masks: training uses negative views, validation/caching 0..views-1.
RATE_VIEW = 1 << 20


BOUND_VIEW0 = RATE_VIEW + 1


@dataclass
class EvalMasks:
    """Every mask of one evaluation, on CPU; shared by all the models compared."""

    rates: tuple  # (R,)
    rate_masks: Tensor  # (R, N, T) bool
    bound_masks: Tensor  # (S, N, T) bool
    bound_t: Tensor  # (S, N) float64: l / n, the rate each bound draw was masked at
    n_tokens: Tensor  # (N,) long: non-pad tokens per sequence
    seed: int

    @property
    def n_sequences(self) -> int:
        return int(self.n_tokens.shape[0])

    @property
    def bound_samples(self) -> int:
        return int(self.bound_t.shape[0])


def stratified_counts(n_tokens: Tensor, samples: int, seed: int) -> Tensor:
    """(S, N) long mask counts l in 1..n_i: per draw, one sequence in each of the N strata of u."""
    N = int(n_tokens.shape[0])
    out = torch.empty(samples, N, dtype=torch.long)
    n = n_tokens.to(torch.float64)
    for s in range(samples):
        g = generator(seed, "eval-bound", s)
        perm = torch.randperm(N, generator=g).to(torch.float64)  # (N,) stratum of each sequence
        jitter = torch.rand(N, generator=g, dtype=torch.float64)  # (N,)
        u = (perm + jitter) / N  # (N,) in [0, 1), marginally uniform
        out[s] = torch.minimum(torch.floor(u * n).long() + 1, n_tokens.clamp_min(1))
    return out


def draw_masks(
    tokens: Tensor,
    *,
    seed: int,
    rates: Sequence[float],
    bound_samples: int,
    mask_id: int,
    pad_id: int | None,
    chunk: int = 256,
) -> EvalMasks:
    """Masks for the fixed rates (one nested view) and the bound draws, from (seed, index, view)."""
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)  # (N, T)
    N, T = tokens.shape
    n_tokens = (tokens != pad_id).sum(1) if pad_id is not None else torch.full((N,), T, dtype=torch.long)
    counts = stratified_counts(n_tokens, bound_samples, seed)  # (S, N)
    bound_t = counts.to(torch.float64) / n_tokens.clamp_min(1).to(torch.float64)  # (S, N)
    draw = {"seed": seed, "mask_id": mask_id, "pad_id": pad_id, "chunk": chunk}
    rate_masks = torch.zeros(len(rates), N, T, dtype=torch.bool)
    for r, rate in enumerate(rates):
        rate_masks[r] = view_masks(tokens, RATE_VIEW, FixedSchedule(float(rate)), **draw)
    bound_masks = torch.zeros(bound_samples, N, T, dtype=torch.bool)
    unit = UniformSchedule(0.0, 1.0)  # t = u: the count is set through u = l / n
    for s in range(bound_samples):
        bound_masks[s] = view_masks(tokens, BOUND_VIEW0 + s, unit, u=bound_t[s].float(), **draw)
    got = bound_masks.sum(2)  # (S, N)
    want = torch.where(n_tokens > 0, counts, torch.zeros_like(counts))
    if not torch.equal(got, want):  # the bound is only right if each draw masks exactly l positions
        raise RuntimeError("eval masks: mask_batch did not mask exactly l = t * n positions")
    return EvalMasks(tuple(float(r) for r in rates), rate_masks, bound_masks, bound_t, n_tokens, seed)


def view_masks(
    tokens: Tensor,
    view: int,
    schedule: Schedule,
    u: Tensor | None = None,
    *,
    seed: int,
    mask_id: int,
    pad_id: int | None,
    chunk: int = 256,
) -> Tensor:
    """(N, T) bool: the mask of every sequence of `tokens` (N, T) at one view, `chunk` sequences at a time.

    u: (N,) the schedule's uniform per sequence (None: drawn from the sequence's own generator).
    """
    out = torch.zeros(tokens.shape, dtype=torch.bool)
    for a in range(0, len(tokens), chunk):
        ids = tokens[a : a + chunk]
        index = torch.arange(a, a + len(ids))
        _, mask, _ = mask_batch(
            ids,
            index,
            torch.full_like(index, view),
            seed=seed,
            schedule=schedule,
            k=1,
            progress=1.0,
            mask_id=mask_id,
            pad_id=pad_id,
            u=None if u is None else u[a : a + len(ids)],
        )
        out[a : a + len(ids)] = mask
    return out
