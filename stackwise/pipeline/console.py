"""What a run shows a person: the results table, the depth summary in TensorBoard, and at the end of
`stage=all` the depth report and a sample. The pipeline calls these on global rank 0 only."""

from __future__ import annotations

from torch.utils.tensorboard import SummaryWriter

from stackwise import artifacts as art
from stackwise.config import RunConfig
from stackwise.generation import sample_text
from stackwise.pipeline.stage import Stage
from stackwise.report import write_report


def print_table(records: list[dict]) -> None:
    """The end-of-run table: stage, val loss, val accuracy, tokens, time."""
    if not records:
        return
    lines = [f"{'stage':<12}{'val loss':>10}{'val acc':>10}{'tokens':>14}{'time (s)':>10}"]
    for r in records:
        lines.append(
            f"{r['stage']:<12}{r['val_loss']:>10.4f}{r['val_acc']:>10.4f}{r['tokens']:>14,}{r['seconds']:>10.1f}"
        )
    print("\n" + "\n".join(lines) + "\n", flush=True)


def log_depth(paths: art.ExperimentPaths, stage: Stage, record: dict) -> None:
    """The dashboard's depth view: validation loss against layer index k, fused / e2e beside it."""
    tag = "depth/val_loss" if stage.kind == "layer" else f"depth/val_loss_{stage.record}"
    with SummaryWriter(str(paths.tb_dir / "summary")) as w:
        w.add_scalar(tag, record["val_loss"], stage.k)
        w.add_scalar(tag.replace("val_loss", "val_acc"), record["val_acc"], stage.k)


def finish_all(run: RunConfig, paths: art.ExperimentPaths) -> None:
    """The end of `stage=all`: the table, the depth report when an e2e run is beside it, a sample."""
    print_table(art.read_results(paths))
    if (paths.e2e_dir / "config.json").is_file():
        md, png = write_report(paths.root)
        print(f"depth report: {md} and {png}")
    s = run.sample
    if s.enabled and run.data.name != "dummy":
        which = "finetuned" if (paths.finetuned_dir / "config.json").is_file() else "fused"
        text = sample_text(paths.root, prompt=s.prompt, length=s.length, seed=run.seed, model=which, **s.sampler())
        print(f"\nsample from the {which} model (stackwise-generate {paths.root} for more):\n{text}\n")
