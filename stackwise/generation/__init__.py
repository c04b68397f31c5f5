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

This package is pure torch (no Lightning).

    unmasking.py   generate: the sampler, on any model and batch
    inputs.py      build_ids (prompt / infill text -> ids with masks), decode
    experiment.py  load_experiment_model, sample_ids, sample_text: from an experiment folder
"""

from stackwise.generation.experiment import (
    MODEL_KINDS,
    ExperimentModel,
    experiment_tokenizer,
    load_experiment_model,
    sample_generators,
    sample_ids,
    sample_seeds,
    sample_text,
)
from stackwise.generation.inputs import INFILL_MARK, build_ids, decode
from stackwise.generation.unmasking import STRATEGIES, GenerationError, GeneratorArg, generate, linear_counts

__all__ = [
    "INFILL_MARK",
    "MODEL_KINDS",
    "STRATEGIES",
    "ExperimentModel",
    "GenerationError",
    "GeneratorArg",
    "build_ids",
    "decode",
    "experiment_tokenizer",
    "generate",
    "linear_counts",
    "load_experiment_model",
    "sample_generators",
    "sample_ids",
    "sample_seeds",
    "sample_text",
]
