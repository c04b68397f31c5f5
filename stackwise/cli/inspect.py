"""`stackwise-inspect`: what an experiment folder holds, and whether every file is intact; or, with
`--plan`, what a run would hold on its GPU before it runs.

    stackwise-inspect outputs/default            # stages, checkpoints, caches, models, results
    stackwise-inspect outputs/default --verify   # + sha256 of every checkpoint and cache shard
    stackwise-inspect --plan model=llama3_70b data.seq_len=4096 data.batch_size=2 hardware=gpu
    stackwise-inspect --plan --json model=seed   # the same plan as JSON

Exit status 0 when everything present reads back, 1 when some artifact is damaged (each problem
is one line naming the file), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stackwise import artifacts as art
from stackwise.cli.common import user_errors
from stackwise.data.cache.reader import ActivationCache
from stackwise.errors import ArtifactError, StackWiseError


def inspect_experiment(exp_dir: Path, verify: bool) -> tuple[list[str], list[str]]:
    """(report lines, problem lines) for one experiment folder."""
    paths = art.ExperimentPaths(exp_dir)
    lines, problems = [f"experiment {exp_dir}"], []
    for k in paths.existing_layers():
        path = paths.layer_ckpt(k)
        try:
            weights, meta = art.load_layer_checkpoint(path)
            n = weights.numel()
            lines.append(
                f"  layer_{k}.pt  {n:,} params  val loss {meta.get('val_loss', float('nan')):.4f}  "
                f"tokens {meta.get('tokens', 0):,}  config {meta.get('config_hash')}"
            )
        except ArtifactError as e:
            problems.append(str(e))
        acts_dir = paths.acts_dir(k)
        if acts_dir.exists():
            try:
                cache = ActivationCache.open(acts_dir, verify=verify)
                lines.append(
                    f"  acts_layer{k}  train {cache.rows('train'):,} rows, val {cache.rows('val'):,} rows, "
                    f"{cache.hidden_dtype}, views {cache.views}" + ("  sha256 ok" if verify else "")
                )
            except ArtifactError as e:
                problems.append(str(e))
    for label, folder, name in (
        ("fused", paths.fused_dir, "model"),
        ("fine-tuned", paths.finetuned_dir, "model"),
        ("e2e", paths.e2e_dir, "model"),
    ):
        if folder.exists():
            try:
                state, _, meta = art.load_safetensors_model(folder, name=name, verify=verify)
                lines.append(
                    f"  {label:<10} {sum(t.numel() for t in state.values()):,} params  "
                    f"val loss {meta.get('val_loss', float('nan')):.4f}"
                )
            except ArtifactError as e:
                problems.append(str(e))
    stale = sorted(p.name for p in paths.ckpt_root.glob("*")) if paths.ckpt_root.exists() else []
    if stale:
        lines.append(f"  in progress (mid-stage checkpoints): {', '.join(stale)}")
    for r in art.read_results(paths):
        lines.append(
            f"  result {r['stage']:<10} val loss {r['val_loss']:.4f}  acc {r['val_acc']:.4f}  "
            f"tokens {r['tokens']:,}  {r['seconds']:.1f}s"
        )
    return lines, problems


def plan_report(overrides: list[str], as_json: bool) -> str:
    """The memory plan (stackwise/plan.py) of `stackwise-train OVERRIDES`, as a table or JSON."""
    from stackwise.config import compose_run
    from stackwise.plan import format_plan, plan_run

    plan = plan_run(compose_run(overrides))
    return json.dumps(plan.to_dict(), indent=1) if as_json else format_plan(plan)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stackwise-inspect", description=__doc__.splitlines()[0])
    parser.add_argument(
        "target", nargs="*", help="an experiment folder, e.g. outputs/default; with --plan, stackwise-train overrides"
    )
    parser.add_argument("--verify", action="store_true", help="check the sha256 of every file against its manifest")
    parser.add_argument(
        "--plan", action="store_true", help="print the GPU memory, files and host RAM a run of these overrides needs"
    )
    parser.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.plan:
        if args.verify:
            parser.error("--verify reads an experiment folder; --plan reads overrides")
        with user_errors("stackwise-inspect"):
            print(plan_report(args.target, args.json))
        return
    if args.json or len(args.target) != 1:
        parser.error("give one experiment folder (--json goes with --plan)")
    experiment = Path(args.target[0])
    with user_errors("stackwise-inspect"):
        if not experiment.is_dir():
            raise StackWiseError(f"experiment folder {experiment} does not exist")
        lines, problems = inspect_experiment(experiment, args.verify)
    print("\n".join(lines))
    for p in problems:
        print(f"stackwise-inspect: damaged: {p}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
