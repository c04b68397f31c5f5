"""`stackwise-report`: validation loss against depth, with the fused, fine-tuned and e2e models beside it.

    stackwise-report outputs/default                   # outputs/default/report.md + depth.png
    stackwise-report outputs/a outputs/b --out cmp     # a sweep: one row and one curve per experiment
    stackwise-report outputs --out cmp                 # every experiment under outputs/ (each with results.json)

Reads each experiment's results.json only (no model is loaded). Exit status 0 on success, 2 for bad
input (a missing folder, no results), with one line on stderr.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stackwise.cli.common import user_errors
from stackwise.errors import StackWiseError

PROG = "stackwise-report"


def resolve_experiments(folders: list[Path]) -> tuple[list[Path], bool]:
    """(experiment folders, expanded): a single folder without results.json but with experiment
    sub-folders (a sweep's output root) stands for those sub-folders."""
    from stackwise import artifacts as art
    from stackwise.report import find_experiments

    for folder in folders:
        if not folder.is_dir():
            raise StackWiseError(f"experiment folder {folder} does not exist")
    if len(folders) == 1 and not art.ExperimentPaths(folders[0]).results_json.is_file():
        found = find_experiments(folders[0])
        if found:
            return found, True
    return folders, False


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
        from stackwise.report import write_report, write_sweep_report  # matplotlib: after argument errors

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
