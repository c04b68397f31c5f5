"""Evaluate every model of an experiment on its validation split (pure torch, no Lightning).

Models: each depth prefix k = 1..K (embedding of layer 1, blocks 1..k, final norm / head of layer k:
exactly the model whose loss stage k reported), the fused model, the fine-tuned one and the e2e
baseline when present. Metrics, all on the same masked sequences for every model:

* masked cross-entropy and masked-token accuracy at fixed rates (default 0.15, 0.5, 0.9):
  sum of CE over masked positions / number of masked positions, as the stages' `val/loss`;
* the masked-diffusion upper bound on -log p(x) (MDLM / LLaDA), in nats per token and bits per
  byte, with its standard error over sequences.

The bound. For a sequence x of n non-pad tokens, any-order autoregression (the uniform mixture
over unmasking orders, a normalised model of x) gives

    -log p(x) <= sum_{l=1..n} f_x(l),    f_x(l) = E_{|M|=l} [ (1/l) sum_{i in M} -log p(x_i | x with M masked) ]

where M is a uniformly random set of l positions (f_x(l) is the mean masked CE at l masks). With
l ~ U{1..n} and t = l/n this is LLaDA's  E_t [ (1/t) sum_{i in M} -log p(x_i | x_M) ],  i.e. the
MDLM bound E_{t~U(0,1]} [(1/t) ...] with t on the grid {1/n, ..., 1}. The grid is not a
simplification: `mask_batch` masks exactly round(t n) positions (at least one), and with that
mask the continuous-t form would weigh one mask by 1/t for t -> 0 (an infinite expectation).
Per token = the sum over sequences of the bound / the number of non-pad tokens.

Estimator (`bound_samples` = S draws per sequence): for draw s of sequence i,
    u_is = (pi_s(i) + v_is) / N            pi_s a seeded permutation of 0..N-1, v_is ~ U[0, 1)
    l_is = floor(u_is n_i) + 1,  t_is = l_is / n_i
    Y_is = (1/t_is) sum_{j in M_is} CE_ij    (nats; unbiased for the sequence's bound)
so each draw s puts exactly one sequence in each of the N strata of u (stratified t over the whole
validation set, re-permuted per draw: marginally u_is ~ U[0,1), l_is ~ U{1..n_i}, so the estimate
is unbiased per sequence, and it does not depend on the batch size). Then
    B  = sum_i Ybar_i / sum_i n_i                                   nats/token
    se = sqrt( N/(N-1) sum_i (Ybar_i - B n_i)^2 ) / sum_i n_i       (ratio-estimator delta method)
with Ybar_i the mean of Y_is over s. The se treats sequences as independent; stratification makes
them slightly negatively correlated, so the se is conservative.
bits/byte = B / ln 2 * tokens / bytes (byte tokenizer: tokens = bytes; other tokenizers: bytes of
the decoded validation text; dummy data has no bytes: bits/token is reported instead).

Common random numbers: every mask is a function of (seed, validation index, view) through
`mask_batch`, and the eval views are fixed numbers (`RATE_VIEW`, `BOUND_VIEW0 + s`), far from the
views training and caching use, so all models of one evaluation see the same masks and their
differences are not sampling noise of the masks. The fixed-rate masks share one view, so they are
nested (the positions masked at 0.15 are masked at 0.5 and 0.9 too).

    masks.py       EvalMasks, draw_masks: the fixed-rate and bound masks, shared by every model
    scorers.py     Scorer: WholeModel (a Transformer), PrefixStack (depth prefixes in one pass)
    scoring.py     score: per-model sums; the bound and its standard errors; paired differences
    models.py      discover: the models of an experiment folder and their loaders
    experiment.py  evaluate_experiment: all of it on the validation split; eval.json; the table
"""

from stackwise.evaluation.experiment import (
    DEFAULT_RATES,
    ESTIMATOR,
    EvalSettings,
    bytes_per_token,
    eval_json_path,
    evaluate_experiment,
    format_table,
    model_report,
    validation_tokens,
)
from stackwise.evaluation.masks import BOUND_VIEW0, RATE_VIEW, EvalMasks, draw_masks, stratified_counts
from stackwise.evaluation.models import ModelEntry, discover, layer_stack
from stackwise.evaluation.scorers import HeadFn, PrefixStack, Scorer, WholeModel
from stackwise.evaluation.scoring import LN2, masked_ce_per_sequence, paired_difference, score

__all__ = [
    "BOUND_VIEW0",
    "DEFAULT_RATES",
    "ESTIMATOR",
    "LN2",
    "RATE_VIEW",
    "EvalMasks",
    "EvalSettings",
    "HeadFn",
    "ModelEntry",
    "PrefixStack",
    "Scorer",
    "WholeModel",
    "bytes_per_token",
    "discover",
    "draw_masks",
    "eval_json_path",
    "evaluate_experiment",
    "format_table",
    "layer_stack",
    "masked_ce_per_sequence",
    "model_report",
    "paired_difference",
    "score",
    "stratified_counts",
    "validation_tokens",
]
