"""`stackwise-generate`: sample from an experiment's model by iterative unmasking.

    stackwise-generate outputs/shakespeare                                 # seq_len tokens from all-[MASK]
    stackwise-generate outputs/shakespeare --prompt "ROMEO:" --length 200 --num-samples 3
    stackwise-generate outputs/shakespeare --infill "To be or ___ to be"   # each _ is one masked token
    stackwise-generate outputs/shakespeare --steps 32 --block-length 32 --temperature 0.8 --top-k 40
    stackwise-generate outputs/shakespeare --strategy margin --top-p 0.9 --steps 32 --schedule cosine
    stackwise-generate outputs/default --model e2e --strategy random       # the dummy data prints token ids

Exit status 0, or 2 with one line `stackwise-generate: error: ...` for bad arguments or artifacts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from stackwise.cli.common import doc_parser, user_errors
from stackwise.errors import StackWiseError
from stackwise.generation import (
    DEFAULTS,
    MODEL_KINDS,
    SCHEDULES,
    STRATEGIES,
    ExperimentModel,
    decode,
    load_experiment_model,
    sample_ids,
    sample_seeds,
)

PROG = "stackwise-generate"


def _parser() -> argparse.ArgumentParser:
    p = doc_parser(PROG, __doc__)
    p.add_argument("experiment", type=Path, help="an experiment folder, e.g. outputs/default")
    p.add_argument(
        "--model",
        choices=MODEL_KINDS,
        default="fused",
        help="which model of the experiment: fused (default), finetuned or e2e",
    )
    _start_arguments(p)
    _sampler_arguments(p)
    p.add_argument("--device", default="cpu", help="torch device for the model, e.g. cuda (default cpu)")
    p.add_argument(
        "--show-steps",
        action="store_true",
        help="print every step's partly unmasked sequence to stderr (masks shown as _)",
    )
    return p


def _start_arguments(p: argparse.ArgumentParser) -> None:
    """What the sample starts from: a prompt and a length, or a text with its masks marked."""
    start = p.add_mutually_exclusive_group()
    start.add_argument("--prompt", default="", help="text the sample starts with (kept as given)")
    start.add_argument(
        "--infill",
        default=None,
        help="text with the positions to fill marked: [MASK] = one token, each _ = one token "
        "(tokens, not characters, for a BPE tokenizer); --length does not apply",
    )
    p.add_argument(
        "--length",
        type=int,
        default=None,
        help="tokens in all, prompt included (default: the experiment's data.seq_len)",
    )


def _sampler_arguments(p: argparse.ArgumentParser) -> None:
    """How the masks are filled: steps, strategy, sampling, blocks, samples and their seeds."""
    p.add_argument(
        "--steps", type=int, default=None, help="unmasking steps (model calls); default: one per masked token"
    )
    p.add_argument(
        "--strategy",
        default=DEFAULTS.strategy,
        help=f"the reveal order, which masked positions each step reveals: {', '.join(STRATEGIES)} "
        "(confidence: the most probable draws, remasking the rest; margin: the largest gap between the two "
        "most likely tokens; entropy: the least uncertain positions; random: uniformly, the diffusion's own "
        f"reverse order) (default {DEFAULTS.strategy})",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=DEFAULTS.temperature,
        help=f"sampling temperature; 0 = greedy (default {DEFAULTS.temperature})",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=DEFAULTS.top_k,
        help=f"sample among the k most likely tokens (default {DEFAULTS.top_k or 'all'})",
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=DEFAULTS.top_p,
        help="nucleus sampling: among the most likely tokens whose mass reaches p, in (0, 1] "
        f"(default {DEFAULTS.top_p or 1}; 1 = no limit)",
    )
    p.add_argument(
        "--schedule",
        default=DEFAULTS.schedule,
        help=f"how many masks each step reveals: {' or '.join(SCHEDULES)} (cosine: few first, many at the end; "
        f"it matters when --steps is below the number of masks) (default {DEFAULTS.schedule})",
    )
    p.add_argument(
        "--block-length",
        type=int,
        default=DEFAULTS.block_length,
        help="semi-autoregressive: fill blocks of this many positions left to right (default: one block)",
    )
    p.add_argument("--num-samples", type=int, default=1, help="samples to draw (default 1)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the first sample; sample i is drawn with seed+i-1, the same on every run (default 0)",
    )


def _check(args: argparse.Namespace) -> torch.device:
    """The arguments argparse cannot check, each a one-line error; returns the device."""
    if args.strategy not in STRATEGIES:
        raise StackWiseError(f"--strategy: unknown strategy {args.strategy!r}; allowed: {', '.join(STRATEGIES)}")
    if args.steps is not None and args.steps < 1:
        raise StackWiseError(f"--steps must be >= 1, got {args.steps}")
    if args.infill is not None and args.length is not None:
        raise StackWiseError("--length does not apply to --infill: the text and its marks set the length")
    if args.length is not None and args.length < 1:
        raise StackWiseError(f"--length must be >= 1, got {args.length}")
    if args.top_k is not None and args.top_k < 1:
        raise StackWiseError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise StackWiseError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.schedule not in SCHEDULES:
        raise StackWiseError(f"--schedule: unknown schedule {args.schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if args.num_samples < 1:
        raise StackWiseError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.seed < 0:
        raise StackWiseError(f"--seed must be >= 0, got {args.seed}")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as e:
        raise StackWiseError(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StackWiseError("--device cuda: no CUDA GPU is available here; use --device cpu")
    return device


def _step_printer(em: ExperimentModel, num_samples: int) -> Callable[[int, torch.Tensor], None]:
    """The --show-steps callback: each row after each step on stderr, masks as _."""

    def show(step: int, x: torch.Tensor) -> None:
        for i, row in enumerate(x.tolist()):
            tag = f"[step {step} sample {i + 1}]" if num_samples > 1 else f"[step {step}]"
            print(
                tag,
                decode(em.tokenizer, row, mask_text="_")
                if em.tokenizer is not None
                else " ".join("_" if t == em.cfg.mask_id else str(t) for t in row),
                file=sys.stderr,
            )

    return show


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    with user_errors(PROG):
        device = _check(args)
        em = load_experiment_model(args.experiment, args.model, device=device)
        _, out = sample_ids(
            em,
            prompt=args.prompt,
            infill=args.infill,
            length=args.length,
            steps=args.steps,
            num_samples=args.num_samples,
            seed=args.seed,
            strategy=args.strategy,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            schedule=args.schedule,
            block_length=args.block_length,
            callback=_step_printer(em, args.num_samples) if args.show_steps else None,
        )
    # each sample's own seed: `--seed S` alone prints that sample again
    for i, (row, seed) in enumerate(zip(out.tolist(), sample_seeds(args.seed, args.num_samples), strict=True)):
        if args.num_samples > 1:
            print(f"=== sample {i + 1}/{args.num_samples} (seed {seed}) ===")
        print(decode(em.tokenizer, row))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
