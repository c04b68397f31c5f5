#!/usr/bin/env python
"""The samplers of `stackwise-generate` measured on trained models: repetition and fluency per setting.

    python benchmarks/samplers.py outputs/default                     # the `make train` model (+ stage=e2e)
    python benchmarks/samplers.py outputs/L8 --reference outputs/L8 --device cuda --num-samples 64
    python benchmarks/samplers.py outputs/default --settings random_t0.8_p0.9,confidence --num-samples 4

For each model of the experiment (fused, finetuned, e2e: those present) and each sampler setting
of SETTINGS, `--num-samples` samples of the training length from all-[MASK] with seeds
seed .. seed+N-1 (sample i is what `stackwise-generate EXP --model M --seed seed+i` with that
setting's flags prints), then per setting the mean over the samples of (stackwise/generation/quality.py):
  distinct-2, distinct-3 (token n-grams: bytes for the byte tokenizer), distinct-2 of words,
  the longest repeated n-gram in tokens, and the fluency proxy: the mean masked CE at rates
  0.15 / 0.5 / 0.9 of the sample under the reference e2e model (`--reference`, default the
  experiment's own e2e), on the same masks for every setting.
The `corpus` row scores N validation windows of the experiment's data the same way: the values real
text has. The table goes to stdout (Markdown), everything to `--out` (JSON, written atomically).

The rule (`best`): a setting qualifies when, for every model, it loops no more than the corpus within
5 %: distinct-3 at least 0.95 x the corpus's and the longest repeat at most 1.05 x the corpus's; among
those the lowest fluency CE, averaged over the models, wins (with none qualifying, the setting closest
to qualifying: the smallest worst relative shortfall). distinct-2 is reported but not in the rule: over
bytes it falls with any temperature below 1 (the common letter pairs grow more common) without a loop.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from stackwise import artifacts as art
from stackwise.config import load_run
from stackwise.evaluation import validation_tokens
from stackwise.generation import (
    MODEL_KINDS,
    SamplerSettings,
    decode,
    distinct_n,
    fluency,
    load_experiment_model,
    longest_repeat,
    sample_ids,
    words,
)

# name -> (sampler settings, steps: None = one per mask). The first is the sampler's old default.
SETTINGS: dict[str, tuple[SamplerSettings, int | None]] = {
    "confidence": (SamplerSettings("confidence", 1.0), None),
    "confidence_t0.8_p0.9": (SamplerSettings("confidence", 0.8, top_p=0.9), None),
    "confidence_block32": (SamplerSettings("confidence", 1.0, block_length=32), None),
    "margin": (SamplerSettings("margin", 1.0), None),
    "entropy": (SamplerSettings("entropy", 1.0), None),
    "random": (SamplerSettings("random", 1.0), None),
    "random_t0.8": (SamplerSettings("random", 0.8), None),
    "random_t0.7": (SamplerSettings("random", 0.7), None),
    "random_k20": (SamplerSettings("random", 1.0, top_k=20), None),
    "random_p0.9": (SamplerSettings("random", 1.0, top_p=0.9), None),
    "random_t0.9_p0.9": (SamplerSettings("random", 0.9, top_p=0.9), None),
    "random_t0.8_p0.9": (SamplerSettings("random", 0.8, top_p=0.9), None),
    "random_t0.8_p0.8": (SamplerSettings("random", 0.8, top_p=0.8), None),
    "random_t0.7_p0.9": (SamplerSettings("random", 0.7, top_p=0.9), None),
    "random_t0.6_p0.9": (SamplerSettings("random", 0.6, top_p=0.9), None),
    "random_steps32": (SamplerSettings("random", 1.0), 32),
    "random_steps32_cosine": (SamplerSettings("random", 1.0, schedule="cosine"), 32),
    "confidence_steps32": (SamplerSettings("confidence", 1.0), 32),
    "confidence_steps32_cosine": (SamplerSettings("confidence", 1.0, schedule="cosine"), 32),
}
TOLERANCE = 0.05
METRICS = ("distinct_2", "distinct_3", "distinct_2_words", "longest_repeat", "fluency_ce")


def flags(settings: SamplerSettings, steps: int | None) -> str:
    """The stackwise-generate flags of a setting (those that differ from the tool's defaults are enough,
    but all are written so the command does not depend on the defaults of the day)."""
    out = [f"--strategy {settings.strategy}", f"--temperature {settings.temperature:g}"]
    if settings.top_k is not None:
        out.append(f"--top-k {settings.top_k}")
    out.append(f"--top-p {1 if settings.top_p is None else settings.top_p:g}")
    out.append(f"--schedule {settings.schedule}")
    if settings.block_length is not None:
        out.append(f"--block-length {settings.block_length}")
    if steps is not None:
        out.append(f"--steps {steps}")
    return " ".join(out)


def measure(samples: np.ndarray, tokenizer, ref, mask_id: int, pad_id: int | None, seed: int) -> dict:
    """The quality measures of samples (N, T): mean and standard error over the samples of each."""
    per = {
        "distinct_2": [distinct_n(s, 2) for s in samples],
        "distinct_3": [distinct_n(s, 3) for s in samples],
        "distinct_2_words": [distinct_n(words(decode(tokenizer, s)), 2) for s in samples],
        "longest_repeat": [longest_repeat(s) for s in samples],
    }
    fl = fluency(ref, torch.as_tensor(samples), mask_id=mask_id, pad_id=pad_id, seed=seed)
    per["fluency_ce"] = list(fl.per_sequence)
    out = {}
    for k, v in per.items():
        v = np.asarray(v, dtype=np.float64)
        out[k] = float(np.nanmean(v))
        out[k + "_se"] = float(np.nanstd(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    out["fluency_rates"] = fl.rates
    return out


def shortfall(row: dict, corpus: dict) -> float:
    """How far a row's repetition is from qualifying: the worst relative gap to the corpus (<= TOLERANCE passes)."""
    return max(1 - row["distinct_3"] / corpus["distinct_3"], row["longest_repeat"] / corpus["longest_repeat"] - 1)


def best(rows: list[dict], corpus: dict, names: list[str]) -> tuple[str, dict]:
    """The setting the rule of the module doc picks, and each setting's (qualifies, worst shortfall, mean CE)."""
    summary = {}
    for name in names:
        mine = [r for r in rows if r["setting"] == name]
        worst = max(shortfall(r, corpus) for r in mine)
        summary[name] = {
            "qualifies": worst <= TOLERANCE,
            "worst_shortfall": worst,
            "mean_fluency_ce": float(np.mean([r["fluency_ce"] for r in mine])),
        }
    ok = [n for n in names if summary[n]["qualifies"]]
    pick = (
        min(ok, key=lambda n: summary[n]["mean_fluency_ce"])
        if ok
        else min(names, key=lambda n: summary[n]["worst_shortfall"])
    )
    return pick, summary


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} torch threads{gpu}; torch {torch.__version__}"


def table(rows: list[dict], corpus: dict, summary: dict, pick: str) -> str:
    head = "| model | setting | distinct-2 | distinct-3 | distinct-2 (words) | longest repeat | fluency CE |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|"]

    def cells(r: dict) -> str:
        return (
            f"{r['distinct_2']:.3f} | {r['distinct_3']:.3f} | {r['distinct_2_words']:.3f} | "
            f"{r['longest_repeat']:.1f} | {r['fluency_ce']:.3f} ± {r['fluency_ce_se']:.3f} |"
        )

    lines.append(f"| corpus | validation text | {cells(corpus)}")
    for r in rows:
        mark = "**" if r["setting"] == pick else ""
        lines.append(f"| {r['model']} | {mark}{r['setting']}{mark} | {cells(r)}")
    lines += ["", "| setting | qualifies | worst repetition shortfall vs corpus | mean fluency CE over models |"]
    lines.append("|---|:---:|---:|---:|")
    for name, s in summary.items():
        mark = "**" if name == pick else ""
        q = "yes" if s["qualifies"] else "no"
        lines.append(f"| {mark}{name}{mark} | {q} | {s['worst_shortfall']:+.1%} | {s['mean_fluency_ce']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", type=Path, help="an experiment folder with fused/ (and finetuned/, e2e/)")
    p.add_argument("--reference", type=Path, default=None, help="the folder whose e2e model scores fluency")
    p.add_argument("--models", default=",".join(MODEL_KINDS), help="comma-separated: fused,finetuned,e2e")
    p.add_argument("--settings", default=None, help=f"comma-separated names (default all): {', '.join(SETTINGS)}")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="sample i has seed seed+i; the masks of the fluency too")
    p.add_argument("--length", type=int, default=None, help="tokens per sample (default the training seq_len)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default torch's); on a shared CPU 1 is faster: the sampler's small ops "
        "with 2 threads ran 7x slower than with 1 on a loaded 2-core box",
    )
    p.add_argument("--out", type=Path, default=None, help="the JSON file (default: print only)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    names = list(SETTINGS) if args.settings is None else args.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        sys.exit(f"samplers.py: error: unknown setting(s) {unknown}; allowed: {', '.join(SETTINGS)}")
    kinds = [k for k in args.models.split(",") if k]
    paths = art.ExperimentPaths(args.experiment)
    folders = {"fused": paths.fused_dir, "finetuned": paths.finetuned_dir, "e2e": paths.e2e_dir}
    present = [k for k in kinds if k in folders and (folders[k] / "config.json").is_file()]
    reference = args.reference or args.experiment
    ref = load_experiment_model(reference, "e2e", device=args.device)
    mask_id, pad_id = ref.cfg.mask_id, ref.cfg.pad_id

    run = load_run(args.experiment)
    val, tokenizer = validation_tokens(run, args.experiment, None)
    length = args.length or val.shape[1]
    picks = np.linspace(0, len(val) - 1, args.num_samples).round().astype(int)
    corpus = measure(val[picks, :length], tokenizer, ref.model, mask_id, pad_id, args.seed)
    corpus["example"] = decode(tokenizer, val[picks[0], :length])

    rows = []
    for kind in present:
        em = load_experiment_model(args.experiment, kind, device=args.device)
        for name in names:
            settings, steps = SETTINGS[name]
            t0 = time.perf_counter()
            _, out = sample_ids(
                em, length=length, steps=steps, num_samples=args.num_samples, seed=args.seed, **asdict(settings)
            )
            seconds = time.perf_counter() - t0
            samples = out.cpu().numpy()
            row = {"model": kind, "setting": name, "settings": asdict(settings), "steps": steps}
            row.update(measure(samples, em.tokenizer, ref.model, mask_id, pad_id, args.seed))
            row["sample_seconds"] = seconds
            row["example"] = decode(em.tokenizer, samples[0])
            row["command"] = (
                f"stackwise-generate {args.experiment} --model {kind} --seed {args.seed} {flags(settings, steps)}"
            )
            rows.append(row)
            print(
                f"{kind:<10}{name:<28}" + "".join(f"{row[m]:>9.3f}" for m in METRICS) + f"{seconds:>8.1f}s",
                file=sys.stderr,
                flush=True,
            )
    pick, summary = best(rows, corpus, names)
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": " ".join(shlex.quote(a) for a in ["python", "benchmarks/samplers.py", *(argv or sys.argv[1:])]),
        "experiment": str(args.experiment),
        "reference": str(reference),
        "models": present,
        "num_samples": args.num_samples,
        "seed": args.seed,
        "length": length,
        "fluency_rates": list(corpus["fluency_rates"]),
        "rule": (
            f"qualify: for every model, distinct-3 >= {1 - TOLERANCE:g} x the corpus's and the longest repeat "
            f"<= {1 + TOLERANCE:g} x the corpus's; best: the lowest fluency CE averaged over the models among "
            "those that qualify (none qualifying: the smallest worst shortfall)"
        ),
        "best": pick,
        "best_settings": {**asdict(SETTINGS[pick][0]), "steps": SETTINGS[pick][1]},
        "summary": summary,
        "corpus": corpus,
        "rows": rows,
    }
    print(table(rows, corpus, summary, pick))
    print(f"\nbest: {pick} ({flags(*SETTINGS[pick])})")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        art.atomic_write_json(report, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
