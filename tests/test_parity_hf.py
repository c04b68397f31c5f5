"""Numerical parity with Hugging Face transformers (CPU, fp32): same weights in, same numbers out.

Llama (mha, gqa) is compared end to end through LlamaForCausalLM (causal, as Llama is) and per
attention module in both masking modes; MLA against DeepseekV3Attention and a dense
DeepseekV3ForCausalLM, with `rope_interleave=False` so DeepSeek uses the rotate-half RoPE we use.
"""

from __future__ import annotations

import pytest
import torch

from stackwise.model.config import ModelConfig
from stackwise.model.transformer import Block, Transformer

transformers = pytest.importorskip("transformers")
llama = pytest.importorskip("transformers.models.llama.modeling_llama")

TOL = dict(atol=1e-5, rtol=1e-5)
B, T = 2, 24


def tiny(**kw) -> ModelConfig:
    base = dict(
        vocab_size=96,
        d_model=48,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=80,
        mla_rq=24,
        mla_rkv=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=12,
        v_head_dim=10,
        rope_theta=500000.0,
        norm_eps=1e-6,
        mask_id=94,
        pad_id=95,
        seed=3,
    )
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def ids_for(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))


def causal_additive_mask() -> torch.Tensor:
    """The (1, 1, T, T) float mask HF's eager attention adds to its scores."""
    return torch.full((T, T), torch.finfo(torch.float32).min).triu(1)[None, None]


def llama_config(cfg: ModelConfig):
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads if cfg.kind(1) == "mha" else cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        max_position_embeddings=T,
        attn_implementation="eager",
    )


def block_to_hf(prefix: str, block: Block) -> dict[str, torch.Tensor]:
    """Our block's tensors under Hugging Face's names (Llama and DeepSeek-V3 decoder layers alike)."""
    names = {
        "attn_norm.weight": "input_layernorm.weight",
        "mlp_norm.weight": "post_attention_layernorm.weight",
        "mlp.gate.weight": "mlp.gate_proj.weight",
        "mlp.up": "mlp.up_proj.weight",
        "mlp.down.weight": "mlp.down_proj.weight",
    }
    names.update({f"attn.{n}": f"self_attn.{hf}" for n, hf in ATTN_NAMES.items()})
    return {prefix + names[n]: t for n, t in {**block.state_dict(), **block.frozen_tensors()}.items()}


ATTN_NAMES = {
    # Llama
    "q_proj.weight": "q_proj.weight",
    "k_proj.weight": "k_proj.weight",
    "v_proj.weight": "v_proj.weight",
    "o_proj.weight": "o_proj.weight",
    # DeepSeek-V3 MLA
    "q_a.weight": "q_a_proj.weight",
    "q_a_norm.weight": "q_a_layernorm.weight",
    "q_b.weight": "q_b_proj.weight",
    "kv_a.weight": "kv_a_proj_with_mqa.weight",
    "kv_a_norm.weight": "kv_a_layernorm.weight",
    "kv_b.weight": "kv_b_proj.weight",
}


def model_to_hf(model: Transformer) -> dict[str, torch.Tensor]:
    sd = {
        "model.embed_tokens.weight": model.embed.weight.detach(),
        "model.norm.weight": model.head.norm.weight.detach(),
    }
    for i, block in enumerate(model.blocks):
        sd.update(block_to_hf(f"model.layers.{i}.", block))
    sd["lm_head.weight"] = model.embed.weight.detach() if model.head.proj is None else model.head.proj.weight.detach()
    return sd


def load_exactly(hf_module: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load every HF tensor from `sd`; no HF tensor may keep its own init (buffers aside)."""
    hf_params = set(dict(hf_module.named_parameters(remove_duplicate=False)))
    assert hf_params <= set(sd), sorted(hf_params - set(sd))
    hf_module.load_state_dict({n: t for n, t in sd.items() if n in hf_module.state_dict()}, strict=False)
    for n, p in hf_module.named_parameters(remove_duplicate=False):
        assert torch.equal(p, sd[n]), n


# ---------------------------------------------------------------------------- Llama
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_llama_for_causal_lm_logits(kind, tie):
    cfg = tiny(attention=kind, causal=True, tie_embeddings=tie)
    ours = Transformer(cfg).eval()
    hf = llama.LlamaForCausalLM(llama_config(cfg)).eval()
    load_exactly(hf, model_to_hf(ours))
    ids = ids_for(cfg)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, **TOL)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_llama_attention_module(kind, causal):
    cfg = tiny(attention=kind, causal=causal)
    block = Block(cfg, 1).eval()
    hf_cfg = llama_config(cfg)
    hf = llama.LlamaAttention(hf_cfg, layer_idx=0).eval()
    load_exactly(
        hf, {n[len("self_attn.") :]: t for n, t in block_to_hf("", block).items() if n.startswith("self_attn.")}
    )
    x = torch.randn(B, T, cfg.d_model, generator=torch.Generator().manual_seed(1))
    cos_sin = llama.LlamaRotaryEmbedding(config=hf_cfg)(x, torch.arange(T)[None])
    with torch.no_grad():
        expected = hf(
            hidden_states=x, position_embeddings=cos_sin, attention_mask=causal_additive_mask() if causal else None
        )[0]
        torch.testing.assert_close(block.attn(x), expected, **TOL)


# ---------------------------------------------------------------------------- DeepSeek-V3 MLA
def deepseek_v3():
    ds = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    if not hasattr(transformers.DeepseekV3Config(), "rope_interleave"):
        pytest.skip("this transformers' DeepSeek-V3 always uses interleaved RoPE")
    return ds


def deepseek_config(cfg: ModelConfig):
    return transformers.DeepseekV3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        first_k_dense_replace=cfg.n_layers,  # dense MLPs only, no MoE
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        q_lora_rank=cfg.mla_rq,
        kv_lora_rank=cfg.mla_rkv,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        v_head_dim=cfg.v_head_dim,
        rope_theta=cfg.rope_theta,
        rope_interleave=False,  # rotate-half, as Llama and we do
        rms_norm_eps=cfg.norm_eps,  # HF's latent norms use their default 1e-6: hence norm_eps=1e-6 in tiny()
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        max_position_embeddings=T,
        attn_implementation="eager",
    )


@pytest.mark.parametrize("freeze", [False, True], ids=["trainable_up", "frozen_up"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_deepseek_v3_attention_module(causal, freeze):
    ds = deepseek_v3()
    cfg = tiny(attention="mla", causal=causal, mla_freeze_up=freeze)
    block = Block(cfg, 1).eval()
    hf_cfg = deepseek_config(cfg)
    hf = ds.DeepseekV3Attention(hf_cfg, layer_idx=0).eval()
    load_exactly(
        hf, {n[len("self_attn.") :]: t for n, t in block_to_hf("", block).items() if n.startswith("self_attn.")}
    )
    x = torch.randn(B, T, cfg.d_model, generator=torch.Generator().manual_seed(1))
    cos_sin = ds.DeepseekV3RotaryEmbedding(config=hf_cfg)(x, torch.arange(T)[None])
    with torch.no_grad():
        expected = hf(
            hidden_states=x, position_embeddings=cos_sin, attention_mask=causal_additive_mask() if causal else None
        )[0]
        torch.testing.assert_close(block.attn(x), expected, **TOL)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_deepseek_v3_for_causal_lm_logits(tie):
    ds = deepseek_v3()
    cfg = tiny(attention="mla", causal=True, tie_embeddings=tie)
    ours = Transformer(cfg).eval()
    hf = ds.DeepseekV3ForCausalLM(deepseek_config(cfg)).eval()
    load_exactly(hf, model_to_hf(ours))
    ids = ids_for(cfg)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, **TOL)
