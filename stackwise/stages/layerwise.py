"""The layer-wise stages: `embed` (k = 1, on token data) and `layer` (k >= 2, on cached activations).

What each stage owns, and so what `layers/layer_k.pt` holds:
  stage 1: the embedding (= the head's matrix when tied), layer 1, the final norm (+ untied head)
  stage k: layer k, the final norm (+ untied head), both carried forward from stage k-1
With tied embeddings the shared matrix trains in stage 1 only: training it later would change
layer 1's input under every cached activation (DESIGN §4). Stage k keeps it as a frozen buffer.
Frozen tensors (SwiGLU up, MLA ups) are not stored: the block regenerates them from
(seed, k) and checks them against the checksum in the file.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stackwise.config import OptimConfig
from stackwise.model.config import ModelConfig
from stackwise.model.transformer import Block, Embedding, Head
from stackwise.stages.base import StageModule, trainable


def _prefixed(prefix: str, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v.detach().to("cpu").clone() for k, v in sd.items()}


def _strip(prefix: str, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    p = prefix + "."
    return {k[len(p) :]: v for k, v in sd.items() if k.startswith(p)}


class LayerwiseStage(StageModule):
    """Layer k, the final norm and the head, on top of whatever produces layer k's input."""

    def __init__(
        self,
        cfg: ModelConfig,
        k: int,
        optim: OptimConfig,
        weighting: str,
        max_steps: int,
        previous: dict[str, Tensor] | None = None,
        embed_weight: Tensor | None = None,
        init: str = "random",
    ):
        super().__init__(cfg, optim, weighting, max_steps)
        self.k = k
        self.stage_name = "embed" if k == 1 else f"layer_{k}"
        self.block = Block(cfg, k)
        self.head = Head(cfg)
        if previous is not None:  # carry the final norm (+ untied head) forward from stage k-1
            self.head.load_state_dict(_strip("head", previous))
        if k > 1 and init == "identity":
            self.block.zero_residual_branches()
        elif k > 1 and init == "previous":
            if previous is None:
                raise ValueError("init=previous needs layer k-1's weights")
            below = Block(cfg, k - 1)
            below.load_state_dict(_strip("block", previous), strict=False)
            self.block.copy_trainable_from(below)
        if k == 1:
            self.embed = Embedding(cfg)
        elif cfg.tie_embeddings:
            if embed_weight is None:
                raise ValueError("a tied layer stage needs stage 1's embedding matrix")
            # frozen, not a parameter: no optimizer ever sees it; not persistent: it lives in layer_1.pt
            self.register_buffer("embed_weight", embed_weight.detach().clone(), persistent=False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        mods = [self.block, self.head] + ([self.embed] if self.k == 1 else [])
        return trainable(*mods)

    def hidden_states(self, batch: dict) -> Tensor:
        pad = self.pad_mask(batch)
        if self.k == 1:
            h = self.embed(batch["ids"])  # (B, T, D)
        else:
            h = batch["hidden"].to(self.block_dtype())  # (B, T, D), bf16/fp32 from the cache
        return self.block(h, pad_mask=pad)

    def block_dtype(self) -> torch.dtype:
        return next(self.block.parameters()).dtype

    def head_logits(self, h: Tensor) -> Tensor:
        if not self.cfg.tie_embeddings:
            return self.head(h)
        w = self.embed.weight if self.k == 1 else self.embed_weight
        return self.head(h, w)

    # ------------------------------------------------------------------ checkpoint contents
    def export_state(self) -> dict[str, Tensor]:
        """The tensors layer_k.pt stores (frozen ones excluded: they are regenerated)."""
        sd = {**_prefixed("block", self.block.trainable_state_dict()), **_prefixed("head", self.head.state_dict())}
        if self.k == 1:
            sd.update(_prefixed("embed", self.embed.state_dict()))
        return sd

    def load_exported(self, sd: dict[str, Tensor], frozen_sha256: str) -> None:
        self.block.load_trainable_state_dict(_strip("block", sd), frozen_sha256)
        self.head.load_state_dict(_strip("head", sd))
        if self.k == 1:
            self.embed.load_state_dict(_strip("embed", sd))
