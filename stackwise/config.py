"""From a composed Hydra config to validated, typed run settings.

`RunConfig.from_hydra(cfg)` is the one place where the YAML tree is read: it builds the typed
`ModelConfig`, `MaskingConfig` and `DataConfig`, fills the model's vocabulary from the data's
tokenizer, checks every value (naming the bad one), and derives the hashes that tie artifacts to
the settings that made them. Everything downstream takes a `RunConfig`, never the raw tree.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stackwise.errors import ConfigError
from stackwise.model.config import ModelConfig
from stackwise.model.portable_rng import VERSION as FROZEN_INIT
from stackwise.objective.masking import MaskingConfig

STAGES = ("embed", "layer", "fusion", "all", "e2e")
TRAINED_STAGES = ("embed", "layer", "fusion", "e2e")
LAYER_INITS = ("random", "identity", "previous")
CACHE_DTYPES = ("float32", "bfloat16", "float16")

# Trainer keys that change how fast / where a stage runs or what it prints, not what it learns.
# They stay out of the config hashes, so a run can move from CPU to GPU between stages.
# `precision` is among them, but what it makes of the weights is not: see PRECISION_WEIGHTS.
_NON_RESULT_TRAINER_KEYS = {
    "accelerator",
    "devices",
    "num_nodes",
    "strategy",
    "precision",
    "enable_progress_bar",
    "enable_model_summary",
    "log_every_n_steps",
    "val_check_interval",
    "check_val_every_n_epoch",
    "limit_val_batches",
    "num_sanity_val_steps",
    "deterministic",
    "benchmark",
    "profiler",
    "default_root_dir",
    "enable_checkpointing",
    "logger",
    "callbacks",
    "_target_",  # the class Hydra instantiates (lightning.Trainer), not one of its arguments
}


# trainer.precision: every value lightning.Trainer takes (its int and short aliases too; null is
# its default, 32-true) but transformer-engine*, which swaps in layers this model does not have.
# Each maps to the dtype the weights are held and trained in: that is part of the settings'
# identity (RunConfig.hashes). Autocast (the *-mixed values) keeps fp32 weights and changes results
# only by rounding, as moving from CPU to GPU does, so a run may change it between stages; a
# *-true value trains weights of another dtype, a different result, so artifacts made in it are
# never taken for fp32 ones (and the experiment folder's name keeps the value: experiment_name).
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


# The values that compute in fp32 or fp64 throughout: no autocast, no half-precision weights.
FULL_PRECISION = (None, "32-true", "32", 32, "64-true", "64", 64)
# trainer.precision=16-true keeps the weights and AdamW's state in fp16, where an eps below the
# smallest normal number (2**-14) rounds to 0 or near it: the first step divides by ~0 (NaN).
_FP16_MIN_EPS = 2.0**-14


def precision_weights(precision: Any) -> str:
    """The dtype of the weights under `trainer.precision` (a validated value)."""
    return PRECISION_WEIGHTS[precision]


def _valid_precision(v: Any) -> bool:
    # 32.0 == 32 and True == 1 would match the dict keys; Lightning takes neither
    return not isinstance(v, (bool, float)) and v in PRECISION_WEIGHTS


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prefix: str) -> OptimConfig:
        cfg = cls(**_known_fields(cls, d, prefix))
        _check(
            isinstance(cfg.betas, (list, tuple))
            and len(cfg.betas) == 2
            and all(_is_number(b) and 0 <= b < 1 for b in cfg.betas),
            f"{prefix}.betas",
            f"must be two numbers in [0, 1), got {cfg.betas!r}",
        )
        cfg.betas = tuple(float(b) for b in cfg.betas)
        _check(_is_number(cfg.lr) and cfg.lr > 0, f"{prefix}.lr", f"must be a finite number > 0, got {cfg.lr!r}")
        _check(
            _is_number(cfg.weight_decay) and cfg.weight_decay >= 0,
            f"{prefix}.weight_decay",
            f"must be a number >= 0, got {cfg.weight_decay!r}",
        )
        _check(_is_number(cfg.eps) and cfg.eps > 0, f"{prefix}.eps", f"must be a number > 0, got {cfg.eps!r}")
        _check(
            _is_int(cfg.warmup_steps) and cfg.warmup_steps >= 0,
            f"{prefix}.warmup_steps",
            f"must be an integer >= 0, got {cfg.warmup_steps!r}",
        )
        _check(
            _is_number(cfg.min_lr_ratio) and 0 <= cfg.min_lr_ratio <= 1,
            f"{prefix}.min_lr_ratio",
            f"must be a number in [0, 1], got {cfg.min_lr_ratio!r}",
        )
        return cfg


@dataclass
class CacheConfig:
    views: int = 2
    dtype: str = "float32"
    shard_size: int = 1024
    batch_size: int = 64
    train_sequences: Any = None  # int, None (all) or "auto" (what the next stage reads: RunConfig)
    last_layer: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CacheConfig:
        cfg = cls(**_known_fields(cls, d, "cache"))
        for name in ("views", "shard_size", "batch_size"):
            v = getattr(cfg, name)
            _check(_is_int(v) and v > 0, f"cache.{name}", f"must be a positive integer, got {v!r}")
        _check(
            cfg.dtype in CACHE_DTYPES, "cache.dtype", f"unknown dtype {cfg.dtype!r}; allowed: {', '.join(CACHE_DTYPES)}"
        )
        if cfg.train_sequences is not None and cfg.train_sequences != "auto":
            _check(
                _is_int(cfg.train_sequences) and cfg.train_sequences > 0,
                "cache.train_sequences",
                f"must be a positive integer, auto or null, got {cfg.train_sequences!r}",
            )
        _check_bool(cfg.last_layer, "cache.last_layer")
        return cfg


@dataclass
class FusionConfig:
    finetune_steps: int = 0
    lr: float = 1e-3
    check: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FusionConfig:
        cfg = cls(**_known_fields(cls, d, "fusion"))
        _check(
            _is_int(cfg.finetune_steps) and cfg.finetune_steps >= 0,
            "fusion.finetune_steps",
            f"must be an integer >= 0, got {cfg.finetune_steps!r}",
        )
        _check(_is_number(cfg.lr) and cfg.lr > 0, "fusion.lr", f"must be a finite number > 0, got {cfg.lr!r}")
        _check_bool(cfg.check, "fusion.check")
        return cfg


@dataclass
class SampleConfig:
    """The sample printed at the end of `stage=all` (text data only); `stackwise-generate` does more."""

    enabled: bool = True
    prompt: str = ""
    length: int | None = None  # tokens in all, prompt included; null = data.seq_len
    steps: int | None = None  # unmasking steps; null = one per masked token
    temperature: float = 1.0
    top_k: int | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SampleConfig:
        cfg = cls(**_known_fields(cls, d, "sample"))
        _check(isinstance(cfg.enabled, bool), "sample.enabled", f"must be true or false, got {cfg.enabled!r}")
        _check(isinstance(cfg.prompt, str), "sample.prompt", f"must be a string, got {cfg.prompt!r}")
        for name in ("length", "steps", "top_k"):
            v = getattr(cfg, name)
            _check(
                v is None or (_is_int(v) and v > 0), f"sample.{name}", f"must be a positive integer or null, got {v!r}"
            )
        _check(
            isinstance(cfg.temperature, (int, float))
            and not isinstance(cfg.temperature, bool)
            and cfg.temperature >= 0,
            "sample.temperature",
            f"must be a number >= 0, got {cfg.temperature!r}",
        )
        return cfg


@dataclass
class RunConfig:
    """Everything one `stackwise-train` invocation needs, validated."""

    stage: str
    k: int | None
    experiment: str
    seed: int
    exp_dir: Path
    overwrite: bool
    verify: bool
    model: ModelConfig
    masking: MaskingConfig
    data: Any  # stackwise.data.tokens.DataConfig
    optim: OptimConfig
    cache: CacheConfig
    fusion: FusionConfig
    layer_init: str  # layerwise.init
    embed_budget: float  # layerwise.embed_budget: stage 1's steps = this x trainer.max_steps
    sample: SampleConfig
    trainer: dict  # the `trainer` node (lightning.Trainer kwargs)
    stages: dict  # per-stage {"trainer": {...}, "optim": {...}} overrides
    logger: dict | None = None
    callbacks: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)  # the resolved tree, for hparams and hashing

    # ------------------------------------------------------------------ per-stage settings
    def trainer_kwargs(self, stage: str) -> dict:
        """`trainer` merged with `stages.<stage>.trainer`; e2e's max_steps defaults to the layer-wise budget."""
        kw = {**self.trainer, **self.stages.get(stage, {}).get("trainer", {})}
        if stage == "embed" and "max_steps" not in self.stages.get("embed", {}).get("trainer", {}):
            kw["max_steps"] = max(1, round(self.embed_budget * int(kw["max_steps"])))
        if stage == "e2e" and "max_steps" not in self.stages.get("e2e", {}).get("trainer", {}):
            kw["max_steps"] = self.layerwise_steps()
        if stage == "fusion":  # the fine-tune budget has one home: fusion.finetune_steps
            kw["max_steps"] = self.fusion.finetune_steps
        return kw

    def optim_for(self, stage: str) -> OptimConfig:
        base = dataclasses.asdict(self.optim)
        if stage == "fusion":
            base["lr"] = self.fusion.lr
        base.update(self.stages.get(stage, {}).get("optim", {}))
        return OptimConfig.from_dict(base, f"stages.{stage}.optim")

    def max_steps(self, stage: str) -> int:
        return int(self.trainer_kwargs(stage)["max_steps"])

    def layerwise_steps(self) -> int:
        """Optimizer steps of the whole layer-wise run: stage 1, stages 2..L and the fusion fine-tune."""
        return (
            self.max_steps("embed") + (self.model.n_layers - 1) * self.max_steps("layer") + self.fusion.finetune_steps
        )

    def cache_train_sequences(self) -> int | None:
        """Training sequences to cache (None = all). `auto`: as many as the next stage reads, so
        that it sees every cached (sequence, view) row once and no row is cached for nothing."""
        n = self.cache.train_sequences
        if n != "auto":
            return n
        rows = (
            self.max_steps("layer")
            * self.data.batch_size
            * int(self.trainer_kwargs("layer").get("accumulate_grad_batches", 1))
        )
        views_read = 1 if self.masking.schedule == "per_layer" else self.cache.views  # per_layer: one view a stage
        return -(-rows // views_read)

    def tokens_per_step(self, stage: str) -> int:
        accumulate = int(self.trainer_kwargs(stage).get("accumulate_grad_batches", 1))
        return self.data.batch_size * self.data.seq_len * accumulate

    # ------------------------------------------------------------------ hashes
    def hashes(self) -> dict[str, str]:
        """Which settings each artifact depends on.

        `layer` covers every layer-wise stage (they share their settings), `fusion` adds the
        fusion settings on top, `e2e` is independent of the layer-wise settings but for its budget.
        """
        r = self.raw
        common = {
            "model": self.model.to_dict(),
            "masking": dataclasses.asdict(self.masking),
            "data": _data_identity(r.get("data", {})),
            "seed": self.seed,
            "cache": {"views": self.cache.views, "train_sequences": self.cache_train_sequences()},
            "frozen_init": FROZEN_INIT,  # how the frozen tensors are drawn: another draw, another model
        }
        layer = {
            **common,
            "embed": self._train_identity("embed"),
            "layer": self._train_identity("layer"),
            "layer_init": self.layer_init,
        }
        fusion = {
            "layer": _digest(layer),
            "fusion": dataclasses.asdict(self.fusion),
            "train": self._train_identity("fusion"),
        }
        e2e = {**common, "train": self._train_identity("e2e")}
        return {"layer": _digest(layer), "fusion": _digest(fusion), "e2e": _digest(e2e)}

    def _train_identity(self, stage: str) -> dict:
        kw = self.trainer_kwargs(stage)
        trainer = {k: v for k, v in kw.items() if k not in _NON_RESULT_TRAINER_KEYS}
        return {
            "trainer": trainer,
            "weights": precision_weights(kw.get("precision")),
            "optim": dataclasses.asdict(self.optim_for(stage)),
            "batch_size": self.data.batch_size,
        }

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hydra(cls, cfg: DictConfig, override_dirname: str = "") -> RunConfig:
        """Validate a composed config. Raises ConfigError naming the first bad value."""
        from stackwise.data.tokens import DataConfig, vocab_info  # the data layer owns tokenizers

        try:
            raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except Exception as e:  # a ??? left unset or a broken interpolation
            key = getattr(e, "full_key", None) or "config"
            raise ConfigError(str(key), f"{_first_line(e)}") from None
        raw.pop("hydra", None)

        stage = raw.get("stage")
        _check(stage in STAGES, "stage", f"unknown stage {stage!r}; allowed: {', '.join(STAGES)}")
        seed = raw.get("seed")
        _check(_is_int(seed) and seed >= 0, "seed", f"must be an integer >= 0, got {seed!r}")

        data = DataConfig.from_dict(raw.get("data") or {}, prefix="data")
        model_node = dict(raw.get("model") or {})
        vocab = vocab_info(data)  # (vocab_size, mask_id, pad_id) of the data's tokenizer
        for key, value in zip(("vocab_size", "mask_id", "pad_id"), vocab, strict=True):
            if model_node.get(key) is None:
                model_node[key] = value
            elif key == "vocab_size":
                # A padded vocabulary (rows no token uses, e.g. 128000 for a 258-id byte tokenizer or a
                # multiple of 64 for speed) is fine; fewer rows than token ids is not.
                _check(
                    _is_int(model_node[key]) and model_node[key] >= value,
                    "model.vocab_size",
                    f"is {model_node[key]} but the data's tokenizer has {value} ids; set it >= {value} "
                    "or leave it null to take the tokenizer's",
                )
            elif model_node[key] != value:
                raise ConfigError(
                    f"model.{key}",
                    f"is {model_node[key]} but the data's tokenizer has {key}={value}; "
                    "leave it null to take the tokenizer's",
                )
        model = ModelConfig.from_dict(model_node)
        masking = MaskingConfig.from_dict(raw.get("masking") or {}, prefix="masking")
        masking.validate(model.n_layers)

        k = raw.get("k")
        if stage == "layer":
            _check(k is not None, "k", f"stage=layer needs k in 2..{model.n_layers} (the layer to train), got null")
            _check(
                _is_int(k) and 2 <= k <= model.n_layers,
                "k",
                f"must be an integer in 2..n_layers={model.n_layers} for stage=layer (k=1 is stage=embed), got {k!r}",
            )
        elif k is not None:
            _check(_is_int(k) and 1 <= k <= model.n_layers, "k", f"must be in 1..n_layers={model.n_layers}, got {k!r}")

        cache = CacheConfig.from_dict(raw.get("cache") or {})
        if masking.schedule == "per_layer" and cache.views != model.n_layers:
            raise ConfigError(
                "cache.views",
                f"the per_layer schedule caches one mask view per layer: set "
                f"cache.views={model.n_layers} (n_layers), got {cache.views}",
            )
        stages = raw.get("stages") or {}
        for name, node in stages.items():
            _check(name in TRAINED_STAGES, f"stages.{name}", f"unknown stage; allowed: {', '.join(TRAINED_STAGES)}")
            for sub in node or {}:
                _check(sub in ("trainer", "optim"), f"stages.{name}.{sub}", "allowed keys: trainer, optim")
        stages = {
            n: {"trainer": dict((v or {}).get("trainer") or {}), "optim": dict((v or {}).get("optim") or {})}
            for n, v in stages.items()
        }

        layerwise = dict(raw.get("layerwise") or {})
        for key in layerwise:
            _check(key in ("init", "embed_budget"), f"layerwise.{key}", "unknown key; allowed: init, embed_budget")
        # fallbacks equal conf/config.yaml's defaults (for a root config without a `layerwise` node)
        layer_init = layerwise.get("init", "previous")
        _check(
            layer_init in LAYER_INITS,
            "layerwise.init",
            f"unknown init {layer_init!r}; allowed: {', '.join(LAYER_INITS)}",
        )
        embed_budget = layerwise.get("embed_budget", 2.0)
        _check(
            _is_number(embed_budget) and embed_budget > 0,
            "layerwise.embed_budget",
            f"must be a number > 0 (stage 1 trains for embed_budget x trainer.max_steps), got {embed_budget!r}",
        )

        for flag in ("overwrite", "verify", "debug"):
            _check_bool(raw.get(flag, False), flag)
        _check_trainer(raw.get("trainer") or {}, "trainer")
        for name, node in stages.items():
            _check_trainer(node["trainer"], f"stages.{name}.trainer")
        experiment = experiment_name(raw.get("experiment"), override_dirname)
        output_root = raw.get("output_root") or "outputs"
        _check(isinstance(output_root, str), "output_root", f"must be a folder path, got {output_root!r}")
        # structure only: readers (load_run) may use a read-only folder; the trainer checks writability
        check_output_dir(Path(output_root).expanduser() / experiment, "output_root", writable=False)
        run = cls(
            stage=stage,
            k=k,
            experiment=experiment,
            seed=seed,
            exp_dir=Path(output_root).expanduser() / experiment,
            overwrite=raw.get("overwrite", False),
            verify=raw.get("verify", False),
            model=model,
            masking=masking,
            data=data,
            optim=OptimConfig.from_dict(raw.get("optim") or {}, "optim"),
            cache=cache,
            fusion=FusionConfig.from_dict(raw.get("fusion") or {}),
            layer_init=layer_init,
            embed_budget=float(embed_budget),
            sample=SampleConfig.from_dict(raw.get("sample") or {}),
            trainer=dict(raw.get("trainer") or {}),
            stages=stages,
            logger=raw.get("logger") or None,
            callbacks=dict(raw.get("callbacks") or {}),
            raw=raw,
        )
        for name in ("embed", "layer", "e2e"):
            steps = run.trainer_kwargs(name).get("max_steps")
            _check(
                _is_int(steps) and steps > 0,
                "trainer.max_steps",
                f"must be a positive integer for stage {name}, got {steps!r}",
            )
            run.optim_for(name)
        for name in TRAINED_STAGES:
            eps = run.optim_for(name).eps
            if precision_weights(run.trainer_kwargs(name).get("precision")) == "float16" and eps < _FP16_MIN_EPS:
                where = f"stages.{name}.optim.eps" if "eps" in stages.get(name, {}).get("optim", {}) else "optim.eps"
                raise ConfigError(
                    where,
                    f"is {eps:g}, too small for trainer.precision=16-true (fp16 weights and AdamW state: stage "
                    f"{name} would divide by ~0); set it >= {_FP16_MIN_EPS:.2g} or use bf16-true or 16-mixed",
                )
        return run


def load_run(exp_dir: Path, stage: str = "all") -> RunConfig:
    """The RunConfig an experiment folder was made with (its run_config.json), re-validated."""
    import json as _json

    from stackwise.artifacts import ExperimentPaths
    from stackwise.errors import ArtifactError

    exp_dir = Path(exp_dir)
    path = ExperimentPaths(exp_dir).run_config
    if not path.is_file():
        raise ArtifactError(
            f"{exp_dir} is not a StackWise experiment folder (no {path.name}); "
            "give outputs/<experiment> of a stackwise-train run"
        )
    try:
        raw = _json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not readable JSON ({_first_line(e)})") from None
    raw.update(stage=stage, k=None, experiment=exp_dir.name, output_root=str(exp_dir.parent))
    return RunConfig.from_hydra(OmegaConf.create(raw))


def check_output_dir(path: Path, field_name: str, writable: bool = True) -> None:
    """`path` (which need not exist yet) can become a folder this run writes in: no file in the way,
    and (`writable`) write permission on its nearest existing ancestor. Checked before Hydra or the
    pipeline create it."""
    p = Path(path).absolute()
    if p.exists() and not p.is_dir():
        raise ConfigError(field_name, f"{p} exists and is not a folder")
    anc = p
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ConfigError(field_name, f"cannot create {p}: {anc} is a file, not a folder")
    if writable and not os.access(anc, os.W_OK | os.X_OK):
        raise ConfigError(field_name, f"cannot create {p}: {anc} is not writable")


# Trainer arguments the pipeline relies on, checked here so a typo stops before any work (Lightning
# itself would only complain when the stage's Trainer is built, after the data is prepared).
_TRAINER_CHECKS = {
    "accumulate_grad_batches": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "val_check_interval": (
        lambda v: v is None or (_is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1),
        "an integer >= 1 (steps), a fraction in (0, 1] or null",
    ),
    "gradient_clip_val": (lambda v: v is None or (_is_number(v) and v >= 0), "a number >= 0 or null"),
    "limit_val_batches": (
        lambda v: v is None or (_is_int(v) and v >= 0) or (isinstance(v, float) and 0 <= v <= 1),
        "an integer >= 0, a fraction in [0, 1] or null",
    ),
    "log_every_n_steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "num_sanity_val_steps": (lambda v: _is_int(v) and v >= -1, "an integer >= -1"),
    "max_epochs": (lambda v: v is None or (_is_int(v) and v >= -1), "an integer >= -1 or null"),
}


def _check_trainer(node: Mapping[str, Any], prefix: str) -> None:
    if "precision" in node and not _valid_precision(node["precision"]):
        allowed = ", ".join(dict.fromkeys(str(v) for v in PRECISION_WEIGHTS if v is not None))
        raise ConfigError(f"{prefix}.precision", f"unknown precision {node['precision']!r}; allowed: {allowed}")
    for key, (ok, allowed) in _TRAINER_CHECKS.items():
        if key in node and not ok(node[key]):
            raise ConfigError(f"{prefix}.{key}", f"must be {allowed}, got {node[key]!r}")


# ---------------------------------------------------------------------- experiment names
def experiment_name(experiment: str | None, override_dirname: str = "") -> str:
    """The experiment folder: `experiment` if given, else the result-changing overrides, else "default"."""
    if experiment is not None:
        name = str(experiment)
        _check(
            bool(name) and "/" not in name and name not in (".", ".."),
            "experiment",
            f"must be a plain folder name, got {name!r}",
        )
        return name
    override_dirname = _drop_fp32_precision(override_dirname)
    if not override_dirname:
        return "default"
    name = re.sub(r"[/\\\s]+", "_", override_dirname)
    if len(name) > 120:  # keep it readable and within file-name limits
        name = name[:100] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return name


# `[+]trainer.precision=V` or `[+]stages.<name>.trainer.precision=V` in Hydra's override_dirname
_PRECISION_OVERRIDE = re.compile(r"(?:^|,)\+{0,2}(?:stages\.\w+\.)?trainer\.precision=([^,]*)")


def _drop_fp32_precision(override_dirname: str) -> str:
    """The overrides without a precision that keeps fp32 weights: such a run shares the folder (and the
    hash) of an fp32 one, as a run on another device does; a bf16-true run gets a folder of its own."""

    def keep(m: re.Match) -> str:
        value = m.group(1)
        key = None if value == "null" else int(value) if value.isdigit() else value
        return "" if PRECISION_WEIGHTS.get(key) == "float32" else m.group(0)

    return _PRECISION_OVERRIDE.sub(keep, override_dirname).strip(",")


def register_resolvers() -> None:
    """OmegaConf resolvers used by conf/ (`sw.experiment`, `sw.alternate`)."""
    if not OmegaConf.has_resolver("sw.experiment"):
        OmegaConf.register_new_resolver("sw.experiment", lambda exp, dirname="": experiment_name(exp, dirname or ""))
    if not OmegaConf.has_resolver("sw.alternate"):
        # sw.alternate:gqa,mla,4 -> [gqa, mla, gqa, mla]
        OmegaConf.register_new_resolver("sw.alternate", lambda a, b, n: [a if i % 2 == 0 else b for i in range(int(n))])


# ---------------------------------------------------------------------- helpers
def _known_fields(cls, d: Mapping[str, Any], prefix: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    for key in d:
        _check(key in names, f"{prefix}.{key}", f"unknown key; allowed: {', '.join(sorted(names))}")
    return copy.deepcopy(dict(d))


def _data_identity(d: Mapping[str, Any]) -> dict:
    """The data settings that change what is learned (not workers or where the token cache lives)."""
    return {k: v for k, v in d.items() if k not in ("num_workers", "cache_dir")}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A finite int or float (not a bool, not a string: `optim.lr=abc` must not reach a comparison)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_bool(v: Any, field_name: str) -> None:
    # bool("no") is True: a mistyped flag such as overwrite=maybe must stop, not count as true
    _check(isinstance(v, bool), field_name, f"must be true or false, got {v!r}")


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(field_name, message)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
