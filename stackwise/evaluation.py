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
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stackwise import artifacts as art
from stackwise.config import load_run
from stackwise.data.tokenizers import ByteTokenizer
from stackwise.data.tokens import load_token_splits
from stackwise.errors import ArtifactError, StackWiseError
from stackwise.model.config import ModelConfig
from stackwise.model.transformer import Transformer
from stackwise.model.weights import LayerWeights, assemble, head_of
from stackwise.objective.masking import FixedSchedule, UniformSchedule, mask_batch
from stackwise.utils import generator

DEFAULT_RATES = (0.15, 0.5, 0.9)
# Views of the eval masks: training uses negative views, validation/caching 0..views-1.
RATE_VIEW = 1 << 20
BOUND_VIEW0 = RATE_VIEW + 1
LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------- settings
@dataclass
class EvalSettings:
    rates: tuple = DEFAULT_RATES
    bound_samples: int = 8
    batch_size: int = 64
    max_sequences: int | None = None  # the first N validation sequences (None = all)
    device: str = "cpu"
    seed: int | None = None  # None = the experiment's seed

    def validate(self) -> None:
        if not self.rates:
            raise StackWiseError("--rates: give at least one masking rate")
        for r in self.rates:
            if not 0.0 < float(r) <= 1.0:
                raise StackWiseError(f"--rates: every rate must be in (0, 1], got {r}")
        if int(self.bound_samples) < 1:
            raise StackWiseError(f"--bound-samples must be >= 1, got {self.bound_samples}")
        if int(self.batch_size) < 1:
            raise StackWiseError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_sequences is not None and int(self.max_sequences) < 1:
            raise StackWiseError(f"--max-sequences must be >= 1, got {self.max_sequences}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise StackWiseError(f"--device {self.device}: CUDA is not available on this machine")


# ---------------------------------------------------------------------------------- masks
@dataclass
class EvalMasks:
    """Every mask of one evaluation, on CPU; shared by all the models compared."""

    rates: tuple  # (R,)
    rate_masks: Tensor  # (R, N, T) bool
    bound_masks: Tensor  # (S, N, T) bool
    bound_t: Tensor  # (S, N) float64: l / n, the rate each bound draw was masked at
    n_tokens: Tensor  # (N,) long: non-pad tokens per sequence
    seed: int

    @property
    def n_sequences(self) -> int:
        return int(self.n_tokens.shape[0])

    @property
    def bound_samples(self) -> int:
        return int(self.bound_t.shape[0])


def stratified_counts(n_tokens: Tensor, samples: int, seed: int) -> Tensor:
    """(S, N) long mask counts l in 1..n_i: per draw, one sequence in each of the N strata of u."""
    N = int(n_tokens.shape[0])
    out = torch.empty(samples, N, dtype=torch.long)
    n = n_tokens.to(torch.float64)
    for s in range(samples):
        g = generator(seed, "eval-bound", s)
        perm = torch.randperm(N, generator=g).to(torch.float64)  # (N,) stratum of each sequence
        jitter = torch.rand(N, generator=g, dtype=torch.float64)  # (N,)
        u = (perm + jitter) / N  # (N,) in [0, 1), marginally uniform
        out[s] = torch.minimum(torch.floor(u * n).long() + 1, n_tokens.clamp_min(1))
    return out


def draw_masks(
    tokens: Tensor,
    *,
    seed: int,
    rates: Sequence[float],
    bound_samples: int,
    mask_id: int,
    pad_id: int | None,
    chunk: int = 256,
) -> EvalMasks:
    """Masks for the fixed rates (one nested view) and the bound draws, from (seed, index, view)."""
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)  # (N, T)
    N, T = tokens.shape
    n_tokens = (tokens != pad_id).sum(1) if pad_id is not None else torch.full((N,), T, dtype=torch.long)
    rate_masks = torch.zeros(len(rates), N, T, dtype=torch.bool)
    bound_masks = torch.zeros(bound_samples, N, T, dtype=torch.bool)
    counts = stratified_counts(n_tokens, bound_samples, seed)  # (S, N)
    bound_t = counts.to(torch.float64) / n_tokens.clamp_min(1).to(torch.float64)  # (S, N)
    unit = UniformSchedule(0.0, 1.0)  # t = u: the count is set through u = l / n
    for a in range(0, N, chunk):
        ids = tokens[a : a + chunk]
        index = torch.arange(a, a + len(ids))
        for r, rate in enumerate(rates):
            _, mask, _ = mask_batch(
                ids,
                index,
                torch.full_like(index, RATE_VIEW),
                seed=seed,
                schedule=FixedSchedule(float(rate)),
                k=1,
                progress=1.0,
                mask_id=mask_id,
                pad_id=pad_id,
            )
            rate_masks[r, a : a + len(ids)] = mask
        for s in range(bound_samples):
            _, mask, _ = mask_batch(
                ids,
                index,
                torch.full_like(index, BOUND_VIEW0 + s),
                seed=seed,
                schedule=unit,
                k=1,
                progress=1.0,
                mask_id=mask_id,
                pad_id=pad_id,
                u=bound_t[s, a : a + len(ids)].float(),
            )
            bound_masks[s, a : a + len(ids)] = mask
    got = bound_masks.sum(2)  # (S, N)
    want = torch.where(n_tokens > 0, counts, torch.zeros_like(counts))
    if not torch.equal(got, want):  # the bound is only right if each draw masks exactly l positions
        raise RuntimeError("eval masks: mask_batch did not mask exactly l = t * n positions")
    return EvalMasks(tuple(float(r) for r in rates), rate_masks, bound_masks, bound_t, n_tokens, seed)


# ---------------------------------------------------------------------------------- models
HeadFn = Callable[[Tensor], Tensor]  # (N, D) -> (N, V)


class Scorer(abc.ABC):
    """One or more models sharing a forward pass: `outputs(ids, pad_mask)` yields (name, hidden, head_fn)."""

    names: list[str]

    @abc.abstractmethod
    def to(self, device: str | torch.device) -> Scorer:
        """Move the model(s) to `device`; returns self."""

    @abc.abstractmethod
    def outputs(self, ids: Tensor, pad_mask: Tensor | None) -> Iterator[tuple[str, Tensor, HeadFn]]:
        """(name, hidden (B, T, D), head_fn) for each model this scorer holds."""


class WholeModel(Scorer):
    """A whole Transformer (fused, fine-tuned, e2e, or any model built by hand); `depth` runs only
    layers 1..depth (e.g. `assemble(cfg, layers[:k])`, depth=k)."""

    def __init__(self, name: str, model: Transformer, depth: int | None = None):
        self.names, self.model = [name], model.eval()
        self.depth = model.cfg.n_layers if depth is None else depth

    def to(self, device):
        self.model.to(device)
        return self

    def outputs(self, ids, pad_mask):
        m = self.model
        h = m.run_layers(m.embed_tokens(ids), 1, self.depth, pad_mask)  # (B, T, D)
        yield self.names[0], h, m.logits


class PrefixStack(Scorer):
    """Depth prefixes 1..K of the layer checkpoints, in one incremental pass: the hidden state after
    layer k is layer k applied to the one after layer k-1 (as the activation cache is made), and
    prefix k reads it out with stage k's final norm and head.

    `assemble(cfg, layers[:k])` builds the same model k; the tests check the two agree.
    """

    def __init__(self, cfg: ModelConfig, layers: Sequence[LayerWeights]):
        self.cfg, self.depth = cfg, len(layers)
        self.names = [f"depth_{k}" for k in range(1, self.depth + 1)]
        self.model = assemble(cfg, layers).eval()  # embedding of layer 1, blocks 1..K, head of layer K
        self.heads = nn.ModuleList(head_of(cfg, weights).eval() for weights in layers)

    def to(self, device):
        self.model.to(device)
        self.heads.to(device)
        return self

    def outputs(self, ids, pad_mask):
        m = self.model
        embed_w = m.embed.weight if self.cfg.tie_embeddings else None
        h = m.embed_tokens(ids)  # (B, T, D)
        for k in range(1, self.depth + 1):
            h = m.run_layers(h, k, k, pad_mask)
            head = self.heads[k - 1]
            yield self.names[k - 1], h, (lambda x, head=head: head(x, embed_w))


# ---------------------------------------------------------------------------------- scoring
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
        rates[_rate_key(rate)] = {
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


def _rate_key(rate: float) -> str:
    return f"{float(rate):g}"


# ---------------------------------------------------------------------------------- experiment
@dataclass
class ModelEntry:
    name: str
    kind: str  # prefix | fused | finetuned | e2e
    depth: int
    recorded_val_loss: float | None = None


def _model_config(d: Any, source: Path, run_cfg: ModelConfig) -> ModelConfig:
    """A layer checkpoint's recorded model config (the experiment's when it records none), checked by `_belongs`."""
    if not isinstance(d, dict):
        return run_cfg
    return _belongs(ModelConfig.from_dict(d, prefix=f"{source}: model"), source, run_cfg)


def _belongs(cfg: ModelConfig, source: Path, run_cfg: ModelConfig) -> ModelConfig:
    """A model of this experiment shares its data's vocabulary and special ids."""
    for key in ("vocab_size", "mask_id", "pad_id"):
        if getattr(cfg, key) != getattr(run_cfg, key):
            raise ArtifactError(
                f"{source} has {key}={getattr(cfg, key)} but the experiment's data has "
                f"{getattr(run_cfg, key)}: it does not belong to this experiment"
            )
    return cfg


def layer_stack(
    paths: art.ExperimentPaths, run_cfg: ModelConfig, warnings: list[str]
) -> tuple[ModelConfig | None, list[tuple[LayerWeights, dict]]]:
    """The layer checkpoints 1..K that form one consistent stack (K may be 0)."""
    present = paths.existing_layers()
    states: list[tuple[LayerWeights, dict]] = []
    cfg: ModelConfig | None = None
    for k in present:
        if k != len(states) + 1:
            warnings.append(f"{paths.layer_ckpt(k)} skipped: {paths.layer_ckpt(len(states) + 1)} is missing")
            break
        path = paths.layer_ckpt(k)
        weights, meta = art.load_layer_checkpoint(path)
        if meta.get("k") not in (None, k):
            raise ArtifactError(f"{path} says it is layer {meta.get('k')}, not {k}")
        if states and meta.get("prev_sha256") and meta["prev_sha256"] != art.sha256_file(paths.layer_ckpt(k - 1)):
            warnings.append(
                f"{path} skipped: it was trained on another {paths.layer_ckpt(k - 1).name} than the one "
                "present (rerun its stage)"
            )
            break
        k_cfg = _model_config(meta.get("model"), path, run_cfg)
        if cfg is not None and k_cfg != cfg:
            warnings.append(f"{path} skipped: its model config differs from layer 1's")
            break
        cfg = k_cfg
        states.append((weights, meta))
    return cfg, states


def discover(
    paths: art.ExperimentPaths, run_cfg: ModelConfig, warnings: list[str]
) -> list[tuple[list[ModelEntry], Callable[[], Scorer]]]:
    """Every model of the experiment: [(the entries one scorer evaluates, a loader building it)].

    Layer checkpoints are read here (the prefix stack needs them all anyway); the safetensors
    models are read by their loaders, one at a time.
    """
    cfg, states = layer_stack(paths, run_cfg, warnings)
    groups: list[tuple[list[ModelEntry], Callable[[], Scorer]]] = []
    if states:
        entries = [
            ModelEntry(f"depth_{k}", "prefix", k, meta.get("val_loss")) for k, (_, meta) in enumerate(states, start=1)
        ]
        groups.append((entries, lambda: PrefixStack(cfg, [weights for weights, _ in states])))
    complete = paths.fused_config.name  # a model folder is complete once its config.json exists
    for name, folder in (("fused", paths.fused_dir), ("finetuned", paths.finetuned_dir), ("e2e", paths.e2e_dir)):
        if not folder.is_dir():
            continue
        if not (folder / complete).is_file():
            warnings.append(f"{folder} skipped: incomplete (no {complete}; its stage did not finish)")
            continue
        entry = ModelEntry(name, name, run_cfg.n_layers)

        def load(name=name, folder=folder, entry=entry) -> Scorer:
            model, meta = art.load_model(folder)
            _belongs(model.cfg, folder, run_cfg)
            entry.depth, entry.recorded_val_loss = model.cfg.n_layers, meta.get("val_loss")
            return WholeModel(name, model)

        groups.append(([entry], load))
    return groups


def bytes_per_token(tokens: np.ndarray, tokenizer: Any, pad_id: int | None) -> tuple[float | None, str]:
    """(bytes per non-pad token of the evaluated text, how it was measured); None for dummy data."""
    if tokenizer is None:
        return None, "dummy data has no bytes: bits/token"
    if isinstance(tokenizer, ByteTokenizer):
        return 1.0, "byte tokenizer: 1 token = 1 byte"
    flat = np.asarray(tokens).reshape(-1)
    if pad_id is not None:
        flat = flat[flat != pad_id]
    n_bytes = len(tokenizer.decode(flat.tolist()).encode("utf-8"))
    return n_bytes / max(len(flat), 1), "bytes of the decoded validation text"


def evaluate_experiment(
    exp_dir: str | Path, settings: EvalSettings | None = None, log: Callable[[str], None] = lambda s: None
) -> dict:
    """Evaluate every model of `outputs/<experiment>`; return the report (what eval.json holds)."""
    settings = settings or EvalSettings()
    settings.validate()
    settings.rates = tuple(dict.fromkeys(float(r) for r in settings.rates))  # each rate once, in order
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        raise StackWiseError(f"experiment folder {exp_dir} does not exist")
    run = load_run(exp_dir)
    warnings: list[str] = []
    groups = discover(art.ExperimentPaths(exp_dir), run.model, warnings)
    for w in warnings:
        log(f"warning: {w}")
    if not groups:
        raise ArtifactError(
            f"{exp_dir} holds no model to evaluate (no layers/layer_1.pt, fused/ or e2e/); "
            "train one with stackwise-train first"
        )
    val, tokenizer = validation_tokens(run, exp_dir, settings.max_sequences)
    entries = [e for group_entries, _ in groups for e in group_entries]
    seed = run.seed if settings.seed is None else settings.seed
    tokens = torch.from_numpy(val.astype(np.int64))
    log(
        f"eval: {len(val)} validation sequences x {val.shape[1]} tokens, {len(entries)} models, "
        f"rates {list(settings.rates)}, {settings.bound_samples} bound draws per sequence"
    )
    mask_id, pad_id = run.model.mask_id, run.model.pad_id
    masks = draw_masks(
        tokens, seed=seed, rates=settings.rates, bound_samples=settings.bound_samples, mask_id=mask_id, pad_id=pad_id
    )
    results: dict[str, dict] = {}
    for group_entries, load in groups:  # one model group in memory at a time
        kw = {"batch_size": settings.batch_size, "device": settings.device}
        results.update(score(load(), tokens, masks, mask_id=mask_id, pad_id=pad_id, **kw))
        log(f"eval: {', '.join(e.name for e in group_entries)} done")
    bpt, byte_note = bytes_per_token(val, tokenizer, pad_id)
    # paired differences of the bound against the baseline: e2e when present, else the fused model
    ref = next((n for n in ("e2e", "fused", "finetuned") if n in results), entries[-1].name)
    report = {"experiment": exp_dir.name, "exp_dir": str(exp_dir), "split": "val", "n_sequences": len(val)}
    report.update(seq_len=int(val.shape[1]), n_tokens=int(masks.n_tokens.sum()), seed=seed)
    report.update(rates=[float(r) for r in settings.rates], bound_samples=settings.bound_samples)
    report.update(bytes_per_token=bpt, bytes_note=byte_note, unit="bits/byte" if bpt else "bits/token")
    report.update(reference=ref, estimator=ESTIMATOR)
    report["models"] = [model_report(e, results, ref, bpt, masks) for e in entries]
    report["warnings"] = warnings
    return report


ESTIMATOR = (
    "MDLM/LLaDA bound with l ~ U{1..n} masks (t = l/n), weight 1/t, per token = sum / non-pad "
    "tokens; t stratified over the validation set per draw; se over sequences (ratio estimator); "
    "paired: bound minus the reference's on the same masks, paired se"
)


def validation_tokens(run: Any, exp_dir: Path, max_sequences: int | None) -> tuple[np.ndarray, Any]:
    """(the first `max_sequences` validation sequences (N, T), the experiment's tokenizer)."""
    splits = load_token_splits(run.data, run.seed, art.ExperimentPaths(exp_dir).tokens_dir)
    val = np.asarray(splits.val)
    if max_sequences is not None:
        val = val[:max_sequences]
    if len(val) == 0:
        raise StackWiseError(f"{exp_dir}: the validation split is empty")
    return val, splits.tokenizer


def model_report(entry: ModelEntry, results: dict[str, dict], ref: str, bpt: float | None, masks: EvalMasks) -> dict:
    """One model's part of eval.json: its scores, its bound in bits/byte, the paired difference to `ref`."""
    res = results[entry.name]
    b = res["bound"]
    b["bits_per_byte"] = b["bits_per_token"] / bpt if bpt else None
    b["se_bits_per_byte"] = b["se_bits_per_token"] / bpt if bpt and b["se"] is not None else None
    paired = {"vs": ref, **paired_difference(res, results[ref], masks.n_tokens)} if entry.name != ref else None
    return {
        "name": entry.name,
        "kind": entry.kind,
        "depth": entry.depth,
        "recorded_val_loss": entry.recorded_val_loss,
        "rates": res["rates"],
        "bound": b,
        "paired": paired,
    }


def eval_json_path(exp_dir: str | Path) -> Path:
    """Where eval.json goes by default."""
    return art.ExperimentPaths(exp_dir).eval_json


def format_table(report: dict) -> str:
    """The console table: one row per model."""
    rates = [_rate_key(r) for r in report["rates"]]
    unit = report["unit"]
    cols = [f"{'model':<11}"] + [f"{h:>10}" for r in rates for h in (f"ce@{r}", f"acc@{r}")]
    cols += [f"{'bound nats/tok ± se':>22}", f"{unit:>11}", f"{'Δ vs ' + report['reference']:>18}"]
    lines = ["".join(cols)]
    for m in report["models"]:
        row = [f"{m['name']:<11}"]
        for r in rates:
            row += [f"{m['rates'][r]['ce']:>10.4f}", f"{m['rates'][r]['acc']:>10.4f}"]
        b = m["bound"]
        se = "n/a" if b["se"] is None else f"{b['se']:.4f}"
        row.append(f"{b['nats_per_token']:>13.4f} ± {se:<6}")
        per = b["bits_per_byte"] if report["bytes_per_token"] else b["bits_per_token"]
        row.append(f"{per:>11.4f}")
        p = m.get("paired")
        if p:
            pse = "n/a" if p["se"] is None else f"{p['se']:.4f}"
            row.append(f"{p['delta_nats_per_token']:>+11.4f} ± {pse:<6}")
        lines.append("".join(row))
    n = report["models"][0]["bound"] if report["models"] else {}
    lines.append(
        f"{report['n_sequences']} val sequences, {report['n_tokens']:,} tokens; bound: "
        f"{report['bound_samples']} draws/sequence ({n.get('n_samples', 0):,} samples); "
        f"{unit} ({report['bytes_note']})"
    )
    return "\n".join(lines)
