"""Scoring: masked CE and accuracy at the fixed rates, the bound per sequence, and their standard errors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stackwise.evaluation.masks import EvalMasks
from stackwise.evaluation.scorers import HeadFn, Scorer

LN2 = math.log(2.0)


def masked_ce_per_sequence(hidden: Tensor, targets: Tensor, mask: Tensor, head_fn: HeadFn) -> tuple[Tensor, Tensor]:
    """(CE summed over each sequence's masked positions (B,) float64, correct argmax count (B,) long).

    The same computation as `objective.loss.masked_loss` (head only at masked positions, fp32
    log-softmax over the whole vocabulary), kept per sequence for the standard errors.
    """
    B = targets.shape[0]
    rows = mask.nonzero(as_tuple=True)[0]  # (N,) sequence of each masked position
    tgt = targets[mask]  # (N,)
    logits = head_fn(hidden[mask]).float()  # (N, V)
    ce = F.cross_entropy(logits, tgt, reduction="none").double()  # (N,)
    correct = (logits.argmax(-1) == tgt).long()
    ce_seq = torch.zeros(B, dtype=torch.float64, device=ce.device).index_add_(0, rows, ce)
    ok_seq = torch.zeros(B, dtype=torch.long, device=ce.device).index_add_(0, rows, correct)
    return ce_seq, ok_seq


@dataclass
class _Acc:
    """Running sums of one model."""

    R: int
    N: int
    ce: np.ndarray = None  # (R,) CE sums at each fixed rate
    correct: np.ndarray = None  # (R,)
    masked: np.ndarray = None  # (R,)
    bound: np.ndarray = None  # (N,) sum over draws of Y_is (nats)

    def __post_init__(self):
        self.ce, self.correct, self.masked = np.zeros(self.R), np.zeros(self.R, np.int64), np.zeros(self.R, np.int64)
        self.bound = np.zeros(self.N)


def score(
    scorer: Scorer,
    tokens: Tensor,
    masks: EvalMasks,
    *,
    mask_id: int,
    pad_id: int | None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict[str, dict]:
    """Fixed-rate CE/accuracy and the bound of every model of `scorer`, {name: result dict}."""
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    N, R, S = masks.n_sequences, len(masks.rates), masks.bound_samples
    accs = {name: _Acc(R, N) for name in scorer.names}
    scorer.to(device)
    with torch.inference_mode():
        for a in range(0, N, batch_size):
            ids = tokens[a : a + batch_size].to(device)  # (B, T)
            pad = (ids == pad_id) if pad_id is not None else None
            pad = pad if pad is not None and bool(pad.any()) else None  # None keeps the fused attention kernels
            sets = [("rate", r, masks.rate_masks[r, a : a + batch_size]) for r in range(R)]
            sets += [("bound", s, masks.bound_masks[s, a : a + batch_size]) for s in range(S)]
            for kind, j, mask in sets:
                mask = mask.to(device)
                masked = ids.masked_fill(mask, mask_id)
                for name, h, head_fn in scorer.outputs(masked, pad):
                    ce, ok = masked_ce_per_sequence(h, ids, mask, head_fn)
                    acc = accs[name]
                    if kind == "rate":
                        acc.ce[j] += float(ce.sum())
                        acc.correct[j] += int(ok.sum())
                        acc.masked[j] += int(mask.sum())
                    else:
                        t = masks.bound_t[j, a : a + batch_size].to(ce.device)  # (B,) float64
                        acc.bound[a : a + len(ids)] += (ce / t).cpu().numpy()
    return {name: _result(acc, masks) for name, acc in accs.items()}


def _result(acc: _Acc, masks: EvalMasks) -> dict:
    n = masks.n_tokens.numpy().astype(np.float64)  # (N,)
    y = acc.bound / masks.bound_samples  # (N,) per-sequence bound estimate, nats
    B, se = _ratio(y, n)
    rates = {}
    for r, rate in enumerate(masks.rates):
        m = max(int(acc.masked[r]), 1)
        rates[rate_key(rate)] = {
            "ce": float(acc.ce[r] / m),
            "acc": float(acc.correct[r] / m),
            "n_masked": int(acc.masked[r]),
        }
    return {
        "rates": rates,
        "bound": {
            "nats_per_token": B,
            "se": se,
            "bits_per_token": B / LN2,
            "se_bits_per_token": None if se is None else se / LN2,
            "n_sequences": len(y),
            "samples_per_sequence": masks.bound_samples,
            "n_samples": len(y) * masks.bound_samples,
            "n_tokens": int(n.sum()),
        },
        "per_sequence_nats": y,
    }  # (N,) numpy: for paired comparisons; not written to JSON


def _ratio(y: np.ndarray, n: np.ndarray) -> tuple[float, float | None]:
    """sum(y) / sum(n) and its standard error over sequences (delta method for a ratio)."""
    total, N = float(n.sum()), len(y)
    B = float(y.sum() / total)
    se = float(math.sqrt(N / (N - 1) * np.sum((y - B * n) ** 2)) / total) if N > 1 else None
    return B, se


def paired_difference(a: dict, b: dict, n_tokens: Tensor | np.ndarray) -> dict:
    """Bound of model a minus model b (nats/token) and its paired standard error.

    Both evaluated on the same masks (`score` with one `EvalMasks`), so the per-sequence
    differences cancel the mask and data noise that the two models share.
    """
    n = np.asarray(n_tokens, dtype=np.float64)
    d, se = _ratio(np.asarray(a["per_sequence_nats"]) - np.asarray(b["per_sequence_nats"]), n)
    return {"delta_nats_per_token": d, "se": se}


def rate_key(rate: float) -> str:
    return f"{float(rate):g}"
