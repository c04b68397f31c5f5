"""Sampling from a masked-diffusion model: iterative unmasking (LLaDA-style).

Start from a sequence in which the positions to fill hold `[MASK]` (all of them, a prompt
followed by masks, or masks inside a text) and unmask them over `steps` steps. At each step the
model predicts every position at once; for each still-masked position a token x0 is drawn
(`temperature`, `top_k`), and only the `n_s` positions the strategy ranks first are revealed:

  - `confidence`: the positions whose drawn token has the highest model probability (LLaDA's
    "low-confidence remasking": the least confident predictions are put back under [MASK]);
  - `random`: positions chosen uniformly at random (the plain reverse process of the diffusion).

`n_s` follows a linear schedule: after step s of S, round(n * s / S) of the n masks are revealed
(floor), so the masking rate falls linearly from 1 to 0 and the last step fills every mask.
With S == n each step reveals exactly one token; with S > n some steps reveal nothing.

`block_length` makes it semi-autoregressive (LLaDA): the masked span is cut into blocks of
`block_length` positions starting at the row's first mask, the blocks are filled left to right,
and the steps are shared between the blocks as evenly as possible (each needs at least one).

Given (unmasked) tokens are never changed. Every random draw comes from CPU `torch.Generator`s,
so a seed gives the same output on any machine (up to the model's own float arithmetic).
With one generator per row, each row is a function of its own input and generator only. Sample i
(0-based) of `seed` is drawn with seed `seed + i`: it is the same whether 1 or 10 samples are drawn,
and `seed + i` alone gives it again, so each sample is labelled with the one seed that reproduces it.

This module is pure torch (no Lightning). `load_experiment_model`, `build_ids` and `sample_text`
read an experiment folder.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stackwise import artifacts as art
from stackwise.config import load_run
from stackwise.data.tokens import data_tokenizer
from stackwise.errors import StackWiseError
from stackwise.utils import generator

STRATEGIES = ("confidence", "random")
MODEL_KINDS = ("fused", "finetuned", "e2e")
# A mask in infill text: `[MASK]` is one token, each `_` of a run of underscores is one token.
INFILL_MARK = re.compile(r"\[MASK\]|_+")

GeneratorArg = torch.Generator | Sequence[torch.Generator] | None


class GenerationError(StackWiseError, ValueError):
    """Bad sampling arguments (steps, strategy, prompt, ...): the CLIs print it as one line."""


# ---------------------------------------------------------------------------------- schedule
def linear_counts(n: int, steps: int) -> list[int]:
    """How many of n masks are revealed at each of `steps` steps: sum n, each floor-linear.

    After step s (1-based) exactly floor(n * s / steps) masks are revealed.
    """
    return [n * (s + 1) // steps - n * s // steps for s in range(steps)]


def _row_plan(masked: Tensor, steps: int, block_length: int | None) -> list[tuple[int, int, int]]:
    """Per step of one row: (lo, hi, count) = reveal `count` masks among positions [lo, hi).

    masked: (T,) bool, the row's positions to fill.
    """
    T = masked.numel()
    pos = masked.nonzero().flatten()
    if pos.numel() == 0:
        return [(0, T, 0)] * steps
    if block_length is None:
        return [(0, T, c) for c in linear_counts(pos.numel(), steps)]
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
        plan += [(lo, hi, c) for c in linear_counts(n, block_steps)]
    return plan


# ---------------------------------------------------------------------------------- sampling
def _draw(logits: Tensor, temperature: float, top_k: int | None, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """logits (N, V) float32 on CPU -> (x0 (N,), confidence (N,) = model probability of x0)."""
    if temperature == 0:
        x0 = logits.argmax(-1)
    else:
        scaled = logits / temperature
        if top_k is not None and top_k < scaled.shape[-1]:
            kth = scaled.topk(top_k, dim=-1).values[:, -1:]  # (N, 1)
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        x0 = torch.multinomial(scaled.softmax(-1), 1, generator=g).squeeze(-1)
    # LLaDA ranks by the model's own probability (temperature 1), whatever the sampling temperature
    conf = logits.softmax(-1).gather(-1, x0[:, None]).squeeze(-1)
    return x0, conf


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
    strategy: str = "confidence",
    temperature: float = 1.0,
    top_k: int | None = None,
    block_length: int | None = None,
    mask_id: int,
    pad_id: int | None = None,
    generator: GeneratorArg = None,
    callback: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """Fill every `mask_id` position of `ids` (B, T) by iterative unmasking; return the new (B, T) ids.

    model: `ids (B, T) [, pad_mask] -> logits (B, T, V)` (a `Transformer`); it is run in eval mode
      (its training flag is restored afterwards), on its own device.
    steps: model calls per row (>= 1; with `block_length`, >= the number of blocks).
    strategy: "confidence" (keep the most probable draws, remask the rest) or "random".
    temperature: 0 = greedy (argmax); otherwise sample softmax(logits / temperature), optionally
      restricted to the `top_k` most likely tokens. [MASK] (and `pad_id`) are never sampled.
    block_length: None = the whole sequence at once; else semi-autoregressive blocks (module doc).
    pad_id: positions holding it are padding (passed to the model as `pad_mask`, never filled).
    generator: one CPU torch.Generator for every row, or one per row (row i then depends only on
      its own input and generator); None = seed 0.
    callback: called as callback(step, ids) after each step (1-based; `ids` is the live tensor).
    """
    vocab_size = getattr(getattr(model, "cfg", None), "vocab_size", None)
    _check_args(ids, steps, strategy, temperature, top_k, block_length, mask_id, vocab_size)
    gens = _generators(generator, ids.shape[0])
    device = next(model.parameters()).device
    x = ids.to(device=device, dtype=torch.long).clone()  # (B, T)
    pad_mask = (x == pad_id) if pad_id is not None else None
    if pad_mask is not None and not pad_mask.any():
        pad_mask = None
    plans = [_row_plan(row.cpu(), steps, block_length) for row in (x == mask_id)]
    banned = [mask_id] + ([pad_id] if pad_id is not None else [])

    was_training = model.training
    model.eval()
    try:
        for s in range(steps):
            todo = [(r, *plan[s]) for r, plan in enumerate(plans) if plan[s][2] > 0]
            if todo:
                logits = model(x, pad_mask) if pad_mask is not None else model(x)  # (B, T, V)
                for r, lo, hi, count in todo:
                    pos = (x[r, lo:hi] == mask_id).nonzero().flatten() + lo  # (N,) still masked in the block
                    lg = logits[r, pos].float().cpu()  # (N, V): sample on CPU, the same on every device
                    lg[:, banned] = float("-inf")
                    x0, conf = _draw(lg, float(temperature), top_k, gens[r])
                    if strategy == "random":
                        conf = torch.rand(pos.numel(), generator=gens[r])
                    keep = conf.argsort(descending=True, stable=True)[:count]
                    x[r, pos[keep]] = x0[keep].to(device)
            if callback is not None:
                callback(s + 1, x)
    finally:
        model.train(was_training)
    return x.to(ids.device)


# ---------------------------------------------------------------------------------- inputs
def _encode_text(tokenizer: Any, text: str, vocab_size: int, specials: Sequence[int], what: str) -> list[int]:
    """Text -> ids; without a tokenizer (dummy data) the text is whitespace-separated ids."""
    if tokenizer is not None:
        return list(tokenizer.encode(text))
    ids = []
    for word in text.split():
        try:
            i = int(word)
        except ValueError:
            raise GenerationError(
                f"{what}: this experiment's data has no tokenizer (dummy data): give token ids "
                f"separated by spaces, got {word!r}"
            ) from None
        if not 0 <= i < vocab_size or i in specials:
            raise GenerationError(f"{what}: token id {i} is outside [0, {vocab_size}) or a special id {list(specials)}")
        ids.append(i)
    return ids


def build_ids(
    tokenizer: Any,
    *,
    mask_id: int,
    vocab_size: int,
    length: int | None = None,
    prompt: str = "",
    infill: str | None = None,
    pad_id: int | None = None,
) -> list[int]:
    """The ids to start from: `prompt` + masks up to `length`, or `infill` with its masks marked.

    infill: `[MASK]` is one masked token; a run of n underscores is n masked tokens. The text
      between the marks is encoded piece by piece (for a BPE tokenizer a piece's boundary is a token
      boundary, and `_` counts tokens, not characters: `___` asks for three tokens, roughly three
      words or word pieces). Without a tokenizer (dummy data) the pieces are ids separated by spaces.
    """
    specials = [mask_id] + ([pad_id] if pad_id is not None else [])
    if infill is not None:
        if prompt:
            raise GenerationError("give a prompt or an infill text, not both")
        ids: list[int] = []
        pos = 0
        for m in INFILL_MARK.finditer(infill):
            ids += _encode_text(tokenizer, infill[pos : m.start()], vocab_size, specials, "infill")
            ids += [mask_id] * (1 if m.group() == "[MASK]" else len(m.group()))
            pos = m.end()
        ids += _encode_text(tokenizer, infill[pos:], vocab_size, specials, "infill")
        if mask_id not in ids:
            raise GenerationError(
                f"the infill text has nothing to fill: mark the positions with [MASK] or _ "
                f"(one _ per token), got {infill!r}"
            )
        return ids
    if length is None or isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise GenerationError(f"length must be an integer >= 1, got {length!r}")
    head = _encode_text(tokenizer, prompt, vocab_size, specials, "prompt") if prompt else []
    if len(head) >= length:
        raise GenerationError(
            f"the prompt is {len(head)} tokens, which leaves nothing to generate in length={length}; "
            f"give a length > {len(head)}"
        )
    return head + [mask_id] * (length - len(head))


def decode(tokenizer: Any, ids: Sequence[int], mask_text: str | None = None) -> str:
    """Text of ids with the experiment's tokenizer; without one (dummy data), the ids themselves."""
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return " ".join(str(i) for i in ids)
    return tokenizer.decode(ids, mask_text=mask_text) if mask_text is not None else tokenizer.decode(ids)


# ---------------------------------------------------------------------------------- experiments
@dataclass
class ExperimentModel:
    """A trained model of an experiment folder, ready to sample from."""

    model: nn.Module  # stackwise.model.transformer.Transformer, eval mode
    cfg: Any  # ModelConfig
    tokenizer: Any  # None for the dummy data
    seq_len: int  # the training sequence length: the default sample length
    meta: dict


def load_experiment_model(
    exp_dir: str | Path, which: str = "fused", device: str | torch.device = "cpu"
) -> ExperimentModel:
    """Load `fused` (default), `finetuned` or `e2e` from `exp_dir`, with the experiment's tokenizer.

    Raises StackWiseError (one line) for a missing folder or model, or a corrupt artifact.
    """
    exp_dir = Path(exp_dir)
    if which not in MODEL_KINDS:
        raise GenerationError(f"unknown model {which!r}; allowed: {', '.join(MODEL_KINDS)}")
    if not exp_dir.is_dir():
        raise StackWiseError(f"experiment folder {exp_dir} does not exist")
    paths = art.ExperimentPaths(exp_dir)
    folder = {"fused": paths.fused_dir, "finetuned": paths.finetuned_dir, "e2e": paths.e2e_dir}[which]
    if not (folder / "config.json").is_file():
        how = {
            "fused": "stackwise-train (stage=all, or stage=fusion after the layer stages)",
            "finetuned": "stackwise-train with fusion.finetune_steps > 0",
            "e2e": "stackwise-train stage=e2e",
        }[which]
        raise StackWiseError(f"{exp_dir} has no {which} model ({folder} is missing or incomplete); run {how} first")
    run = load_run(exp_dir)
    model, meta = art.load_model(folder)
    cfg = model.cfg
    model.to(device).eval()
    tokenizer = experiment_tokenizer(run)
    if tokenizer is not None and (tokenizer.mask_id, tokenizer.vocab_size) != (cfg.mask_id, cfg.vocab_size):
        raise StackWiseError(
            f"{folder}: the model has mask_id={cfg.mask_id}, vocab_size={cfg.vocab_size} but the "
            f"experiment's tokenizer has mask_id={tokenizer.mask_id}, vocab_size={tokenizer.vocab_size}"
        )
    return ExperimentModel(model=model, cfg=cfg, tokenizer=tokenizer, seq_len=int(run.data.seq_len), meta=meta)


def experiment_tokenizer(run: Any) -> Any:
    """The tokenizer the experiment was trained with (None for the dummy data).

    Built from the data config alone (what `load_token_splits(...).tokenizer` returns), so sampling
    never reads or re-tokenizes the corpus.
    """
    return data_tokenizer(run.data)


def sample_seeds(seed: int, n: int) -> list[int]:
    """The seed of each of n samples: sample i is the single sample of seed + i."""
    return [seed + i for i in range(n)]


def sample_generators(seed: int, n: int) -> list[torch.Generator]:
    """One CPU generator per sample, from that sample's own seed: sample i does not depend on n."""
    # the key ("generate", 0) keeps the first sample of every seed what it has always been
    return [generator(s, "generate", 0) for s in sample_seeds(seed, n)]


def sample_ids(
    em: ExperimentModel,
    *,
    prompt: str = "",
    infill: str | None = None,
    length: int | None = None,
    steps: int | None = None,
    num_samples: int = 1,
    seed: int = 0,
    strategy: str = "confidence",
    temperature: float = 1.0,
    top_k: int | None = None,
    block_length: int | None = None,
    callback: Callable[[int, Tensor], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """(start (T,), samples (num_samples, T)) for a loaded model; steps default: one per mask."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise GenerationError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise GenerationError(f"seed must be an integer >= 0, got {seed!r}")
    cfg = em.cfg
    start = torch.tensor(
        build_ids(
            em.tokenizer,
            mask_id=cfg.mask_id,
            vocab_size=cfg.vocab_size,
            pad_id=cfg.pad_id,
            length=em.seq_len if length is None and infill is None else length,
            prompt=prompt,
            infill=infill,
        )
    )
    if steps is None:
        steps = int((start == cfg.mask_id).sum())
    batch = start[None].repeat(num_samples, 1)
    out = generate(
        em.model,
        batch,
        steps=steps,
        strategy=strategy,
        temperature=temperature,
        top_k=top_k,
        block_length=block_length,
        mask_id=cfg.mask_id,
        pad_id=cfg.pad_id,
        generator=sample_generators(seed, num_samples),
        callback=callback,
    )
    return start, out


def sample_text(
    exp_dir: str | Path,
    prompt: str = "",
    length: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    *,
    model: str = "fused",
    **kwargs: Any,
) -> str:
    """One sample from an experiment's model, decoded (ids separated by spaces for the dummy data).

    length: tokens in all, prompt included (default: the training seq_len); steps: default one per
    masked token. kwargs: strategy, temperature, top_k, block_length, infill (see `generate`).
    """
    em = load_experiment_model(exp_dir, model)
    _, out = sample_ids(em, prompt=prompt, length=length, steps=steps, seed=seed, **kwargs)
    return decode(em.tokenizer, out[0].tolist())
