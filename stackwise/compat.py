"""The one place that knows which torch version introduced what (the package supports torch>=2.1).

Each fallback computes the same thing with older ops, so results do not depend on which path ran.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# F.rms_norm and nn.RMSNorm: torch 2.4. The fallbacks below are used only on older torch.
def _rms_norm(
    x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None, eps: float | None = None
) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the trailing `normalized_shape` dims, in at least fp32."""
    dims = tuple(range(-len(normalized_shape), 0))
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # half precision loses the mean of squares
    eps = torch.finfo(x32.dtype).eps if eps is None else eps  # torch's default
    y = (x32 * torch.rsqrt(x32.pow(2).mean(dims, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else y * weight


class _RMSNorm(nn.Module):
    """Same constructor, parameter name (`weight`) and state-dict keys as torch.nn.RMSNorm."""

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine=True, device=None, dtype=None):
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.eps = eps
        weight = torch.ones(self.normalized_shape, device=device, dtype=dtype)
        self.weight = nn.Parameter(weight) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.normalized_shape, self.weight, self.eps)


rms_norm = getattr(F, "rms_norm", _rms_norm)
RMSNorm = getattr(nn, "RMSNorm", _RMSNorm)


# F.scaled_dot_product_attention(..., enable_gqa=): torch 2.5. It lets grouped K/V heads be read in
# place; before it, K/V must be repeated up to the query heads (a materialised copy). The builtin has
# no introspectable signature, hence the version check.
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention; q (B, H, T, dk), k (B, Hkv, S, dk), v (B, Hkv, S, dv) -> (B, H, T, dv).

    `attn_mask` is boolean (True = may attend) and broadcasts to (B, H, T, S). With `enable_gqa`,
    H must be a multiple of Hkv and query head h reads K/V head h // (H / Hkv).
    """
    if enable_gqa and k.size(1) != q.size(1):
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=True
            )
        groups = q.size(1) // k.size(1)
        k = k.repeat_interleave(groups, dim=1)  # (B, H, S, dk)
        v = v.repeat_interleave(groups, dim=1)  # (B, H, S, dv)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on `device_type` now, or None when autocast is off there.
    torch.get_autocast_dtype / is_autocast_enabled(device_type): torch 2.4; the per-device getters before."""
    if hasattr(torch, "get_autocast_dtype"):
        on = torch.is_autocast_enabled(device_type)
        return torch.get_autocast_dtype(device_type) if on else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return None


# torch.compiler.assume_constant_result (torch._dynamo's before): the function runs when torch.compile
# traces a call to it, and its result is a constant of the graph. Where neither exists, compiling
# blocks is refused anyway (StageModule.compile_blocks needs torch >= 2.2).
assume_constant_result = getattr(getattr(torch, "compiler", None), "assume_constant_result", None) or getattr(
    torch._dynamo, "assume_constant_result", lambda f: f
)
