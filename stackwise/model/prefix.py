"""The frozen prefix of a layer-wise model: the embedding and layers 1..n, run to recompute what
layer n would have cached (`cache.store=recompute`: stage n+1 reads token batches, not a cache).

A stage k >= 2 fed by a cache reads layer k-1's output as the caching passes made it: layer 1 ran
on the embedded masked ids, each later layer j on layer j-1's output *as read back from its cache*
(rounded to the cache's dtype, then cast to the dtype the block runs in), every pass in eval mode
(no dropout). `FrozenPrefix` runs the same chain: `between` is that rounding (the cache codec's
round trip, stackwise/data/cache/layout.py `round_trip`), so stage k sees the values a cache of that
dtype would have given it. Its tensors never train and are never saved with a stage.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from stackwise.model.config import ModelConfig
from stackwise.model.transformer import Block, Embedding


class FrozenPrefix(nn.Module):
    """Embedding + blocks 1..n, frozen and always in eval mode. `forward(ids (B, T), pad_mask)` ->
    (B, T, D): layer n's output, after `between` (None: the block's output as it is)."""

    def __init__(self, embed: Embedding, blocks: Sequence[Block], between: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        if not blocks or [b.k for b in blocks] != list(range(1, len(blocks) + 1)):
            raise ValueError(f"a prefix holds layers 1..n in order, got {[b.k for b in blocks]}")
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.between = between
        self.requires_grad_(False)
        self.train(False)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def train(self, mode: bool = True) -> FrozenPrefix:
        # the caching passes it stands for ran in eval mode: no dropout, whatever its owner does
        return super().train(False)

    def follow(self, like: Tensor) -> None:
        """Onto `like`'s device and floating dtype (the trained block's: what a precision plugin made
        of the stage's own modules, which it does not reach here), once. Every block is looked at: a
        stage=all run reuses the blocks of the stage before, which followed its modules already,
        beside a block built for this stage."""
        firsts = (self.embed.weight, *(next(b.parameters()) for b in self.blocks))
        if any(p.device != like.device or p.dtype != like.dtype for p in firsts):
            self.to(device=like.device, dtype=like.dtype)

    @torch.no_grad()
    def forward(self, ids: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        """ids (B, T) masked input ids -> (B, T, D) layer n's output, as its cache would hold it."""
        h = self.embed(ids)  # (B, T, D)
        for block in self.blocks:
            h = block(h.to(self.embed.weight.dtype), pad_mask)  # (B, T, D)
            if self.between is not None:
                h = self.between(h)
        return h


def forward_rate(
    cfg: ModelConfig,
    batch_size: int,
    seq_len: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    autocast: torch.dtype | None = None,
    iters: int = 5,
) -> float:
    """Tokens/s of one layer's forward (no grad) on `device` at (batch_size, seq_len): what
    `cache.store=auto` prices recomputing at. The block is built on the meta device and filled
    with random values there (its own init would draw the frozen tensors: seconds at large sizes).
    `dtype`: the weights' dtype; `autocast`: the dtype of a mixed-precision run's matmuls."""
    with torch.device("meta"):
        block = Block(cfg, 2 if cfg.n_layers >= 2 else 1)
    block = block.to_empty(device=device).to(dtype).eval()
    with torch.no_grad():
        for t in (*block.parameters(), *block.buffers()):
            t.normal_(0.0, cfg.init_std)
    h = torch.randn(batch_size, seq_len, cfg.d_model, device=device, dtype=dtype)  # (B, T, D)
    ctx = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad(), ctx:
        for _ in range(2):  # kernels chosen, memory allocated
            block(h)
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            block(h)
        sync()
    return iters * batch_size * seq_len / max(time.perf_counter() - t0, 1e-9)
