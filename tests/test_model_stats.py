"""Parameter counts against closed forms (meta device, no allocation); training-step FLOPs against
torch's own FLOP counter run on a real stage step."""

from __future__ import annotations

import resource
import sys
import time

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from stackwise.config import OptimConfig
from stackwise.errors import ConfigError
from stackwise.model.config import ModelConfig
from stackwise.model.stats import param_counts, train_step_flops
from stackwise.model.transformer import Block, Head, Transformer
from stackwise.model.weights import LayerModules, first_layer
from stackwise.stages.base import StageModule
from stackwise.stages.full import FullModelStage
from stackwise.stages.layerwise import LayerwiseStage


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
    # The seed model (conf/model/seed.yaml): tied embeddings, gqa everywhere.
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
    vocab_size=64,
    d_model=32,
    n_layers=3,
    n_heads=4,
    n_kv_heads=2,
    d_ff=64,
    mla_rq=16,
    mla_rkv=8,
    qk_rope_head_dim=4,
    qk_nope_head_dim=8,
    v_head_dim=8,
    mask_id=62,
    pad_id=63,
)
Bs, T, RATE = 4, 16, 0.375  # 6 of the 16 positions of every sequence are masked


def stage_batch(cfg: ModelConfig) -> dict:
    """A batch as the stages read it, with exactly RATE * T masked positions per sequence."""
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, cfg.vocab_size - 2, (Bs, T), generator=g)
    mask = torch.zeros(Bs, T, dtype=torch.bool)
    for row in mask:
        row[torch.randperm(T, generator=g)[: round(RATE * T)]] = True
    return {
        "ids": targets.masked_fill(mask, cfg.mask_id),  # token stages
        "hidden": torch.randn(Bs, T, cfg.d_model, generator=g),  # layer stages: the cached activations
        "targets": targets,
        "mask": mask,
        "t": torch.full((Bs,), RATE),
    }


def counted_train_step_flops(module: StageModule, batch: dict) -> int:
    """Matmul FLOPs torch itself counts in one training step (loss forward + backward) of a real stage.

    SDPA runs on its math backend: the fused CPU attention kernel is not in FlopCounterMode's table,
    the math one is made of the bmm it counts."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module.compute_loss(batch).loss.backward()
    return counter.get_total_flops()


ATTENTIONS = {
    "gqa": dict(attention="gqa"),
    "mha": dict(attention="mha"),
    "mla": dict(attention="mla"),
    "mla_frozen_ups": dict(attention="mla", mla_freeze_up=True),
    "hybrid": dict(attention=["gqa", "mla", "gqa"], mla_freeze_up=True),
}


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("attention", list(ATTENTIONS))
def test_flops_equal_what_torch_counts_in_a_stage_step(attention, tie):
    """train_step_flops against torch.utils.flop_counter on each stage's own module: forward and
    backward matmuls, no weight gradient for frozen tensors (SwiGLU up, frozen MLA ups, the tied
    matrix after stage 1), the head only at masked positions."""
    cfg = ModelConfig(**TINY, **ATTENTIONS[attention], tie_embeddings=tie)
    optim, batch = OptimConfig(), stage_batch(cfg)
    embed = LayerwiseStage(cfg, first_layer(cfg), optim, "mean", 10, "embed")
    cases = {("embed", 1): embed, ("e2e", 1): FullModelStage(cfg, optim, "mean", 10, "e2e")}
    cases[("fusion", 1)] = FullModelStage(cfg, optim, "mean", 10, "fusion")
    for k in (2, 3):
        tied_matrix = embed.embed.weight.detach() if tie else None
        layer = LayerModules(Block(cfg, k), Head(cfg))
        cases[("layer", k)] = LayerwiseStage(cfg, layer, optim, "mean", 10, f"layer_{k}", embed_weight=tied_matrix)
    for (stage, k), module in cases.items():
        assert train_step_flops(cfg, stage, k, Bs, T, RATE) == counted_train_step_flops(module, batch), (stage, k)


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
