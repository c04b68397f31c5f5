"""The layer-wise stages: layer 1 (on token data, trains the embedding too) and layer k >= 2 (on cached activations).

What each stage trains, and so what `layers/layer_k.pt` holds (stackwise/model/weights.py):
  stage 1: the embedding (= the head's matrix when tied), layer 1, the final norm (+ untied head)
  stage k: layer k, the final norm (+ untied head), both carried forward from stage k-1
  with `layerwise.top_layers=m` > 0 every stage also trains the top segment (blocks L-m+1..L,
  carried forward too): layer k's output runs through it before the head (SegProp), while the
  activation cache (`predict_step`) still holds layer k's own output, the input of stage k+1.
  A tied head stays stage 1's matrix (frozen later, as without a top segment).
With tied embeddings the shared matrix trains in stage 1 only: training it later would change
layer 1's input under every cached activation. Stage k keeps it as a frozen buffer.
How the modules start (the `layerwise.init` policy, what is carried forward) is decided before they
get here (`first_layer` / `next_layer` in stackwise/model/weights.py): this module only trains them.
Stage k >= 2 reads layer k-1's output from its batches (`hidden`), or, given a `prefix`
(`cache.store=recompute`), runs the frozen layers 1..k-1 on the batches' masked ids (`ids`) itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stackwise.compat import autocast_dtype
from stackwise.config import OptimConfig
from stackwise.model.config import ModelConfig
from stackwise.model.prefix import FrozenPrefix
from stackwise.model.transformer import Block, Embedding, Head
from stackwise.model.weights import LayerModules
from stackwise.objective.loss import LinearHead
from stackwise.stages.base import StageModule, trainable


class LayerwiseStage(StageModule):
    """Layer k, the top segment, the final norm and the head (+ the embedding in stage 1) on top of
    whatever produces layer k's input."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer: LayerModules,
        optim: OptimConfig,
        weighting: str,
        max_steps: int,
        stage_name: str,
        embed_weight: Tensor | None = None,
        prefix: FrozenPrefix | None = None,
    ):
        super().__init__(cfg, optim, weighting, max_steps)
        self.stage_name = stage_name
        self.block, self.head, self.embed = layer.block, layer.head, layer.embed
        # blocks L-m+1..L (layerwise.top_layers), empty for m = 0
        self.top = layer.top if layer.top is not None else nn.ModuleList()
        if prefix is not None and (self.embed is not None or prefix.n_layers != self.block.k - 1):
            raise ValueError(f"layer {self.block.k} recomputes layers 1..{self.block.k - 1}, not 1..{prefix.n_layers}")
        # not a submodule: no optimizer, state dict or checkpoint of this stage holds the frozen layers
        # below it, nor does a precision plugin or DDP see them (`FrozenPrefix.follow` places them)
        object.__setattr__(self, "prefix", prefix)
        if self.embed is None and cfg.tie_embeddings:
            if embed_weight is None:
                raise ValueError("a tied layer stage after stage 1 needs stage 1's embedding matrix")
            # frozen, not a parameter: no optimizer ever sees it; not persistent: it lives in layer_1.pt
            self.register_buffer("embed_weight", embed_weight.detach().clone(), persistent=False)
        self._embed_cast: tuple[Tensor | None, Tensor | None] = (None, None)  # see _frozen_embed

    @property
    def k(self) -> int:
        return self.block.k

    def trained_modules(self) -> LayerModules:
        return LayerModules(self.block, self.head, self.embed, self.top if len(self.top) else None)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return trainable(*(m for m in self.trained_modules() if m is not None))

    def rebuild(self) -> LayerwiseStage:
        cfg = self.cfg
        embed = Embedding(cfg) if self.embed is not None else None
        top = nn.ModuleList(Block(cfg, b.k) for b in self.top) if len(self.top) else None
        layer = LayerModules(Block(cfg, self.k), Head(cfg), embed, top)
        embed_weight = getattr(self, "embed_weight", None)
        return LayerwiseStage(
            cfg,
            layer,
            self.optim,
            self.weighting,
            self.max_steps_total,
            self.stage_name,
            None if embed_weight is None else embed_weight.cpu(),
            self.prefix,
        )

    def hidden_states(self, batch: dict) -> Tensor:
        """Layer k's output through the top segment (when there is one): what the head reads."""
        h = self.layer_output(batch)
        if len(self.top):
            pad = self.pad_mask(batch)
            for block in self.top:
                h = block(h, pad_mask=pad)
        return h

    def cached_states(self, batch: dict) -> Tensor:
        return self.layer_output(batch)

    def layer_output(self, batch: dict) -> Tensor:
        """(B, T, D) layer k's output: the input of stage k+1."""
        pad = self.pad_mask(batch)
        if self.embed is not None:
            h = self.embed(batch["ids"])  # (B, T, D)
        elif "hidden" in batch:
            h = batch["hidden"].to(self.block_dtype())  # (B, T, D), bf16/fp32 from the cache
        else:  # layers 1..k-1 recomputed, rounded as their caches would have been
            if self.prefix is None:
                raise ValueError(f"stage {self.stage_name} got token ids but has no frozen layers to run them through")
            self.prefix.follow(next(self.block.parameters()))
            h = self.prefix(batch["ids"], pad).to(self.block_dtype())  # (B, T, D)
        return self.block(h, pad_mask=pad)

    def block_dtype(self) -> torch.dtype:
        return next(self.block.parameters()).dtype

    def blocks(self) -> list[nn.Module]:
        return [self.block, *self.top, *(self.prefix.blocks if self.prefix is not None else ())]

    def linear_head(self) -> LinearHead:
        embed = None
        if self.cfg.tie_embeddings:
            embed = self.embed.weight if self.embed is not None else self._frozen_embed()
        return LinearHead(*self.head.as_linear(embed))

    def _frozen_embed(self) -> Tensor:
        """Stage 1's frozen matrix (V, D), in autocast's dtype when autocast is on: cast once per stage
        instead of in every step (the cast autocast would make gives the same values; at a 128k
        vocabulary it reads 2 GB each time)."""
        w = self.embed_weight
        low = autocast_dtype(w.device.type)
        if low is None or low == w.dtype:
            return w
        src, cast = self._embed_cast
        if src is not w or cast.dtype != low:  # a new buffer (moved, replaced) or another autocast dtype
            cast = w.detach().to(low)
            self._embed_cast = (w, cast)
        return cast

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() replace the buffer: drop the cast made from the old one with it
        self._embed_cast = (None, None)
        return super()._apply(fn, *args, **kwargs)
