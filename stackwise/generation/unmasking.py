"""`generate`: fill the [MASK] positions of a batch by iterative unmasking (the package doc says how)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from stackwise.errors import StackWiseError

# The reveal order: which still-masked positions a step reveals (the package doc says how each ranks).
STRATEGIES = ("confidence", "margin", "entropy", "random")
# How many masks each step reveals: the fraction still masked after step s of S is 1 - s/S (linear)
# or cos(pi/2 * s/S) (cosine, MaskGIT's: few reveals at first, many at the end).
SCHEDULES = ("linear", "cosine")


@dataclass(frozen=True)
class SamplerSettings:
    """The sampler's settings. The defaults are the setting benchmarks/samplers.py measured best on the
    default model (benchmarks/RESULTS.md, "Samplers"): random order, temperature 0.8, nucleus 0.9. On
    that small model the confidence orders loop ("you you thee you"): the most probable tokens are the
    frequent short words, and each one revealed makes the next more probable. `sample.*`
    (stackwise/config/nodes.py) and stackwise-generate carry the same defaults."""

    strategy: str = "random"
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = 0.9
    schedule: str = "linear"
    block_length: int | None = None


DEFAULTS = SamplerSettings()


GeneratorArg = torch.Generator | Sequence[torch.Generator] | None


class GenerationError(StackWiseError, ValueError):
    """Bad sampling arguments (steps, strategy, prompt, ...): the CLIs print it as one line."""


def linear_counts(n: int, steps: int) -> list[int]:
    """How many of n masks are revealed at each of `steps` steps: sum n, each floor-linear.

    After step s (1-based) exactly floor(n * s / steps) masks are revealed.
    """
    return [n * (s + 1) // steps - n * s // steps for s in range(steps)]


def reveal_counts(n: int, steps: int, schedule: str = "linear") -> list[int]:
    """How many of n masks are revealed at each of `steps` steps under `schedule` (sum n).

    After step s (1-based), floor(n * (1 - gamma(s / steps))) masks are revealed, gamma the fraction
    still masked: 1 - r (linear, exact integer arithmetic) or cos(pi/2 * r) (cosine).
    """
    if schedule == "linear":
        return linear_counts(n, steps)
    done = [0] + [math.floor(n * (1 - math.cos(math.pi / 2 * s / steps))) for s in range(1, steps)] + [n]
    return [done[s + 1] - done[s] for s in range(steps)]


def _row_plan(masked: Tensor, steps: int, block_length: int | None, schedule: str) -> list[tuple[int, int, int]]:
    """Per step of one row: (lo, hi, count) = reveal `count` masks among positions [lo, hi).

    masked: (T,) bool, the row's positions to fill.
    """
    T = masked.numel()
    pos = masked.nonzero().flatten()
    if pos.numel() == 0:
        return [(0, T, 0)] * steps
    if block_length is None:
        return [(0, T, c) for c in reveal_counts(pos.numel(), steps, schedule)]
    first = int(pos[0])
    bounds = [(lo, min(lo + block_length, T)) for lo in range(first, T, block_length)]
    if steps < len(bounds):
        raise GenerationError(
            f"steps={steps} is fewer than the {len(bounds)} blocks of block_length={block_length} "
            f"from the first mask at position {first} to the end ({T}); give steps >= {len(bounds)} "
            "or a larger block length"
        )
    plan: list[tuple[int, int, int]] = []
    for b, (lo, hi) in enumerate(bounds):
        block_steps = linear_counts(steps, len(bounds))[b]  # steps shared evenly between blocks
        n = int(masked[lo:hi].sum())
        plan += [(lo, hi, c) for c in reveal_counts(n, block_steps, schedule)]
    return plan


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """probs (N, V) -> the same with everything outside each row's nucleus zeroed (not renormalised).

    The nucleus is the smallest set of most likely tokens whose mass reaches `top_p` (Holtzman et
    al. 2020): a token is kept when the mass of the tokens more likely than it is below top_p, so
    the most likely token is always kept. Ties keep their vocabulary order (a stable sort).
    """
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # (N, V)
    before = sorted_p.cumsum(-1) - sorted_p  # (N, V) mass of the more likely tokens
    keep_sorted = before < top_p
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return probs * keep


def _draw(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, g: torch.Generator
) -> tuple[Tensor, Tensor]:
    """logits (N, V) float32 on CPU -> (x0 (N,), probs (N, V) = the model's distribution at temperature 1)."""
    if temperature == 0:
        x0 = logits.argmax(-1)
    else:
        scaled = logits / temperature
        if top_k is not None and top_k < scaled.shape[-1]:
            kth = scaled.topk(top_k, dim=-1).values[:, -1:]  # (N, 1)
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        p = scaled.softmax(-1)
        if top_p is not None and top_p < 1:
            p = nucleus(p, top_p)
        x0 = torch.multinomial(p, 1, generator=g).squeeze(-1)
    # LLaDA ranks by the model's own probability (temperature 1), whatever the sampling temperature
    return x0, logits.softmax(-1)


def _ranking(strategy: str, x0: Tensor, probs: Tensor, g: torch.Generator) -> Tensor:
    """(N,) score of each masked position; the step reveals the highest first.

    confidence: p(x0), the drawn token's probability (LLaDA's low-confidence remasking);
    margin: p(top 1) - p(top 2), how clearly the model prefers one token;
    entropy: minus the entropy of the position's distribution (the least uncertain first);
    random: uniform (the reverse process of the diffusion: MDLM's ancestral order).
    """
    if strategy == "confidence":
        return probs.gather(-1, x0[:, None]).squeeze(-1)
    if strategy == "margin":
        top2 = probs.topk(2, dim=-1).values  # (N, 2)
        return top2[:, 0] - top2[:, 1]
    if strategy == "entropy":
        return torch.special.xlogy(probs, probs).sum(-1)  # -H: 0 * log 0 = 0 for the excluded tokens
    return torch.rand(x0.numel(), generator=g)


def _generators(generator: GeneratorArg, batch: int) -> list[torch.Generator]:
    if generator is None:
        g = torch.Generator(device="cpu")
        g.manual_seed(0)
        return [g] * batch
    if isinstance(generator, torch.Generator):
        return [generator] * batch
    gens = list(generator)
    if len(gens) != batch:
        raise GenerationError(f"got {len(gens)} generators for a batch of {batch} rows: give one, or one per row")
    return gens


def _check_args(
    ids: Tensor,
    steps: Any,
    strategy: Any,
    temperature: Any,
    top_k: Any,
    top_p: Any,
    schedule: Any,
    block_length: Any,
    mask_id: Any,
    vocab_size: int | None,
) -> None:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(steps) or steps < 1:
        raise GenerationError(f"steps must be an integer >= 1, got {steps!r}")
    if strategy not in STRATEGIES:
        raise GenerationError(f"unknown strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    if (
        not isinstance(temperature, (int, float))
        or isinstance(temperature, bool)
        or not temperature >= 0
        or math.isinf(temperature)
    ):
        raise GenerationError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise GenerationError(f"top_k must be an integer >= 1 or None (no limit), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1):
        raise GenerationError(f"top_p must be a number in (0, 1] or None (no limit), got {top_p!r}")
    if schedule not in SCHEDULES:
        raise GenerationError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if block_length is not None and (not is_int(block_length) or block_length < 1):
        raise GenerationError(f"block_length must be an integer >= 1 or None (one block), got {block_length!r}")
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise GenerationError(f"ids must be a (B, T) integer tensor, got {tuple(ids.shape)} {ids.dtype}")
    if not is_int(mask_id):
        raise GenerationError(f"mask_id must be an integer, got {mask_id!r}")
    if vocab_size is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise GenerationError(f"ids must lie in [0, {vocab_size}), got values in [{int(ids.min())}, {int(ids.max())}]")


@torch.no_grad()
def generate(
    model: nn.Module,
    ids: Tensor,
    *,
    steps: int,
    strategy: str = DEFAULTS.strategy,
    temperature: float = DEFAULTS.temperature,
    top_k: int | None = DEFAULTS.top_k,
    top_p: float | None = DEFAULTS.top_p,
    schedule: str = DEFAULTS.schedule,
    block_length: int | None = DEFAULTS.block_length,
    mask_id: int,
    pad_id: int | None = None,
    generator: GeneratorArg = None,
    callback: Callable[[int, Tensor], None] | None = None,
    n_ids: int | None = None,
) -> Tensor:
    """Fill every `mask_id` position of `ids` (B, T) by iterative unmasking; return the new (B, T) ids.

    model: `ids (B, T) [, pad_mask] -> logits (B, T, V)` (a `Transformer`); it is run in eval mode
      (its training flag is restored afterwards), on its own device.
    steps: model calls per row (>= 1; with `block_length`, >= the number of blocks).
    strategy: the reveal order, one of STRATEGIES (`_ranking` says how each ranks the positions).
    temperature: 0 = greedy (argmax); otherwise sample softmax(logits / temperature), optionally
      restricted to the `top_k` most likely tokens, then to the nucleus of mass `top_p`.
      [MASK] (and `pad_id`) are never sampled.
    schedule: how many masks each step reveals, one of SCHEDULES (`reveal_counts`).
    block_length: None = the whole sequence at once; else semi-autoregressive blocks (module doc).
    pad_id: positions holding it are padding (passed to the model as `pad_mask`, never filled).
    generator: one CPU torch.Generator for every row, or one per row (row i then depends only on
      its own input and generator); None = seed 0.
    callback: called as callback(step, ids) after each step (1-based; `ids` is the live tensor).
    n_ids: the ids a tokenizer can decode (a model's vocabulary may be padded past them): ids >= n_ids
      are never sampled. None = every id of the model.
    """
    vocab_size = getattr(getattr(model, "cfg", None), "vocab_size", None)
    _check_args(ids, steps, strategy, temperature, top_k, top_p, schedule, block_length, mask_id, vocab_size)
    gens = _generators(generator, ids.shape[0])
    device = next(model.parameters()).device
    x = ids.to(device=device, dtype=torch.long).clone()  # (B, T)
    pad_mask = (x == pad_id) if pad_id is not None else None
    if pad_mask is not None and not pad_mask.any():
        pad_mask = None
    plans = [_row_plan(row.cpu(), steps, block_length, schedule) for row in (x == mask_id)]
    top_p = None if top_p is None else float(top_p)
    reveal = _Reveal(mask_id, pad_id, strategy, float(temperature), top_k, top_p, n_ids)
    with _eval_mode(model):
        for s in range(steps):
            todo = [(r, *plan[s]) for r, plan in enumerate(plans) if plan[s][2] > 0]
            if todo:
                logits = model(x, pad_mask) if pad_mask is not None else model(x)  # (B, T, V)
                for r, lo, hi, count in todo:
                    reveal(x[r], logits[r], lo, hi, count, gens[r])
            if callback is not None:
                callback(s + 1, x)
    return x.to(ids.device)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block; its training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class _Reveal:
    """One step's reveal of one row: draw a token for each mask, keep the `count` the strategy ranks first."""

    mask_id: int
    pad_id: int | None
    strategy: str
    temperature: float
    top_k: int | None
    top_p: float | None = None
    n_ids: int | None = None

    def __call__(self, row: Tensor, logits: Tensor, lo: int, hi: int, count: int, g: torch.Generator) -> None:
        """Reveal `count` masks of `row` (T,) among positions [lo, hi), in place, from its logits (T, V)."""
        pos = (row[lo:hi] == self.mask_id).nonzero().flatten() + lo  # (N,) still masked in the block
        lg = logits[pos].float().cpu()  # (N, V): sample on CPU, the same on every device
        lg[:, [self.mask_id] + ([self.pad_id] if self.pad_id is not None else [])] = float("-inf")
        if self.n_ids is not None:
            lg[:, self.n_ids :] = float("-inf")  # the padded rows of the vocabulary: no token to decode
        x0, probs = _draw(lg, self.temperature, self.top_k, self.top_p, g)
        keep = _ranking(self.strategy, x0, probs, g).argsort(descending=True, stable=True)[:count]
        row[pos[keep]] = x0[keep].to(row.device)
