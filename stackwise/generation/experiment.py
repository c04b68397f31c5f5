"""Sampling from an experiment folder's model: load it with its tokenizer, draw seeded samples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stackwise import artifacts as art
from stackwise.config import load_run
from stackwise.data.config import data_tokenizer
from stackwise.errors import StackWiseError
from stackwise.generation.inputs import build_ids, decode
from stackwise.generation.unmasking import DEFAULTS, GenerationError, generate
from stackwise.utils import generator

MODEL_KINDS = ("fused", "finetuned", "e2e")


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
        how = art.MODEL_COMMANDS[which]
        raise StackWiseError(f"{exp_dir} has no {which} model ({folder} is missing or incomplete); run {how} first")
    run = load_run(exp_dir)
    model, meta = art.load_model(folder)
    cfg = model.cfg
    model.to(device).eval()
    tokenizer = experiment_tokenizer(run)
    # a model's vocabulary may be padded past the ids its tokenizer uses (model=seed's 128000 rows
    # over the byte tokenizer's 258): those rows are never sampled (sample_ids passes n_ids)
    if tokenizer is not None and (tokenizer.mask_id != cfg.mask_id or cfg.vocab_size < n_ids_of(tokenizer)):
        raise StackWiseError(
            f"{folder}: the model has mask_id={cfg.mask_id}, vocab_size={cfg.vocab_size} but the "
            f"experiment's tokenizer has mask_id={tokenizer.mask_id} and uses {n_ids_of(tokenizer)} ids"
        )
    return ExperimentModel(model=model, cfg=cfg, tokenizer=tokenizer, seq_len=int(run.data.seq_len), meta=meta)


def n_ids_of(tokenizer: Any) -> int:
    """The ids a tokenizer really uses (its vocab_size where it does not say)."""
    return int(getattr(tokenizer, "n_ids", tokenizer.vocab_size))


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
    strategy: str = DEFAULTS.strategy,
    temperature: float = DEFAULTS.temperature,
    top_k: int | None = DEFAULTS.top_k,
    top_p: float | None = DEFAULTS.top_p,
    schedule: str = DEFAULTS.schedule,
    block_length: int | None = DEFAULTS.block_length,
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
        top_p=top_p,
        schedule=schedule,
        block_length=block_length,
        mask_id=cfg.mask_id,
        pad_id=cfg.pad_id,
        generator=sample_generators(seed, num_samples),
        callback=callback,
        n_ids=None if em.tokenizer is None else n_ids_of(em.tokenizer),
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
    masked token. kwargs: strategy, temperature, top_k, top_p, schedule, block_length, infill (see
    `generate`; their defaults are `DEFAULTS`).
    """
    em = load_experiment_model(exp_dir, model)
    _, out = sample_ids(em, prompt=prompt, length=length, steps=steps, seed=seed, **kwargs)
    return decode(em.tokenizer, out[0].tolist())
