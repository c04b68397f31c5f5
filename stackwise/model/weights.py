"""Layer-wise weights as module state dicts, and the modules and models built from them (no Lightning, no files).

A layer-wise stage trains three modules: its `Block`, the final norm (+ untied output projection)
in a `Head`, and, in stage 1 only, the `Embedding`. `LayerWeights` holds their state dicts side by
side, one section per module, exactly as each module's own `state_dict()` names them, so nothing is
prefixed on the way out or stripped on the way in. `layers/layer_k.pt` stores one `LayerWeights`
(stackwise/artifacts/checkpoints.py writes and reads it).

    LayerWeights.of(modules)          trained modules -> weights (CPU copies)
    weights.modules(cfg, k)           weights -> modules (frozen tensors regenerated and checked)
    first_layer(cfg), next_layer(...) the modules a stage starts training from
    assemble(cfg, [w_1 .. w_L])       the fused Transformer
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from stackwise.model.config import ModelConfig
from stackwise.model.transformer import Block, Embedding, Head, Transformer, init_layer


class LayerModules(NamedTuple):
    """The modules one layer-wise stage trains; `embed` only in stage 1."""

    block: Block
    head: Head
    embed: Embedding | None = None


def _cpu(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # clone: a view of a larger tensor would otherwise keep (and save) the whole storage
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}


@dataclass
class LayerWeights:
    """What one layer-wise stage trained, per module. Frozen tensors are not stored: the block
    regenerates them from (seed, k) and checks them against `frozen_sha256`."""

    block: dict[str, Tensor]  # Block.trainable_state_dict()
    frozen_sha256: str  # Block.frozen_up_checksum()
    head: dict[str, Tensor]  # Head.state_dict(): final norm (+ untied projection)
    embed: dict[str, Tensor] | None = None  # Embedding.state_dict(): stage 1 only

    @classmethod
    def of(cls, modules: LayerModules) -> LayerWeights:
        block, head, embed = modules
        return cls(
            block=_cpu(block.trainable_state_dict()),
            frozen_sha256=block.frozen_up_checksum(),
            head=_cpu(head.state_dict()),
            embed=None if embed is None else _cpu(embed.state_dict()),
        )

    def sections(self) -> dict[str, dict[str, Tensor]]:
        """{module: state dict} for every module present: what a checkpoint file stores."""
        out = {"block": self.block, "head": self.head}
        if self.embed is not None:
            out["embed"] = self.embed
        return out

    def numel(self) -> int:
        return sum(t.numel() for section in self.sections().values() for t in section.values())

    def load_block(self, block: Block) -> None:
        """Into a block of the same layer: ArtifactError on missing keys, shapes or a frozen-checksum mismatch."""
        block.load_trainable_state_dict(self.block, self.frozen_sha256)

    def modules(self, cfg: ModelConfig, k: int) -> LayerModules:
        """Layer k's modules holding these weights (the embedding too when they have one)."""
        block, head = Block(cfg, k), Head(cfg)
        self.load_block(block)
        head.load_state_dict(self.head)
        embed = None
        if self.embed is not None:
            embed = Embedding(cfg)
            embed.load_state_dict(self.embed)
        return LayerModules(block, head, embed)


def first_layer(cfg: ModelConfig) -> LayerModules:
    """Stage 1 starts from scratch: layer 1, the head and the embedding, each from its own (seed, ...) init."""
    return LayerModules(Block(cfg, 1), Head(cfg), Embedding(cfg))


def next_layer(cfg: ModelConfig, k: int, policy: str, below: LayerWeights) -> LayerModules:
    """Stage k >= 2 starts from layer k-1's weights: the final norm (+ untied head) carried forward,
    the new block started by `policy` (`init_layer`: random, identity or previous)."""
    block, head = Block(cfg, k), Head(cfg)
    head.load_state_dict(below.head)
    # `previous` copies layer k-1's trained tensors straight from its file's section: building its
    # block would redraw (and re-check) its frozen tensors, seconds at large sizes, for nothing
    init_layer(block, policy, below.block if policy == "previous" else None)
    return LayerModules(block, head)


def assemble(cfg: ModelConfig, layers: Sequence[LayerWeights]) -> Transformer:
    """The fused model from layer_1 … layer_K (K <= n_layers): the embedding from stage 1, block k
    from stage k, the final norm and head from stage K (the last one to train them)."""
    if not layers or layers[0].embed is None:
        raise ValueError("assemble needs layer 1's weights first (they hold the embedding)")
    model = Transformer(cfg)
    model.embed.load_state_dict(layers[0].embed)
    for block, weights in zip(model.blocks, layers, strict=False):
        weights.load_block(block)
    model.head.load_state_dict(layers[-1].head)
    return model


def head_of(cfg: ModelConfig, weights: LayerWeights) -> Head:
    """The final norm (+ untied projection) stage k left behind: how depth prefix k reads out."""
    head = Head(cfg)
    head.load_state_dict(weights.head)
    return head
