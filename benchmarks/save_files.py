"""How fast StackWise writes its weight files, beside the raw disk on the same bytes.

Writes, into `--dir`, a stage-1 layer file (`layers/layer_1.pt`: a block of the seed's shapes and an
embedding of `--vocab` x `--d-model`, bf16 as a GPU run saves them) and a model folder
(`fused/finetuned/`, fp32: the same embedding and `--layers` blocks, Hugging Face's 5 GB shards), each
through the project's own writer (`save_layer_checkpoint`, `save_safetensors_model`: write, fsync,
sha256), and prints seconds and GB/s beside the same number of bytes written raw (`ndarray.tofile` +
fsync) and hashed alone (`sha256_file` from the page cache). What a run pays for each file is the
writer's time; the raw write plus the hash, one after the other, is what a writer that does not
overlap them costs.

    python benchmarks/save_files.py --dir /tmp                        # the seed's shapes: ~1.4 GB and ~4.7 GB
    python benchmarks/save_files.py --dir /tmp --layers 1 --vocab 32000   # smaller, for a quick look

A measurement, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stackwise.artifacts import save_layer_checkpoint, save_safetensors_model, sha256_file
from stackwise.model.weights import LayerWeights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datapath import raw_write


def block_state(d: int, d_ff: int, kv: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A gqa block's trainable tensors at these sizes (the frozen up-projection is not stored)."""
    shapes = {
        "attn_norm.weight": (d,),
        "attn.q_proj.weight": (d, d),
        "attn.k_proj.weight": (kv, d),
        "attn.v_proj.weight": (kv, d),
        "attn.o_proj.weight": (d, d),
        "mlp_norm.weight": (d,),
        "mlp.gate.weight": (d_ff, d),
        "mlp.down.weight": (d, d_ff),
    }
    return {n: torch.randn(s, dtype=torch.float32).to(dtype) for n, s in shapes.items()}


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def raw(folder: Path, n: int) -> tuple[float, float]:
    """(seconds to write n bytes with tofile + fsync, seconds to sha256 that file from the page cache)."""
    path = folder / "raw.bin"
    write = raw_write(path, np.random.default_rng(0).integers(0, 255, n, dtype=np.uint8))
    t0 = time.perf_counter()
    sha256_file(path)
    hashed = time.perf_counter() - t0
    path.unlink()
    return write, hashed


def timed(what: str, n: int, seconds: float, reference: tuple[float, float]) -> dict:
    write, hashed = reference
    row = {
        "file": what,
        "gb": n / 1e9,
        "seconds": seconds,
        "gb_per_s": n / 1e9 / seconds,
        "raw_write_s": write,
        "sha256_s": hashed,
        "vs_raw_write_then_hash": (write + hashed) / seconds,
    }
    print(
        f"{what:28s} {n / 1e9:6.2f} GB  {seconds:6.2f} s ({row['gb_per_s']:.2f} GB/s)   raw write {write:5.2f} s"
        f" + sha256 {hashed:5.2f} s = {write + hashed:5.2f} s"
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the files go (the disk measured)")
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--d-ff", type=int, default=14336)
    ap.add_argument("--kv", type=int, default=1024, help="rows of the k and v projections (n_kv_heads x head_dim)")
    ap.add_argument("--vocab", type=int, default=128000)
    ap.add_argument("--layers", type=int, default=4, help="blocks of the fp32 model folder")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="stackwise-save-", dir=args.dir))
    rows = []
    try:
        d, ff, kv = args.d_model, args.d_ff, args.kv
        embed = {"weight": torch.randn(args.vocab, d).to(torch.bfloat16)}
        layer = LayerWeights(
            block=block_state(d, ff, kv, torch.bfloat16),
            frozen_sha256="0" * 64,
            head={"norm.weight": torch.ones(d, dtype=torch.bfloat16)},
            embed=embed,
        )
        layer_bytes = nbytes(layer.block) + nbytes(embed) + nbytes(layer.head)
        model = {"embed.weight": embed["weight"].float(), "head.norm.weight": torch.ones(d)}
        for i in range(args.layers):
            model.update({f"blocks.{i}.{n}": t for n, t in block_state(d, ff, kv, torch.float32).items()})
        model_bytes = nbytes(model)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            save_layer_checkpoint(work / "layers" / "layer_1.pt", layer, {"stage": "embed"})
            rows.append(timed("layer_1.pt (bf16)", layer_bytes, time.perf_counter() - t0, raw(work, layer_bytes)))
            t0 = time.perf_counter()
            save_safetensors_model(work / "finetuned", model, {"d_model": d}, {"finetuned": True})
            rows.append(timed("fused/finetuned/ (fp32)", model_bytes, time.perf_counter() - t0, raw(work, model_bytes)))
            shutil.rmtree(work / "layers")
            shutil.rmtree(work / "finetuned")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
