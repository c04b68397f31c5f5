"""The pieces of a layer: RMSNorm, rotary embeddings, and the SwiGLU MLP with its frozen up-projection.

Frozen tensors follow one small protocol shared with `attention.py`: a module lists their buffer
names in `frozen` and returns their canonical values from `frozen_values()` (fp32, drawn by
`portable_normal` from their own `(seed, key, k)` stream, on the device of the buffer they go to:
a GPU draws in milliseconds what takes the host seconds; on the CPU for a buffer on the meta
device), and `load_frozen(module)` copies those values in. Because each frozen tensor has its own
stream and that generator's bits are defined on every platform and device, layer k's values are the
same in every process, on every device and every machine, whatever was built or drawn before it.

A frozen tensor is a non-persistent buffer, not a parameter: no optimizer, `requires_grad_(True)`
or checkpoint (state_dict) can see it. It still moves and casts with the module (`.to(device)`,
a bf16-true precision plugin), so its live value is its canonical value cast to the module's dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from stackwise.compat import RMSNorm, assume_constant_result
from stackwise.model.config import ModelConfig
from stackwise.model.portable_rng import portable_normal
from stackwise.utils import derive_seed

__all__ = [
    "FrozenLinear",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "draw_device",
    "frozen_normal",
    "load_frozen",
    "normal",
]


def normal(shape, std: float, g: torch.Generator) -> torch.Tensor:
    """N(0, std^2) drawn on CPU in fp32 from `g`: the same numbers whatever device the model is on.

    For trainable tensors, which checkpoints store. torch.randn's bits depend on the CPU's instruction
    set, so a tensor that is regenerated rather than stored comes from `frozen_normal` instead."""
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32, device="cpu") * std


def frozen_normal(shape, std: float, seed: int, *keys, device: str | torch.device | None = None) -> torch.Tensor:
    """N(0, std^2) in fp32 on `device` (default: the CPU) from the `(seed, *keys)` stream of
    `portable_normal`: the same bits on every platform and device, which a tensor that is regenerated
    instead of stored needs. A CPU draw is the same tensor object for the same arguments while it is
    among the last few drawn: read it, never write into it.

    A device draw that runs out of memory is made on the CPU instead (the same bits, more slowly):
    the tensor returned is then a CPU one."""
    args = (tuple(int(n) for n in shape), float(std), derive_seed(seed, *keys))
    device = torch.device("cpu" if device is None else device)
    if device.type != "cpu":
        # Not cached: a draw takes milliseconds there, and 4 kept draws (3.8 GB at the 70B shape)
        # would hold GPU memory that no stage's memory plan counts.
        try:
            return portable_normal(*args, device)
        except torch.cuda.OutOfMemoryError:  # e.g. writing fused/ beside the fused model on its GPU
            pass
    return _frozen_normal(*args)


@functools.lru_cache(maxsize=4)
def _frozen_normal(shape: tuple[int, ...], std: float, key: int) -> torch.Tensor:
    # A stage draws a block's frozen tensors when it builds the block and again for the checksum its
    # layer file records, and the next stage draws the layer below again: 2.1 s a draw at the seed's
    # sizes on an H200's host. The last 4 drawn are kept (235 MB each at the seed's sizes, 0.9 GB at
    # the 70B shape).
    return portable_normal(shape, std, key)


def draw_device(buffer: torch.Tensor, device: str | torch.device | None = None) -> torch.device:
    """Where a frozen tensor for `buffer` is drawn: `device` if given, else the buffer's own device
    (the CPU for a meta buffer: a shape-only block still regenerates real values, for a checksum)."""
    if device is not None:
        return torch.device(device)
    return torch.device("cpu") if buffer.is_meta else buffer.device


def load_frozen(module: nn.Module, values: dict[str, torch.Tensor] | None = None) -> None:
    """Copy `values` (default: `module.frozen_values()`, drawn on the buffers' device) into its frozen
    buffers, cast and moved to theirs."""
    if any(module.get_buffer(name).is_meta for name in module.frozen):
        return  # a shape-only model (stats, meta init) has nothing to fill
    with torch.no_grad():
        for name, value in (module.frozen_values() if values is None else values).items():
            module.get_buffer(name).copy_(value)


class FrozenLinear(nn.Module):
    """A bias-free linear map whose `weight (out, in)` is a frozen tensor (a non-persistent buffer).

    It keeps nn.Linear's `weight` name, so a frozen projection has the same tensor name as a trained one.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("weight", torch.empty(out_features, in_features), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class RotaryEmbedding(nn.Module):
    """RoPE in the rotate-half convention of Hugging Face Llama: dims i and i + dim/2 form a pair.

    cos/sin are computed in fp32 on CPU (so every device rotates by the same angles) and cached per
    (T, device). They are plain attributes, not buffers: `model.to(torch.bfloat16)` cannot round
    the frequencies, and checkpoints do not carry them.
    """

    def __init__(self, dim: int, theta: float):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self._cache: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    @assume_constant_result
    def cos_sin(self, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: (T, dim) fp32 on `device`. torch.compile runs this when it traces a block and keeps
        the result as a constant of the graph: traced like any code, the cache's filling was a side
        effect the graph guarded on, and every compiled block compiled again on its second call."""
        key = (T, torch.device(device))
        if key not in self._cache:
            # Lightning validates under inference_mode before it trains; a cached tensor made there
            # could never be saved for backward, so the cache is always built outside it.
            with torch.inference_mode(False), torch.no_grad():
                exponents = torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim  # (dim/2,)
                inv_freq = 1.0 / (self.theta**exponents)  # (dim/2,)
                freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)  # (T, dim/2)
                emb = torch.cat((freqs, freqs), dim=-1)  # (T, dim)
                self._cache[key] = (emb.cos().to(device), emb.sin().to(device))
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., T, dim) -> rotated x, same shape and dtype."""
        cos, sin = self.cos_sin(x.size(-2), x.device)
        # The rotation itself runs in x's dtype, exactly as Hugging Face does it.
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), with `up` a fixed random projection that never trains.

    `up` (d_ff, D) is a non-persistent buffer (see the module docstring), drawn N(0, init_std^2),
    the Llama init it would otherwise start from, from the `(seed, "up", k)` stream of
    `frozen_normal`. gate and down are initialised by the `Block`.
    """

    def __init__(self, cfg: ModelConfig, k: int):
        super().__init__()
        self.seed, self.k, self.std = cfg.seed, k, cfg.init_std
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.register_buffer("up", torch.empty(cfg.d_ff, cfg.d_model), persistent=False)  # (d_ff, D)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.frozen = ("up",)
        load_frozen(self)

    def frozen_values(self, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """{"up": its canonical fp32 value}, drawn on `device` (default: the buffer's, see `draw_device`)."""
        # `frozen` loses "up" when the block stores it instead (Block.keep_frozen: an imported layer)
        on = draw_device(self.up, device)
        return {n: frozen_normal(self.up.shape, self.std, self.seed, "up", self.k, device=on) for n in self.frozen}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> (..., D)."""
        return self.down(F.silu(self.gate(x)) * F.linear(x, self.up))  # hidden (..., d_ff)
