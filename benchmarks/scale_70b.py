#!/usr/bin/env python
"""A model of the 70B shape by stages on one GPU: every stage, fused, exported, loaded by transformers.

    python benchmarks/scale_70b.py --out bench_out/scale_70b.json            # one H200: ~6 minutes
    python benchmarks/scale_70b.py --model tiny --set hardware=cpu --layers 2 --long-layers 3 --out /tmp/s.json

Each stage is its own `stackwise-train` process (as a user runs them), so each gets its own
figures: wall time (process start to exit), peak host RAM (the process' max RSS, `os.wait4`) and
peak GPU memory (`peak_gpu_gib` of the stage's results.json record), beside what the memory
planner (`stackwise-inspect --plan`, stackwise/plan.py) predicted for that stage. Then:
  export   `stackwise-export` of the fused model (sharded safetensors + index), its wall time and
           peak host RAM, and `AutoModelForCausalLM.from_pretrained` of the folder: the logits of
           one batch beside the StackWise model's (both bf16 on the GPU).
  long     stage 1 and stage 2 of the full-depth config (`--long-layers`, 80 for Llama-3-70B).
The joint fine-tune is off (`fusion.finetune_steps=0`): at 4 layers the planner puts it at 98 GiB,
which one H200 holds but which would push the chain past one 10-minute device command; at 80
layers it is FSDP's job (`hardware=fsdp`, several GPUs), and one GPU refuses it with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

GIB = 2**30
BASE = [
    "data.seq_len=2048",
    "data.batch_size=2",
    "hardware=gpu",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "sample.enabled=false",
    "fusion.finetune_steps=0",
    "cache.keep=last",
    "cache.store=disk",  # as measured in RESULTS.md (hardware=gpu now defaults to auto)
]


def command(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run one process; its exit code, wall time and peak RSS (its own and its waited-for children's)."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in KiB on Linux
    out = {"cmd": cmd, "rc": rc, "wall_s": round(wall, 1), "peak_host_gib": round(usage.ru_maxrss * 1024 / GIB, 2)}
    print(f"  rc={rc} {out['wall_s']} s, peak host RSS {out['peak_host_gib']} GiB", flush=True)
    return out


def train(overrides: list[str], log: Path) -> dict[str, Any]:
    return command([sys.executable, "-m", "stackwise.cli.train", *overrides], log)


def planned(overrides: list[str]) -> dict[str, Any]:
    """The planner's GPU peak per stage key (embed, layer, finetune, e2e) and its fusion host RAM, GiB."""
    from stackwise.config import compose_run
    from stackwise.plan import plan_run

    plan = plan_run(compose_run(overrides)).to_dict()
    return {
        "stage_peak_gib": {s["key"]: round(s["peak"] / GIB, 2) for s in plan["stages"]},
        "fusion_host_gib": round(sum(plan["fusion_host"].values()) / GIB, 2),
        "layer_files_gib": {k: round(v / GIB, 2) for k, v in plan["layer_files"].items()},
    }


def records(exp: Path) -> dict[str, dict[str, Any]]:
    path = exp / "results.json"
    return {r["stage"]: r for r in json.loads(path.read_text())} if path.exists() else {}


def folder_gib(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / GIB, 2)


def hf_logits_check(exp: Path, hf_dir: Path) -> dict[str, Any]:
    """Load the export with transformers (no custom code) and the fused model with StackWise, both
    bf16 on the GPU one after the other; compare their logits on one batch of real token ids."""
    import torch
    from transformers import AutoModelForCausalLM

    from stackwise.artifacts import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    model, _ = load_model(exp / "fused", device=device)  # the fused model as StackWise stores it
    model = model.to(dtype=dtype).eval()
    causal = model.cfg.causal
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (1, 128), generator=g).to(device)  # byte ids of the shipped tokenizer
    with torch.no_grad():
        ref = model(ids).float()  # (1, 128, V)
    del model
    torch.cuda.empty_cache() if device == "cuda" else None
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=dtype, local_files_only=True).to(device).eval()
    load_s = time.perf_counter() - t0
    # StackWise models are bidirectional by default: an all-visible 4-D mask (see the README's export section)
    mask = torch.zeros(1, 1, 128, 128, dtype=dtype, device=device)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=None if causal else mask).logits.float()
    diff = (out - ref).abs()
    return {
        "class": type(hf).__name__,
        "load_and_forward_s": round(load_s, 1),
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "logit_std": ref.std().item(),
        "argmax_agree": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    }


def chain(run: list[str], exp: Path, args: argparse.Namespace, res: dict[str, Any], log: Path, save) -> None:
    """Every stage of the `--layers` model, each its own process, then fusion, export and the HF check."""
    res["plan"] = planned(run)
    res["stages"] = []
    save()
    for stage in ["stage=embed", *[f"stage=layer k={k}" for k in range(2, args.layers + 1)], "stage=fusion"]:
        out = train([*run, *stage.split()], log)
        out["stage"] = stage
        key = {"stage=embed": "embed", "stage=fusion": "fused"}.get(stage, "layer_" + stage.split("k=")[-1])
        out["record"] = records(exp).get(key)
        res["stages"].append(out)
        save()
        if out["rc"] != 0:
            sys.exit(f"{stage} failed; see {log}")
    res["records"] = records(exp)
    res["layer_files_gib"] = {p.name: round(p.stat().st_size / GIB, 2) for p in sorted((exp / "layers").glob("*"))}
    res["fused_gib"] = folder_gib(exp / "fused")
    save()

    hf_dir = exp.with_name(exp.name + "_hf")
    cmd = [sys.executable, "-m", "stackwise.cli.export", str(exp), "--out", str(hf_dir), "--overwrite"]
    res["export"] = command(cmd, log)
    if res["export"]["rc"] == 0:
        res["export"]["files"] = sorted(p.name for p in hf_dir.iterdir())
        res["export"]["gib"] = folder_gib(hf_dir)
        save()
        if not args.no_check:
            res["export"]["check"] = hf_logits_check(exp, hf_dir)
            print("export check", json.dumps(res["export"]["check"]), flush=True)
    save()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3_70b", help="the model= preset (default: llama3_70b)")
    ap.add_argument("--layers", type=int, default=4, help="model.n_layers of the run through every stage")
    ap.add_argument("--long-layers", type=int, default=80, help="n_layers of the stage 1 + 2 run (0: skip)")
    ap.add_argument(
        "--parts",
        default="chain,long",
        help="chain (every stage, fusion, export) and/or long (stage 1 + 2 of --long-layers): one per GPU of a 2-GPU lease",
    )
    ap.add_argument("--steps", type=int, default=10, help="trainer.max_steps of a layer stage (stage 1: twice)")
    ap.add_argument("--output-root", type=Path, default=Path("/tmp/sw_70b"))
    ap.add_argument("--set", nargs="*", default=[], help="extra stackwise-train overrides for every run")
    ap.add_argument("--no-check", action="store_true", help="skip the transformers load and logits check")
    ap.add_argument("--out", type=Path, default=Path("outputs/benchmarks/scale_70b.json"))
    args = ap.parse_args(argv)
    root = args.output_root
    root.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log = args.out.with_suffix(".log")
    base = [f"model={args.model}", *BASE, *args.set, f"output_root={root}", f"trainer.max_steps={args.steps}"]
    res: dict[str, Any] = {"base": base}

    def save() -> None:
        args.out.write_text(json.dumps(res, indent=1))

    parts = set(args.parts.split(","))
    if "chain" in parts:
        chain(
            [*base, f"name=l{args.layers}", f"model.n_layers={args.layers}"],
            root / f"l{args.layers}",
            args,
            res,
            log,
            save,
        )
    if args.long_layers and "long" in parts:
        lname = f"l{args.long_layers}"
        lrun = [*base, f"name={lname}", f"model.n_layers={args.long_layers}"]
        res["long"] = {"plan": planned(lrun), "stages": []}
        for stage in ["stage=embed", "stage=layer k=2"]:
            out = train([*lrun, *stage.split()], log)
            out["stage"] = stage
            res["long"]["stages"].append(out)
            save()
            if out["rc"] != 0:
                break
        res["long"]["records"] = records(root / lname)
    res["self_peak_host_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2)
    save()
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
