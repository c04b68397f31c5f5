"""`stackwise-report`: validation loss against depth, with the fused, fine-tuned and e2e models beside it.

    stackwise-report outputs/default                   # outputs/default/report.md + depth.png
    stackwise-report outputs/a outputs/b --out cmp     # a sweep: one row and one curve per experiment
    stackwise-report outputs --out cmp                 # every experiment under outputs/ (each with results.json)
    stackwise-report outputs/depth-study               # a depth study (benchmarks/depth_study.py): study.md + plots

Reads each experiment's results.json only (no model is loaded). Exit status 0 on success, 2 for bad
input (a missing folder, no results), with one line on stderr.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stackwise.cli.common import user_errors
from stackwise.errors import StackWiseError

PROG = "stackwise-report"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "experiments",
        type=Path,
        nargs="+",
        metavar="EXPERIMENT",
        help="experiment folder(s), e.g. outputs/default; several (or a folder of them) = a sweep",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="where report.md and depth.png go (default: the experiment folder; "
        "required for several experiments unless they were given as one parent folder)",
    )
    args = parser.parse_args(argv)
    with user_errors(PROG):
        # matplotlib and torch take seconds to import: only once the arguments parse, so --help is instant
        from stackwise.report import (
            STUDY_JSON,
            resolve_experiments,
            write_report,
            write_study_report,
            write_sweep_report,
        )

        if len(args.experiments) == 1 and (args.experiments[0] / STUDY_JSON).is_file():
            md, pngs = write_study_report(args.experiments[0], args.out)
            print(md.read_text(encoding="utf-8"), end="")
            print("".join(f"\nwrote {p}" for p in (md, *pngs)).lstrip("\n"))
            return
        exps, expanded = resolve_experiments(args.experiments)
        if len(exps) == 1 and not expanded:
            md, png = write_report(exps[0], args.out)
        else:
            out = args.out if args.out is not None else (args.experiments[0] if expanded else None)
            if out is None:
                raise StackWiseError(f"{len(exps)} experiments need --out DIR for the combined report")
            md, png = write_sweep_report(exps, out)
    print(md.read_text(encoding="utf-8"), end="")
    print(f"\nwrote {md}\nwrote {png}")


if __name__ == "__main__":
    main()
