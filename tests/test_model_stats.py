"""Parameter counts against closed forms (meta device, no allocation) and training-step FLOPs."""

from __future__ import annotations

import resource
import sys
import time

import pytest

from stackwise.errors import ConfigError
from stackwise.model.config import ModelConfig
from stackwise.model.stats import param_counts, train_step_flops
from stackwise.model.transformer import Transformer


def gqa_layer(D: int, H: int, Hkv: int, d_ff: int) -> tuple[int, int]:
    """(total, frozen) parameters of one Llama layer: q, k, v, o + gate, up, down + two norms; up is frozen."""
    hd = D // H
    attn = D * H * hd + 2 * D * Hkv * hd + H * hd * D
    mlp = 3 * D * d_ff
    return attn + mlp + 2 * D, D * d_ff


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------- param_counts
def test_seed_config_counts():
    # The SRD's seed model: tied embeddings, gqa everywhere.
    cfg = ModelConfig(
        vocab_size=128000, d_model=4096, n_layers=8, n_heads=32, n_kv_heads=8, d_ff=14336, attention="gqa"
    )
    V, D, L = 128000, 4096, 8
    layer, frozen = gqa_layer(D, 32, 8, 14336)
    assert layer == 218_112_000 and frozen == 58_720_256
    counts = param_counts(cfg)
    assert counts["embed"] == {"total": V * D, "trainable": V * D, "frozen": 0}
    assert counts["head"] == {"total": D, "trainable": D, "frozen": 0}  # tied: only the final norm
    for k in range(1, L + 1):
        assert counts[f"layer_{k}"] == {"total": layer, "trainable": layer - frozen, "frozen": frozen}
    assert counts["total"] == V * D + L * layer + D == 2_269_188_096
    assert counts["frozen"] == L * frozen == 469_762_048
    assert counts["trainable"] == counts["total"] - counts["frozen"]


def test_llama3_70b_counts_without_allocating():
    cfg = ModelConfig(
        vocab_size=128256,
        d_model=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        d_ff=28672,
        attention="gqa",
        tie_embeddings=False,
        rope_theta=500000.0,
    )
    rss, start = _max_rss_bytes(), time.perf_counter()
    counts = param_counts(cfg)
    assert time.perf_counter() - start < 10
    assert _max_rss_bytes() - rss < 512 * 2**20  # the weights alone would be 282 GB in fp32
    V, D, L = 128256, 8192, 80
    layer, _frozen = gqa_layer(D, 64, 8, 28672)
    # embeddings + untied head matrix + final norm + 80 layers
    assert counts["total"] == V * D + (D * V + D) + L * layer == 70_553_706_496
    assert counts["head"]["total"] == D * V + D
    assert counts["frozen"] == L * D * 28672


def test_mla_layer_counts_and_frozen_latent_ups():
    D, H, rq, rkv, r, nope, dv, d_ff = 64, 4, 32, 16, 8, 16, 16, 128
    kw = dict(
        vocab_size=64,
        d_model=D,
        n_layers=2,
        n_heads=H,
        d_ff=d_ff,
        attention="mla",
        mla_rq=rq,
        mla_rkv=rkv,
        qk_rope_head_dim=r,
        qk_nope_head_dim=nope,
        v_head_dim=dv,
        mask_id=62,
        pad_id=63,
    )
    q_b, kv_b = rq * H * (nope + r), rkv * H * (nope + dv)
    attn = D * rq + rq + q_b + D * (rkv + r) + rkv + kv_b + H * dv * D
    layer = attn + 3 * D * d_ff + 2 * D
    trainable_ups = param_counts(ModelConfig(**kw, mla_freeze_up=False))
    frozen_ups = param_counts(ModelConfig(**kw, mla_freeze_up=True))
    assert trainable_ups["layer_1"] == {"total": layer, "trainable": layer - D * d_ff, "frozen": D * d_ff}
    assert frozen_ups["layer_1"]["frozen"] == D * d_ff + q_b + kv_b
    assert frozen_ups["total"] == trainable_ups["total"]


@pytest.mark.parametrize("attention", ["mha", "gqa", ["gqa", "mla"]], ids=["mha", "gqa", "mixed"])
def test_counts_match_a_real_model(attention):
    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        attention=attention,
        mla_rq=16,
        mla_rkv=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=8,
        tie_embeddings=False,
        mask_id=62,
        pad_id=63,
    )
    model = Transformer(cfg)
    counts = param_counts(cfg)
    # the frozen tensors are the model's only buffers
    assert counts["total"] == sum(t.numel() for t in [*model.parameters(), *model.buffers()])
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["layer_2"]["total"] == sum(
        t.numel() for t in [*model.blocks[1].parameters(), *model.blocks[1].buffers()]
    )


# ---------------------------------------------------------------------------- train_step_flops
TINY = dict(
    vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, attention="gqa", mask_id=62, pad_id=63
)
Bs, T, RATE = 4, 16, 0.5


def tiny_flops_parts(cfg: ModelConfig):
    """Closed form for the TINY gqa config: layer matmuls 2 N W, frozen matmuls 2 N Wf, attention core A, head forward."""
    N, D, hd = Bs * T, cfg.d_model, cfg.head_dim
    W = 2 * D * D + 2 * D * cfg.n_kv_heads * hd + 3 * D * cfg.d_ff
    A = 2 * Bs * T * T * cfg.n_heads * (hd + hd)
    head = 2 * RATE * N * D * cfg.vocab_size
    return 2 * N * W, 2 * N * D * cfg.d_ff, A, head


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_flops_closed_form(tie):
    cfg = ModelConfig(**TINY, tie_embeddings=tie)
    matmul, frozen, A, head = tiny_flops_parts(cfg)
    # a trained layer: forward, input gradients (both operands of QK^T and PV), weight gradients of trainable weights
    layer = (matmul + A) + (matmul + 2 * A) + (matmul - frozen)
    head_bwd_weight = 0 if tie else head  # tied: the embedding matrix trains in stage 1 only
    assert train_step_flops(cfg, "layer", 2, Bs, T, RATE) == int(layer + 2 * head + head_bwd_weight)
    assert train_step_flops(cfg, "embed", 1, Bs, T, RATE) == int(layer + 3 * head)
    assert train_step_flops(cfg, "e2e", 1, Bs, T, RATE) == int(3 * layer + 3 * head)
    assert train_step_flops(cfg, "fusion", 1, Bs, T, RATE) == train_step_flops(cfg, "e2e", 1, Bs, T, RATE)


def test_flops_sanity():
    cfg = ModelConfig(**TINY)
    matmul, frozen, A, head = tiny_flops_parts(cfg)
    layer_stage = train_step_flops(cfg, "layer", 3, Bs, T, RATE)
    assert layer_stage < train_step_flops(cfg, "e2e", 3, Bs, T, RATE)
    # frozen up: no weight gradient, so less than the usual 3x forward of an all-trainable layer
    all_trainable = 3 * (matmul + A) + 3 * head
    assert layer_stage == all_trainable - frozen - head < all_trainable
    # the head only runs on supervised positions
    assert train_step_flops(cfg, "layer", 3, Bs, T, 1.0) - layer_stage == 2 * head
    untied = ModelConfig(**TINY, tie_embeddings=False)
    assert train_step_flops(untied, "layer", 3, Bs, T, RATE) > layer_stage


def test_flops_fewer_with_frozen_mla_ups():
    kw = dict(TINY, attention="mla", mla_rq=16, mla_rkv=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)
    frozen = train_step_flops(ModelConfig(**kw, mla_freeze_up=True), "layer", 2, Bs, T, RATE)
    trainable = train_step_flops(ModelConfig(**kw, mla_freeze_up=False), "layer", 2, Bs, T, RATE)
    q_b, kv_b = 16 * 4 * (8 + 4), 8 * 4 * (8 + 8)
    assert trainable - frozen == 2 * Bs * T * (q_b + kv_b)


def test_flops_of_a_70b_layer_stage_are_computed_without_allocating():
    cfg = ModelConfig(
        vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672, tie_embeddings=False
    )
    assert train_step_flops(cfg, "layer", 40, 1, 4096, 0.5) < train_step_flops(cfg, "e2e", 40, 1, 4096, 0.5)


def test_flops_reject_bad_stage_and_k():
    cfg = ModelConfig(**TINY)
    with pytest.raises(ConfigError, match="stage"):
        train_step_flops(cfg, "pretrain", 1, Bs, T, RATE)
    with pytest.raises(ConfigError, match="k=4"):
        train_step_flops(cfg, "layer", 4, Bs, T, RATE)
