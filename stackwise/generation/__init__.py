"""Sampling from a masked-diffusion model: iterative unmasking (LLaDA-style).

Start from a sequence in which the positions to fill hold `[MASK]` (all of them, a prompt
followed by masks, or masks inside a text) and unmask them over `steps` steps. At each step the
model predicts every position at once; for each still-masked position a token x0 is drawn
(`temperature`, then `top_k`, then the nucleus `top_p`), and only the `n_s` positions the strategy
(the reveal order) ranks first are revealed:

  - `confidence`: the positions whose drawn token has the highest model probability (LLaDA's
    "low-confidence remasking": the least confident predictions are put back under [MASK]);
  - `margin`: the largest gap between the two most likely tokens' probabilities;
  - `entropy`: the lowest entropy of the position's distribution;
  - `random`: positions chosen uniformly at random (the plain reverse process of the diffusion,
    MDLM's ancestral order with exactly n_s reveals per step).

`n_s` follows the `schedule`: after step s of S, floor(n * (1 - gamma(s / S))) of the n masks are
revealed, gamma the fraction still masked: 1 - r (`linear`: the masking rate falls linearly from 1
to 0) or cos(pi/2 * r) (`cosine`, MaskGIT's: few reveals first, many at the end); the last step
fills every mask. Linear with S == n reveals exactly one token per step; with S > n some steps
reveal nothing (and cost no model call when no row reveals anything).

The defaults (`DEFAULTS`, also those of `sample.*` and stackwise-generate) are the setting that
measured best on the default model (benchmarks/samplers.py); `quality.py` holds the measures.

`block_length` makes it semi-autoregressive (LLaDA): the masked span is cut into blocks of
`block_length` positions starting at the row's first mask, the blocks are filled left to right,
and the steps are shared between the blocks as evenly as possible (each needs at least one).

Given (unmasked) tokens are never changed. Every random draw comes from CPU `torch.Generator`s,
so a seed gives the same output on any machine (up to the model's own float arithmetic).
With one generator per row, each row is a function of its own input and generator only. Sample i
(0-based) of `seed` is drawn with seed `seed + i`: it is the same whether 1 or 10 samples are drawn,
and `seed + i` alone gives it again, so each sample is labelled with the one seed that reproduces it.

This package is pure torch (no Lightning).

    unmasking.py   generate: the sampler, on any model and batch; SamplerSettings, DEFAULTS
    quality.py     distinct-n, the longest repeated n-gram, the fluency proxy (masked CE under a model)
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
from stackwise.generation.quality import FLUENCY_RATES, Fluency, distinct_n, fluency, longest_repeat, words
from stackwise.generation.unmasking import (
    DEFAULTS,
    SCHEDULES,
    STRATEGIES,
    GenerationError,
    GeneratorArg,
    SamplerSettings,
    generate,
    linear_counts,
    nucleus,
    reveal_counts,
)

__all__ = [
    "DEFAULTS",
    "FLUENCY_RATES",
    "INFILL_MARK",
    "MODEL_KINDS",
    "SCHEDULES",
    "STRATEGIES",
    "ExperimentModel",
    "Fluency",
    "GenerationError",
    "GeneratorArg",
    "SamplerSettings",
    "build_ids",
    "decode",
    "distinct_n",
    "experiment_tokenizer",
    "fluency",
    "generate",
    "linear_counts",
    "load_experiment_model",
    "longest_repeat",
    "nucleus",
    "reveal_counts",
    "sample_generators",
    "sample_ids",
    "sample_seeds",
    "sample_text",
    "words",
]
