"""Cross-entropy at the masked positions only, with the LM head run only there.

The head is the largest matmul of a small model ((B*T, D) x (D, V)); a masked-diffusion step
supervises a fraction t of the positions, so gathering the masked hidden states first and running
the head on those N rows saves (1 - t) of it and never materialises the (B, T, V) logits grid.

Weightings:
    mean   ce_sum / n_masked                                  the mean CE over masked tokens
    elbo   sum_masked CE / t_b  /  n_tokens (non-pad tokens)  the MDLM / LLaDA bound on -log p per token

Two ways to the masked rows, the same rows in the same (row-major) order:
- `index`: their flat positions in (B*T), computed on the host before the batch moves to the device
  (`masked_positions`, called by StageModule.on_before_batch_transfer). The gather's shape is then
  known on the host, so the device never has to report it.
- `hidden[mask]` with the boolean mask: the host waits for the device to count the rows (a sync).

Chunks: at a 128k vocabulary the fp32 logits of the N masked rows of an 8 x 2048 batch are 4.4 GB,
and their gradient as much again. With `chunk_rows` and a head given as a `LinearHead`, the head's
projection and the cross-entropy run over chunks of rows, and each chunk's gradient is taken at once
(its logits are freed before the next chunk), so no more than one chunk's logits ever exist and no
matmul is recomputed. The loss and the gradients are the full path's up to summation order.

`fused`: each chunk's softmax, cross-entropy, argmax and gradient run as one `torch.compile`d
function (`_fused_chunk`: a reduction over each row and one pass writing the half-precision
gradient) instead of ~10 eager passes over an (n, V) fp32 tensor. At a 128k vocabulary those passes
were 23 % of a layer stage's step on an H200 (benchmarks/profile_step.py). A stage uses it when it
compiles its blocks (`step.compile`); every other run keeps the eager loop below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from stackwise.compat import autocast_dtype
from stackwise.objective.masking import WEIGHTINGS

# `auto` chunks (StepConfig.loss_chunk): at most this many fp32 logits per chunk (1 GiB). Fewer,
# larger chunks cost less where the head's weight trains (stage 1, e2e): each chunk adds its share
# of the weight's gradient into an fp32 sum, one pass over the (V, D) matrix per chunk.
AUTO_CHUNK_LOGITS = 2**28


class LossOut(NamedTuple):
    loss: Tensor  # () the value to backpropagate
    ce_sum: Tensor  # () fp32 sum of CE over masked positions (detached: it feeds metrics)
    n_masked: Tensor  # () long, supervised positions
    n_correct: Tensor  # () long, masked positions where argmax == target
    n_tokens: Tensor  # () long, non-pad positions (the elbo denominator)


class LinearHead(NamedTuple):
    """An LM head whose last step is a linear map: logits = F.linear(features(h), weight).

    Given as this pair instead of a plain function, the head can be applied a chunk of rows at a time.
    """

    features: Callable[[Tensor], Tensor]  # (N, D) -> (N, D), e.g. the final norm
    weight: Tensor  # (V, D)

    def logits(self, h: Tensor) -> Tensor:
        return F.linear(self.features(h), self.weight)


def masked_positions(mask: Tensor) -> Tensor:
    """(N,) long: the flat positions in (B*T) where mask (B, T) is True, in row-major order (that of `hidden[mask]`)."""
    return mask.reshape(-1).nonzero().squeeze(1)


def chunk_rows_for(setting: int | str, vocab_size: int) -> int:
    """Rows per chunk for a `step.loss_chunk` setting: 0 (never chunk), a row count, or `auto`."""
    if setting == "auto":
        return max(1, AUTO_CHUNK_LOGITS // vocab_size)
    return int(setting)


def masked_loss(
    hidden: Tensor,
    targets: Tensor,
    mask: Tensor,
    t: Tensor,
    head_fn: Callable[[Tensor], Tensor] | LinearHead,
    weighting: str = "mean",
    pad_id: int | None = None,
    *,
    index: Tensor | None = None,
    chunk_rows: int = 0,
    fused: bool = False,
) -> LossOut:
    """hidden (B, T, D), targets (B, T) long, mask (B, T) bool, t (B,); head_fn: (N, D) -> (N, V), or a LinearHead.

    pad_id: positions where targets == pad_id are padding (they only change the elbo denominator;
    padding is never masked). None means the batch has no padding.
    index: `masked_positions(mask)` when already known (on the host), for a gather without a sync.
    chunk_rows: > 0 runs a LinearHead head over chunks of that many rows when there are more rows.
    fused: with chunk_rows > 0, the chunked path (one chunk if the rows fit) with its compiled kernel.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
    B, T = targets.shape
    if index is None:
        h = hidden[mask]  # (N, D)
        tgt = targets[mask]  # (N,)
    else:
        h = hidden.reshape(B * T, hidden.shape[-1]).index_select(0, index)  # (N, D)
        tgt = targets.reshape(B * T).index_select(0, index)  # (N,)
    n_masked = mask.sum()
    n_tokens = (targets != pad_id).sum() if pad_id is not None else targets.new_full((), B * T)
    t_pos = None
    if weighting == "elbo":
        # each masked token weighs 1/t of its sequence; t >= mask_fraction_min > 0 in training, the
        # clamp only guards hand-built batches
        t32 = t.to(torch.float32)
        t_pos = t32[:, None].expand(B, T)[mask] if index is None else t32.index_select(0, index // T)  # (N,)
        t_pos = t_pos.clamp_min(1e-6)

    if isinstance(head_fn, LinearHead) and chunk_rows > 0 and (chunk_rows < h.shape[0] or fused):
        total, ce_sum, n_correct = chunked_linear_cross_entropy(
            head_fn.features(h), head_fn.weight, tgt, t_pos, chunk_rows, fused=fused
        )
    else:
        logits = (head_fn.logits(h) if isinstance(head_fn, LinearHead) else head_fn(h)).float()  # (N, V)
        # fp32 above so that bf16/fp16 autocast does not round the log-softmax
        ce = F.cross_entropy(logits, tgt, reduction="none")  # (N,)
        ce_sum = ce.sum()
        n_correct = (logits.detach().argmax(-1) == tgt).sum()
        total = ce_sum if t_pos is None else (ce / t_pos).sum()
        ce_sum = ce_sum.detach()
    loss = total / (n_masked.clamp_min(1) if weighting == "mean" else n_tokens.clamp_min(1))
    return LossOut(loss, ce_sum, n_masked, n_correct, n_tokens)


def chunked_linear_cross_entropy(
    x: Tensor, weight: Tensor, targets: Tensor, divisor: Tensor | None, chunk_rows: int, fused: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """sum_i CE(x_i W^T, targets_i) / divisor_i over chunks of `chunk_rows` rows (divisor None = 1).

    x (N, D), weight (V, D), targets (N,) long, divisor (N,) fp32. Returns (total: differentiable
    w.r.t. x and weight, ce_sum: the undivided CE sum, n_correct: rows whose argmax is the target).
    Logits are taken in the precision F.linear gives under the ambient autocast and promoted to
    fp32 for the softmax, as in the unchunked path. `fused`: the gradient's chunks through the
    compiled `_fused_chunk` (without a gradient to take, the eager loop runs).
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _ChunkedLinearCE.apply(x, weight, targets, divisor, chunk_rows, fused)
    return _chunks(x, weight, targets, divisor, chunk_rows, need_x=False, need_w=False)[:3]


def _chunks(
    x: Tensor,
    weight: Tensor,
    targets: Tensor,
    divisor: Tensor | None,
    chunk_rows: int,
    need_x: bool,
    need_w: bool,
    fused: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """(total, ce_sum, n_correct, d total / d x, d total / d weight in fp32), one chunk of logits at a time."""
    grad_x = torch.empty_like(x) if need_x else None  # (N, D)
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None  # (V, D), summed over chunks
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    ce_sum = torch.zeros((), dtype=torch.float32, device=x.device)
    n_correct = torch.zeros((), dtype=torch.long, device=x.device)
    # the weight in the logits' dtype, cast once for every chunk and the gradient matmuls (autocast
    # would cast it again in each chunk's F.linear: 2 GB read per cast at a 128k vocabulary)
    low = autocast_dtype(x.device.type)
    w_lo = weight.to(low) if low is not None and weight.dtype != low else weight  # (V, D)
    for s in range(0, x.shape[0], chunk_rows):
        xs, ts = x[s : s + chunk_rows], targets[s : s + chunk_rows]  # (n, D), (n,)
        logits = F.linear(xs, w_lo)  # (n, V), bf16 under bf16 autocast
        if fused and (need_x or need_w):
            div = None if divisor is None else divisor[s : s + chunk_rows]
            ce, correct, grad = fused_chunk_kernel()(logits, ts, div)  # (n,), (n,), (n, V) in w_lo's dtype
            del logits
            n_correct += correct.sum()
            ce_sum += ce.sum()
            total += ce.sum() if div is None else (ce / div).sum()
            if need_x:
                grad_x[s : s + chunk_rows] = grad @ w_lo  # (n, D)
            if need_w:
                grad_w += grad.t() @ xs.to(w_lo.dtype)  # (V, D)
            continue
        n_correct += (logits.argmax(-1) == ts).sum()
        logp = F.log_softmax(logits.float(), dim=-1)  # (n, V) fp32
        del logits
        ce = -logp.gather(1, ts[:, None]).squeeze(1)  # (n,)
        ce_sum += ce.sum()
        total += ce.sum() if divisor is None else (ce / divisor[s : s + chunk_rows]).sum()
        if not (need_x or need_w):
            continue
        # d CE_i / d logits_i = softmax_i - onehot(target_i), divided as the row is
        grad = logp.exp_()  # (n, V), in place: logp is not needed any more
        grad.scatter_add_(1, ts[:, None], torch.full_like(grad[:, :1], -1.0))
        if divisor is not None:
            grad /= divisor[s : s + chunk_rows, None]
        grad = grad.to(w_lo.dtype)
        if need_x:
            grad_x[s : s + chunk_rows] = grad @ w_lo  # (n, D)
        if need_w:
            grad_w += grad.t() @ xs.to(w_lo.dtype)  # (V, D)
    return total, ce_sum, n_correct, grad_x, grad_w


class _ChunkedLinearCE(torch.autograd.Function):
    """The gradient is taken chunk by chunk in the forward pass, while each chunk's logits exist:
    the output is a scalar, so backward only scales the stored gradients by the incoming one."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, divisor: Tensor | None, chunk_rows: int, fused: bool):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total, ce_sum, n_correct, grad_x, grad_w = _chunks(
            x, weight, targets, divisor, chunk_rows, need_x=need_x, need_w=need_w, fused=fused
        )
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(ce_sum, n_correct)
        return total, ce_sum, n_correct

    @staticmethod
    def backward(ctx, grad_total: Tensor, *_):
        grad_x, grad_w = ctx.saved_tensors
        gx = None if grad_x is None else grad_x * grad_total.to(grad_x.dtype)
        gw = None if grad_w is None else (grad_w * grad_total).to(ctx.weight_dtype)
        return gx, gw, None, None, None, None


def _fused_chunk(logits: Tensor, targets: Tensor, divisor: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk's (ce (n,) fp32, correct (n,) bool, d sum(ce / divisor) / d logits (n, V) in logits' dtype),
    written for torch.compile: the eager loop's math (log-softmax in fp32, softmax minus the one-hot
    target, divided as the row is) as a row reduction and one pointwise pass, without in-place ops."""
    lf = logits.float()  # (n, V)
    lse = torch.logsumexp(lf, dim=-1, keepdim=True)  # (n, 1)
    ce = (lse - lf.gather(1, targets[:, None])).squeeze(1)  # (n,)
    correct = logits.argmax(-1) == targets  # (n,)
    p = torch.exp(lf - lse)  # (n, V) softmax
    hit = torch.arange(lf.shape[1], device=lf.device)[None, :] == targets[:, None]  # (n, V) one-hot
    grad = torch.where(hit, p - 1.0, p)
    if divisor is not None:
        grad = grad / divisor[:, None]
    return ce, correct, grad.to(logits.dtype)


_FUSED_CHUNK: Callable | None = None


def fused_chunk_kernel() -> Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor, Tensor]]:
    """`_fused_chunk` compiled once per process. Only the row count is dynamic (it varies with the
    batch's masked count); the vocabulary stays a constant of the kernel, so Triton tiles its row
    reductions for the real V instead of a symbolic one (`dynamic=True` made every size symbolic)."""
    global _FUSED_CHUNK
    if _FUSED_CHUNK is None:
        compiled = torch.compile(_fused_chunk)  # automatic dynamic: V static, the rows marked below
        mark = getattr(torch._dynamo, "maybe_mark_dynamic", torch._dynamo.mark_dynamic)

        def call(logits: Tensor, targets: Tensor, divisor: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
            for t in (logits, targets, divisor):
                if t is not None and t.shape[0] > 1:  # a 1-row chunk: its own (specialised) graph
                    mark(t, 0)
            return compiled(logits, targets, divisor)

        _FUSED_CHUNK = call
    return _FUSED_CHUNK
