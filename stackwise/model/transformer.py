"""The model: `Embedding`, pre-norm `Block`s, `Head`, and the `Transformer` that runs any slice of them.

Layer indices are 1-based everywhere (`blocks[k - 1]` is layer k). Every part draws its initial
weights from its own generator, `(seed, "embed")`, `(seed, "layer", k)`, `(seed, "head")`, on CPU
in fp32, so a part built alone equals the same part inside a whole `Transformer`, in any process,
on any device. Inside a block the trainable tensors are drawn in `named_parameters()` order from
the layer's one stream; frozen tensors (the SwiGLU up, MLA's q_b/kv_b under `mla_freeze_up`) each
come from their own key by the platform-independent generator of `portable_rng.py` (see
`layers.py`), so they can be regenerated without the rest, on any machine.

Every module can also be built without drawing anything: on the meta device (`empty(factory,
device)`: shapes only, then uninitialised storage on `device`), to be filled by `init_weights()`
(the same draws, tensor by tensor: only one tensor's fp32 draw is ever held on the host, whatever
`device` is) or by loading a state dict, which then needs no draw at all but the frozen tensors'
(`Block.init_frozen()`). The trainable draws stay on the CPU even for a GPU module: they come from
torch.randn's CPU generator, whose bits no CUDA generator reproduces. The frozen tensors are drawn
on the module's device, where their generator gives the same bits in milliseconds instead of the
host's seconds.

Frozen tensors are non-persistent buffers: state dicts (and so checkpoints) do not hold them, no
optimizer or `requires_grad_(True)` reaches them. A layer checkpoint stores
`Block.frozen_up_checksum()` beside the trainable tensors; `Block.load_trainable_state_dict(sd,
checksum)` regenerates the frozen tensors from the seed and refuses to load if the checksum
differs (another seed, or another generator). The checksum is always taken over the canonical
fp32 draw, whatever dtype the block runs in.

One exception: a layer imported from a pretrained model (`stackwise-import`) has a trained
up-projection that no seed regenerates. `Block.keep_frozen` holds such a tensor as a stored
weight: a persistent buffer, still frozen (no optimizer sees it) but in the state dict, so every
layer file and model folder carries it. Loading a state dict that holds a frozen tensor's name does
the same, so a stored tensor survives every save and load without a flag of its own.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from stackwise.compat import RMSNorm
from stackwise.errors import ArtifactError
from stackwise.model.attention import GroupedQueryAttention, MultiHeadLatentAttention
from stackwise.model.config import ModelConfig
from stackwise.model.layers import SwiGLU, load_frozen, normal
from stackwise.utils import generator, tensor_sha256

M = TypeVar("M", bound=nn.Module)


def empty(factory: Callable[[], M], device: str | torch.device = "cpu") -> M:
    """`factory()` built on the meta device (nothing drawn, nothing allocated), then given
    uninitialised storage on `device`: fill it with `init_weights()` or a state dict (plus
    `init_frozen()` for a block's frozen tensors) before use."""
    with torch.device("meta"):
        module = factory()
    return module.to_empty(device=device)


class Embedding(nn.Module):
    """Token embeddings, `.weight (V, D)` ~ N(0, init_std^2) from `(seed, "embed")`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))  # (V, D)
        if not self.weight.is_meta:
            self.init_weights()

    def init_weights(self) -> None:
        with torch.no_grad():
            self.weight.copy_(normal(self.weight.shape, self.cfg.init_std, generator(self.cfg.seed, "embed")))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> (B, T, D)."""
        return F.embedding(ids, self.weight)


class Block(nn.Module):
    """Pre-norm residual block of layer k: h + attn(norm(h)), then h + mlp(norm(h)), with dropout on both branches."""

    def __init__(self, cfg: ModelConfig, k: int):
        super().__init__()
        self.cfg, self.k = cfg, k
        kind = cfg.kind(k)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if kind == "mla":
            self.attn = MultiHeadLatentAttention(cfg, k)
        else:
            self.attn = GroupedQueryAttention(cfg, cfg.n_heads if kind == "mha" else cfg.n_kv_heads)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg, k)
        self.drop = nn.Dropout(cfg.dropout)
        self.frozen_names = tuple(f"attn.{n}" for n in self.attn.frozen) + tuple(f"mlp.{n}" for n in self.mlp.frozen)
        self.stored: tuple[str, ...] = ()  # frozen tensors held as stored weights (keep_frozen), not regenerated
        if not any(p.is_meta for p in self.parameters()):  # the frozen tensors were drawn by their modules
            self.init_trainable()

    def init_weights(self) -> None:
        """Every tensor of the block from `(seed, k)`: what the constructor draws, into a block built by `empty`."""
        self.init_trainable()
        self.init_frozen()

    def init_trainable(self, last: str | None = None) -> None:
        """Trainable tensors from `(seed, "layer", k)`: norms 1, matrices N(0, init_std^2), and the
        output projections scaled by 1/sqrt(2 * n_layers) (GPT-2), since each layer adds two of them
        to the residual stream. They are drawn in `named_parameters()` order from the layer's one
        stream, so the tensors up to `last` (its name, inclusive) are drawn without the ones after it."""
        g = generator(self.cfg.seed, "layer", self.k)
        out_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        with torch.no_grad():
            for name, p in self.named_parameters():  # frozen tensors are buffers, drawn by their modules
                if p.ndim == 1:
                    p.fill_(1.0)
                else:
                    std = out_std if name in ("attn.o_proj.weight", "mlp.down.weight") else self.cfg.init_std
                    p.copy_(normal(p.shape, std, g))
                if name == last:
                    return

    def init_frozen(self) -> None:
        """The frozen tensors regenerated from `(seed, k)` (no checksum check: `verify_frozen` does that)."""
        load_frozen(self.attn)
        load_frozen(self.mlp)

    def forward(self, h: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """h (B, T, D), pad_mask (B, T) bool True at padding -> (B, T, D)."""
        h = h + self.drop(self.attn(self.attn_norm(h), pad_mask))
        return h + self.drop(self.mlp(self.mlp_norm(h)))

    # ------------------------------------------------------------------ initialisation levers
    def zero_residual_branches(self) -> None:
        """Start as the identity map: both output projections zero, so a new layer begins exactly
        where the stack below left off instead of adding random noise to it."""
        with torch.no_grad():
            self.attn.o_proj.weight.zero_()
            self.mlp.down.weight.zero_()

    def copy_trainable_from(self, other: Block) -> None:
        """Start from another layer's trained weights (progressive stacking). The frozen tensors
        stay this layer's own: they are a function of (seed, k) by design. When the two layers'
        attention kinds differ (a hybrid model), only the kind-independent part is copied (the two
        norms and the MLP's trainable weights); the attention keeps its (seed, k) initialisation."""
        self.copy_trainable_state(other.trainable_state_dict(), other.k)

    def copy_trainable_state(self, state: Mapping[str, torch.Tensor], k: int) -> None:
        """`copy_trainable_from` given layer k's `trainable_state_dict()` (a layer file's block
        section), without building layer k's block: no frozen draw of a layer that is not trained.
        A frozen tensor that layer k stores (an imported layer's up-projection) is not copied."""
        state = {n: v for n, v in state.items() if n not in self.frozen_names}
        if self.cfg.kind(k) != self.cfg.kind(self.k):
            state = {n: v for n, v in state.items() if not n.startswith("attn.")}
        self.load_state_dict(state, strict=False)

    def last_attention_tensor(self) -> str:
        """The name of the attention's last trainable tensor in the init stream (see `init_trainable`)."""
        return [n for n, _ in self.named_parameters() if n.startswith("attn.")][-1]

    # ------------------------------------------------------------------ frozen tensors and checkpoints
    def frozen_tensors(self) -> dict[str, torch.Tensor]:
        """The live frozen tensors by name, in the block's dtype and on its device."""
        return {name: self.get_buffer(name) for name in self.frozen_names}

    def keep_frozen(self, values: Mapping[str, torch.Tensor]) -> None:
        """Hold these frozen tensors (by name, e.g. `mlp.up`) as stored weights instead of their
        `(seed, k)` draw: persistent buffers, in the block's dtype and on its device. They stay frozen
        (buffers: no optimizer or `requires_grad_` reaches them), are in `state_dict()` and so in every
        checkpoint, and are no longer regenerated nor part of `frozen_up_checksum()`."""
        for name, value in values.items():
            if name not in self.frozen_names:
                raise KeyError(f"layer {self.k}: {name} is not a frozen tensor of this block ({self.frozen_names})")
            owner_name, attr = name.rsplit(".", 1)  # mlp.up -> (mlp, up); attn.q_b.weight -> (attn.q_b, weight)
            owner, live = self.get_submodule(owner_name), self.get_buffer(name)
            owner.register_buffer(
                attr, value.detach().to(device=live.device, dtype=live.dtype).clone(), persistent=True
            )
            part_name = name.split(".", 1)[0]  # attn | mlp: the module that regenerates it
            part = getattr(self, part_name)
            part.frozen = tuple(n for n in part.frozen if f"{part_name}.{n}" != name)
            if name not in self.stored:
                self.stored = (*self.stored, name)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A state dict that holds a frozen tensor stores it (an imported layer): keep it, so that
        # `load_state_dict` of a model folder or layer file restores it instead of refusing the key.
        found = {n: state_dict[prefix + n] for n in self.frozen_names if prefix + n in state_dict}
        if found:
            self.keep_frozen(found)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def frozen_values(self, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """The canonical frozen tensors by name: fp32, regenerated from `(seed, k)` (stored ones aside:
        `keep_frozen`) on `device`, by default the block's (the CPU for a block on the meta device).
        The same bits on every device: a checksum over them is the same wherever they were drawn."""
        values = {f"attn.{n}": v for n, v in self.attn.frozen_values(device).items()}
        values.update({f"mlp.{n}": v for n, v in self.mlp.frozen_values(device).items()})
        return values

    def frozen_up_checksum(self, device: str | torch.device | None = None) -> str:
        """sha256 over the canonical fp32 frozen tensors (names and bytes, in a fixed order), once the
        live ones are checked against them (`verify_frozen`). They are drawn on `device` (default: the
        block's); the bits, and so the checksum, are the same on every device.

        Never taken over the live tensors: they are cast to the dtype the block runs in (a bf16-true
        precision plugin casts buffers too), while the checksum in a checkpoint must be the one that
        any later run regenerates, in whatever precision it runs.
        """
        values = self.frozen_values(device)
        self._check_live(values)
        return _checksum(values)

    def verify_frozen(self) -> None:
        """Raise `ArtifactError` if a frozen tensor no longer equals its regeneration from the seed
        (cast to the tensor's own dtype)."""
        self._check_live(self.frozen_values())

    def _check_live(self, values: dict[str, torch.Tensor]) -> None:
        for name, live in self.frozen_tensors().items():
            if (
                name in values
                and not live.is_meta
                and not torch.equal(live, values[name].to(device=live.device, dtype=live.dtype))
            ):
                raise ArtifactError(
                    f"layer {self.k}: frozen tensor {name} differs from its regeneration from seed {self.cfg.seed}"
                )

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: the state dict, which never holds the frozen (non-persistent) tensors."""
        return self.state_dict()

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor], checksum: str) -> None:
        """Load a `trainable_state_dict()`, regenerate the frozen tensors and check them against `checksum`.

        Raises `ArtifactError` naming the layer on missing/unexpected keys, a shape mismatch, or a
        checksum mismatch; nothing is changed unless everything matches. A frozen tensor that `sd`
        holds is a stored one (`keep_frozen`: an imported layer), loaded rather than regenerated.
        """
        values = self.check_trainable_state_dict(sd, checksum)
        self._load_frozen_values(values)
        self.load_state_dict(sd)  # stores the frozen tensors that sd holds (_load_from_state_dict)

    def check_trainable_state_dict(
        self, sd: Mapping[str, torch.Tensor], checksum: str, device: str | torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """`load_trainable_state_dict`'s checks without loading anything (a block on the meta device
        does): the keys and shapes of `sd`, and `checksum` against the frozen tensors regenerated
        from (seed, k), which are returned (canonical fp32 values, drawn on `device`: by default the
        block's, the CPU for a meta block; a stored one is not regenerated)."""
        stored = self._check_keys(sd)
        values = {n: v for n, v in self.frozen_values(device).items() if n not in stored}
        return self._checked_frozen(values, checksum)

    def load_trainable_only(self, sd: dict[str, torch.Tensor]) -> None:
        """The first half of `load_trainable_state_dict`: `sd`'s keys and shapes checked and its tensors
        loaded (a stored frozen one too), the regenerated frozen tensors left for `load_frozen_checked`.
        For a reader of many layers that regenerates their frozen tensors in an order of its own."""
        self._check_keys(sd)
        self.load_state_dict(sd)

    def load_frozen_checked(self, checksum: str) -> None:
        """The second half: the frozen tensors regenerated from (seed, k), checked against `checksum`
        (ArtifactError on a mismatch, before any is loaded), then loaded."""
        self._load_frozen_values(self._checked_frozen(self.frozen_values(), checksum))

    def _check_keys(self, sd: Mapping[str, torch.Tensor]) -> set[str]:
        """`sd`'s keys and shapes against this block (ArtifactError naming the layer); the frozen
        tensors it stores."""
        stored = {n for n in self.frozen_names if n in sd}
        expected = set(self.trainable_state_dict()) | stored
        missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
        if missing or unexpected:
            raise ArtifactError(
                f"layer {self.k}: checkpoint keys do not match the model: missing {missing}, unexpected {unexpected}"
            )
        own = {**self.frozen_tensors(), **self.state_dict()}
        for name, t in sd.items():
            if tuple(t.shape) != tuple(own[name].shape):
                raise ArtifactError(
                    f"layer {self.k}: {name} has shape {tuple(t.shape)} in the checkpoint, "
                    f"the model needs {tuple(own[name].shape)}"
                )
        return stored

    def _checked_frozen(self, values: dict[str, torch.Tensor], checksum: str) -> dict[str, torch.Tensor]:
        got = _checksum(values)
        if got != checksum:
            raise ArtifactError(
                f"layer {self.k}: frozen up-projection checksum mismatch: checkpoint {checksum[:16]}, "
                f"regenerated from seed {self.cfg.seed} {got[:16]}"
            )
        return values

    def _load_frozen_values(self, values: Mapping[str, torch.Tensor]) -> None:
        load_frozen(self.attn, {n[len("attn.") :]: v for n, v in values.items() if n.startswith("attn.")})
        load_frozen(self.mlp, {n[len("mlp.") :]: v for n, v in values.items() if n.startswith("mlp.")})


LAYER_INITS = ("random", "identity", "previous")


def init_layer(block: Block, policy: str, below: Block | Mapping[str, torch.Tensor] | None = None) -> None:
    """How layer k >= 2 starts training (`layerwise.init`): `random` keeps its own (seed, k) draw,
    `identity` zeroes both residual branches (the block starts as the identity map), `previous`
    copies `below`'s (layer k-1's block, or its `trainable_state_dict()`) trained weights."""
    if policy == "identity":
        block.zero_residual_branches()
    elif policy == "previous":
        if below is None:
            raise ValueError("init=previous needs layer k-1's trained block")
        if isinstance(below, Block):
            block.copy_trainable_from(below)
        else:
            block.copy_trainable_state(below, block.k - 1)
    elif policy != "random":
        raise ValueError(f"unknown layer init {policy!r}; allowed: {', '.join(LAYER_INITS)}")


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    lines = "".join(f"{name}={tensor_sha256(t)}\n" for name, t in tensors.items())
    return hashlib.sha256(lines.encode()).hexdigest()


class Head(nn.Module):
    """Final RMSNorm + output projection.

    Tied: the embedding matrix is passed in. Untied: its own `proj (V, D)` from `(seed, "head")`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.proj = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if self.proj is not None and not self.proj.weight.is_meta:
            self.init_proj()

    def init_weights(self) -> None:
        with torch.no_grad():
            self.norm.weight.fill_(1.0)
        if self.proj is not None:
            self.init_proj()

    def init_proj(self) -> None:
        with torch.no_grad():
            w = self.proj.weight
            w.copy_(normal(w.shape, self.cfg.init_std, generator(self.cfg.seed, "head")))

    def forward(self, h: torch.Tensor, embed_weight: torch.Tensor | None = None) -> torch.Tensor:
        """h (..., D) -> logits (..., V). `embed_weight (V, D)` is used only when tied."""
        h = self.norm(h)
        if self.proj is not None:
            return self.proj(h)
        if embed_weight is None:
            raise ValueError("tied head: pass the embedding matrix as embed_weight")
        return F.linear(h, embed_weight)

    def as_linear(self, embed_weight: torch.Tensor | None = None) -> tuple[nn.Module, torch.Tensor]:
        """(norm, W (V, D)) with forward(h, embed_weight) == F.linear(norm(h), W): the head as its
        final linear map, for a loss that applies it to a few rows at a time."""
        if self.proj is not None:
            return self.norm, self.proj.weight
        if embed_weight is None:
            raise ValueError("tied head: pass the embedding matrix as embed_weight")
        return self.norm, embed_weight


class Transformer(nn.Module):
    """Embedding -> layers 1..L -> head; any contiguous slice can run on its own."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg, k) for k in range(1, cfg.n_layers + 1))
        self.head = Head(cfg)

    def init_weights(self) -> None:
        """Every tensor from its own (seed, ...) stream: what the constructor draws, into a model built by `empty`."""
        self.embed.init_weights()
        for block in self.blocks:
            block.init_weights()
        self.head.init_weights()

    def init_frozen(self) -> None:
        """Every block's frozen tensors, regenerated: what a state dict cannot fill (they are not in it)."""
        for block in self.blocks:
            block.init_frozen()

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> h (B, T, D)."""
        return self.embed(ids)

    def run_layers(self, h: torch.Tensor, first: int, last: int, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Layers first..last inclusive (1-based) on h (B, T, D); first > last returns h unchanged."""
        if first > last:
            return h
        if first < 1 or last > self.cfg.n_layers:
            raise ValueError(f"layers {first}..{last} are outside 1..{self.cfg.n_layers}")
        for block in self.blocks[first - 1 : last]:
            h = block(h, pad_mask)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + head on h (..., D) -> (..., V)."""
        return self.head(h, self.embed.weight if self.head.proj is None else None)

    def head_as_linear(self) -> tuple[nn.Module, torch.Tensor]:
        """`logits` as (final norm, W (V, D)): logits(h) == F.linear(norm(h), W)."""
        return self.head.as_linear(self.embed.weight if self.head.proj is None else None)

    def forward(self, ids: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, V)."""
        return self.logits(self.run_layers(self.embed_tokens(ids), 1, self.cfg.n_layers, pad_mask))
