#!/usr/bin/env python
"""Multi-GPU scaling, measured through `stackwise-train` itself: 1 GPU vs N under DDP (and e2e under FSDP).

    python benchmarks/scaling.py --gpus 1,2 --out bench_out/scaling.json            # one 2-GPU machine
    python benchmarks/scaling.py --gpus 1,2 --parts fsdp_all --out bench_out/fsdp_all.json

For each GPU count, at the same global batch (`data.batch_size` is the global batch: N GPUs take
B/N rows each per step), the seed sizes with 4 layers (e2e must fit one GPU for the 1-GPU row):
  embed   `stage=embed`: stage 1 (embedding, layer 1, the 128k head) on token data
  layer   `stage=layer k=2`: a layer stage fed from the cache stage 1 wrote (on as many GPUs)
  e2e     `stage=e2e`, capped at --e2e-steps
  fsdp    (N > 1) `stage=e2e` under `hardware=fsdp`
tokens/s is the global rate the stage's ThroughputMonitor logged to TensorBoard (median of the
windows after the first); peak GPU memory is rank 0's (`peak_gpu_gib` in results.json).
  fsdp_all (N > 1) `stage=all` under `hardware=fsdp`, 2 layers, a few steps: every stage kind
           (stage 1, a layer stage, the fusion fine-tune) trains sharded and the run finishes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from datapath import logged_rate, results, train  # noqa: E402  (benchmarks/datapath.py)


def placement(gpus: int, sharded: bool = False) -> list[str]:
    if sharded:
        return ["hardware=fsdp", f"trainer.devices={gpus}"]
    # one GPU on the disk store as the DDP runs (hardware=gpu alone defaults to cache.store=auto)
    return ["hardware=gpu", "cache.store=disk"] if gpus == 1 else ["hardware=ddp", f"trainer.devices={gpus}"]


def row(exp: Path, stage: str, wall: float) -> dict[str, Any]:
    rec = results(exp)[stage]
    return {
        "tokens_per_s": logged_rate(exp, stage, exclude="device")["tokens_per_s"],  # the global rate
        "train_seconds": rec["seconds"],
        "peak_gpu_gib": rec.get("peak_gpu_gib"),
        "val_loss": rec["val_loss"],
        "command_wall_s": wall,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="1,2")
    ap.add_argument("--parts", default="embed,layer,e2e,fsdp", help="embed, layer, e2e, fsdp, fsdp_all")
    ap.add_argument("--batch-size", type=int, default=8, help="the global batch")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=40, help="trainer.max_steps of stage 1 and the layer stage")
    ap.add_argument("--e2e-steps", type=int, default=30)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--output-root", default=None)
    ap.add_argument("--set", nargs="*", default=[], help="extra stackwise-train overrides for every run")
    ap.add_argument("--out", default="outputs/benchmarks/scaling.json")
    args = ap.parse_args(argv)

    root = Path(args.output_root or tempfile.mkdtemp(prefix="stackwise_scaling_"))
    log = Path(args.out).with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    base = ["experiment=seed_gpu", f"model.n_layers={args.layers}", f"data.batch_size={args.batch_size}"]
    base += [f"data.seq_len={args.seq_len}", f"trainer.max_steps={args.steps}", "layerwise.embed_budget=1"]
    base += ["trainer.val_check_interval=1000", "fusion.finetune_steps=0", "sample.enabled=false"]
    res: dict[str, Any] = {"base_overrides": base, "rows": []}

    def record(gpus: int, what: str, exp: Path, stage: str, wall: float, overrides: list[str]) -> None:
        res["rows"].append({"gpus": gpus, "what": what, "overrides": overrides, **row(exp, stage, wall)})
        print(json.dumps(res["rows"][-1]), flush=True)
        Path(args.out).write_text(json.dumps(res, indent=1))  # what has run so far survives a timeout

    for gpus in [int(g) for g in args.gpus.split(",")]:
        run = [*base, *placement(gpus), f"output_root={root / f'{gpus}gpu'}", "name=s", *args.set]
        if parts & {"embed", "layer"}:
            wall = train([*run, "stage=embed"], log)
            record(gpus, "embed", root / f"{gpus}gpu" / "s", "embed", wall, run)
        if "layer" in parts:
            wall = train([*run, "stage=layer", "k=2"], log)
            record(gpus, "layer", root / f"{gpus}gpu" / "s", "layer_2", wall, run)
        if "e2e" in parts:
            e2e = [*run, f"+stages.e2e.trainer.max_steps={args.e2e_steps}"]
            wall = train([*e2e, "stage=e2e"], log)
            record(gpus, "e2e", root / f"{gpus}gpu" / "s", "e2e", wall, e2e)
        if "fsdp" in parts and gpus > 1:
            e2e = [*base, *placement(gpus, sharded=True), f"output_root={root / f'{gpus}fsdp'}", "name=s", *args.set]
            e2e += [f"+stages.e2e.trainer.max_steps={args.e2e_steps}"]
            wall = train([*e2e, "stage=e2e"], log)
            record(gpus, "e2e fsdp", root / f"{gpus}fsdp" / "s", "e2e", wall, e2e)
        if "fsdp_all" in parts and gpus > 1:
            every = [*base, *placement(gpus, sharded=True), f"output_root={root / f'{gpus}fsdp_all'}", "name=s"]
            every += ["model.n_layers=2", "trainer.max_steps=10", "fusion.finetune_steps=6", *args.set]
            wall = train([*every, "stage=all"], log)
            for stage in ("embed", "layer_2", "finetuned"):
                record(gpus, f"all fsdp: {stage}", root / f"{gpus}fsdp_all" / "s", stage, wall, every)

    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
