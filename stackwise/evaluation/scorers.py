"""The models an evaluation scores: a whole Transformer, or the depth prefixes of the layer checkpoints."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from stackwise.model.config import ModelConfig
from stackwise.model.transformer import Transformer
from stackwise.model.weights import LayerWeights, assemble, head_of

HeadFn = Callable[[Tensor], Tensor]  # (N, D) -> (N, V)


class Scorer(abc.ABC):
    """One or more models sharing a forward pass: `outputs(ids, pad_mask)` yields (name, hidden, head_fn)."""

    names: list[str]

    @abc.abstractmethod
    def to(self, device: str | torch.device) -> Scorer:
        """Move the model(s) to `device`; returns self."""

    @abc.abstractmethod
    def outputs(self, ids: Tensor, pad_mask: Tensor | None) -> Iterator[tuple[str, Tensor, HeadFn]]:
        """(name, hidden (B, T, D), head_fn) for each model this scorer holds."""


class WholeModel(Scorer):
    """A whole Transformer (fused, fine-tuned, e2e, or any model built by hand); `depth` runs only
    layers 1..depth (e.g. `assemble(cfg, layers[:k])`, depth=k)."""

    def __init__(self, name: str, model: Transformer, depth: int | None = None):
        self.names, self.model = [name], model.eval()
        self.depth = model.cfg.n_layers if depth is None else depth

    def to(self, device):
        self.model.to(device)
        return self

    def outputs(self, ids, pad_mask):
        m = self.model
        h = m.run_layers(m.embed_tokens(ids), 1, self.depth, pad_mask)  # (B, T, D)
        yield self.names[0], h, m.logits


class PrefixStack(Scorer):
    """Depth prefixes 1..K of the layer checkpoints, in one incremental pass: the hidden state after
    layer k is layer k applied to the one after layer k-1 (as the activation cache is made), and
    prefix k reads it out with stage k's final norm and head. An untied output projection is kept
    for the latest stage only, so with untied embeddings every prefix reads out through layer K's
    projection (after its own final norm): prefix k < K then scores otherwise than stage k did.

    `assemble(cfg, layers[:k])` builds the same model k; the tests check the two agree.
    """

    def __init__(self, cfg: ModelConfig, layers: Sequence[LayerWeights]):
        self.cfg, self.depth = cfg, len(layers)
        self.names = [f"depth_{k}" for k in range(1, self.depth + 1)]
        self.model = assemble(cfg, layers).eval()  # embedding of layer 1, blocks 1..K, head of layer K
        proj = None if cfg.tie_embeddings else self.model.head.proj.weight.detach()
        self.heads = nn.ModuleList(head_of(cfg, weights, proj=proj).eval() for weights in layers)

    def to(self, device):
        self.model.to(device)
        self.heads.to(device)
        return self

    def outputs(self, ids, pad_mask):
        m = self.model
        embed_w = m.embed.weight if self.cfg.tie_embeddings else None
        h = m.embed_tokens(ids)  # (B, T, D)
        for k in range(1, self.depth + 1):
            h = m.run_layers(h, k, k, pad_mask)
            head = self.heads[k - 1]
            yield self.names[k - 1], h, (lambda x, head=head: head(x, embed_w))
