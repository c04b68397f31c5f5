"""Numerical parity with Hugging Face transformers (CPU, fp32): same weights in, same numbers out.

Whole models (Llama for mha and gqa, DeepSeek-V3 for mla) are compared in the three ways our model
attends: causal, bidirectional (our default: a 4-D all-visible mask makes HF's model non-causal) and
bidirectional with padding (a 4-D mask hiding the pad keys; only non-pad positions are compared).
A hybrid gqa + mla stack is compared layer by layer against HF decoder layers of the matching kind,
and each attention module on its own. The HF configs and tensor names come from the package's adapter
(stackwise/hf/adapter.py): DeepSeek-V3 runs with `rope_interleave=False`, the rotate-half RoPE we use,
and our default norm_eps 1e-5 is kept: the adapter folds it into the MLA latent down-projections, as
DeepSeek-V3's latent norms have a fixed 1e-6. `transformers` is a dev dependency (pyproject.toml):
without it these tests fail.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds
from transformers.models.llama import modeling_llama as llama

from stackwise.hf import StateDictAdapter, full_state_dict
from stackwise.model.config import ModelConfig
from stackwise.model.transformer import Block, Transformer

TOL = dict(atol=1e-5, rtol=1e-5)
B, T = 2, 24
MODES = ["causal", "bidir", "bidir_padded"]


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
        mask_id=94,
        pad_id=95,
        seed=3,
    )
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def ids_for(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size - 2, (B, T), generator=torch.Generator().manual_seed(0))


def pad_mask_for() -> torch.Tensor:
    """(B, T) True at padding: the first row padded on the right, the second on the left."""
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, -7:] = True
    pad[1, :3] = True
    return pad


def causal_additive_mask() -> torch.Tensor:
    """The (1, 1, T, T) float mask HF's eager attention adds to its scores."""
    return torch.full((T, T), torch.finfo(torch.float32).min).triu(1)[None, None]


def key_padding_additive_mask(pad: torch.Tensor | None) -> torch.Tensor:
    """(B, 1, T, T): every query reads every key but the pad keys. A 4-D mask goes into HF's model as
    it is, so the model is not causal; all zeros (pad=None) is plain bidirectional attention."""
    if pad is None:
        return torch.zeros(B, 1, T, T)
    hide = torch.where(pad, torch.finfo(torch.float32).min, 0.0)  # (B, T)
    return hide[:, None, None, :].expand(B, 1, T, T).clone()


def mode_inputs(cfg: ModelConfig, mode: str):
    """(ids, our pad_mask, HF attention_mask, positions compared (B, T) bool) for one masking mode."""
    ids = ids_for(cfg)
    if mode == "causal":
        return ids, None, None, torch.ones(B, T, dtype=torch.bool)
    pad = pad_mask_for() if mode == "bidir_padded" else None
    if pad is not None:
        ids = ids.masked_fill(pad, cfg.pad_id)
    keep = torch.ones(B, T, dtype=torch.bool) if pad is None else ~pad
    return ids, pad, key_padding_additive_mask(pad), keep


def llama_config(cfg: ModelConfig, kind: str | None = None):
    return StateDictAdapter(cfg).hf_config(kind, max_position_embeddings=T, attn_implementation="eager")


def deepseek_config(cfg: ModelConfig):
    return StateDictAdapter(cfg).hf_config("mla", max_position_embeddings=T, attn_implementation="eager")


def block_to_hf(prefix: str, block: Block) -> dict[str, torch.Tensor]:
    """Our block's tensors under Hugging Face's names (Llama and DeepSeek-V3 decoder layers alike),
    through the package's adapter. Frozen tensors are included (they are buffers); `load_exactly`
    then checks that every HF weight got one of ours."""
    ours = {**block.frozen_tensors(), **block.state_dict()}
    return {prefix + n: t for n, t in StateDictAdapter(block.cfg).layer_to_hf(block.k, ours).items()}


def model_to_hf(model: Transformer) -> dict[str, torch.Tensor]:
    sd = StateDictAdapter(model.cfg).to_hf(full_state_dict(model))
    if model.cfg.tie_embeddings:  # HF's tied lm_head is a parameter too; save_pretrained leaves it out
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def load_exactly(hf_module: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load every HF tensor from `sd`; no HF tensor may keep its own init (buffers aside)."""
    hf_params = set(dict(hf_module.named_parameters(remove_duplicate=False)))
    assert hf_params <= set(sd), sorted(hf_params - set(sd))
    hf_module.load_state_dict({n: t for n, t in sd.items() if n in hf_module.state_dict()}, strict=False)
    for n, p in hf_module.named_parameters(remove_duplicate=False):
        assert torch.equal(p, sd[n]), n


def attn_only(block: Block) -> dict[str, torch.Tensor]:
    return {n[len("self_attn.") :]: t for n, t in block_to_hf("", block).items() if n.startswith("self_attn.")}


def layer_output(out) -> torch.Tensor:
    """A HF decoder layer returns its hidden states, or (in older transformers) a tuple starting with them."""
    return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("mode, tie", [(m, True) for m in MODES] + [("causal", False)], ids=[*MODES, "causal-untied"])
@pytest.mark.parametrize("kind", ["mha", "gqa", "mla"])
def test_whole_model_logits(kind, mode, tie):
    cfg = tiny(attention=kind, causal=mode == "causal", tie_embeddings=tie)
    ours = Transformer(cfg).eval()
    if kind == "mla":
        hf = ds.DeepseekV3ForCausalLM(deepseek_config(cfg)).eval()
    else:
        hf = llama.LlamaForCausalLM(llama_config(cfg)).eval()
    load_exactly(hf, model_to_hf(ours))
    ids, pad, hf_mask, keep = mode_inputs(cfg, mode)
    with torch.no_grad():
        got, want = ours(ids, pad_mask=pad), hf(input_ids=ids, attention_mask=hf_mask).logits
    torch.testing.assert_close(got[keep], want[keep], **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_hybrid_gqa_mla_stack_layer_by_layer(mode):
    """A 3-layer gqa, mla, gqa stack: after every layer our hidden state equals the one HF's Llama
    (gqa) and DeepSeek-V3 (mla) decoder layers give on the same input; then the logits."""
    cfg = tiny(attention=["gqa", "mla", "gqa"], n_layers=3, causal=mode == "causal", tie_embeddings=False)
    ours = Transformer(cfg).eval()
    ll_cfg, ds_cfg = llama_config(cfg, "gqa"), deepseek_config(cfg)
    ids, pad, hf_mask, keep = mode_inputs(cfg, mode)
    hf_mask = causal_additive_mask() if mode == "causal" else hf_mask
    positions = torch.arange(T)[None]
    x = ours.embed_tokens(ids)
    rope = {
        "gqa": llama.LlamaRotaryEmbedding(config=ll_cfg)(x, positions),
        "mla": ds.DeepseekV3RotaryEmbedding(config=ds_cfg)(x, positions),
    }
    h_ours = h_hf = x
    with torch.no_grad():
        for k, block in enumerate(ours.blocks, 1):
            kind = cfg.kind(k)
            layer = (
                llama.LlamaDecoderLayer(ll_cfg, layer_idx=k - 1)
                if kind == "gqa"
                else ds.DeepseekV3DecoderLayer(ds_cfg, layer_idx=k - 1)
            ).eval()
            load_exactly(layer, block_to_hf("", block))
            h_ours = block(h_ours, pad_mask=pad)
            h_hf = layer_output(layer(h_hf, attention_mask=hf_mask, position_embeddings=rope[kind]))
            torch.testing.assert_close(h_ours[keep], h_hf[keep], **TOL, msg=lambda m, k=k: f"layer {k}: {m}")
        norm = llama.LlamaRMSNorm(cfg.d_model, eps=cfg.norm_eps)
        norm.weight.copy_(ours.head.norm.weight)
        want = torch.nn.functional.linear(norm(h_hf), ours.head.proj.weight)
        torch.testing.assert_close(ours.logits(h_ours)[keep], want[keep], **TOL)
    assert [cfg.kind(k) for k in (1, 2, 3)] == ["gqa", "mla", "gqa"]


# ---------------------------------------------------------------------------- single attention modules
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_llama_attention_module(kind, causal):
    cfg = tiny(attention=kind, causal=causal)
    block = Block(cfg, 1).eval()
    hf_cfg = llama_config(cfg)
    hf = llama.LlamaAttention(hf_cfg, layer_idx=0).eval()
    load_exactly(hf, attn_only(block))
    x = torch.randn(B, T, cfg.d_model, generator=torch.Generator().manual_seed(1))
    cos_sin = llama.LlamaRotaryEmbedding(config=hf_cfg)(x, torch.arange(T)[None])
    with torch.no_grad():
        expected = hf(
            hidden_states=x, position_embeddings=cos_sin, attention_mask=causal_additive_mask() if causal else None
        )[0]
        torch.testing.assert_close(block.attn(x), expected, **TOL)


@pytest.mark.parametrize("freeze", [False, True], ids=["trainable_up", "frozen_up"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_deepseek_v3_attention_module(causal, freeze):
    cfg = tiny(attention="mla", causal=causal, mla_freeze_up=freeze)
    block = Block(cfg, 1).eval()
    hf_cfg = deepseek_config(cfg)
    hf = ds.DeepseekV3Attention(hf_cfg, layer_idx=0).eval()
    load_exactly(hf, attn_only(block))
    x = torch.randn(B, T, cfg.d_model, generator=torch.Generator().manual_seed(1))
    cos_sin = ds.DeepseekV3RotaryEmbedding(config=hf_cfg)(x, torch.arange(T)[None])
    with torch.no_grad():
        expected = hf(
            hidden_states=x, position_embeddings=cos_sin, attention_mask=causal_additive_mask() if causal else None
        )[0]
        torch.testing.assert_close(block.attn(x), expected, **TOL)
