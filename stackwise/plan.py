"""The memory planner: what each stage of a run holds on its device, and what it writes, before any
tensor exists (`stackwise-inspect --plan model=llama3_70b data.seq_len=4096 data.batch_size=2`).

Tensor sizes come from the model's own modules built on the meta device (`Block(cfg, k)`,
`Embedding`, `Head`, `Transformer`: nothing allocated), so the counts follow the real model: mha,
gqa, mla or a per-layer mix, tied or untied, frozen up-projections. The run's settings say the rest:
`trainer.precision` (per stage), `data.batch_size` / `data.seq_len` (the micro-batch of one
device: the global batch over devices x num_nodes x accumulate_grad_batches), `step.compile`,
`step.loss_chunk`, `step.fused_adamw`, `cache.dtype`, `masking`.

GPU memory of a training step, per stage (bytes; w = weight dtype bytes: 4 under *-mixed and
32-true, 2 under bf16-true; a = activation bytes: 2 under bf16/16 (mixed or true), else w;
r = residual-stream bytes = w: the embedding output and a cached input are converted to the
weights' dtype, and the residual adds keep it):
  weights       every tensor the stage holds (trainable, frozen up-projections, a later tied stage's
                copy of the embedding) x w
  autocast      *-mixed only: autocast casts each matmul weight to a bytes once per forward and the
                matmul keeps that copy for its backward: matmul weights of the blocks run x a
  gradients     trainable x w (created during backward; set to None before each forward)
  optimizer     AdamW's exp_avg and exp_avg_sq: 2 x trainable x w (fused on CUDA: no temporaries;
                the foreach kernel adds one more trainable x w during the step)
  activations   what the blocks save for backward, per token (N = micro-batch tokens), eager:
                  attention (gqa/mha): r D (block input, saved by the norm) + r D (the composite
                  rms_norm's normalised output, saved for its weight's gradient) + c a D (the
                  normalised input as each of the c = 3 projections reads it: autocast casts it
                  once per matmul; c = 1 without autocast) + a (H + 2 Hkv) hd (q, k, v after RoPE,
                  saved by SDPA's flash kernel) + a H hd (its output, read by o_proj) + 4 H (its
                  logsumexp); SDPA never holds the T x T scores (flash / memory-efficient kernel:
                  no padding mask, which is the case for packed text windows)
                  attention (mla): r D + r D + c a D (c = 2: q_a, kv_a) + the latents: q_a out and
                  its norm (a + 4 + 4) rq, kv_a out a (rkv + rope) and its norm 4 rkv + 4 rkv, the
                  casts into q_b / kv_b a (rq + rkv), kv_b out a H (nope + v) (v is a view of it),
                  q and k a H (nope + rope) each, the output a H v, logsumexp 4 H
                  MLP (SwiGLU): r D + r D (norm) + c a D (c = 2: gate, up) + 4 a F (gate out,
                  silu(gate), up out, their product)
                  dropout > 0: + 2 D (a bool mask per residual branch)
                compiled (`step.compile`, per block): the partitioner keeps the matmul and SDPA
                inputs and outputs and recomputes pointwise work: the norms' internals, the
                repeated casts (one a D each) and silu(gate) x up are not saved:
                  attention r D + a D + q k v, out, lse as above (mla: its latents once); MLP
                  r D + a D + 2 a F
                a later stage also holds its input batch: N D x the cache dtype's bytes (twice
                with `cache.device_prefetch` on a GPU: the next batch is copied one ahead)
  logits        the masked head and its loss, for M = N x the schedule's highest rate masked rows
                (a batch can be that masked): the last block's output r N D, the gathered rows
                r M D and the final norm's r M D + 4 M D; chunked (`step.loss_chunk`): the head
                weight cast to a (V D a, *-mixed: once a step, every chunk reads that copy; a later
                stage's frozen tied head keeps its cast for the whole stage, counted with the
                weights), the input gradient 4 M D and, where the head trains, its fp32 gradient sum
                4 V D, kept from the forward to the backward, plus n V (12 + 2 a) for a chunk of n
                rows (its logits, their fp32 copy and log-softmax beside the previous chunk's
                log-softmax and gradient: the eager loop; a compiled stage's fused kernel writes
                only the half-precision gradient, so this is an upper bound there); unchunked
                n = M, log-softmax saved (4 M V), no sums
  checkpoint    an asynchronous mid-stage checkpoint (`step.async_checkpoints`, on a GPU) first
                copies the state and AdamW's on the device: 3 x trainable x w, until written
The peak of a step is weights + optimizer + inputs + the largest of these moments:
  forward end   gradients (Lightning zeroes the last step's after the forward, not before it)
                + autocast + activations + logits (the loss's forward, its chunk included)
  backward start autocast + activations + what the loss keeps + the head's gradients (4 M D, and
                4 V D where the head trains) as they are made
  step          gradients (+ a tied stage 1's dense embedding gradient added in place, + foreach)
  checkpoint    gradients + the checkpoint's copy, when the stage writes one
  validation    gradients + a forward without gradients (autocast, a block at its widest, the
                loss), when validation runs between two training steps
A stage checkpoints only before its last step (none at its end: its own artifact follows), so a
checkpoint's copy lives on while the next steps run, and every moment holds it (one copy: each further checkpoint taken before the last is written
adds another, as the writer takes one at a time). Between backward start and step each block's
activations are freed as its gradients appear, so the two ends bound the backward.
The caching pass after a layer stage holds the weights (training's gradients and optimizer are
gone) and one block's forward without gradients at its widest, the MLP: N (2 a F + (2 r + a) D)
compiled (gate and up outputs, the product written over one of them, block input, its sum,
the normalised input's cast), N (3 a F + (2 r + 4 + a) D) eager; N = cache.batch_size sequences
for stage 1, a training batch for a later stage (its loader reads the input cache in those).
Measured on one H200 (benchmarks/results/2026-12-01-h200-plan/): every planned peak within 13 %
of torch.cuda.max_memory_allocated, most within 1 %. Not counted: the CUDA context and the caching
allocator's reserve, torch.compile's workspace, a padding mask (which sends SDPA to a kernel that
takes the T x T mask), FSDP sharding (divide weights, gradients and optimizer by the GPUs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from stackwise.artifacts.models import MAX_SHARD_BYTES
from stackwise.config import FULL_PRECISION, RunConfig, precision_weights
from stackwise.data.cache.layout import estimate_cache_bytes
from stackwise.model.config import ModelConfig
from stackwise.model.transformer import Block, Transformer
from stackwise.objective.loss import chunk_rows_for
from stackwise.structured import is_int

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
# bytes of a cached hidden vector element on the GPU (fp8 is decoded to bf16 on the host)
CACHE_GPU_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3": 2}
MEMORY_KEYS = ("weights", "autocast", "gradients", "optimizer", "activations", "logits", "inputs", "checkpoint")
# steps between mid-stage checkpoints when trainer.val_check_interval is not a step count (as
# stackwise/pipeline/trainers.py, which imports Lightning, sets them)
CHECKPOINT_EVERY = 50


@dataclass(frozen=True)
class Numerics:
    """How a stage computes under its `trainer.precision` (see the module docstring)."""

    w: int  # bytes of a weight, its gradient, each AdamW state
    a: int  # bytes of a matmul's input and output
    r: int  # bytes of the residual stream
    autocast: bool

    @classmethod
    def of(cls, precision: Any) -> Numerics:
        w = DTYPE_BYTES[precision_weights(precision)]
        mixed = precision not in FULL_PRECISION and w == 4
        return cls(w=w, a=2 if mixed else w, r=w, autocast=mixed)


@dataclass
class StagePlan:
    """One training stage on one device: its tensors and the peak of a training step (bytes)."""

    key: str  # embed | layer | finetune | e2e
    name: str
    tokens: int  # tokens of the micro-batch on one device
    masked: int  # masked rows the head runs on (at the schedule's highest rate)
    params: int  # every tensor the stage holds on its device (trainable and frozen)
    trainable: int
    precision: str
    compiled: bool
    memory: dict[str, int] = field(default_factory=dict)
    peak: int = 0
    peak_at: str = ""  # forward end | backward start | step
    caching: int | None = None  # the caching pass after a layer stage (no gradients, cache.batch_size)
    moments: dict[str, int] = field(default_factory=dict)  # what a step holds beyond weights, optimizer, inputs


@dataclass
class Plan:
    model: str  # a one-line description
    device: str
    stages: list[StagePlan]
    layer_files: dict[str, int]  # layer_1.pt, layer_k.pt (k >= 2), fused/
    cache_per_mtoken: int  # bytes of acts_layer{k} per million cached tokens
    cache_train_rows: int | None  # rows (sequence x view) of one acts_layer{k}'s train split; None = all
    cache_train_bytes: int | None
    fusion_host: dict[str, int]  # host RAM of the fusion stage, by part
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------ counting on meta
def _meta(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return build()


def _held(module: nn.Module) -> tuple[int, int, int]:
    """(trainable, frozen, matmul) elements of `module`: frozen = parameters that do not train and the
    blocks' frozen buffers; matmul = 2-D weights of its blocks (what autocast copies), frozen ones too."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    matmul = 0
    for block in (m for m in module.modules() if isinstance(m, Block)):
        buffers = block.frozen_tensors().values()
        frozen += sum(t.numel() for t in buffers)
        matmul += sum(p.numel() for p in block.parameters() if p.ndim == 2) + sum(t.numel() for t in buffers)
    return trainable, frozen, matmul


def block_activation_bytes(block: Block, tokens: int, num: Numerics, compiled: bool) -> int:
    """Bytes layer `block` saves for its backward over `tokens` tokens (module docstring: activations)."""
    cfg = block.cfg
    D, F, r, a = cfg.d_model, block.mlp.gate.out_features, num.r, num.a
    attn = block.attn

    def casts(readers: int) -> int:  # copies of a normalised input: autocast casts it once per matmul
        return 1 if compiled or not num.autocast else readers

    norm = r * D if compiled else 2 * r * D  # block input (+ the composite norm's normalised output)
    if block.cfg.kind(block.k) == "mla":
        H, nope, rope, v = attn.n_heads, attn.nope, attn.rope_dim, attn.v_dim
        rq, rkv = attn.q_a.out_features, attn.kv_rank
        latents = a * (rq + rkv + rope) + a * (rq + rkv)  # q_a / kv_a outputs, the casts into q_b / kv_b
        if not compiled:
            latents += 8 * (rq + rkv)  # the two latent norms' fp32 internals
        sdpa = a * H * (nope + v) + 2 * a * H * (nope + rope) + a * H * v + 4 * H
        attention = norm + casts(2) * a * D + latents + sdpa
    else:
        H, Hkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
        attention = norm + casts(3) * a * D + a * (H + 2 * Hkv) * hd + a * H * hd + 4 * H
    mlp = norm + casts(2) * a * D + (2 if compiled else 4) * a * F
    dropout = 2 * D if cfg.dropout > 0 else 0
    return tokens * (attention + mlp + dropout)


def _loss_bytes(
    V: int, D: int, tokens: int, masked: int, num: Numerics, head_trains: bool, chunk: int, cast_held: bool = False
):
    """(forward peak, kept for backward, made at the start of backward, a forward without gradients)
    of the masked head and its loss (module docstring: logits). `cast_held`: the head's cast is held
    by the stage (a later stage's frozen tied head), counted with the weights."""
    r, a, M = num.r, num.a, masked
    features = (4 if num.autocast else r) * M * D  # the final norm's output (fp32 under autocast)
    rows = r * M * D + features  # gathered rows and the composite norm's normalised copy, saved by the norm
    hidden = r * tokens * D  # the last block's output, held until the loss returns
    # the head weight cast once (stackwise/objective/loss.py: every chunk and the gradient matmuls read it)
    casts = V * D * a if num.autocast and not cast_held else 0
    no_grad = hidden + rows + casts + min(chunk or M, M) * V * (a + 8)
    if 0 < chunk < M:
        sums = features + (4 * V * D if head_trains else 0)  # input gradient, head gradient sum (fp32)
        # a chunk's logits, their fp32 copy and log-softmax beside the previous chunk's log-softmax and
        # gradient, or its gradient matmul's (V, D) output
        step = max(chunk * V * (12 + 2 * a), chunk * V * (4 + a) + (V * D * a if head_trains else 0))
        forward = hidden + rows + features + casts + sums + step
        return forward, rows + sums, features + (4 * V * D if head_trains else 0), no_grad
    logits = M * V * 4  # log-softmax, saved
    forward = hidden + rows + features + casts + M * D * a + M * V * (a + 4) + logits
    kept = rows + casts + M * D * a + logits
    head_grad = V * D * (num.w + (a if num.autocast else 0))  # of the cast weight, then of the weight
    return forward, kept, M * V * (4 + a) + (head_grad if head_trains else 0), no_grad


def _widest_no_grad(cfg: ModelConfig, F: int, tokens: int, num: Numerics, compiled: bool) -> int:
    """A block's forward without gradients at its widest, the MLP: block input and its sum with the
    attention, the normalised input and its cast, gate and up outputs and their product (compiled:
    the product is written over the gate's output, and the fp32 normalised input never exists)."""
    D, r, a = cfg.d_model, num.r, num.a
    return tokens * (2 * a * F + D * (2 * r + a) if compiled else 3 * a * F + D * (2 * r + 4 + a))


def _max_rate(run: RunConfig) -> float:
    m = run.masking
    if m.schedule == "fixed":
        return m.rate
    if m.schedule == "per_layer" and m.rates:
        return max(m.rates)
    return m.mask_fraction_max


# ------------------------------------------------------------------------------ stages
@dataclass
class _Setting:
    """What a stage's run settings say about its step on one device."""

    num: Numerics
    precision: str
    tokens: int
    masked: int
    compiled: bool
    fused_adamw: bool
    on_gpu: bool
    validates: bool  # validation runs between training steps (val_check_interval < the stage's steps)
    # a checkpoint is written in the background before the stage's last step (none at its last: the
    # stage's own artifact follows, stackwise/stages/callbacks.py StageCheckpoint); its device copy
    # lives on while the next steps run
    snapshot: bool


def _setting(run: RunConfig, budget: str) -> _Setting:
    kw = run.trainer_kwargs(budget)
    devices, nodes = kw.get("devices", 1), kw.get("num_nodes", 1)
    devices = len(devices) if isinstance(devices, (list, tuple)) else devices
    split = (devices if isinstance(devices, int) else 1) * int(nodes) * int(kw.get("accumulate_grad_batches", 1))
    tokens = max(1, run.data.batch_size // split) * run.data.seq_len
    accelerator = str(kw.get("accelerator", "cpu"))
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    strategy = str(kw.get("strategy", "auto"))
    step = run.step
    compiled = step.compiles(on_gpu, strategy.startswith("fsdp"), run.max_steps(budget))
    scaler = kw.get("precision") in ("16-mixed", "16", 16)
    fused = step.fused_adamw is True or (step.fused_adamw == "auto" and on_gpu and not scaler)
    masked = math.ceil(tokens * _max_rate(run))
    precision = str(kw.get("precision") or "32-true")
    steps, every = run.max_steps(budget), kw.get("val_check_interval")
    validates = isinstance(every, float) or (is_int(every) and every < steps)
    ckpt_every = every if is_int(every) and every > 0 else CHECKPOINT_EVERY
    background = step.async_checkpoints is True or (step.async_checkpoints == "auto" and on_gpu)
    num = Numerics.of(kw.get("precision"))
    snapshot = background and ckpt_every < steps
    return _Setting(num, precision, tokens, masked, compiled, fused, on_gpu, validates, snapshot)


def _stage(
    run: RunConfig, key: str, name: str, held: Iterable[nn.Module], blocks: list[Block], extra: dict
) -> StagePlan:
    """extra: head_trains, embed_trains, held_bytes / held_params (a tensor held beside the modules),
    input_bytes (a function of the setting)."""
    budget = {"finetune": "fusion"}.get(key, key)
    cfg, s = run.model, _setting(run, budget)
    num = s.num
    trainable = frozen = matmul = 0
    for module in held:
        t, f, m = _held(module)
        trainable, frozen, matmul = trainable + t, frozen + f, matmul + m
    chunk = chunk_rows_for(run.step.loss_chunk, cfg.vocab_size)
    V, D, F = cfg.vocab_size, cfg.d_model, max(b.mlp.gate.out_features for b in blocks)
    cast_held = bool(extra.get("head_cast_held")) and num.autocast
    fwd, kept, head_grads, no_grad = _loss_bytes(V, D, s.tokens, s.masked, num, extra["head_trains"], chunk, cast_held)
    acts = sum(block_activation_bytes(b, s.tokens, num, s.compiled) for b in blocks)
    grads = trainable * num.w
    autocast = matmul * num.a if num.autocast else 0
    mem = {
        # + a frozen tied head's cast to autocast's dtype, made once per stage (stages/layerwise.py)
        "weights": (trainable + frozen) * num.w + extra.get("held_bytes", 0) + (V * D * num.a if cast_held else 0),
        "autocast": autocast,
        "gradients": grads,
        "optimizer": 2 * trainable * num.w,
        "activations": acts,
        "logits": fwd,
        "inputs": extra["input_bytes"](s),
        # an asynchronous mid-stage checkpoint first copies the state and AdamW's on the device
        "checkpoint": 3 * trainable * num.w if s.snapshot else 0,
    }
    tied_embed = V * D * num.w if cfg.tie_embeddings and extra.get("embed_trains") else 0
    foreach = 0 if s.fused_adamw or not s.on_gpu else trainable * num.w
    copy = mem["checkpoint"]  # the copy of a checkpoint taken before this step, still being written
    moments = {
        # Lightning zeroes the gradients after the forward: the last step's are still there
        "forward end": grads + autocast + acts + fwd + copy,
        "backward start": autocast + acts + kept + head_grads + copy,
        "step": grads + tied_embed + foreach + copy,
    }
    if s.snapshot:
        moments["checkpoint"] = grads + mem["checkpoint"]
    if s.validates:  # between two steps: the last step's gradients are still held
        moments["validation"] = grads + autocast + _widest_no_grad(cfg, F, s.tokens, num, s.compiled) + no_grad + copy
    at = max(moments, key=moments.get)
    peak = mem["weights"] + mem["optimizer"] + mem["inputs"] + moments[at]
    caching = None
    if key in ("embed", "layer"):  # training's gradients and optimizer are gone by then
        # every caching pass runs cache.batch_size sequences at a time
        n = run.cache.batch_size * run.data.seq_len
        caching = mem["weights"] + _widest_no_grad(cfg, F, n, num, s.compiled)
    return StagePlan(
        key,
        name,
        s.tokens,
        s.masked,
        trainable + frozen + extra.get("held_params", 0),
        trainable,
        s.precision,
        s.compiled,
        mem,
        peak,
        at,
        caching,
        moments,
    )


def _token_inputs(s: _Setting) -> int:
    return s.tokens * (8 + 8 + 1) + s.masked * 8  # ids, targets (int64), mask, masked positions


def _cached_inputs(run: RunConfig) -> Callable[[_Setting], int]:
    def inputs(s: _Setting) -> int:
        batches = 2 if run.cache.device_prefetch and s.on_gpu else 1
        per_token = run.model.d_model * CACHE_GPU_BYTES[run.cache.dtype] + 8 + 1
        return batches * s.tokens * per_token + s.masked * 8

    return inputs


def stage_plans(run: RunConfig) -> list[StagePlan]:
    """Stage 1, the largest layer stage, the fusion check and fine-tune, e2e. A layer stage holds,
    runs and trains the top segment's blocks (`layerwise.top_layers`) beside its own."""
    cfg, last = run.model, run.layer_stages
    model = _meta(lambda: Transformer(cfg))
    embed, head = model.embed, model.head
    top = list(model.blocks[last:])  # blocks L-m+1..L: empty without a top segment
    tokens = {"head_trains": True, "embed_trains": True, "input_bytes": _token_inputs}
    first = [model.blocks[0], *top]
    plans = [_stage(run, "embed", "stage 1 (embed)", [embed, *first, head], first, tokens)]
    if last > 1:
        V, D = cfg.vocab_size, cfg.d_model
        w = _setting(run, "layer").num.w
        tied = {"held_bytes": V * D * w, "held_params": V * D, "head_cast_held": True} if cfg.tie_embeddings else {}
        extra = {"head_trains": not cfg.tie_embeddings, "input_bytes": _cached_inputs(run), **tied}
        layers = [
            _stage(run, "layer", f"layer {k}", [model.blocks[k - 1], *top, head], [model.blocks[k - 1], *top], extra)
            for k in range(2, last + 1)
        ]
        largest = max(layers, key=lambda p: p.peak)
        if len({cfg.kind(k) for k in range(2, last + 1)}) == 1:
            largest.name = f"layer k (2..{last})"
        plans.append(largest)
    blocks = list(model.blocks)
    plans.append(_stage(run, "finetune", "fusion fine-tune", [model], blocks, tokens))
    plans.append(_stage(run, "e2e", "e2e", [model], blocks, tokens))
    return plans


# ------------------------------------------------------------------------------ files and host
def _state_numel(module: nn.Module) -> int:
    return sum(t.numel() for t in module.state_dict().values())


def plan_run(run: RunConfig) -> Plan:
    """The whole plan of `run` (nothing allocated, nothing read but the config)."""
    cfg = run.model
    model = _meta(lambda: Transformer(cfg))
    # layer files (and fused/, streamed from them) hold the dtype `layerwise.save_dtype` gives
    w = torch.empty((), dtype=getattr(torch, run.layerwise.saved_dtype(run.trainer_kwargs("layer").get("precision"))))
    w = w.element_size()
    proj = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model  # untied: kept once, beside the latest layer
    head = _state_numel(model.head) - proj
    last = run.layer_stages
    # what layer_k.pt holds: block + final norm (+ embed)
    layer = [_state_numel(b) + head for b in model.blocks[:last]]
    layer[0] += _state_numel(model.embed)
    top = sum(_state_numel(b) for b in model.blocks[last:])  # the top segment: kept once, beside the latest layer
    fused = _state_numel(model) * w
    files = {"layer_1.pt": layer[0] * w, "fused/model.safetensors": fused}
    if last > 1:
        files["layer_k.pt (k >= 2)"] = max(layer[1:]) * w
    if proj:
        files["layer_k.head.safetensors (the latest layer's only)"] = proj * w
    if top:
        files["layer_k.top.safetensors (the latest layer's only)"] = top * w
    T, D = run.data.seq_len, cfg.d_model
    per_mtoken = round(estimate_cache_bytes(1, T, D, run.cache.dtype, cfg.vocab_size) * 1e6 / T)
    seqs = run.cache_train_sequences()
    rows = None if seqs is None else seqs * run.cache.views
    params = sum(_held(model)[:2])
    # fused/ is streamed from the layer files (or the assembled model, one tensor at a time): one
    # layer's state and one shard buffer at a time; the fp32 model the check and the fine-tune run
    # is built on the host unless the run has one GPU
    host = {
        "one layer file's state": (max(layer) + proj + top) * w,
        "one shard of fused/ being written": min(fused, MAX_SHARD_BYTES),
    }
    if not _one_gpu(run.trainer_kwargs("fusion")):
        host["fp32 assembled model (check, fine-tune)"] = params * 4
    notes = []
    strategy = str(run.trainer_kwargs("layer").get("strategy", "auto"))
    if strategy.startswith("fsdp"):
        notes.append("FSDP: weights, gradients and optimizer state are shared by the GPUs (not divided here)")
    if not all(isinstance(run.trainer_kwargs(b).get("devices", 1), (int, list)) for b in ("embed", "layer")):
        notes.append("trainer.devices=auto: planned for one device's share of data.batch_size as if it were 1")
    return Plan(
        model=describe(cfg),
        device=str(run.trainer_kwargs("layer").get("accelerator", "cpu")),
        stages=stage_plans(run),
        layer_files=files,
        cache_per_mtoken=per_mtoken,
        cache_train_rows=rows,
        cache_train_bytes=None if rows is None else estimate_cache_bytes(rows, T, D, run.cache.dtype, cfg.vocab_size),
        fusion_host=host,
        notes=notes,
    )


def _one_gpu(node: dict) -> bool:
    """Whether a trainer node runs on exactly one GPU (where the fused model is built), from the
    config alone: stackwise/pipeline/memory.py decides it at run time from the devices found."""
    devices, strategy = node.get("devices", "auto"), str(node.get("strategy", "auto"))
    gpu = str(node.get("accelerator", "auto")) in ("gpu", "cuda")
    one = devices in (1, "1") or (isinstance(devices, (list, tuple)) and len(devices) == 1)
    return gpu and one and strategy in ("auto", "single_device")


def describe(cfg: ModelConfig) -> str:
    kinds = sorted(set(cfg.layer_kinds()))
    return (
        f"d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads / {cfg.n_kv_heads} kv, d_ff {cfg.d_ff}, "
        f"vocab {cfg.vocab_size}, {'/'.join(kinds)}, {'tied' if cfg.tie_embeddings else 'untied'}"
    )


# ------------------------------------------------------------------------------ the table
def _amount(n: int | None, unit: int) -> str:
    return "-" if n is None else f"{n / unit:,.2f}"


def format_plan(plan: Plan) -> str:
    """The plan as the table `stackwise-inspect --plan` prints (GiB = 2^30 bytes; MiB for a model
    whose every peak is under 1 GiB)."""
    unit, name = (GIB, "GiB") if max(s.peak for s in plan.stages) >= GIB else (2**20, "MiB")

    def size(n: int | None) -> str:
        return _amount(n, unit)

    head = ["stage", "params", *MEMORY_KEYS, "peak", "caching", "peak at"]
    rows = [head]
    for s in plan.stages:
        cells = [size(s.memory[k]) for k in MEMORY_KEYS]
        count = f"{s.params / 1e9:.2f}B" if s.params >= 1e8 else f"{s.params / 1e6:.2f}M"
        rows.append([s.name, count, *cells, size(s.peak), size(s.caching), s.peak_at])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"model: {plan.model}", f"device ({plan.device}) memory of a training step, {name}:"]
    for r in rows:
        cells = [
            c.ljust(wd) if i in (0, len(r) - 1) else c.rjust(wd)
            for i, (c, wd) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    s = plan.stages[0]
    lines.append(
        f"  ({s.tokens:,} tokens a step on one device, {s.masked:,} masked at the highest rate; "
        f"{s.precision}{', compiled blocks' if s.compiled else ''}; caching: the pass after the stage)"
    )
    lines.append(f"files, {name}: " + ", ".join(f"{k} {size(v)}" for k, v in plan.layer_files.items()))
    cache = f"activation cache: {_amount(plan.cache_per_mtoken, GIB)} GiB per million tokens"
    if plan.cache_train_rows is not None:
        rows_size = _amount(plan.cache_train_bytes, GIB)
        cache += f"; one acts_layer{{k}} train split: {plan.cache_train_rows:,} rows, {rows_size} GiB"
    lines.append(cache + " (+ the validation rows)")
    parts = ", ".join(f"{k} {size(v)}" for k, v in plan.fusion_host.items())
    lines.append(f"fusion host RAM, {name}: {size(sum(plan.fusion_host.values()))} ({parts})")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
