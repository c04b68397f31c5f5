#!/usr/bin/env python
"""StackWise benchmarks: layer-wise stage steps vs end-to-end steps, and the activation cache.

    python benchmarks/run.py                                   # quick CPU run (< 2 min): small model
    python benchmarks/run.py --device cuda --model seed --seq-len 2048 --batch-size 4 --out results.json

What is measured (benchmarks/README.md has the details):
  (a) train: one optimizer step of a real stage module (stackwise.stages) on a fixed batch that is
      already on the device: `layer` = LayerwiseStage k=2 on a cached-activation batch (one block +
      final norm + tied head on the masked positions), `embed` = LayerwiseStage k=1 on token ids,
      `e2e` = FullModelStage (every layer). The step is what Lightning runs for these modules:
      autocast bf16 (precision bf16-mixed) on CUDA / fp32 on CPU, compute_loss, the non-finite
      check, backward, grad-norm clip 1.0, AdamW (configure_optimizers) and the LR scheduler.
      tokens/s = B*T / step time; MFU = stackwise.model.stats.train_step_flops / step time / peak.
      `cache_fwd` = the forward of the layer stage alone under inference_mode (the caching pass).
  (c) memory: torch.cuda.max_memory_allocated over warmup + timed steps (weights, grads, AdamW
      state, activations, the head's logits), per stage; optional largest-batch search.
  (b) cache: activations written through Lightning `Trainer.predict` + stackwise CacheWriter
      (GPU->CPU copy, sha256 while writing, .npy shards), manifest, ActivationCache.open(verify),
      and read back memory-mapped through ActivationDataset / ActivationDataModule, with the
      page cache cold (pages evicted with posix_fadvise DONTNEED after a sync) and warm.
Data loading is not part of (a); (b) says how fast the cache can feed it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from stackwise.config import OptimConfig  # noqa: E402
from stackwise.model.config import ModelConfig  # noqa: E402
from stackwise.model.stats import param_counts, train_step_flops  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import hf_layer_stage, peak_matmul, time_steps  # noqa: E402

# Dense bf16 tensor-core peaks from NVIDIA's data sheets (TFLOP/s, without structured sparsity).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
)
STAGES = ("embed", "layer", "e2e")


# ------------------------------------------------------------------------------ configuration
def model_config(args) -> ModelConfig:
    """The model sizes of stackwise/conf/model/<preset>.yaml, with command-line overrides."""
    # what the preset changes from ModelConfig's defaults (small.yaml changes nothing)
    raw = yaml.safe_load((ROOT / "stackwise" / "conf" / "model" / f"{args.model}.yaml").read_text()) or {}
    raw = raw.get("model", raw)  # a preset that also sets optim (a global package) nests its sizes
    d = {k: v for k, v in raw.items() if v is not None and not (isinstance(v, str) and v.startswith("${"))}
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "mla_rq", "mla_rkv"):
        if getattr(args, key) is not None:
            d[key] = getattr(args, key)
    d.setdefault("vocab_size", 258)  # the byte tokenizer of data=shakespeare
    if "mask_id" not in d:
        d["mask_id"], d["pad_id"] = (256, 257) if d["vocab_size"] == 258 else (d["vocab_size"] - 2, d["vocab_size"] - 1)
    d["dropout"] = 0.0
    d["seed"] = 0
    return ModelConfig.from_dict(d)


def with_attention(cfg: ModelConfig, kind: str) -> ModelConfig:
    d = cfg.to_dict()
    d["attention"] = kind
    return ModelConfig.from_dict(d)


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak for CPU: MFU not reported"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"dense bf16 peak of {key} from NVIDIA's data sheet"
    return None, f"unknown GPU {name!r}: pass --peak-tflops for MFU"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ (a) and (c)
def build(factory, device: torch.device):
    """Build a stage module without drawing its weights on the CPU: shapes on the meta device,
    storage on `device`, then N(0, 0.02) matrices and unit norms (speed does not depend on values,
    and the seed model's CPU init would take longer than its benchmark)."""
    with torch.device("meta"):
        module = factory()
    module.to_empty(device=device)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.normal_(0.0, 0.02) if t.ndim >= 2 else t.fill_(1.0)
    return module


def make_module(stage: str, cfg: ModelConfig, device: torch.device, max_steps: int):
    from stackwise.model.transformer import Block, Head
    from stackwise.model.weights import LayerModules, first_layer
    from stackwise.stages.full import FullModelStage
    from stackwise.stages.layerwise import LayerwiseStage

    optim = OptimConfig(warmup_steps=2)
    if stage == "embed":
        return build(lambda: LayerwiseStage(cfg, first_layer(cfg), optim, "mean", max_steps, "embed"), device)
    if stage == "layer":
        # k = 2 on cached activations; tied head: stage 1's matrix is a frozen buffer (V, D)
        return build(
            lambda: LayerwiseStage(
                cfg,
                LayerModules(Block(cfg, 2), Head(cfg)),
                optim,
                "mean",
                max_steps,
                "layer_2",
                embed_weight=torch.empty(cfg.vocab_size, cfg.d_model),
            ),
            device,
        )
    return build(lambda: FullModelStage(cfg, optim, "mean", max_steps, "e2e"), device)


def make_batch(
    cfg: ModelConfig,
    stage: str,
    B: int,
    T: int,
    device: torch.device,
    hidden_dtype: torch.dtype,
    seed: int = 0,
    prepare=None,
) -> dict:
    """A batch as the data modules give it, at their mean mask rate: the rows' t are the B midpoints of
    [0.15, 0.9] split in B equal parts (mean 0.525, the mean of t ~ U[0.15, 0.9]), that fraction masked.
    A random draw of B rates is what one batch of a stage sees, not its average step: with B = 4 it
    masked 0.426 of the positions at seed 0, and the head on the masked rows is most of the step at a
    128k vocabulary. `prepare` (a stage's prepare_batch) runs on the host batch, as Lightning runs it
    before the copy."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, min(cfg.mask_id, cfg.pad_id), (B, T), generator=g)  # (B, T), no pad
    t = 0.15 + 0.75 * (torch.arange(B, dtype=torch.float32) + 0.5) / B  # (B,) stratified
    mask = torch.rand(B, T, generator=g) < t[:, None]  # (B, T)
    mask[:, 0] = True  # at least one supervised position per row
    batch = {
        "targets": targets,
        "mask": mask,
        "t": t,
        "index": torch.arange(B),
        "view": torch.zeros(B, dtype=torch.long),
    }
    if stage == "layer":
        batch["hidden"] = torch.randn(B, T, cfg.d_model, generator=g).to(hidden_dtype)  # (B, T, D) as cached
    else:
        batch["ids"] = torch.where(mask, torch.full_like(targets, cfg.mask_id), targets)  # (B, T)
    if prepare is not None:
        batch = prepare(batch)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_step(module, batch: dict, autocast) -> Callable[[], torch.Tensor]:
    """One optimizer step of `module` on `batch` as Lightning runs it for a stage (`autocast`: a context
    factory): compute_loss, the non-finite guard (on the device, read at the end), backward, clipping
    at 1.0, AdamW (configure_optimizers) and the LR scheduler; returns the loss."""
    params = module.trainable_parameters()
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]

    def step() -> torch.Tensor:
        with autocast():
            out = module.compute_loss(batch)
        module._watch_finite(out.loss)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    return step


def bench_train(
    stage: str,
    cfg: ModelConfig,
    B: int,
    T: int,
    device: torch.device,
    steps: int,
    warmup: int,
    amp: bool,
    peak: float | None,
    fwd_only_too: bool = False,
    compile_blocks: bool = False,
) -> dict:
    """Time `steps` optimizer steps after `warmup` of one stage; peak memory over all of them."""
    rec: dict[str, Any] = {"stage": stage, "attention": cfg.kind(1), "batch_size": B, "seq_len": T}
    rec["compile"] = compile_blocks
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    try:
        module = make_module(stage, cfg, device, max_steps=warmup + steps)
        hidden_dtype = torch.bfloat16 if amp else torch.float32  # cache.dtype of hardware=gpu / cpu
        batch = make_batch(cfg, stage, B, T, device, hidden_dtype, prepare=module.prepare_batch)
        if compile_blocks:
            module.compile_blocks()
        mask_rate = float(batch["mask"].float().mean())
        params = module.trainable_parameters()
        module.train()
        ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext
        if device.type == "cuda":
            rec["weights_gib"] = (torch.cuda.memory_allocated(device) - base) / 2**30

        step = train_step(module, batch, ctx)
        dt, loss = time_steps(step, warmup, steps, device)
        module.check_finite()
        flops = train_step_flops(cfg, stage, 2 if stage == "layer" else 1, B, T, mask_rate)
        rec.update(
            step_ms=dt * 1e3,
            tokens_per_s=B * T / dt,
            mask_rate=mask_rate,
            tflop_per_step=flops / 1e12,
            tflops=flops / dt / 1e12,
            mfu=(flops / dt / 1e12 / peak) if peak else None,
            loss=float(loss),
            trainable_params=sum(p.numel() for p in params),
            steps=steps,
            warmup=warmup,
        )
        if device.type == "cuda":
            rec["peak_mem_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
            rec["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        if fwd_only_too:  # the caching pass: the layer's forward alone, no grad
            module.eval()

            def forward() -> None:
                with torch.inference_mode(), ctx():
                    module.hidden_states(batch)

            fdt, _ = time_steps(forward, warmup, steps, device)
            rec["cache_fwd_ms"] = fdt * 1e3
            rec["cache_fwd_tokens_per_s"] = B * T / fdt
    except torch.cuda.OutOfMemoryError as e:
        rec["oom"] = True
        rec["error"] = str(e).splitlines()[0][:200]
    finally:
        module = batch = step = params = None
        free(device)
    return rec


def max_batch(stage: str, cfg: ModelConfig, T: int, device: torch.device, amp: bool, start: int, limit: int) -> dict:
    """Largest batch (doubling from `start`) whose training step fits in GPU memory."""
    best, b, tried = None, start, []
    while b <= limit:
        r = bench_train(stage, cfg, b, T, device, steps=1, warmup=1, amp=amp, peak=None)
        tried.append({"batch_size": b, "oom": bool(r.get("oom")), "peak_mem_gib": r.get("peak_mem_gib")})
        if r.get("oom"):
            break
        best, b = r, b * 2
    return {
        "stage": stage,
        "attention": cfg.kind(1),
        "seq_len": T,
        "largest_batch": best and best["batch_size"],
        "peak_mem_gib": best and best.get("peak_mem_gib"),
        "tried": tried,
    }


# ------------------------------------------------------------------------------ (b) the cache
def _evict(paths) -> None:
    """Drop the files' pages from the page cache so the next read comes from the disk."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_cache(
    cfg: ModelConfig,
    B: int,
    T: int,
    rows: int,
    shard_size: int,
    dtype: str,
    device: torch.device,
    workers: list[int],
    root: Path,
) -> dict:
    import logging
    import warnings

    import lightning as L
    from torch.utils.data import DataLoader

    from stackwise.data.cache.datamodule import ActivationDataModule
    from stackwise.data.cache.layout import write_manifest
    from stackwise.data.cache.reader import ActivationCache, ActivationDataset
    from stackwise.data.cache.writer import CacheWriter

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # the trainer's banner and tips
    warnings.filterwarnings("ignore", message=".*batch indices.*")
    warnings.filterwarnings("ignore", message=".*treespec.*")

    D = cfg.d_model
    n_batches = max(1, rows // B)
    rows = n_batches * B
    hidden_dtype = torch.bfloat16 if dtype == "float8_e4m3" else getattr(torch, dtype)  # what a stage returns

    class Replay(L.LightningModule):
        """predict_step returns one batch of hidden states already on the device (like a stage's)."""

        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.register_buffer("hidden", torch.randn(B, T, D, generator=g).to(hidden_dtype))
            self.register_buffer("targets", torch.randint(0, min(cfg.mask_id, cfg.pad_id), (B, T), generator=g))
            self.register_buffer("mask", torch.rand(B, T, generator=g) < 0.5)

        def predict_step(self, batch, batch_idx):
            return {
                "hidden": self.hidden,
                "targets": self.targets,
                "mask": self.mask,
                "t": torch.full((B,), 0.5, device=self.device),
                "index": torch.arange(B, device=self.device) + batch_idx * B,
                "view": torch.zeros(B, dtype=torch.long, device=self.device),
            }

    out: dict[str, Any] = {
        "rows": rows,
        "seq_len": T,
        "d_model": D,
        "dtype": dtype,
        "shard_size": shard_size,
        "batch_size": B,
        "dir": str(root),
    }
    acts_dir = root / "acts_layer1"
    shutil.rmtree(acts_dir, ignore_errors=True)
    writer = CacheWriter(acts_dir, shard_size=shard_size, vocab_size=cfg.vocab_size, dtype=dtype, splits=("train",))
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[writer],
        default_root_dir=str(root),
    )
    loader = DataLoader(range(n_batches), batch_size=None)
    model = Replay()
    # where the writer's time goes: on the predict loop's thread per batch, and waiting for its threads at the end
    spent = {"write_on_batch_end": 0.0, "on_predict_end": 0.0}
    for name in spent:

        def wrap(fn, name=name):
            def timed_call(*a, **kw):
                t = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    spent[name] += time.perf_counter() - t

            return timed_call

        setattr(writer, name, wrap(getattr(writer, name)))
    t0 = time.perf_counter()
    trainer.predict(model, dataloaders=loader, return_predictions=False)
    t_write = time.perf_counter() - t0
    records = writer.records()
    t0 = time.perf_counter()
    write_manifest(
        acts_dir, records, {"k": 1, "config_hash": "bench", "producer_sha256": "bench", "views": 1}, splits=("train",)
    )
    t_manifest = time.perf_counter() - t0
    total = sum(f["bytes"] for r in records for f in r["files"].values())
    hidden_bytes = sum(r["files"]["hidden"]["bytes"] for r in records)
    files = [acts_dir / f["path"] for r in records for f in r["files"].values()]
    out["write"] = {
        "seconds": t_write,
        "bytes": total,
        "gb_per_s": total / t_write / 1e9,
        "shards": len(records),
        "what": "Trainer.predict + CacheWriter: cast on the device, copies to pinned buffers, threads writing, "
        "hashing and fsyncing .npy shards",
    }
    out["write"]["breakdown_seconds"] = {
        "write_on_batch_end (cast on the device, copy to the host, queue; waits when the threads are behind)": spent[
            "write_on_batch_end"
        ],
        "on_predict_end (the threads' last writes, hashes and fsyncs)": spent["on_predict_end"],
        "rest (Lightning predict loop, predict_step)": t_write - sum(spent.values()),
    }
    out["manifest_seconds"] = t_manifest
    out["reference"] = reference_io(root, min(hidden_bytes, 1 << 30))
    del trainer, model
    free(device)

    t0 = time.perf_counter()
    cache = ActivationCache.open(acts_dir, verify=True)
    t_verify = time.perf_counter() - t0
    out["open_verify"] = {
        "seconds": t_verify,
        "gb_per_s": total / t_verify / 1e9,
        "what": "ActivationCache.open(verify=True): sha256 of every shard file",
    }

    row_bytes = hidden_bytes / rows
    reads = []

    def timed(name: str, cold: bool, fn) -> None:
        if cold:
            _evict(files)
        t0 = time.perf_counter()
        n = fn()
        dt = time.perf_counter() - t0
        reads.append(
            {
                "reader": name,
                "page_cache": "cold" if cold else "warm",
                "rows": n,
                "seconds": dt,
                "hidden_gb_per_s": n * row_bytes / dt / 1e9,
                "rows_per_s": n / dt,
            }
        )

    def sequential() -> int:
        ds = ActivationDataset(cache, "train")
        for i in range(len(ds)):
            ds[i]
        return len(ds)

    def datamodule(nw: int):
        def run() -> int:
            dm = ActivationDataModule(
                cache, batch_size=B, seed=0, num_workers=nw, max_steps=n_batches, pin_memory=device.type == "cuda"
            )
            n = 0
            for batch in dm.train_dataloader():
                h = batch["hidden"].to(device, non_blocking=True)  # what the stage's step receives
                n += h.shape[0]
            sync(device)
            return n

        return run

    for cold in (True, False):
        timed("ActivationDataset[i] in order", cold, sequential)
        for nw in workers:
            timed(f"ActivationDataModule train loader, shuffled, workers={nw}, to {device.type}", cold, datamodule(nw))
    out["read"] = reads
    shutil.rmtree(acts_dir, ignore_errors=True)
    return out


def reference_io(root: Path, nbytes: int) -> dict:
    """What the disk and one core's sha256 do alone, to put the cache figures in context."""
    import hashlib

    buf = np.random.default_rng(0).integers(0, 1 << 16, size=nbytes // 2, dtype=np.uint16)
    t0 = time.perf_counter()
    hashlib.sha256(memoryview(buf).cast("B")).hexdigest()
    t_sha = time.perf_counter() - t0
    path = root / "reference.npy"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        np.save(f, buf, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    t_save = time.perf_counter() - t0
    _evict([path])
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
    t_read = time.perf_counter() - t0
    path.unlink()
    return {
        "bytes": int(buf.nbytes),
        "sha256_gb_per_s": buf.nbytes / t_sha / 1e9,
        "np_save_fsync_gb_per_s": buf.nbytes / t_save / 1e9,
        "cold_read_gb_per_s": buf.nbytes / t_read / 1e9,
    }


# ------------------------------------------------------------------------------ report
def machine(device: torch.device) -> dict:
    import lightning

    m = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": device.type,
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        m.update(
            gpu=p.name,
            gpu_memory_gib=p.total_memory / 2**30,
            sm_count=p.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return m


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_tables(res: dict) -> None:
    measured = res.get("measured_peak", {}).get("tflops")
    print(
        f"\nmachine: {res['machine'].get('gpu', 'CPU')}  torch {res['machine']['torch']}  "
        f"peak {res['peak_tflops']} TFLOP/s ({res['peak_source']}); measured bf16 matmul "
        f"{fmt(measured, '.0f')} TFLOP/s"
    )
    print(
        f"model: {res['model_name']}  d_model={res['model']['d_model']} n_layers={res['model']['n_layers']} "
        f"vocab={res['model']['vocab_size']}  precision={res['precision']}"
    )
    hdr = (
        f"{'attn':<5}{'stage':<7}{'B':>4}{'T':>6}{'step ms':>10}{'tokens/s':>12}{'GFLOP/s':>10}{'MFU':>7}"
        f"{'peak GiB':>10}{'params (trained)':>18}"
    )
    print("\n(a)+(c) training step\n" + hdr)
    for r in res["train"]:
        if r.get("oom"):
            print(f"{r['attention']:<5}{r['stage']:<7}{r['batch_size']:>4}{r['seq_len']:>6}   out of memory")
            continue
        if r["stage"] in ("hf", "hf_same") and "error" in r:
            print(f"{r['attention']:<5}{r['stage']:<7}   {r['error']}")
            continue
        if r["stage"] in ("hf", "hf_same"):  # the peers (benchmarks/peers.py)
            what = "as a user writes it" if r["stage"] == "hf" else "the same math as `layer`"
            print(
                f"{r['attention']:<5}{r['stage']:<7}{r['batch_size']:>4}{r['seq_len']:>6}{r['step_ms']:>10.1f}"
                f"{r['tokens_per_s']:>12,.0f}   (Hugging Face layer stage, {what})"
            )
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        name = r["stage"] + ("+c" if r.get("compile") else "")  # +c: blocks torch.compiled
        print(
            f"{r['attention']:<5}{name:<7}{r['batch_size']:>4}{r['seq_len']:>6}{r['step_ms']:>10.1f}"
            f"{r['tokens_per_s']:>12,.0f}{1e3 * r['tflops']:>10,.0f}{mfu:>7}{fmt(r.get('peak_mem_gib'), '.2f'):>10}"
            f"{r['trainable_params'] / 1e6:>17.1f}M"
        )
        extra = []
        if r.get("mfu_measured_peak") is not None:
            extra.append(f"MFU vs measured peak {100 * r['mfu_measured_peak']:.1f}%")
        for peer in ("hf", "hf_same"):
            if r.get("vs_" + peer) is not None:
                extra.append(f"{r['vs_' + peer]:.2f}x {peer}")
        if extra:
            print(f"{'':<22}" + ", ".join(extra))
        if "cache_fwd_tokens_per_s" in r:
            print(
                f"{'':<5}{'cachefw':<7}{r['batch_size']:>4}{r['seq_len']:>6}{r['cache_fwd_ms']:>10.1f}"
                f"{r['cache_fwd_tokens_per_s']:>12,.0f}   (layer k=2 forward only, inference_mode)"
            )
    for m in res.get("max_batch", []):
        print(
            f"largest batch that trains: {m['attention']} {m['stage']} T={m['seq_len']}: B={m['largest_batch']} "
            f"(peak {fmt(m['peak_mem_gib'], '.1f')} GiB); tried {[t['batch_size'] for t in m['tried']]}"
        )
    c = res.get("cache")
    if c:
        print(
            f"\n(b) activation cache: {c['rows']} rows x T={c['seq_len']} x D={c['d_model']} {c['dtype']}, "
            f"{c['write']['bytes'] / 1e9:.2f} GB in {c['write']['shards']} shards"
        )
        parts = ", ".join(f"{k.split(' ')[0]} {v:.1f} s" for k, v in c["write"]["breakdown_seconds"].items())
        print(f"  write (predict + CacheWriter)  {c['write']['gb_per_s']:7.2f} GB/s  ({parts})")
        ref = c["reference"]
        print(
            f"  reference, {ref['bytes'] / 1e9:.2f} GB: sha256 {ref['sha256_gb_per_s']:.2f} GB/s, np.save+fsync "
            f"{ref['np_save_fsync_gb_per_s']:.2f} GB/s, cold sequential read {ref['cold_read_gb_per_s']:.2f} GB/s"
        )
        print(f"  open(verify=True) sha256       {c['open_verify']['gb_per_s']:7.2f} GB/s")
        for r in c["read"]:
            print(
                f"  read {r['page_cache']:<5} {r['reader']:<62}{r['hidden_gb_per_s']:7.2f} GB/s "
                f"{r['rows_per_s']:9.1f} rows/s"
            )
    print()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--model", default="small", help="a preset of stackwise/conf/model/ (small, seed, tiny, ...)")
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "mla_rq", "mla_rkv"):
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=None, help=f"override model.{key}")
    ap.add_argument("--attention", default="mha,gqa,mla", help="comma-separated kinds to benchmark")
    ap.add_argument("--stages", default="embed,layer,e2e", help=f"comma-separated, of {STAGES}")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on CPU, 20 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 on CPU, 3 on CUDA)")
    ap.add_argument(
        "--precision",
        choices=("bf16-mixed", "32"),
        default=None,
        help="default: bf16-mixed on CUDA (hardware=gpu), 32 on CPU (hardware=cpu)",
    )
    ap.add_argument("--peak-tflops", type=float, default=None, help="the accelerator's peak, for MFU")
    ap.add_argument(
        "--compile",
        default="off",
        choices=("off", "on", "both"),
        help="torch.compile each block (the step.compile a CUDA run gets by default); both: time each",
    )
    ap.add_argument(
        "--peer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the Hugging Face layer stage (benchmarks/peers.py) beside each `layer` stage",
    )
    ap.add_argument(
        "--max-batch",
        default=None,
        metavar="ATTN",
        help="also find the largest batch (doubling) that trains, for layer and e2e, with this attention",
    )
    ap.add_argument("--max-batch-limit", type=int, default=256)
    ap.add_argument("--cache-rows", type=int, default=256, help="rows written and read in (b); 0 skips (b)")
    ap.add_argument("--shard-size", type=int, default=1024, help="cache.shard_size for (b)")
    ap.add_argument("--cache-batch-size", type=int, default=None, help="batch size of (b) (default --batch-size)")
    ap.add_argument("--workers", default="0,2", help="DataLoader workers to try in (b)")
    ap.add_argument("--cache-dir", default=None, help="where (b) writes (default: a temporary folder)")
    ap.add_argument(
        "--out",
        default="outputs/benchmarks/results.json",
        help="the JSON report (default under the git-ignored outputs/)",
    )
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32")
    amp = precision == "bf16-mixed"
    steps = args.steps or (20 if device.type == "cuda" else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 2)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as Lightning suggests on Ampere+; bf16 runs ignore it
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    measured_peak = peak_matmul(device)  # the reference MFU is also reported against, in this run
    base = model_config(args)
    res: dict[str, Any] = {
        "command": " ".join(
            [Path(sys.argv[0]).name if argv is None else "run.py"] + (sys.argv[1:] if argv is None else argv)
        ),
        "machine": machine(device),
        "peak_tflops": peak,
        "peak_source": peak_source,
        "measured_peak": measured_peak,
        "precision": precision,
        "model_name": args.model,
        "model": base.to_dict(),
        "train": [],
        "max_batch": [],
    }
    t_all = time.perf_counter()
    for kind in args.attention.split(","):
        cfg = with_attention(base, kind)
        res.setdefault("params", {})[kind] = {
            k: v for k, v in param_counts(cfg).items() if k in ("total", "trainable", "frozen")
        }
        compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
        for stage, compiled in [(s, c) for s in args.stages.split(",") for c in compiles]:
            r = bench_train(
                stage,
                cfg,
                args.batch_size,
                args.seq_len,
                device,
                steps,
                args.warmup,
                amp,
                peak,
                fwd_only_too=stage == "layer" and not compiled,
                compile_blocks=compiled,
            )
            if measured_peak["tflops"] and "tflops" in r:
                r["mfu_measured_peak"] = r["tflops"] / measured_peak["tflops"]
            res["train"].append(r)
            print(json.dumps(r), flush=True)
            for same_math in (False, True) if stage == "layer" and args.peer and compiled == compiles[-1] else ():
                # the Hugging Face layer stage, same sizes, same batch (benchmarks/peers.py)
                p = hf_layer_stage(
                    cfg, args.batch_size, args.seq_len, device, steps, args.warmup, amp, make_batch, same_math
                )
                if "tokens_per_s" in p and "tokens_per_s" in r:
                    r["vs_" + p["stage"]] = r["tokens_per_s"] / p["tokens_per_s"]
                res["train"].append(p)
                print(json.dumps(p), flush=True)
    if args.max_batch and device.type == "cuda":
        cfg = with_attention(base, args.max_batch)
        for stage in ("layer", "e2e"):
            m = max_batch(stage, cfg, args.seq_len, device, amp, start=args.batch_size, limit=args.max_batch_limit)
            res["max_batch"].append(m)
            print(json.dumps(m), flush=True)
    if args.cache_rows > 0:
        root = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="stackwise_bench_"))
        root.mkdir(parents=True, exist_ok=True)
        try:
            res["cache"] = bench_cache(
                base,
                args.cache_batch_size or args.batch_size,
                args.seq_len,
                args.cache_rows,
                args.shard_size,
                "bfloat16" if amp else "float32",
                device,
                [int(w) for w in args.workers.split(",") if w != ""],
                root,
            )
        finally:
            if not args.cache_dir:
                shutil.rmtree(root, ignore_errors=True)
    res["seconds"] = time.perf_counter() - t_all
    print_tables(res)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out} ({res['seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
