#!/usr/bin/env python
"""The data path, measured through `stackwise-train` itself, beside its references, in one run.

    python benchmarks/datapath.py --out bench_out/datapath.json            # GPU: the seed sizes
    python benchmarks/datapath.py --preset small --out /tmp/dp.json        # a CPU smoke run (~1 min)

Parts (each a real `stackwise-train` process; its figures come from what the run itself wrote):
  disk     the raw sequential write and cold read bandwidth of the output folder's disk
           (`np.ndarray.tofile` + one fsync, then a read after evicting the pages): the reference the
           caching pass is compared with, on the same bytes as the feed part's caching pass wrote
           when it runs (`cache_vs_raw_write`), else on --disk-gb.
  feed     `stage=embed`, then `stage=layer k=2` fed from acts_layer1: tokens/s of the layer stage as
           its ThroughputMonitor logged it to TensorBoard (median of the windows after the first),
           its training seconds and its caching pass (`cache_seconds`, `cache_bytes` in results.json);
           beside it, the compute-only step of the same stage (`benchmarks/run.py`'s bench_train on a
           batch already on the device) and the Hugging Face peer (benchmarks/peers.py).
  all/e2e  `stage=all` (every stage, caching, fusion and fine-tune) and `stage=e2e` on the same token
           budget: wall time of each command, final validation loss, peak GPU memory per stage.
Every override a part passes is printed and stored, so a figure is one command line away.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from run import _evict  # noqa: E402  (benchmarks/run.py: drop a file's pages from the page cache)

PRESETS = {
    # the seed sizes on one GPU: d_model 4096, 8 layers, vocab 128000, gqa, bf16-mixed
    "seed": ["experiment=seed_gpu"],
    # d_model 2048, 8 layers, vocab 32000, T 1024
    "mid": ["experiment=mid_gpu"],
    # the CPU default model, for a smoke run of this script
    "small": ["hardware=cpu"],
}


def raw_write(path: Path, buf: np.ndarray) -> float:
    """Seconds to write `buf` to `path` with `tofile` and one fsync: the disk's raw sequential write."""
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        buf.tofile(f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def disk_reference(folder: Path, gb: float) -> dict[str, Any]:
    """Raw sequential write (tofile + one fsync) and cold read of `gb` GB in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = np.random.default_rng(0).integers(0, 255, size=int(gb * 1e9), dtype=np.uint8)
    path = folder / "disk_reference.bin"
    t_write = raw_write(path, buf)
    _evict([path])  # the read comes from the disk, not the page cache
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(1 << 26):
            pass
    t_read = time.perf_counter() - t0
    path.unlink()
    return {
        "bytes": buf.nbytes,
        "write_gb_per_s": buf.nbytes / t_write / 1e9,
        "read_gb_per_s": buf.nbytes / t_read / 1e9,
    }


def train(overrides: list[str], log: Path, profile: Path | None = None) -> float:
    """Run `stackwise-train` with these overrides; its wall time in seconds (it must succeed).
    `profile`: run it under cProfile and print where its time went (the 30 costliest calls)."""
    prof = ["-m", "cProfile", "-o", str(profile)] if profile else []
    cmd = [sys.executable, *prof, "-m", "stackwise.cli.train", *overrides]
    print("$ stackwise-train " + " ".join(overrides), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(
            cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        ).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"stackwise-train failed (exit {rc}); see {log}")
    print(f"  {wall:.1f} s", flush=True)
    if profile:
        import pstats

        pstats.Stats(str(profile)).sort_stats("cumulative").print_stats(r"stackwise|lightning|torch/serialization", 30)
    return wall


def results(exp_dir: Path) -> dict[str, dict[str, Any]]:
    return {r["stage"]: r for r in json.loads((exp_dir / "results.json").read_text())}


def logged_rate(exp_dir: Path, run: str, tag_part: str = "items_per_sec", exclude: str | None = None) -> dict[str, Any]:
    """The tokens/s a stage's ThroughputMonitor wrote to TensorBoard: median over its windows but the
    first (which holds the warm-up); `exclude`: leave out the tags holding it (e.g. "device": the
    global rate only, not each device's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: list[float] = []
    tags: set[str] = set()
    for events in sorted((exp_dir / "tb").rglob("events.out.tfevents.*")):
        if run not in events.parts:
            continue
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag_part in tag and not (exclude and exclude in tag):
                tags.add(tag)
                values += [e.value for e in acc.Scalars(tag)]
    steady = values[1:] or values
    return {"tokens_per_s": statistics.median(steady) if steady else None, "windows": len(values), "tags": sorted(tags)}


def remove_run(exp_dir: Path, overrides: list[str]) -> None:
    """Delete a finished run's experiment folder and its RAM caches (cache.store=memory keeps them in
    <cache.memory_dir>/stackwise/<name>-<hash>/ until deleted): a sweep over stores and depths at the
    seed's sizes writes tens of GB per run, more than a GPU host's disk holds."""
    memory_dir = next(
        (o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("cache.memory_dir=")), "/dev/shm"
    )
    for ram in (Path(memory_dir) / "stackwise").glob(f"{exp_dir.name}-*"):
        shutil.rmtree(ram, ignore_errors=True)
    shutil.rmtree(exp_dir, ignore_errors=True)


def compute_only(preset: list[str], B: int, T: int, steps: int) -> dict[str, Any]:
    """The same layer stage's step on a batch already on the device, and the Hugging Face peer."""
    import run as bench  # benchmarks/run.py

    # --compile both: the stage itself runs compiled (step.compile=auto on CUDA); eager beside it
    argv = ["--device", "cuda", "--stages", "layer", "--attention", "gqa", "--compile", "both", "--batch-size", str(B)]
    argv += ["--seq-len", str(T), "--steps", str(steps), "--cache-rows", "0", "--out", "/tmp/datapath_run.json"]
    argv += ["--model", "seed"] + (_mid_args() if "experiment=mid_gpu" in preset else [])
    return bench.main(argv)


def _mid_args() -> list[str]:
    return [
        "--d-model",
        "2048",
        "--n-heads",
        "16",
        "--n-kv-heads",
        "4",
        "--d-ff",
        "5632",
        "--vocab-size",
        "32000",
        "--mla-rq",
        "512",
        "--mla-rkv",
        "256",
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="seed")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--layer-steps", type=int, default=40, help="trainer.max_steps of the feed part's layer stage")
    ap.add_argument("--parts", default="disk,feed,all", help="comma-separated: disk, feed, all (all + e2e)")
    ap.add_argument("--layers", default="4", help="comma-separated n_layers for the all/e2e part")
    ap.add_argument("--all-steps", type=int, default=20, help="trainer.max_steps per layer stage in the all part")
    ap.add_argument(
        "--stores",
        default="",
        help="comma-separated cache.store values for stage=all (default: the config's; hardware=gpu: auto)",
    )
    ap.add_argument(
        "--sides",
        default="all,e2e",
        help="which sides of the all part run (all, e2e): one side per GPU of a 2-GPU lease, in two processes",
    )
    ap.add_argument(
        "--embed-steps",
        type=int,
        default=None,
        help="stage 1's steps in the feed part (default: a quarter of --layer-steps)",
    )
    ap.add_argument(
        "--keep-runs",
        action="store_true",
        help="keep each all/e2e run's folder (and its RAM caches) after its figures are read; by default "
        "they are deleted, so that a sweep of stores does not fill the disk",
    )
    ap.add_argument("--finetune-steps", type=int, default=8)
    ap.add_argument("--disk-gb", type=float, default=4.0)
    ap.add_argument("--output-root", default=None, help="where the runs write (default: a temporary folder)")
    ap.add_argument("--set", nargs="*", default=[], help="extra stackwise-train overrides for every run")
    ap.add_argument("--profile", action="store_true", help="run the feed part's layer stage under cProfile")
    ap.add_argument(
        "--compute-only",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the same stage's compute-only step beside the feed part (benchmarks/run.py)",
    )
    ap.add_argument("--out", default="outputs/benchmarks/datapath.json")
    args = ap.parse_args(argv)

    root = Path(args.output_root or tempfile.mkdtemp(prefix="stackwise_datapath_"))
    log = Path(args.out).with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    base = [*PRESETS[args.preset], f"output_root={root}", f"data.batch_size={args.batch_size}"]
    base += [f"data.seq_len={args.seq_len}", "trainer.enable_progress_bar=false", *args.set]
    parts = set(args.parts.split(","))
    res: dict[str, Any] = {"preset": args.preset, "base_overrides": base, "B": args.batch_size, "T": args.seq_len}

    if "disk" in parts and "feed" not in parts:  # with feed: after it, the caching pass's own bytes
        res["disk"] = disk_reference(root, args.disk_gb)
        print("disk", json.dumps(res["disk"]), flush=True)

    if "feed" in parts:
        name = f"feed_{args.batch_size}x{args.seq_len}"
        embed_budget = 0.25 if args.embed_steps is None else args.embed_steps / args.layer_steps
        feed = [
            *base,
            f"name={name}",
            f"trainer.max_steps={args.layer_steps}",
            f"layerwise.embed_budget={embed_budget}",
        ]
        if args.preset != "small":
            # the steady state of a long stage, which step.compile=auto compiles (>= 1000 steps): the
            # rate is compared with the compiled compute-only step
            feed.append("step.compile=true")
        feed += ["trainer.val_check_interval=1000", "fusion.finetune_steps=0", "sample.enabled=false"]
        feed.append(
            "cache.store=disk"
        )  # fed from its own cache, as measured since the first lease (hardware=gpu: auto)
        train([*feed, "stage=embed"], log)
        wall = train([*feed, "stage=layer", "k=2"], log, Path(args.out).with_suffix(".prof") if args.profile else None)
        rec = results(root / name)["layer_2"]
        res["feed"] = {
            "overrides": feed,
            "command_wall_s": wall,
            "logged": logged_rate(root / name, "layer_2"),
            "train_seconds": rec["seconds"],
            "cache_seconds": rec.get("cache_seconds"),
            "cache_bytes": rec.get("cache_bytes"),
        }
        if rec.get("cache_seconds"):
            res["feed"]["cache_gb_per_s"] = rec["cache_bytes"] / rec["cache_seconds"] / 1e9
        if args.preset != "small" and args.compute_only:
            ref = compute_only(PRESETS[args.preset], args.batch_size, args.seq_len, 20)
            res["feed"]["compute_only"] = ref
            compiled = [r for r in ref["train"] if r["stage"] == "layer" and r.get("compile") and "tokens_per_s" in r]
            fed = res["feed"]["logged"]["tokens_per_s"]
            if compiled and fed:  # the target: the stage fed from its cache vs its compute-only step
                res["feed"]["fed_vs_compute_only"] = fed / compiled[0]["tokens_per_s"]
        if "disk" in parts:
            # the raw disk on the same bytes as the caching pass wrote (beyond the page cache's dirty
            # limit a write runs at the disk's speed, below it at memory's: the same size compares)
            gb = rec["cache_bytes"] / 1e9 if rec.get("cache_bytes") else args.disk_gb
            res["disk"] = disk_reference(root, gb)
            print("disk", json.dumps(res["disk"]), flush=True)
            if res["feed"].get("cache_gb_per_s"):
                res["feed"]["cache_vs_raw_write"] = res["feed"]["cache_gb_per_s"] / res["disk"]["write_gb_per_s"]
        print("feed", json.dumps({k: v for k, v in res["feed"].items() if k != "compute_only"}), flush=True)

    if "all" in parts:
        res["all_vs_e2e"] = []
        # one-off costs of a fresh machine out of both sides' wall times: the first import of matplotlib
        # (torchmetrics imports it) builds its font cache, 11 s on the H200 host of 2026-12-01
        warm = "import lightning, torchmetrics, matplotlib.font_manager"
        subprocess.run([sys.executable, "-c", warm], check=True)
        stores = [x for x in args.stores.split(",") if x] or [None]
        for n_layers in [int(x) for x in args.layers.split(",")]:
            run = [*base, f"model.n_layers={n_layers}", f"trainer.max_steps={args.all_steps}"]
            run += [f"fusion.finetune_steps={args.finetune_steps}", "sample.enabled=false"]
            # e2e once: its token budget (the layer-wise total) does not depend on where the cache lives
            e2e_name = f"e2e_{n_layers}L"
            sides = set(args.sides.split(","))
            wall_e2e = train([*run, f"name={e2e_name}", "stage=e2e"], log) if "e2e" in sides else None
            if wall_e2e is not None:
                res["all_vs_e2e"].append({"n_layers": n_layers, "store": "e2e", "e2e_wall_s": wall_e2e})
                res["all_vs_e2e"][-1]["e2e_records"] = results(root / e2e_name)
                if not args.keep_runs:
                    remove_run(root / e2e_name, args.set)
                Path(args.out).write_text(json.dumps(res, indent=1))
                print(f"e2e L={n_layers}: {wall_e2e:.1f} s", flush=True)
            for store in stores if "all" in sides else []:
                name = f"all_{n_layers}L" + (f"_{store}" if store else "")
                over = [*run, f"name={name}", *([f"cache.store={store}"] if store else [])]
                wall_all = train([*over, "stage=all"], log)
                entry = {
                    "n_layers": n_layers,
                    "store": store or "default",
                    "overrides": over,
                    "all_wall_s": wall_all,
                    "records": results(root / name),
                }
                if wall_e2e is not None:
                    entry["ratio"] = wall_all / wall_e2e
                chosen = root / name / "cache_store.json"  # what cache.store=auto picked, and why
                if chosen.exists():
                    entry["cache_store"] = json.loads(chosen.read_text())
                res["all_vs_e2e"].append(entry)
                Path(args.out).write_text(json.dumps(res, indent=1))  # kept if a later run is cut off
                if not args.keep_runs:
                    remove_run(root / name, over)
                print(f"all({store or 'default'}) L={n_layers}: {wall_all:.1f} s", flush=True)

    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
