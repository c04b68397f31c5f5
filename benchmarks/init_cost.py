#!/usr/bin/env python
"""Host CPU time of building modules that are then loaded: drawing every weight first (how a model
was built before, `Transformer(cfg)` then a state dict) against building it on the meta device and
drawing only what no state dict holds (`stackwise.model.weights`, `stackwise.artifacts.load_model`).

    python benchmarks/init_cost.py                          # d_model 1024, 8 layers, vocab 32000
    python benchmarks/init_cost.py --d-model 2048 --layers 4 --untied
    python benchmarks/init_cost.py --device cuda --draw-only   # one frozen draw: numpy on the host vs the GPU

Each case is run `--repeat` times; the best CPU time (process time: every thread's) and its wall
time are printed, with the values checked equal between the two ways. With `--device`, one frozen
draw (`frozen_normal`, default the seed's up-projection, 14336 x 4096) is also timed on the host's
numpy path and on that device (wall time, best of `--repeat` after one warm-up; the device draw
alone and with its copy to the host, as a checksum reads it), checked bit-identical, with the
device memory the draw needed beyond its result. Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from stackwise import artifacts as art
from stackwise.model import layers as model_layers
from stackwise.model.config import ModelConfig
from stackwise.model.portable_rng import _torch_normal
from stackwise.model.transformer import Block, Head, Transformer, init_layer
from stackwise.model.weights import LayerModules, LayerWeights, assemble, next_layer
from stackwise.utils import derive_seed


def best(fn: Callable[[], object], repeat: int) -> tuple[float, float, object]:
    """(CPU seconds, wall seconds, result) of the run with the least CPU time."""
    runs = []
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        runs.append((time.process_time() - c0, time.perf_counter() - w0, out))
    return min(runs, key=lambda r: r[0])


def old_assemble(cfg: ModelConfig, layers: list[LayerWeights]) -> Transformer:
    model = Transformer(cfg)  # every weight drawn, then overwritten
    model.embed.load_state_dict(layers[0].embed)
    for block, weights in zip(model.blocks, layers, strict=True):
        weights.load_block(block)
    model.head.load_state_dict(layers[-1].head)
    return model


def old_next_layer(cfg: ModelConfig, below: LayerWeights) -> LayerModules:
    block, head = Block(cfg, 2), Head(cfg)
    head.load_state_dict(below.head)
    init_layer(block, "previous", below.block)
    return LayerModules(block, head)


def old_load_model(folder: Path) -> Transformer:
    state, config, _ = art.load_safetensors_model(folder)
    model = Transformer(ModelConfig.from_dict(config))
    model.load_state_dict(state)
    return model


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    ta = dict(a.named_parameters()) | dict(a.named_buffers())
    tb = dict(b.named_parameters()) | dict(b.named_buffers())
    return ta.keys() == tb.keys() and all(torch.equal(t, tb[n]) for n, t in ta.items())


def sync(device: torch.device) -> None:
    """Wait for `device`'s queued work (a GPU's kernels run asynchronously)."""
    module = getattr(torch, device.type, None)
    if device.type != "cpu" and hasattr(module, "synchronize"):
        module.synchronize()


def best_wall(fn: Callable[[], torch.Tensor], device: torch.device, repeat: int) -> tuple[float, torch.Tensor]:
    """(best wall seconds, result) of `repeat` runs after one warm-up, `device` synchronised."""
    out = fn()
    sync(device)
    runs = []
    for _ in range(repeat):
        w0 = time.perf_counter()
        out = fn()
        sync(device)
        runs.append(time.perf_counter() - w0)
    return min(runs), out


def frozen_draw(shape: tuple[int, int], device: str, repeat: int) -> None:
    """One frozen draw on the host's numpy path (its cache of recent draws bypassed) and on `device`."""
    dev, cpu = torch.device(device), torch.device("cpu")

    def on_host() -> torch.Tensor:
        model_layers._frozen_normal.cache_clear()
        return model_layers.frozen_normal(shape, 0.02, 0, "up", 1)

    def on_device() -> torch.Tensor:
        if dev.type == "cpu":  # the torch implementation, which only other devices use: for comparison
            return _torch_normal(shape, 0.02, derive_seed(0, "up", 1), dev)
        return model_layers.frozen_normal(shape, 0.02, 0, "up", 1, device=dev)

    numel = shape[0] * shape[1]
    print(f"frozen draw {shape[0]} x {shape[1]} ({numel / 1e6:.1f}M values), wall s, best of {repeat}:")
    host_s, want = best_wall(on_host, cpu, repeat)
    print(f"  {'host (numpy, ' + str(torch.get_num_threads()) + ' threads)':32} {host_s:8.3f}")
    dev_s, got = best_wall(on_device, dev, repeat)
    assert got.device.type == dev.type, f"the draw was made on {got.device}, not {dev} (out of memory?)"
    got = got.to(cpu)
    copy_s, _ = best_wall(lambda: on_device().to(cpu), dev, repeat)
    assert torch.equal(got, want), "the device draw differs from the host's"
    print(f"  {str(dev) + ' (torch int64)':32} {dev_s:8.3f}   {host_s / dev_s:.3g}x the host, bit-identical")
    print(f"  {str(dev) + ' + copy to the host':32} {copy_s:8.3f}")
    if dev.type == "cuda":  # one draw with nothing else held: its work tensors, bounded by the chunking
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        on_device()
        extra = torch.cuda.max_memory_allocated(dev) - before - 4 * numel
        print(f"  device memory beyond the result: {extra / 2**20:.0f} MiB (peak)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--untied", action="store_true")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", help="also time one frozen draw on this torch device (e.g. cuda) against numpy")
    p.add_argument("--draw-shape", type=int, nargs=2, default=(14336, 4096), metavar=("D_FF", "D_MODEL"))
    p.add_argument("--draw-only", action="store_true", help="with --device: the frozen draw only")
    args = p.parse_args()
    if args.device:
        frozen_draw(tuple(args.draw_shape), args.device, args.repeat)
        if args.draw_only:
            return
    d = args.d_model
    cfg = ModelConfig(
        vocab_size=args.vocab,
        d_model=d,
        n_layers=args.layers,
        n_heads=d // 64,
        n_kv_heads=max(1, d // 256),
        d_ff=4 * d,
        attention="gqa",
        tie_embeddings=not args.untied,
        mask_id=args.vocab - 2,
        pad_id=args.vocab - 1,
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; d_model {d}, {args.layers} layers, ", end="")
    print(f"vocab {args.vocab}, {'untied' if args.untied else 'tied'}")
    model = Transformer(cfg)
    layers = [
        LayerWeights.of(LayerModules(b, model.head, model.embed if k == 1 else None))
        for k, b in enumerate(model.blocks, 1)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        art.save_safetensors_model(tmp, model.state_dict(), cfg.to_dict(), {})
        cases = [
            ("fusion: assemble L layers", lambda: old_assemble(cfg, layers), lambda: assemble(cfg, layers)),
            (
                "stage k: next_layer(previous)",
                lambda: old_next_layer(cfg, layers[0]),
                lambda: next_layer(cfg, 2, "previous", layers[0]),
            ),
            ("readers: load_model", lambda: old_load_model(Path(tmp)), lambda: art.load_model(tmp)[0]),
        ]
        print(f"{'':32} {'before CPU s':>12} {'wall s':>8} {'now CPU s':>10} {'wall s':>8} {'saved':>7}")
        for name, before, now in cases:
            c_old, w_old, a = best(before, args.repeat)
            c_new, w_new, b = best(now, args.repeat)
            a, b = (a.block, b.block) if isinstance(a, LayerModules) else (a, b)
            assert same(a, b), f"{name}: the two ways differ"
            saved = 1 - c_new / c_old
            print(f"{name:32} {c_old:12.2f} {w_old:8.2f} {c_new:10.2f} {w_new:8.2f} {saved:7.0%}")


if __name__ == "__main__":
    main()
