"""Sample quality: repetition (distinct-n, the longest repeated n-gram) and a fluency proxy.

* distinct-n (Li et al. 2016): the number of distinct n-grams of a sequence over its number of
  n-grams, in (0, 1]; a loop ("you you you") lowers it, text that never repeats has 1.
* the longest repeated n-gram: the largest n such that some n-gram occurs twice in the sequence
  (the occurrences may overlap: "aaaa" repeats "aaa"); 0 when no token repeats.
* fluency: the mean masked cross-entropy of the sample under a reference model (the experiment's
  e2e model), at fixed masking rates, on the same masks `stackwise-eval` draws (stackwise/evaluation):
  how well the reference model predicts the sample's tokens from the rest of it. Lower reads more
  like the corpus, but a loop is easy to predict too: read it beside the repetition measures.

All three work on token ids (bytes for the byte tokenizer); `words` gives the word units of a text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from stackwise.evaluation.masks import draw_masks
from stackwise.evaluation.scorers import WholeModel
from stackwise.evaluation.scoring import masked_ce_per_sequence, rate_key

FLUENCY_RATES = (0.15, 0.5, 0.9)


def ngrams(ids: Sequence, n: int) -> list[tuple]:
    """The n-grams of `ids` in order (len(ids) - n + 1 of them; none when it is shorter than n)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ids = list(ids)
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def distinct_n(ids: Sequence, n: int) -> float:
    """Distinct n-grams / n-grams of one sequence; nan when it has no n-gram (shorter than n)."""
    grams = ngrams(ids, n)
    return len(set(grams)) / len(grams) if grams else math.nan


def longest_repeat(ids: Sequence) -> int:
    """The length of the longest n-gram that occurs at least twice in `ids` (overlaps count)."""
    ids = list(ids)

    def repeats(n: int) -> bool:
        grams = ngrams(ids, n)
        return len(set(grams)) < len(grams)

    # if an n-gram repeats, so does its first (n-1)-gram: search the largest n that repeats
    lo, hi = 0, max(len(ids) - 1, 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if repeats(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def words(text: str) -> list[str]:
    """The whitespace-separated words of a text (the unit a reader counts repeats in)."""
    return text.split()


@dataclass
class Fluency:
    """Masked CE of a batch of samples under a reference model, nats per masked token."""

    rates: dict[str, float]  # {rate: CE summed over all samples' masked positions / their count}
    mean: float  # the mean over the rates
    per_sequence: np.ndarray  # (N,) each sample's mean over the rates of its own masked CE


def fluency(
    model: nn.Module,
    ids: Tensor,
    *,
    mask_id: int,
    pad_id: int | None = None,
    rates: Sequence[float] = FLUENCY_RATES,
    seed: int = 0,
    batch_size: int = 64,
) -> Fluency:
    """The fluency proxy of samples `ids` (N, T) under `model` (a Transformer, e.g. the e2e model).

    The masks are `stackwise-eval`'s fixed-rate masks (nested over the rates, a function of
    (seed, row index)), so two sets of N samples are scored on the same masked positions.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).cpu()
    masks = draw_masks(ids, seed=seed, rates=rates, bound_samples=0, mask_id=mask_id, pad_id=pad_id)
    scorer = WholeModel("reference", model)
    device = next(model.parameters()).device
    N, R = ids.shape[0], len(rates)
    ce = np.zeros((R, N))
    count = np.zeros((R, N))
    with torch.inference_mode():
        for a in range(0, N, batch_size):
            x = ids[a : a + batch_size].to(device)  # (B, T)
            pad = (x == pad_id) if pad_id is not None else None
            pad = pad if pad is not None and bool(pad.any()) else None
            for r in range(R):
                mask = masks.rate_masks[r, a : a + batch_size].to(device)  # (B, T)
                for _, h, head_fn in scorer.outputs(x.masked_fill(mask, mask_id), pad):
                    seq_ce, _ = masked_ce_per_sequence(h, x, mask, head_fn)
                    ce[r, a : a + len(x)] = seq_ce.cpu().numpy()
                    count[r, a : a + len(x)] = mask.sum(1).cpu().numpy()
    pooled = {rate_key(rate): float(ce[r].sum() / max(count[r].sum(), 1)) for r, rate in enumerate(rates)}
    per_sequence = (ce / np.maximum(count, 1)).mean(0)
    return Fluency(rates=pooled, mean=float(np.mean(list(pooled.values()))), per_sequence=per_sequence)
