"""Parameter counts and training FLOPs, from the model's own modules built on the meta device.

Nothing here allocates weights, so a 70B config is counted in milliseconds.
"""

from __future__ import annotations

import torch
from torch import nn

from stackwise.errors import ConfigError
from stackwise.model.config import ModelConfig
from stackwise.model.transformer import Block, Transformer

STAGES = ("embed", "layer", "e2e", "fusion")


def _frozen(module: nn.Module) -> list[torch.Tensor]:
    """The frozen tensors under `module`: buffers of its blocks, not parameters (see layers.py)."""
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    return [t for b in blocks for t in b.frozen_tensors().values()]


def _count(module: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    frozen += sum(t.numel() for t in _frozen(module))
    return {"total": trainable + frozen, "trainable": trainable, "frozen": frozen}


def param_counts(cfg: ModelConfig) -> dict:
    """{"total", "trainable", "frozen"} overall, plus the same three per part under "embed",
    "layer_1" ... "layer_L" and "head" (a tied head holds only its norm; the matrix counts once,
    under "embed"). "frozen" are the tensors that never train (SwiGLU up, MLA q_b/kv_b if frozen)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    parts = {"embed": model.embed, **{f"layer_{k}": b for k, b in enumerate(model.blocks, 1)}, "head": model.head}
    counts: dict = {name: _count(m) for name, m in parts.items()}
    overall = {key: sum(counts[name][key] for name in parts) for key in ("total", "trainable", "frozen")}
    return {**overall, **counts}


def _layer_flops(cfg: ModelConfig, k: int, batch_size: int, seq_len: int) -> tuple[int, int, int]:
    """(forward matmul FLOPs, FLOPs through frozen weights, attention-core FLOPs) of layer k."""
    with torch.device("meta"):
        block = Block(cfg, k)
    n = batch_size * seq_len
    frozen_weights = sum(t.numel() for t in block.frozen_tensors().values())
    weights = sum(p.numel() for p in block.parameters() if p.ndim == 2) + frozen_weights
    if cfg.kind(k) == "mla":
        qk_dim, v_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        qk_dim = v_dim = cfg.head_dim
    attn_core = 2 * batch_size * seq_len * seq_len * cfg.n_heads * (qk_dim + v_dim)
    return 2 * n * weights, 2 * n * frozen_weights, attn_core


def train_step_flops(
    cfg: ModelConfig, stage: str, k: int, batch_size: int, seq_len: int, mask_rate: float, top_layers: int = 0
) -> int:
    """Matmul FLOPs of one training step of `stage` (a multiply-add is 2 FLOPs); a layer-wise stage
    also runs and trains the top segment's `top_layers` blocks (layerwise.top_layers).

    With N = batch_size * seq_len tokens, for a layer whose matmul weights number W (Wf of them frozen)
    and whose attention core (scores QK^T and the weighted sum PV, over the full T x T) costs
    A = 2 * B * T^2 * n_heads * (d_qk + d_v):
        forward   F_layer = 2 N W + A
        backward  B_layer = 2 N W  (input gradients)  + 2 N (W - Wf)  (weight gradients: none for frozen)  + 2 A
    Input gradients run through every matmul of a trained layer, even on a cached input, because its
    RMSNorm weights train. With M = mask_rate * N supervised positions (the head runs only there):
        forward   F_head = 2 M D V
        backward  B_head = 2 M D V (input gradient) + 2 M D V if the head matrix trains in this stage
    Stages: "embed" trains layer 1 and the head matrix (tied or not); "layer" trains layer k, and the
    head matrix only when untied (layers below k are not run: their output is cached); "e2e" and
    "fusion" (joint fine-tune) train every layer and the head. Norms, softmax, elementwise ops and
    the embedding gather are not counted.
    """
    if stage not in STAGES:
        raise ConfigError("stage", f"unknown stage {stage!r}; allowed: {', '.join(STAGES)}")
    if stage == "layer" and not 1 <= k <= cfg.n_layers:
        raise ConfigError("k", f"layer index k={k} must be in 1..{cfg.n_layers}")
    layers = {"embed": [1], "layer": [k]}.get(stage, range(1, cfg.n_layers + 1))
    if stage in ("embed", "layer"):  # the top segment (layerwise.top_layers) trains beside the stage's layer
        layers = [*layers, *range(cfg.n_layers - top_layers + 1, cfg.n_layers + 1)]
    head_trains = stage != "layer" or not cfg.tie_embeddings

    flops = 0
    for layer in layers:
        matmul, frozen, attn_core = _layer_flops(cfg, layer, batch_size, seq_len)
        flops += (matmul + attn_core) + (matmul + (matmul - frozen) + 2 * attn_core)
    head = 2 * mask_rate * batch_size * seq_len * cfg.d_model * cfg.vocab_size
    flops += head + head + (head if head_trains else 0)
    return round(flops)
