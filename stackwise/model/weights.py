"""Layer-wise weights as module state dicts, and the modules and models built from them (no Lightning, no files).

A layer-wise stage trains three modules: its `Block`, the final norm (+ untied output projection)
in a `Head`, and, in stage 1 only, the `Embedding`. `LayerWeights` holds their state dicts side by
side, one section per module, exactly as each module's own `state_dict()` names them, so nothing is
prefixed on the way out or stripped on the way in. `layers/layer_k.pt` stores one `LayerWeights`
(stackwise/artifacts/checkpoints.py writes and reads it; an untied projection goes to a file of its own).

With `layerwise.top_layers=m` > 0 a stage also trains the top segment, blocks L-m+1..L, between
its block and the head (SegProp): `LayerModules.top` / `LayerWeights.top`, carried from stage to
stage like the final norm, and kept beside the latest layer file only, like an untied projection.

    LayerWeights.of(modules, dtype)   trained modules -> weights (CPU copies, in the dtype they are saved in)
    weights.modules(cfg, k)           weights -> modules (frozen tensors regenerated and checked)
    first_layer(cfg), next_layer(...) the modules a stage starts training from
    assemble(cfg, layers)             the fused Transformer, filled one layer at a time
    fused_tensors(cfg, layers)        the fused model's state dict, one layer at a time, never built
    assembled_tensors(model, layout)  the same entries from an assembled model (no file read, no draw)

Nothing here draws a tensor it then overwrites: a module that is loaded is built on the meta device
and given storage (`transformer.empty`), and only what no state dict holds is drawn (the frozen
tensors, and the part of a block `init=previous` does not copy). Every draw is the one the module's
constructor makes, so the values are those of building it whole.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from stackwise.errors import ArtifactError
from stackwise.model.config import ModelConfig
from stackwise.model.transformer import Block, Embedding, Head, Transformer, empty, init_layer

Device = str | torch.device


class LayerModules(NamedTuple):
    """The modules one layer-wise stage trains; `embed` only in stage 1; `top`: the top segment's
    blocks L-m+1..L in order (`layerwise.top_layers=m`), None when m = 0."""

    block: Block
    head: Head
    embed: Embedding | None = None
    top: nn.ModuleList | None = None


def _cpu(state: dict[str, Tensor], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    out = {}
    for name, t in state.items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)  # on the tensor's own device: less to copy to the host
        c = t.to("cpu").contiguous()
        # clone a tensor that still shares the module's storage (a view of a larger tensor would
        # otherwise keep, and save, the whole storage; a live one would change under us)
        out[name] = c.clone() if c.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() else c
    return out


@dataclass
class LayerWeights:
    """What one layer-wise stage trained, per module. Frozen tensors are not stored: the block
    regenerates them from (seed, k) and checks them against `frozen_sha256`."""

    block: dict[str, Tensor]  # Block.trainable_state_dict()
    frozen_sha256: str  # Block.frozen_up_checksum()
    head: dict[str, Tensor]  # Head.state_dict(): final norm (+ untied projection, when it was read)
    embed: dict[str, Tensor] | None = None  # Embedding.state_dict(): stage 1 only
    # the top segment (layerwise.top_layers > 0, when it was read): {layer j: TopBlock}, j = L-m+1..L
    top: dict[int, TopBlock] | None = None

    @classmethod
    def of(cls, modules: LayerModules, dtype: torch.dtype | None = None, draw_on: Device | None = None) -> LayerWeights:
        """CPU copies of the trained modules' state, floating-point tensors cast to `dtype` (default:
        kept). The frozen checksums are drawn on `draw_on` (default: each block's device): a stage's
        GPU draws them in milliseconds even once Lightning has moved the trained modules to the host."""
        block, head, embed, top = modules
        return cls(
            block=_cpu(block.trainable_state_dict(), dtype),
            frozen_sha256=block.frozen_up_checksum(draw_on),
            head=_cpu(head.state_dict(), dtype),
            embed=None if embed is None else _cpu(embed.state_dict(), dtype),
            top={b.k: TopBlock(_cpu(b.trainable_state_dict(), dtype), b.frozen_up_checksum(draw_on)) for b in top or ()}
            or None,
        )

    def load_into(self, modules: LayerModules) -> None:
        """Copy these weights into the modules they came from (cast to each tensor's dtype): after
        `of(modules, dtype)` with a narrower dtype, the modules hold exactly what the file holds."""
        block, head, embed, top = modules
        block.load_state_dict(self.block)
        head.load_state_dict(self.head)
        if embed is not None and self.embed is not None:
            embed.load_state_dict(self.embed)
        for b in top or ():
            b.load_state_dict(self.top[b.k].block)

    def sections(self) -> dict[str, dict[str, Tensor]]:
        """{module: state dict} for every module present: what a checkpoint file stores."""
        out = {"block": self.block, "head": self.head}
        if self.embed is not None:
            out["embed"] = self.embed
        return out

    def numel(self) -> int:
        top = sum(t.numel() for b in (self.top or {}).values() for t in b.block.values())
        return top + sum(t.numel() for section in self.sections().values() for t in section.values())

    def load_block(self, block: Block, check: bool = True) -> None:
        """Into a block of the same layer: ArtifactError on missing keys, shapes or a frozen-checksum
        mismatch. `check=False`: the frozen tensors are drawn (on the block's device) without their
        checksum, for weights whose `frozen_sha256` this process drew itself (a stage's saved weights)."""
        if check:
            block.load_trainable_state_dict(self.block, self.frozen_sha256)
        else:
            block.load_trainable_only(self.block)  # stores an imported frozen tensor, which init_frozen skips
            block.init_frozen()

    def modules(self, cfg: ModelConfig, k: int, device: Device = "cpu") -> LayerModules:
        """Layer k's modules holding these weights (the embedding too when they have one), on `device`.

        When these weights no longer hold their untied projection (only the latest stage's is kept),
        the head's projection is its own (seed, "head") draw: enough to run layer k (its caching
        pass never reads the head), not to train on from it (`next_layer` needs the real one)."""
        block = empty(lambda: Block(cfg, k), device)
        self.load_block(block)
        if cfg.tie_embeddings or "proj.weight" in self.head:
            head = head_of(cfg, self, device=device)
        else:
            head = empty(lambda: Head(cfg), device)
            head.init_proj()
            head.load_state_dict(self.head, strict=False)
        embed = None
        if self.embed is not None:
            embed = empty(lambda: Embedding(cfg), device)
            embed.load_state_dict(self.embed)
        return LayerModules(block, head, embed, self.top_blocks(cfg, device))

    def top_blocks(self, cfg: ModelConfig, device: Device = "cpu", check: bool = True) -> nn.ModuleList | None:
        """The top segment's blocks holding these weights (frozen tensors regenerated and checked:
        `load_block`'s `check`); None without one."""
        if not self.top:
            return None
        blocks = nn.ModuleList()
        for j, weights in sorted(self.top.items()):
            block = empty(lambda j=j: Block(cfg, j), device)
            LayerWeights(weights.block, weights.frozen_sha256, {}).load_block(block, check)
            blocks.append(block)
        return blocks


class TopBlock(NamedTuple):
    """One block of the top segment as a layer file keeps it: its trainable state and frozen checksum."""

    block: dict[str, Tensor]
    frozen_sha256: str


def top_indices(cfg: ModelConfig, top_layers: int) -> range:
    """The layers of the top segment: L-m+1..L (empty for m = 0)."""
    return range(cfg.n_layers - top_layers + 1, cfg.n_layers + 1)


def first_layer(cfg: ModelConfig, device: Device = "cpu", top_layers: int = 0) -> LayerModules:
    """Stage 1 starts from scratch: layer 1, the head and the embedding (and the top segment's
    blocks L-m+1..L), each from its own (seed, ...) init: the draws of the whole model's init."""
    parts = (
        empty(lambda: Block(cfg, 1), device),
        empty(lambda: Head(cfg), device),
        empty(lambda: Embedding(cfg), device),
    )
    top = nn.ModuleList(empty(lambda j=j: Block(cfg, j), device) for j in top_indices(cfg, top_layers))
    for part in (*parts, *top):
        part.init_weights()
    return LayerModules(*parts, top if top_layers else None)


def next_layer(
    cfg: ModelConfig,
    k: int,
    policy: str,
    below: LayerWeights,
    device: Device = "cpu",
    top_layers: int = 0,
    check: bool = True,
) -> LayerModules:
    """Stage k >= 2 starts from layer k-1's weights: the final norm (+ untied head) and the top
    segment carried forward, the new block started by `policy` (`init_layer`: random, identity or
    previous). `check=False`: `below` are weights this process saved (their frozen checksums its own
    draws), the top segment's frozen tensors are drawn without checking them again."""
    want = list(top_indices(cfg, top_layers))
    if sorted(below.top or {}) != want:
        raise ArtifactError(
            f"layer {k - 1}'s weights hold the top segment {sorted(below.top or {})} but layerwise.top_layers="
            f"{top_layers} needs layers {want} (only the latest stage's is kept, in layers/layer_<k>.top.safetensors)"
        )
    block = empty(lambda: Block(cfg, k), device)
    block.init_frozen()
    if policy != "previous":
        block.init_trainable()
    elif cfg.kind(k - 1) != cfg.kind(k):  # only the attention keeps its own draw: the stream up to it
        block.init_trainable(last=block.last_attention_tensor())
    # `previous` copies layer k-1's trained tensors straight from its file's section: building its
    # block would redraw (and re-check) its frozen tensors, seconds at large sizes, for nothing
    init_layer(block, policy, below.block if policy == "previous" else None)
    return LayerModules(block, head_of(cfg, below, device=device), None, below.top_blocks(cfg, device, check))


# {fused state dict name: the dtype its layer file holds it in}, in `fused_tensors`' order
FusedLayout = dict[str, torch.dtype]


def assemble(
    cfg: ModelConfig,
    layers: Iterable[LayerWeights],
    device: Device = "cpu",
    layout: FusedLayout | None = None,
    drawn: Collection[int] = (),
) -> Transformer:
    """The fused model from layer_1 … layer_K (K <= n_layers): the embedding from stage 1, block k
    from stage k, the final norm and head (and the top segment, when stage K holds one) from stage
    K (the last one to train them; a partial stack, K < L-m, keeps blocks K+1..L-m's own init).

    `layers` is read once, in order, and no layer is kept once it is copied in, so an iterator that
    loads each layer file when asked holds one layer at a time beside the model. Other blocks
    beyond K keep their own (seed, k) initialisation. `layout`, when given, is filled with the
    names and file dtypes of what was loaded, in `fused_tensors`' order: what `assembled_tensors`
    needs to write the model exactly as `fused_tensors` streams it from the same layers. `drawn`:
    the layers (top segment's included) whose frozen checksums were drawn, or checked, by this
    process already (weights it kept in memory): their frozen tensors are drawn on `device` without
    the checksum again (a host copy and hash of each, ~0.3 s a layer at the seed's sizes)."""
    model = empty(lambda: Transformer(cfg), device)
    seen: FusedLayout = {} if layout is None else layout
    seen.clear()
    last, partial = None, False
    frozen: list[tuple[Block, str]] = []  # (block, its layer file's frozen checksum), loaded last
    for k, weights in enumerate(layers, start=1):
        if k == 1:
            if weights.embed is None:
                raise ValueError("assemble needs layer 1's weights first (they hold the embedding)")
            model.embed.load_state_dict(weights.embed)
            seen.update((f"embed.{n}", weights.embed[n].dtype) for n in model.embed.state_dict())
        if k > cfg.n_layers:
            raise ValueError(f"assemble got more than n_layers={cfg.n_layers} layers")
        model.blocks[k - 1].load_trainable_only(weights.block)
        frozen.append((model.blocks[k - 1], weights.frozen_sha256))
        seen.update((f"blocks.{k - 1}.{n}", t.dtype) for n, t in weights.block.items())
        last, top = weights.head, weights.top or {}
    if last is None:
        raise ValueError("assemble needs layer 1's weights first (they hold the embedding)")
    for block in model.blocks[k:]:
        if block.k in top:
            block.load_trainable_only(top[block.k].block)
            frozen.append((block, top[block.k].frozen_sha256))
            seen.update((f"blocks.{block.k - 1}.{n}", t.dtype) for n, t in top[block.k].block.items())
        else:
            block.init_weights()
            partial = True
    # The frozen tensors last, the top layer's first: the layer stages just drew the last few
    # layers' (frozen_normal keeps the last 4 drawn), which layers 1, 2, ... would evict before
    # they are reached (4 redraws of ~2 s each at the seed sizes). Each is checked as it is loaded.
    for block, checksum in reversed(frozen):
        if block.k in drawn:
            block.init_frozen()
        else:
            block.load_frozen_checked(checksum)
    head = _head_state(cfg, last)
    model.head.load_state_dict(head)
    seen.update((f"head.{n}", head[n].dtype) for n in model.head.state_dict())
    if partial:  # blocks that no layer file holds: not a fused model (fused_tensors refuses it)
        seen.clear()
    return model


def loaded_weights_problem(
    block: Block,
    dtypes: Mapping[str, torch.dtype],
    embed: Embedding | None = None,
    embed_dtypes: Mapping[str, torch.dtype] | None = None,
) -> str | None:
    """Why `loaded_weights` could not give back the layer file's tensors from the modules loaded from
    it (None when it can): `dtypes` (and `embed_dtypes`, layer 1's) are the file's {name: dtype}."""
    if block.stored:  # an imported layer's stored frozen tensor: the file's, read from it
        return f"layer {block.k} stores frozen tensors"
    parts = [(f"layer {block.k}", block.state_dict(), dtypes)]
    if embed_dtypes is not None:
        if embed is None:
            return "no embedding"
        parts.append(("the embedding", embed.state_dict(), embed_dtypes))
    for what, state, want in parts:
        if set(state) != set(want):
            return f"{what} holds {sorted(state)}, its file {sorted(want)}"
        for name, dtype in want.items():
            t = state[name]
            if type(t) not in (Tensor, nn.Parameter) or t.is_meta:
                return f"{what}'s {name} is not a plain tensor (sharded or on the meta device)"
            if t.dtype != dtype and not _holds_exactly(t.dtype, dtype):
                return f"{what}'s {name} is {t.dtype}, {dtype} in its file"
    return None


def loaded_weights(
    block: Block,
    dtypes: Mapping[str, torch.dtype],
    frozen_sha256: str,
    embed: Embedding | None = None,
    embed_dtypes: Mapping[str, torch.dtype] | None = None,
) -> LayerWeights:
    """The weights of the layer file `block` (and `embed`, from layer 1's) was loaded from, taken
    from the modules instead of the file: each tensor cast back to the dtype the file holds it in,
    in the file's order, on the modules' device (the same tensor where the dtype is the file's). The
    values are the file's exactly once `loaded_weights_problem` is None (the module's dtype holds
    every value of the file's). No head: the fused model's is the last layer's, read whole."""
    state = block.state_dict()
    out = LayerWeights(
        block={n: state[n].detach().to(d) for n, d in dtypes.items()}, frozen_sha256=frozen_sha256, head={}
    )
    if embed is not None and embed_dtypes is not None:
        e = embed.state_dict()
        out.embed = {n: e[n].detach().to(d) for n, d in embed_dtypes.items()}
    return out


def _check_top(cfg: ModelConfig, k: int, top: Mapping[int, TopBlock]) -> None:
    """A top segment read with layer k is layers k+1..L exactly (the fused model's last blocks)."""
    if top and sorted(top) != list(range(k + 1, cfg.n_layers + 1)):
        raise ArtifactError(
            f"layer {k}'s top segment holds layers {sorted(top)}, the fused model needs {k + 1}..{cfg.n_layers}"
        )


def fused_tensors(
    cfg: ModelConfig, layers: Iterable[LayerWeights], device: Device = "cpu"
) -> Iterator[tuple[str, Tensor]]:
    """The fused model's state dict (`Transformer.state_dict()` names and order) from layer_1 …
    layer_K (K = L, or L-m with the top segment K holds), one entry at a time, without building the
    model: each layer is checked as `assemble` checks it (keys, shapes, its frozen checksum against
    the regeneration from (seed, k), drawn on `device`: a GPU draws it in milliseconds, the bits are
    the same) and dropped once its tensors are out. The tensors keep the dtype the layer files hold."""
    with torch.device("meta"):
        shapes = Transformer(cfg)
    head: dict[str, Tensor] | None = None
    n = 0
    for n, weights in enumerate(layers, start=1):
        if n > cfg.n_layers:
            raise ValueError(f"the fused model has n_layers={cfg.n_layers} layers, more were given")
        if n == 1:
            if weights.embed is None:
                raise ValueError("the fused model needs layer 1's weights first (they hold the embedding)")
            yield from _checked("embed", shapes.embed, weights.embed)
        shapes.blocks[n - 1].check_trainable_state_dict(weights.block, weights.frozen_sha256, device)
        yield from ((f"blocks.{n - 1}.{name}", t) for name, t in weights.block.items())
        head, top = weights.head, weights.top or {}
    if head is None or n + len(top) != cfg.n_layers:
        raise ValueError(f"the fused model needs all n_layers={cfg.n_layers} layers, got {n} (+ {len(top)} on top)")
    _check_top(cfg, n, top)
    for j, weights in sorted(top.items()):
        shapes.blocks[j - 1].check_trainable_state_dict(weights.block, weights.frozen_sha256, device)
        yield from ((f"blocks.{j - 1}.{name}", t) for name, t in weights.block.items())
    yield from _checked("head", shapes.head, head)


def assembled_tensors(model: Transformer, layout: FusedLayout) -> Iterator[tuple[str, Tensor]]:
    """What `fused_tensors` yields for the layers `model` was assembled from (`assemble(...,
    layout=layout)`), taken from the model instead: the same names in the same order, each in the
    dtype its layer file holds it in, one tensor at a time on the host. Nothing is read or drawn
    again. Check `assembled_problem` first: the model's tensors must still hold the files' values."""
    state = model.state_dict()
    for name, dtype in layout.items():
        t = state[name].detach()
        # cast on the model's device (less to copy to the host); the result is always a tensor of
        # its own, so that it does not change with the model (a fine-tune), copied only when it
        # would otherwise still be the model's (on the host, in its own dtype)
        own = t.dtype == dtype and t.device.type == "cpu"
        yield name, t.to(dtype).to("cpu", copy=own)


def assembled_problem(model: Transformer, layout: FusedLayout) -> str | None:
    """Why `assembled_tensors(model, layout)` would not be what `fused_tensors` streams from the layer
    files (None when it is): no layout (a partial stack), a tensor missing, or one held in a dtype
    that does not hold every value of the file's exactly (a precision plugin cast the model to
    bf16/fp16 after it was assembled from fp32 files). A wider float holds a narrower one exactly:
    bf16 and fp16 in fp32, any of them in fp64."""
    if not layout:
        return "no layout of the layer files' tensors (not assembled from a whole stack)"
    state = model.state_dict()
    for name, dtype in layout.items():
        t = state.get(name)
        if type(t) not in (Tensor, nn.Parameter) or t.is_meta:
            return f"{name} is not a plain tensor of the model (missing, sharded or on the meta device)"
        if t.dtype != dtype and not _holds_exactly(t.dtype, dtype):
            return f"{name} is {t.dtype} in the model, {dtype} in the layer files"
    return None


def _holds_exactly(wide: torch.dtype, narrow: torch.dtype) -> bool:
    """Whether every `narrow` value is a `wide` value (a round trip narrow -> wide -> narrow is exact)."""
    if wide not in (torch.float32, torch.float64) or not narrow.is_floating_point:
        return False
    return torch.finfo(narrow).bits < torch.finfo(wide).bits


def _checked(prefix: str, module: torch.nn.Module, state: Mapping[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """`state`'s entries as `prefix.name`, once its keys and shapes are those of `module` (meta is fine)."""
    own = module.state_dict()
    if set(own) != set(state):
        raise ArtifactError(f"{prefix}: keys {sorted(state)} do not match the model's {sorted(own)}")
    for name, t in own.items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise ArtifactError(
                f"{prefix}.{name} has shape {tuple(state[name].shape)}, the model needs {tuple(t.shape)}"
            )
    return ((f"{prefix}.{name}", state[name]) for name in own)


def head_of(cfg: ModelConfig, weights: LayerWeights, proj: Tensor | None = None, device: Device = "cpu") -> Head:
    """The final norm (+ untied projection) stage k left behind: how depth prefix k reads out.
    `proj` stands in for an untied projection `weights` do not hold (only the latest stage's is kept)."""
    head = empty(lambda: Head(cfg), device)
    head.load_state_dict(_head_state(cfg, weights.head, proj))
    return head


def _head_state(cfg: ModelConfig, state: Mapping[str, Tensor], proj: Tensor | None = None) -> dict[str, Tensor]:
    state = dict(state)
    if proj is not None and "proj.weight" not in state:
        state["proj.weight"] = proj
    if not cfg.tie_embeddings and "proj.weight" not in state:
        raise ArtifactError(
            "the untied output projection of the last layer is missing (only the latest stage's is kept, "
            "in layers/layer_<k>.head.safetensors)"
        )
    return state
