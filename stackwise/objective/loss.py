"""Cross-entropy at the masked positions only, with the LM head run only there.

The head is the largest matmul of a small model ((B*T, D) x (D, V)); a masked-diffusion step
supervises a fraction t of the positions, so gathering the masked hidden states first and running
the head on those N rows saves (1 - t) of it and never materialises the (B, T, V) logits grid.

Weightings:
    mean   ce_sum / n_masked                                  the mean CE over masked tokens
    elbo   sum_masked CE / t_b  /  n_tokens (non-pad tokens)  the MDLM / LLaDA bound on -log p per token
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from stackwise.objective.masking import WEIGHTINGS


class LossOut(NamedTuple):
    loss: Tensor  # () the value to backpropagate
    ce_sum: Tensor  # () fp32 sum of CE over masked positions (detached: it feeds metrics)
    n_masked: Tensor  # () long, supervised positions
    n_correct: Tensor  # () long, masked positions where argmax == target
    n_tokens: Tensor  # () long, non-pad positions (the elbo denominator)


def masked_loss(
    hidden: Tensor,
    targets: Tensor,
    mask: Tensor,
    t: Tensor,
    head_fn: Callable[[Tensor], Tensor],
    weighting: str = "mean",
    pad_id: int | None = None,
) -> LossOut:
    """hidden (B, T, D), targets (B, T) long, mask (B, T) bool, t (B,); head_fn: (N, D) -> (N, V).

    pad_id: positions where targets == pad_id are padding (they only change the elbo denominator;
    padding is never masked). None means the batch has no padding.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
    B, T = targets.shape
    h = hidden[mask]  # (N, D)
    tgt = targets[mask]  # (N,)
    logits = head_fn(h).float()  # (N, V): fp32 so bf16/fp16 autocast does not round the log-softmax
    ce = F.cross_entropy(logits, tgt, reduction="none")  # (N,)
    ce_sum = ce.sum()
    n_masked = mask.sum()
    n_correct = (logits.detach().argmax(-1) == tgt).sum()
    n_tokens = (targets != pad_id).sum() if pad_id is not None else torch.tensor(B * T, device=targets.device)

    if weighting == "mean":
        loss = ce_sum / n_masked.clamp_min(1)
    else:
        # each masked token weighs 1/t of its sequence; t >= mask_fraction_min > 0 in training, the
        # clamp only guards hand-built batches
        t_pos = t.to(ce.dtype)[:, None].expand(B, T)[mask]  # (N,)
        loss = (ce / t_pos.clamp_min(1e-6)).sum() / n_tokens.clamp_min(1)
    return LossOut(loss, ce_sum.detach(), n_masked, n_correct, n_tokens)
