#!/usr/bin/env python
"""Host CPU time of building modules that are then loaded: drawing every weight first (how a model
was built before, `Transformer(cfg)` then a state dict) against building it on the meta device and
drawing only what no state dict holds (`stackwise.model.weights`, `stackwise.artifacts.load_model`).

    python benchmarks/init_cost.py                          # d_model 1024, 8 layers, vocab 32000
    python benchmarks/init_cost.py --d-model 2048 --layers 4 --untied

Each case is run `--repeat` times; the best CPU time (process time: every thread's) and its wall
time are printed, with the values checked equal between the two ways. Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from stackwise import artifacts as art
from stackwise.model.config import ModelConfig
from stackwise.model.transformer import Block, Head, Transformer, init_layer
from stackwise.model.weights import LayerModules, LayerWeights, assemble, next_layer


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--untied", action="store_true")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
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
