"""The small nodes of the run config: optimizer, layer-wise levers, activation cache, fusion,
the closing sample, per-stage overrides. Their dataclass defaults are the defaults (see
stackwise/config/run.py); each `__post_init__` checks what the types cannot."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from stackwise.data.cache.layout import CACHE_DTYPES, FP8
from stackwise.errors import ConfigError
from stackwise.structured import Structured, check, is_int, is_number

STAGE_KEYS = ("embed", "layer", "fusion", "e2e")  # the stages that train, each with its own budget
LAYER_INITS = ("random", "identity", "previous")
SAVE_DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class OptimConfig(Structured):
    """AdamW + linear warmup + cosine decay, for every stage unless stages.<name>.optim overrides it."""

    PATH = "optim"

    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    # an exponential moving average of the trained weights (MDLM keeps one, at 0.9999), updated after
    # every optimizer step; the stage then scores, saves and caches the averaged weights. 0 = off
    ema_decay: float = 0.0
    # the decay after n averaged steps is min(ema_decay, (1 + n) / (10 + n)) (the warm-up of TF's and
    # timm's EMA): without it a 200-step stage at 0.999 keeps 82 % of its initial weights (0.999^200)
    ema_warmup: bool = True

    def __post_init__(self) -> None:
        betas = list(self.betas) if isinstance(self.betas, (list, tuple)) else None
        if betas is None or len(betas) != 2 or not all(is_number(b) and 0 <= b < 1 for b in betas):
            raise ConfigError(self.key("betas"), f"must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = [float(b) for b in betas]
        check(is_number(self.lr) and self.lr > 0, self.key("lr"), f"must be a finite number > 0, got {self.lr!r}")
        check(
            is_number(self.weight_decay) and self.weight_decay >= 0,
            self.key("weight_decay"),
            f"must be a number >= 0, got {self.weight_decay!r}",
        )
        check(is_number(self.eps) and self.eps > 0, self.key("eps"), f"must be a number > 0, got {self.eps!r}")
        check(
            is_number(self.ema_decay) and 0 <= self.ema_decay < 1,
            self.key("ema_decay"),
            f"must be a number in [0, 1) (0 = no averaging), got {self.ema_decay!r}",
        )
        check(
            isinstance(self.ema_warmup, bool), self.key("ema_warmup"), f"must be true or false, got {self.ema_warmup!r}"
        )
        check(
            is_int(self.warmup_steps) and self.warmup_steps >= 0,
            self.key("warmup_steps"),
            f"must be an integer >= 0, got {self.warmup_steps!r}",
        )
        check(
            is_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1,
            self.key("min_lr_ratio"),
            f"must be a number in [0, 1], got {self.min_lr_ratio!r}",
        )


@dataclass
class LayerwiseConfig(Structured):
    """The levers of greedy layer-wise training. The defaults are the winners of the README's sweep
    ("Closing the gap"): each lowered the final loss at the same total token budget."""

    PATH = "layerwise"

    # how layer k >= 2 starts: random (drawn from (seed, k)) | identity (output projections zero, the
    # block starts as the identity map) | previous (a copy of layer k-1's trained weights; in a hybrid
    # model only its norms and MLP when the attention kinds differ)
    init: str = "previous"
    # stage 1 (embeddings + layer 1, the base every later layer builds on) trains for
    # embed_budget x trainer.max_steps steps; stages.embed.trainer.max_steps, when set, wins
    embed_budget: float = 2.0
    # the dtype layers/layer_k.pt (and an untied head) is written in: auto = bfloat16 when the stage
    # trained under a bf16 precision (bf16-mixed, bf16-true), else the dtype its weights are held in
    # (float32 on the CPU default); what a later stage (init=previous, the carried head) and the
    # fused model start from, so it is part of the experiment's identity
    save_dtype: str = "auto"
    # SegProp-style top segment: the last m blocks (L-m+1..L) train in every stage beside its own block,
    # between it and the head, carried from stage to stage; the layer stages are then 1..L-m and the
    # fused model takes blocks L-m+1..L from stage L-m. 0 = plain greedy layer-wise training
    top_layers: int = 0

    def __post_init__(self) -> None:
        check(
            is_int(self.top_layers) and self.top_layers >= 0,
            self.key("top_layers"),
            f"must be an integer >= 0 (0 = no top segment), got {self.top_layers!r}",
        )
        check(
            self.save_dtype in SAVE_DTYPES,
            self.key("save_dtype"),
            f"unknown dtype {self.save_dtype!r}; allowed: {', '.join(SAVE_DTYPES)}",
        )
        check(
            self.init in LAYER_INITS,
            self.key("init"),
            f"unknown init {self.init!r}; allowed: {', '.join(LAYER_INITS)}",
        )
        check(
            is_number(self.embed_budget) and self.embed_budget > 0,
            self.key("embed_budget"),
            f"must be a number > 0 (stage 1 trains for embed_budget x trainer.max_steps), got {self.embed_budget!r}",
        )

    def saved_dtype(self, precision: Any) -> str:
        """The dtype a stage trained under `precision` (a validated `trainer.precision`) saves its layer in."""
        if self.save_dtype != "auto":
            return self.save_dtype
        return "bfloat16" if precision in BF16_PRECISION else precision_weights(precision)


CACHE_STORES = ("disk", "memory", "recompute", "auto")
CACHE_KEEPS = ("all", "last", "auto")


@dataclass
class CacheConfig(Structured):
    """The activation cache written after each layer-wise stage, and how stage k reads it
    (stackwise/data/cache/). Loader workers are `data.num_workers`, shared with the token loaders."""

    PATH = "cache"

    views: int = 2  # mask views cached per sequence (per_layer schedule: one per layer)
    # float32 | bfloat16 | float16 | float8_e4m3 (e4m3 with a float32 scale per token vector, read
    # back as bfloat16: half the bytes of bfloat16); the hardware group sets it with the precision
    dtype: str = "float32"
    # rows per shard, or auto: as many as hold 256 MiB of hidden states, at most 1024 (the files of
    # one shard are hashed on one core: a batch that spans several shards is hashed on several)
    shard_size: Any = "auto"
    batch_size: int = 64  # sequences per batch of every caching pass (stage 1's and each later one's)
    # training sequences cached: auto = what the next stage reads (each row once), an integer (a
    # seeded subset), or null (all); `Any` because OmegaConf has no int-or-string type
    train_sequences: Any = "auto"
    last_layer: bool = False  # also cache acts_layer{L} (no later stage needs it)
    # stage k's training order shuffles blocks of this many consecutive cached rows (each block read
    # in one go); 1 = every row on its own, the plain shuffle. Another value is another order.
    shuffle_block: int = 1
    pin_memory: bool = False  # batches in page-locked memory: faster, asynchronous copies to the GPU
    prefetch_factor: int = 2  # batches each loader worker reads ahead (with data.num_workers > 0)
    # on a GPU, stage k's batches are copied to it one batch ahead, on a side stream (overlapping compute)
    device_prefetch: bool = True
    # where stage k's input lives: disk (outputs/<name>/acts/); memory: the same files in a folder
    # of a RAM-backed file system (tmpfs), <memory_dir>/stackwise/<name>-<hash of the experiment
    # folder>/, no disk bandwidth, gone at reboot (a resumed run rebuilds them from the layer files);
    # recompute: no cache, stage k runs the frozen layers 1..k-1 on the token batches; auto: the
    # cheapest of the three on this machine (stackwise/data/cache/store.py; disk on a CPU)
    store: str = "disk"
    memory_dir: str = "/dev/shm"
    # which caches stay: all, or last: acts_layer{k-1} is deleted once acts_layer{k} is complete
    # (at most two on the disk at once); auto: all while every cache the run writes fits, else last
    keep: str = "auto"

    def __post_init__(self) -> None:
        for name in ("views", "batch_size", "shuffle_block", "prefetch_factor"):
            v = getattr(self, name)
            check(is_int(v) and v > 0, self.key(name), f"must be a positive integer, got {v!r}")
        v = self.shard_size
        check(
            v == "auto" or (is_int(v) and v > 0),
            self.key("shard_size"),
            f"must be a positive integer or auto, got {v!r}",
        )
        check(
            self.dtype in CACHE_DTYPES,
            self.key("dtype"),
            f"unknown dtype {self.dtype!r}; allowed: {', '.join(CACHE_DTYPES)}",
        )
        check(
            self.dtype != FP8 or hasattr(torch, "float8_e4m3fn"),
            self.key("dtype"),
            f"{FP8} needs torch.float8_e4m3fn (torch >= 2.1); this torch is {torch.__version__}",
        )
        check(
            self.store in CACHE_STORES,
            self.key("store"),
            f"unknown store {self.store!r}; allowed: {', '.join(CACHE_STORES)}",
        )
        check(
            self.keep in CACHE_KEEPS,
            self.key("keep"),
            f"unknown keep {self.keep!r}; allowed: {', '.join(CACHE_KEEPS)}",
        )
        n = self.train_sequences
        check(
            n is None or n == "auto" or (is_int(n) and n > 0),
            self.key("train_sequences"),
            f"must be a positive integer, auto or null, got {n!r}",
        )


def _switch(node: Structured, name: str, what: str) -> None:
    v = getattr(node, name)
    check(isinstance(v, bool) or v == "auto", node.key(name), f"must be true, false or auto ({what}), got {v!r}")


@dataclass
class StepConfig(Structured):
    """How the training step runs on its device: speed and memory only, never what is learned
    (not part of the experiment's identity, stackwise/identity.py). `auto` picks what pays where
    the stage runs: on CUDA the fast paths, on CPU today's exact arithmetic (the CPU default run
    keeps its weights bit for bit)."""

    PATH = "step"

    # torch.compile each transformer block (its forward; checkpoints keep their tensor names);
    # auto = on when the stage trains on CUDA (not under FSDP) for at least COMPILE_MIN_STEPS steps
    compile: Any = "auto"
    # AdamW's fused CUDA kernel (torch.optim.AdamW(fused=True)); auto = when every trained tensor is
    # on CUDA and no fp16 gradient scaler is in use
    fused_adamw: Any = "auto"
    # rows of masked positions per chunk of the head + cross-entropy, so the (N, vocab) logits are
    # never held whole (stackwise/objective/loss.py); 0 = one chunk; auto = as many rows as keep
    # one chunk's fp32 logits within 2**28 values (1 GiB): a 128k vocabulary gives 2092-row
    # chunks, a byte vocabulary never chunks
    loss_chunk: Any = "auto"
    # mid-stage checkpoints written by a background thread (training goes on meanwhile; the file
    # still appears atomically, complete or not at all); auto = when training on a GPU
    async_checkpoints: Any = "auto"
    # minutes between mid-stage checkpoints, counted in training time (Lightning's
    # train_time_interval) instead of every trainer.val_check_interval steps; 0 = by steps; auto =
    # CHECKPOINT_MINUTES on a GPU, by steps on the CPU (whose tests resume at an exact step). On one
    # H200 at the seed's sizes, e2e's checkpoints every 40 steps (fp32 weights and AdamW state) took
    # ~110 s of a 211 s fit (benchmarks/RESULTS.md, "Fifth lease set")
    checkpoint_minutes: Any = "auto"

    CHECKPOINT_MINUTES = 30.0

    # Measured on one H200 at the seed's sizes (benchmarks/RESULTS.md, "Third lease set"): a compiled
    # block steps 1.10x faster (0.082 -> 0.075 s for a layer stage at 8 x 2048, 0.65 s -> ~0.59 s for
    # e2e with 8 layers), and compiling costs a process ~27 s of inductor start-up plus ~16 s a stage.
    # Below ~1000 steps (~600 for e2e, ~3000 for a layer stage) it does not pay back.
    COMPILE_MIN_STEPS = 1000

    def checkpoint_interval(self, on_gpu: bool) -> float:
        """Minutes of training between mid-stage checkpoints; 0 = every val_check_interval steps."""
        if self.checkpoint_minutes == "auto":
            return self.CHECKPOINT_MINUTES if on_gpu else 0.0
        return float(self.checkpoint_minutes)

    def compiles(self, on_cuda: bool, sharded: bool, steps: int) -> bool:
        """Whether a stage of `steps` optimizer steps compiles its blocks."""
        if self.compile != "auto":
            return bool(self.compile)
        return on_cuda and not sharded and steps >= self.COMPILE_MIN_STEPS

    def __post_init__(self) -> None:
        for name, what in (
            ("compile", f"auto = on CUDA for stages of >= {self.COMPILE_MIN_STEPS} steps"),
            ("fused_adamw", "auto = on CUDA"),
            ("async_checkpoints", "auto = on a GPU"),
        ):
            _switch(self, name, what)
        m = self.checkpoint_minutes
        check(
            m == "auto" or (is_number(m) and m >= 0),
            self.key("checkpoint_minutes"),
            f"must be a number of minutes >= 0 (0 = every trainer.val_check_interval steps) or auto, got {m!r}",
        )
        n = self.loss_chunk
        check(
            n == "auto" or (is_int(n) and n >= 0),
            self.key("loss_chunk"),
            f"must be an integer >= 0 (rows per chunk, 0 = unchunked) or auto, got {n!r}",
        )


@dataclass
class FusionConfig(Structured):
    """Assemble layer_1..L, check that the fused model reproduces the last stage, optionally fine-tune."""

    PATH = "fusion"

    finetune_steps: int = 80  # ~9% of the default budget (320 + 3 x 160 + 80 steps); 0 = no fine-tune
    lr: float = 1e-3
    check: bool = True
    # the fine-tune's training rates: uniform in [mask_fraction_min, mask_fraction_max], a null bound
    # taken from the `masking` node; both null = the `masking` node's schedule. Its validation (and
    # the fusion check) keeps the `masking` node's schedule
    mask_fraction_min: float | None = None
    mask_fraction_max: float | None = None

    def __post_init__(self) -> None:
        check(
            is_int(self.finetune_steps) and self.finetune_steps >= 0,
            self.key("finetune_steps"),
            f"must be an integer >= 0, got {self.finetune_steps!r}",
        )
        check(is_number(self.lr) and self.lr > 0, self.key("lr"), f"must be a finite number > 0, got {self.lr!r}")
        for name in ("mask_fraction_min", "mask_fraction_max"):
            v = getattr(self, name)
            check(
                v is None or (is_number(v) and 0 < v <= 1),
                self.key(name),
                f"must be a number in (0, 1] or null (the masking node's), got {v!r}",
            )

    def rates(self, lo: float, hi: float) -> tuple[float, float] | None:
        """The fine-tune's own training range (`lo`, `hi`: the masking node's bounds, for a null one),
        or None when neither bound is set (the masking node's schedule)."""
        if self.mask_fraction_min is None and self.mask_fraction_max is None:
            return None
        own = (self.mask_fraction_min, self.mask_fraction_max)
        return (float(lo if own[0] is None else own[0]), float(hi if own[1] is None else own[1]))


@dataclass
class SampleConfig(Structured):
    """The sample printed at the end of `stage=all` (text data only); `stackwise-generate` does more.

    The sampler's defaults are `stackwise.generation.DEFAULTS` (the setting benchmarks/samplers.py
    measured best on the default model); tests/test_sample_quality.py checks the two agree."""

    PATH = "sample"

    enabled: bool = True
    prompt: str = ""
    length: int | None = None  # tokens in all, prompt included; null = data.seq_len
    steps: int | None = None  # unmasking steps; null = one per masked token
    strategy: str = "random"  # the reveal order: confidence, margin, entropy or random
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = 0.9  # nucleus sampling; null or 1 = no limit
    schedule: str = "linear"  # how many masks each step reveals: linear or cosine
    block_length: int | None = None  # semi-autoregressive blocks; null = one block

    def __post_init__(self) -> None:
        # imported here: stackwise.generation imports stackwise.config
        from stackwise.generation.unmasking import SCHEDULES, STRATEGIES

        for name in ("length", "steps", "top_k", "block_length"):
            v = getattr(self, name)
            check(v is None or (is_int(v) and v > 0), self.key(name), f"must be a positive integer or null, got {v!r}")
        check(
            is_number(self.temperature) and self.temperature >= 0,
            self.key("temperature"),
            f"must be a number >= 0, got {self.temperature!r}",
        )
        check(
            self.top_p is None or (is_number(self.top_p) and 0 < self.top_p <= 1),
            self.key("top_p"),
            f"must be a number in (0, 1] or null (no limit), got {self.top_p!r}",
        )
        check(
            self.strategy in STRATEGIES,
            self.key("strategy"),
            f"unknown strategy {self.strategy!r}; allowed: {', '.join(STRATEGIES)}",
        )
        check(
            self.schedule in SCHEDULES,
            self.key("schedule"),
            f"unknown schedule {self.schedule!r}; allowed: {', '.join(SCHEDULES)}",
        )

    def sampler(self) -> dict[str, Any]:
        """The sampler keyword arguments of `stackwise.generation.sample_text` / `sample_ids`."""
        keys = ("steps", "strategy", "temperature", "top_k", "top_p", "schedule", "block_length")
        return {k: getattr(self, k) for k in keys}


@dataclass
class StageOverrides(Structured):
    """One stage's overrides of `trainer` (lightning.Trainer arguments) and `optim` (OptimConfig
    fields): plain mappings, since a key is added with Hydra's `+` (`+stages.layer.optim.lr=1e-3`);
    RunConfig checks them against the trainer checks and OptimConfig."""

    trainer: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)


@dataclass
class StagesConfig(Structured):
    """Per-stage overrides, e.g. `+stages.layer.trainer.max_steps=300`. e2e's max_steps defaults to
    the layer-wise token budget: embed + (n_layers - layerwise.top_layers - 1) * layer + fine-tune steps."""

    PATH = "stages"

    embed: StageOverrides = field(default_factory=StageOverrides)
    layer: StageOverrides = field(default_factory=StageOverrides)
    fusion: StageOverrides = field(default_factory=StageOverrides)
    e2e: StageOverrides = field(default_factory=StageOverrides)

    def of(self, stage_key: str) -> StageOverrides:
        return getattr(self, stage_key)


# trainer.precision: every value lightning.Trainer takes (its int and short aliases too; null is
# its default, 32-true) but transformer-engine*, which swaps in layers this model does not have.
# Each maps to the dtype the weights are held and trained in (autocast, the *-mixed values, keeps
# fp32 weights). Every value is part of the experiment's identity (stackwise/identity.py).
PRECISION_WEIGHTS: dict[Any, str] = {
    None: "float32",
    "32-true": "float32",
    "32": "float32",
    32: "float32",
    "bf16-mixed": "float32",
    "bf16": "float32",
    "16-mixed": "float32",  # on CPU Lightning runs it as bf16-mixed
    "16": "float32",
    16: "float32",
    "bf16-true": "bfloat16",
    "16-true": "float16",
    "64-true": "float64",
    "64": "float64",
    64: "float64",
}
# The values that compute in bf16 (autocast or bf16 weights): their layer files are saved in bf16 by default.
BF16_PRECISION = ("bf16-mixed", "bf16", "bf16-true")
# The values that compute in fp32 or fp64 throughout: no autocast, no half-precision weights.
FULL_PRECISION = (None, "32-true", "32", 32, "64-true", "64", 64)
# trainer.precision=16-true keeps the weights and AdamW's state in fp16, where an eps below the
# smallest normal number (2**-14) rounds to 0 or near it: the first step divides by ~0 (NaN).
FP16_MIN_EPS = 2.0**-14


def precision_weights(precision: Any) -> str:
    """The dtype of the weights under `trainer.precision` (a validated value)."""
    return PRECISION_WEIGHTS[precision]


def _valid_precision(v: Any) -> bool:
    # 32.0 == 32 and True == 1 would match the dict keys; Lightning takes neither
    return not isinstance(v, (bool, float)) and v in PRECISION_WEIGHTS


# Trainer arguments the pipeline relies on, checked here so a typo stops before any work (Lightning
# itself would only complain when the stage's Trainer is built, after the data is prepared).
_TRAINER_CHECKS = {
    "accumulate_grad_batches": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "val_check_interval": (
        lambda v: v is None or (is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1),
        "an integer >= 1 (steps), a fraction in (0, 1] or null",
    ),
    "gradient_clip_val": (lambda v: v is None or (is_number(v) and v >= 0), "a number >= 0 or null"),
    "limit_val_batches": (
        lambda v: v is None or (is_int(v) and v >= 0) or (isinstance(v, float) and 0 <= v <= 1),
        "an integer >= 0, a fraction in [0, 1] or null",
    ),
    "log_every_n_steps": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "num_sanity_val_steps": (lambda v: is_int(v) and v >= -1, "an integer >= -1"),
    "max_epochs": (lambda v: v is None or (is_int(v) and v >= -1), "an integer >= -1 or null"),
}


def check_trainer(node: Mapping[str, Any], prefix: str) -> None:
    """The `trainer` node (or a stage's override of it): the arguments the pipeline relies on."""
    if "precision" in node and not _valid_precision(node["precision"]):
        allowed = ", ".join(dict.fromkeys(str(v) for v in PRECISION_WEIGHTS if v is not None))
        raise ConfigError(f"{prefix}.precision", f"unknown precision {node['precision']!r}; allowed: {allowed}")
    for key, (ok, allowed) in _TRAINER_CHECKS.items():
        if key in node and not ok(node[key]):
            raise ConfigError(f"{prefix}.{key}", f"must be {allowed}, got {node[key]!r}")
