"""Self-attention: `GroupedQueryAttention` (mha, gqa) and `MultiHeadLatentAttention` (mla).

Both are bidirectional unless `cfg.causal` (a masked-diffusion denoiser reads both sides), honour a
key padding mask `pad_mask (B, T)`, True at padding, and call SDPA through `stackwise.compat`.
When there is no padding mask, no mask tensor is passed at all, so SDPA may choose its fused
(flash / memory-efficient) kernels. No biases anywhere, as in Llama and DeepSeek.
"""

from __future__ import annotations

import torch
from torch import nn

from stackwise.compat import RMSNorm, sdpa
from stackwise.model.config import ModelConfig
from stackwise.model.layers import FrozenLinear, RotaryEmbedding, draw_device, frozen_normal, load_frozen


def attention_mask(pad_mask: torch.Tensor | None, causal: bool) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for SDPA; attn_mask is bool, True where a query may read a key."""
    if pad_mask is None:
        return None, causal
    keep = ~pad_mask  # (B, T)
    if causal:
        T = pad_mask.size(1)
        tril = torch.ones(T, T, dtype=torch.bool, device=pad_mask.device).tril()  # (T, T)
        eye = torch.eye(T, dtype=torch.bool, device=pad_mask.device)  # (T, T)
        # Every query also reads itself: a left-padded query with no visible key would softmax to NaN.
        return (tril & (keep[:, None, :] | eye))[:, None], False  # (B, 1, T, T)
    # A sequence of padding only would leave its queries no key: NaN rows, and a NaN value leaks
    # through the zero weights of the next layer. Such a sequence reads every key instead.
    keep = keep | pad_mask.all(dim=-1, keepdim=True)
    return keep[:, None, None, :], False  # (B, 1, 1, T)


class GroupedQueryAttention(nn.Module):
    """Llama attention: mha when n_kv_heads == n_heads, gqa when query heads share K/V heads in groups."""

    def __init__(self, cfg: ModelConfig, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, n_kv_heads, cfg.head_dim
        self.causal = cfg.causal
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.frozen = ()

    def frozen_values(self, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        return {}

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        q, k = self.rope(q), self.rope(k)
        mask, is_causal = attention_mask(pad_mask, self.causal)
        y = sdpa(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=Hkv != H)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * hd))


def _up_projection(d_in: int, d_out: int, frozen: bool) -> nn.Module:
    return FrozenLinear(d_in, d_out) if frozen else nn.Linear(d_in, d_out, bias=False)


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2/V3 Multi-head Latent Attention (weight layout as in Hugging Face DeepseekV3Attention).

    Queries pass through a low-rank latent (q_lora_rank = mla_rq) and keys/values through a shared
    latent (kv_lora_rank = mla_rkv), each RMS-normalised before its up-projection. RoPE is decoupled:
    only q_rope and a single k_rope shared by all heads rotate; k_nope and v come from the latent.
    With `mla_freeze_up`, the up-projections q_b and kv_b are frozen random matrices (`FrozenLinear`,
    non-persistent buffers) drawn like the SwiGLU up, from the `(seed, "mla_up", k, name)` streams.
    """

    def __init__(self, cfg: ModelConfig, k: int):
        super().__init__()
        self.seed, self.k, self.std = cfg.seed, k, cfg.init_std
        self.n_heads, self.causal = cfg.n_heads, cfg.causal
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.mla_rkv
        H, qk_dim = cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.q_a = nn.Linear(cfg.d_model, cfg.mla_rq, bias=False)
        self.q_a_norm = RMSNorm(cfg.mla_rq, eps=cfg.norm_eps)
        self.q_b = _up_projection(cfg.mla_rq, H * qk_dim, cfg.mla_freeze_up)  # per head: [nope | rope]
        self.kv_a = nn.Linear(cfg.d_model, cfg.mla_rkv + cfg.qk_rope_head_dim, bias=False)  # [latent | k_rope]
        self.kv_a_norm = RMSNorm(cfg.mla_rkv, eps=cfg.norm_eps)
        kv_dim = cfg.qk_nope_head_dim + cfg.v_head_dim
        self.kv_b = _up_projection(cfg.mla_rkv, H * kv_dim, cfg.mla_freeze_up)  # per head: [k_nope | v]
        self.o_proj = nn.Linear(H * cfg.v_head_dim, cfg.d_model, bias=False)
        self.rope = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta)
        self.frozen = ("q_b.weight", "kv_b.weight") if cfg.mla_freeze_up else ()
        load_frozen(self)

    def frozen_values(self, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """{buffer name: canonical fp32 value}, each drawn on `device` (default: its buffer's, see `draw_device`)."""
        values = {}
        for name in self.frozen:
            buffer = self.get_buffer(name)
            on = draw_device(buffer, device)
            values[name] = frozen_normal(buffer.shape, self.std, self.seed, "mla_up", self.k, name, device=on)
        return values

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        B, T, _ = x.shape
        H, nope, r, dv = self.n_heads, self.nope, self.rope_dim, self.v_dim
        q = self.q_b(self.q_a_norm(self.q_a(x))).view(B, T, H, nope + r).transpose(1, 2)  # (B, H, T, nope + r)
        q_nope, q_rope = q.split([nope, r], dim=-1)  # (B, H, T, nope), (B, H, T, r)
        latent, k_rope = self.kv_a(x).split([self.kv_rank, r], dim=-1)  # (B, T, rkv), (B, T, r)
        kv = self.kv_b(self.kv_a_norm(latent)).view(B, T, H, nope + dv).transpose(1, 2)  # (B, H, T, nope + dv)
        k_nope, v = kv.split([nope, dv], dim=-1)  # (B, H, T, nope), (B, H, T, dv)
        k_rope = self.rope(k_rope[:, None])  # (B, 1, T, r): one rotary key shared by every head
        q = torch.cat((q_nope, self.rope(q_rope)), dim=-1)  # (B, H, T, nope + r)
        k = torch.cat((k_nope, k_rope.expand(B, H, T, r)), dim=-1)  # (B, H, T, nope + r)
        mask, is_causal = attention_mask(pad_mask, self.causal)
        # SDPA's default scale 1/sqrt(q.size(-1)) is MLA's 1/sqrt(qk_nope_head_dim + qk_rope_head_dim).
        y = sdpa(q, k, v, attn_mask=mask, is_causal=is_causal)  # (B, H, T, dv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * dv))
