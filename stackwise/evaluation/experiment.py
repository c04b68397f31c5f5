"""`evaluate_experiment`: every model of an experiment folder on its validation split; the report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stackwise import artifacts as art
from stackwise.config import load_run
from stackwise.data.tokenizers import ByteTokenizer
from stackwise.data.tokens import load_token_splits
from stackwise.errors import ArtifactError, StackWiseError
from stackwise.evaluation.masks import EvalMasks, draw_masks
from stackwise.evaluation.models import ModelEntry, discover
from stackwise.evaluation.scoring import paired_difference, rate_key, score

DEFAULT_RATES = (0.15, 0.5, 0.9)


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
    rates = [rate_key(r) for r in report["rates"]]
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
