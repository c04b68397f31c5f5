"""`stackwise-eval`: every model of an experiment on its validation split, on the same masks.

    stackwise-eval outputs/default                          # depth prefixes, fused, fine-tuned, e2e
    stackwise-eval outputs/default --rates 0.15 0.5 0.9 --bound-samples 8 --device cuda
    stackwise-eval outputs/default --max-sequences 64 --json /tmp/eval.json

Prints one row per model (masked CE and accuracy at each rate, the masked-diffusion bound on
-log p(x) in nats/token ± its standard error, and bits/byte) and writes the same numbers to
outputs/<experiment>/eval.json. Exit status 2 with one line for a bad folder or argument.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stackwise.artifacts import atomic_write_json
from stackwise.cli.common import user_errors
from stackwise.errors import StackWiseError
from stackwise.evaluation import DEFAULT_RATES, EvalSettings, eval_json_path, evaluate_experiment, format_table

PROG = "stackwise-eval"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("experiment", type=Path, help="an experiment folder, e.g. outputs/default")
    parser.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=list(DEFAULT_RATES),
        help="fixed masking rates for masked CE / accuracy (default: 0.15 0.5 0.9)",
    )
    parser.add_argument(
        "--bound-samples", type=int, default=8, help="masked draws per sequence for the NLL bound (default: 8)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass (default: 64)")
    parser.add_argument(
        "--max-sequences", type=int, default=None, help="evaluate the first N validation sequences only (default: all)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="where to write the results (default: outputs/<experiment>/eval.json)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--seed", type=int, default=None, help="mask seed (default: the experiment's seed)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    with user_errors(PROG, debug=args.debug):
        if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
            raise StackWiseError(f"--device must be cpu or cuda, got {args.device!r}")
        settings = EvalSettings(
            rates=tuple(args.rates),
            bound_samples=args.bound_samples,
            batch_size=args.batch_size,
            max_sequences=args.max_sequences,
            device=args.device,
            seed=args.seed,
        )
        report = evaluate_experiment(args.experiment, settings, log=lambda s: print(s, file=sys.stderr, flush=True))
        out = args.json if args.json is not None else eval_json_path(args.experiment)
        try:
            atomic_write_json(report, out)
        except OSError as e:
            raise StackWiseError(f"cannot write {out}: {e.strerror or e}") from None
    print(format_table(report), flush=True)
    print(f"wrote {out}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
