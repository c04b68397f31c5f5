#!/usr/bin/env python
"""Where a stage step's GPU time goes: the step of benchmarks/run.py under torch.profiler.

    python benchmarks/profile_step.py --batch-size 8 --seq-len 2048 --out bench_out/profile_8x2048.json

The step is run.py's `bench_train` step (autocast bf16, compute_loss, the non-finite guard, backward,
clip, AdamW, scheduler) of a layer stage (k = 2, seed sizes by default) on a batch already on the GPU,
its blocks compiled (`--compile`, what step.compile gives a long CUDA stage). After `--warmup` steps,
`--steps` steps are profiled; every CUDA kernel's time is summed and put in a category (matmul,
attention, the head's cross-entropy, optimizer, copies, other elementwise), so the table says which
part of the step a change has to shorten. Also prints the step's wall time without the profiler.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import run as bench  # noqa: E402  (benchmarks/run.py)
from peers import time_steps  # noqa: E402

# first match wins: a kernel's name -> the part of the step it belongs to
CATEGORIES = (
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*(mha|sdpa)"),
    ("matmul", r"gemm|sm90_xmma|cutlass|nvjet|ampere_.*_tn|matmul|splitk"),
    ("optimizer", r"adam|multi_tensor|foreach|norm_kernel_2|clip"),
    ("softmax/ce", r"softmax|log_softmax|nll|cross_entropy|scatter|gather|argmax|exp"),
    ("triton (fused)", r"triton"),  # the compiled blocks' and the fused cross-entropy's kernels
    ("copy/cast", r"copy|memcpy|memset|cast|\bcat|concat|fill"),
)


def categorise(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="seed")
    ap.add_argument("--stage", default="layer", choices=bench.STAGES)
    ap.add_argument("--attention", default="gqa")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument(
        "--fused-loss",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --compile: the head's cross-entropy through its compiled kernel (what a compiled stage runs)",
    )
    ap.add_argument("--top", type=int, default=25, help="kernels listed, by total time")
    ap.add_argument("--out", default="outputs/benchmarks/profile_step.json")
    args = ap.parse_args(argv)

    device = torch.device("cuda")
    margs = argparse.Namespace(
        model=args.model, **dict.fromkeys(("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"))
    )
    margs.mla_rq = margs.mla_rkv = None
    cfg = bench.with_attention(bench.model_config(margs), args.attention)
    B, T = args.batch_size, args.seq_len
    module = bench.make_module(args.stage, cfg, device, max_steps=args.warmup + 2 * args.steps + 10)
    batch = bench.make_batch(cfg, args.stage, B, T, device, torch.bfloat16, prepare=module.prepare_batch)
    if args.compile:
        module.compile_blocks()
        module.fused_loss = args.fused_loss
    module.train()
    step = bench.train_step(module, batch, lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    dt, _ = time_steps(step, args.warmup, args.steps, device)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    kernels: dict[str, float] = defaultdict(float)  # name -> total device us
    counts: dict[str, int] = defaultdict(int)
    # kernels only: a range the profiler also shows on the GPU (`Optimizer.step#AdamW.step`, a custom
    # autograd Function's name) is a "user annotation" and would count its kernels twice
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA and not getattr(evt, "is_user_annotation", False):
            kernels[evt.name] += evt.device_time
            counts[evt.name] += 1
    total_us = sum(kernels.values())
    cats: dict[str, float] = defaultdict(float)
    for name, us in kernels.items():
        cats[categorise(name)] += us
    per_step = lambda us: us / args.steps / 1e3  # noqa: E731  (ms per step)
    res = {
        "stage": args.stage,
        "attention": args.attention,
        "B": B,
        "T": T,
        "compile": args.compile,
        "fused_loss": bool(args.compile and args.fused_loss),
        "step_ms_unprofiled": dt * 1e3,
        "tokens_per_s_unprofiled": B * T / dt,
        "gpu_busy_ms_per_step": per_step(total_us),
        "categories_ms_per_step": {c: per_step(us) for c, us in sorted(cats.items(), key=lambda x: -x[1])},
        "top_kernels": [
            {
                "name": n[:140],
                "ms_per_step": per_step(us),
                "calls_per_step": counts[n] / args.steps,
                "cat": categorise(n),
            }
            for n, us in sorted(kernels.items(), key=lambda x: -x[1])[: args.top]
        ],
    }
    print(
        f"{args.stage} {args.attention} {B}x{T} compile={args.compile} fused_loss={res['fused_loss']}: step {dt * 1e3:.2f} ms unprofiled, "
        f"{B * T / dt:,.0f} tokens/s; kernels {res['gpu_busy_ms_per_step']:.2f} ms per step"
    )
    for c, ms in res["categories_ms_per_step"].items():
        print(f"  {c:16s} {ms:8.2f} ms  {100 * ms / res['gpu_busy_ms_per_step']:5.1f} %")
    for k in res["top_kernels"]:
        print(f"  {k['ms_per_step']:8.3f} ms x{k['calls_per_step']:5.1f}  [{k['cat']}] {k['name']}")
    with contextlib.suppress(Exception):
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
