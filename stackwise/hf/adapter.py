"""One mapping between StackWise's tensor names and Hugging Face transformers' (a state-dict adapter,
as torchtitan has one per model), and the transformers config of a StackWise `ModelConfig`.

    mha / gqa -> LlamaForCausalLM            mla -> DeepseekV3ForCausalLM, every layer dense (no MoE)

    StackWise (Transformer.state_dict + frozen)   transformers
    embed.weight                                  model.embed_tokens.weight
    blocks.{i}.attn_norm.weight                   model.layers.{i}.input_layernorm.weight
    blocks.{i}.attn.q_proj.weight (k, v, o)       model.layers.{i}.self_attn.q_proj.weight (k, v, o)
    blocks.{i}.attn.q_a.weight ... kv_b.weight    model.layers.{i}.self_attn.q_a_proj.weight ... kv_b_proj.weight
    blocks.{i}.mlp_norm.weight                    model.layers.{i}.post_attention_layernorm.weight
    blocks.{i}.mlp.gate.weight / up / down.weight model.layers.{i}.mlp.gate_proj / up_proj / down_proj.weight
    head.norm.weight                              model.norm.weight
    head.proj.weight (untied only)                lm_head.weight (absent when tied, as save_pretrained writes it)

`blocks.{i}` is layer i + 1, and so is `model.layers.{i}`. The frozen tensors (the SwiGLU up, MLA's
q_b / kv_b under `mla_freeze_up`) are not in `Transformer.state_dict()`: `full_state_dict` adds them,
and on the transformers side they are ordinary weights.

The numbers agree without any change but one: DeepSeek-V3's latent norms (q_a_layernorm,
kv_a_layernorm) have a fixed epsilon of 1e-6 that its config cannot set, and ours use `norm_eps`.
RMSNorm with epsilon e' of c·y equals RMSNorm with epsilon e'/c² of y, so scaling the latent's
down-projection rows by c = sqrt(1e-6 / norm_eps) makes HF's norm compute exactly ours (to float
rounding). `to_hf` scales, `from_hf` divides back. Everything else matches as it is: RoPE in the
rotate-half layout (`rope_interleave=False` for DeepSeek-V3), the same theta, RMSNorm epsilon
(`rms_norm_eps`), no biases, SDPA's scale 1/sqrt(qk_nope + qk_rope) for MLA.

tests/test_parity_hf.py holds the mapping to transformers' own modules, logits and hidden states.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from stackwise.errors import StackWiseError
from stackwise.model.config import ModelConfig
from stackwise.model.transformer import Transformer

# the epsilon transformers' DeepseekV3Attention gives its latent RMSNorms (not a config field)
DEEPSEEK_LATENT_EPS = 1e-6
HF_ARCH = {"llama": "LlamaForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}

# a decoder layer's tensors: ours -> transformers', relative to the layer
LAYER_TO_HF = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
    # Llama attention (mha, gqa); o_proj is MLA's too
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    # DeepSeek-V3 MLA
    "attn.q_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.q_b.weight": "self_attn.q_b_proj.weight",
    "attn.kv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.kv_b.weight": "self_attn.kv_b_proj.weight",
}
LAYER_FROM_HF = {hf: ours for ours, hf in LAYER_TO_HF.items()}
MODEL_TO_HF = {"embed.weight": "model.embed_tokens.weight", "head.norm.weight": "model.norm.weight"}
HEAD_TO_HF = {"head.proj.weight": "lm_head.weight"}
_OURS_LAYER = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# transformers' non-weights that older checkpoints may still carry
_HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq")


class ExportError(StackWiseError):
    """A model that transformers has no class for, or a tensor outside the mapping."""


def full_state_dict(model: Transformer) -> dict[str, Tensor]:
    """Every tensor the forward pass reads, under StackWise's names: `state_dict()` plus the frozen
    tensors it leaves out (regenerated from the seed, or stored by an imported layer)."""
    state = dict(model.state_dict())
    for i, block in enumerate(model.blocks):
        state.update({f"blocks.{i}.{name}": t for name, t in block.frozen_tensors().items()})
    return state


def layer_kinds_line(cfg: ModelConfig) -> str:
    return ", ".join(f"layer {k}: {kind}" for k, kind in enumerate(cfg.layer_kinds(), 1))


def hf_model_type(cfg: ModelConfig, kind: str | None = None) -> str:
    """`llama` (mha, gqa) or `deepseek_v3` (mla): the transformers model of `kind`, else of the whole
    model, which must then have one kind in every layer (ExportError naming each layer's otherwise)."""
    if kind is None:
        kinds = set(cfg.layer_kinds())
        if len(kinds) > 1:
            raise ExportError(
                f"the model's layers mix attention kinds ({layer_kinds_line(cfg)}): transformers has no class for a "
                f"per-layer mix (LlamaForCausalLM takes mha or gqa, DeepseekV3ForCausalLM mla, one kind in every layer)"
            )
        (kind,) = kinds
    return "deepseek_v3" if kind == "mla" else "llama"


class StateDictAdapter:
    """StackWise <-> transformers tensor names (and values, for MLA's latent epsilon) for one model config."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        # to_hf multiplies the latent down-projection rows by this (the module docstring says why)
        self.latent_scale = math.sqrt(DEEPSEEK_LATENT_EPS / cfg.norm_eps)

    # ------------------------------------------------------------------ one decoder layer
    def layer_to_hf(self, k: int, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Layer k's tensors (our names relative to the block, frozen ones included) under the names of
        a transformers decoder layer (Llama's or DeepSeek-V3's, by layer k's kind)."""
        out = {}
        for name, t in state.items():
            if name not in LAYER_TO_HF:
                raise ExportError(f"layer {k}: no transformers name for tensor {name!r}")
            out[LAYER_TO_HF[name]] = self._latent(name, t.detach(), self.latent_scale)
        return out

    def layer_from_hf(self, k: int, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The inverse of `layer_to_hf`."""
        out = {}
        for hf_name, t in state.items():
            if hf_name not in LAYER_FROM_HF:
                raise ExportError(f"layer {k}: transformers tensor {hf_name!r} has no StackWise counterpart")
            name = LAYER_FROM_HF[hf_name]
            out[name] = self._latent(name, t.detach(), 1.0 / self.latent_scale)
        return out

    def _latent(self, name: str, t: Tensor, scale: float) -> Tensor:
        if scale == 1.0 or name not in ("attn.q_a.weight", "attn.kv_a.weight"):
            return t
        t = t.clone()
        rows = t.shape[0] if name == "attn.q_a.weight" else self.cfg.mla_rkv  # kv_a: [latent | k_rope]
        t[:rows] = (t[:rows].double() * scale).to(t.dtype)
        return t

    # ------------------------------------------------------------------ whole models
    def name_to_hf(self, name: str) -> str:
        """One tensor's transformers name, from its `full_state_dict` name."""
        found = _OURS_LAYER.fullmatch(name)
        if found and found[2] in LAYER_TO_HF:
            return f"model.layers.{found[1]}.{LAYER_TO_HF[found[2]]}"
        if name in MODEL_TO_HF or name in HEAD_TO_HF:
            return {**MODEL_TO_HF, **HEAD_TO_HF}[name]
        raise ExportError(f"no transformers name for tensor {name!r}")

    def tensor_to_hf(self, name: str, t: Tensor) -> tuple[str, Tensor]:
        """One tensor of a whole model (a `full_state_dict` name) as (transformers name, value):
        what `to_hf` does to every tensor, for a writer that streams them one at a time."""
        found = _OURS_LAYER.fullmatch(name)
        return self.name_to_hf(name), self._latent(found[2] if found else name, t.detach(), self.latent_scale)

    def to_hf(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A whole model (`full_state_dict`) under transformers' names; no lm_head when tied."""
        hf_model_type(self.cfg)
        return dict(self.tensor_to_hf(name, t) for name, t in state.items())

    def from_hf(self, hf_state: Mapping[str, Tensor], n_layers: int | None = None) -> dict[str, Tensor]:
        """A transformers state dict under our names (frozen tensors included, as `full_state_dict`
        has them); only layers 1..n_layers (default: all) are kept; lm_head only when untied."""
        out: dict[str, Tensor] = {}
        layers: dict[int, dict[str, Tensor]] = {}
        from_hf = {hf: ours for ours, hf in {**MODEL_TO_HF, **HEAD_TO_HF}.items()}
        for hf_name, t in hf_state.items():
            found = _HF_LAYER.fullmatch(hf_name)
            if found:
                if n_layers is None or int(found[1]) < n_layers:
                    layers.setdefault(int(found[1]), {})[found[2]] = t
            elif hf_name in from_hf:
                if not (hf_name == "lm_head.weight" and self.cfg.tie_embeddings):
                    out[from_hf[hf_name]] = t.detach()
            elif not _HF_IGNORED.fullmatch(hf_name):
                raise ExportError(f"transformers tensor {hf_name!r} has no StackWise counterpart")
        for i, layer in sorted(layers.items()):
            out.update({f"blocks.{i}.{n}": t for n, t in self.layer_from_hf(i + 1, layer).items()})
        return out

    # ------------------------------------------------------------------ the transformers config
    def hf_config(self, kind: str | None = None, **overrides: Any):
        """The transformers config (LlamaConfig or DeepseekV3Config) with our model's numbers;
        `kind` picks the class for a single layer of a mixed model; `overrides` are set last
        (e.g. num_hidden_layers=1, attn_implementation="sdpa", max_position_embeddings=T)."""
        transformers = require_transformers()
        cfg = self.cfg
        model_type = hf_model_type(cfg, kind)
        kind = kind or cfg.kind(1)
        common = dict(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model,
            intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            tie_word_embeddings=cfg.tie_embeddings,
            attention_bias=False,
            attention_dropout=0.0,
            hidden_act="silu",
            initializer_range=cfg.init_std,
            pad_token_id=cfg.pad_id,
            # our tokenizers have no BOS/EOS; the classes' defaults (1, 2 / 0, 1) would name real tokens
            bos_token_id=None,
            eos_token_id=None,
            architectures=[HF_ARCH[model_type]],
        )
        if model_type == "llama":
            config = dict(
                common,
                num_key_value_heads=cfg.n_heads if kind == "mha" else cfg.n_kv_heads,
                head_dim=cfg.head_dim,
                mlp_bias=False,
            )
            return transformers.LlamaConfig(**{**config, **overrides})
        if "rope_interleave" not in transformers.DeepseekV3Config().to_dict():  # an unknown key would be ignored
            raise StackWiseError(
                f"transformers {transformers.__version__} has no DeepseekV3Config.rope_interleave, so its MLA would "
                f"rotate interleaved pairs, not StackWise's rotate-half layout: upgrade transformers"
            )
        config = dict(
            common,
            num_key_value_heads=cfg.n_heads,
            first_k_dense_replace=cfg.n_layers,  # dense MLPs only: no MoE layer
            q_lora_rank=cfg.mla_rq,
            kv_lora_rank=cfg.mla_rkv,
            qk_rope_head_dim=cfg.qk_rope_head_dim,
            qk_nope_head_dim=cfg.qk_nope_head_dim,
            v_head_dim=cfg.v_head_dim,
            rope_interleave=False,  # rotate-half, as Llama and StackWise
        )
        config = {**config, **overrides}
        config["first_k_dense_replace"] = config["num_hidden_layers"]
        return transformers.DeepseekV3Config(**config)


def require_transformers():
    """transformers, or a one-line StackWiseError saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise StackWiseError(
            "this needs Hugging Face transformers: pip install 'stackwise[hf]' (or pip install transformers)"
        ) from None
    return transformers


def bidirectional_mask(keep: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The 4-D attention mask that makes an exported (causal) transformers model read both sides,
    as StackWise models do unless `causal: true`: `keep (B, T)` True (or 1) at real tokens, 0 at
    padding -> `(B, 1, T, T)` in `dtype`, 0 where a query may read a key and the dtype's minimum at
    padding keys. transformers takes a 4-D mask as it is, so its model is not causal then.

    A sequence of padding only reads every key, as StackWise's attention does."""
    keep = keep.bool()
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    hide = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
    B, T = keep.shape
    return hide[:, None, None, :].expand(B, 1, T, T)
