"""`RunConfig`: the typed root of the config, and Hydra's schema for it.

One source of truth for every setting: the dataclass defaults here and in the node classes
(`ModelConfig`, `MaskingConfig`, `DataConfig`, stackwise/config/nodes.py) are the defaults.
stackwise/conf/config.yaml starts its defaults list with this schema; a group option's YAML sets
only what choosing it changes (its own name and what differs from the dataclass), and `trainer`,
`logger` and `callbacks`, which map onto Lightning's arguments, live wholly in their groups.
OmegaConf rejects unknown keys and wrong types while composing; `__post_init__` of each class
checks the rest, naming the bad value (stackwise/structured.py).

`RunConfig.from_hydra(cfg, task_overrides)` turns a composed config into a `RunConfig`: it fills
the model's vocabulary from the data's tokenizer and names the experiment folder from the
overrides (stackwise/identity.py). Everything downstream takes a `RunConfig`, never the raw tree.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stackwise import identity
from stackwise.artifacts import ExperimentPaths
from stackwise.config.nodes import (
    FP16_MIN_EPS,
    STAGE_KEYS,
    CacheConfig,
    FusionConfig,
    LayerwiseConfig,
    OptimConfig,
    SampleConfig,
    StagesConfig,
    StepConfig,
    check_trainer,
    precision_weights,
)
from stackwise.data.config import DataConfig, vocab_spec
from stackwise.errors import ArtifactError, ConfigError
from stackwise.model.config import ModelConfig
from stackwise.model.portable_rng import VERSION as FROZEN_INIT
from stackwise.objective.masking import MaskingConfig
from stackwise.structured import Structured, as_config_error, build, check, is_int

STAGES = ("embed", "layer", "fusion", "all", "e2e")


@dataclass
class RunConfig(Structured):
    """Everything one `stackwise-train` invocation needs, validated."""

    # embed | layer | fusion | all | e2e   (all = embed -> layer 2..L -> fusion, skipping finished stages)
    stage: str = "all"
    k: int | None = None  # the layer of stage=layer (2..n_layers - layerwise.top_layers); ignored by the other stages
    # the experiment folder under output_root; null = derived from the overrides that change what is
    # learned (stackwise/identity.py), "default" when there are none. A RunConfig holds the result.
    name: str | None = None
    seed: int = 0
    output_root: str = "outputs"
    overwrite: bool = False  # replace artifacts made by a different config instead of stopping
    verify: bool = False  # sha256-check every checkpoint and shard against its manifest when reading it
    debug: bool = False  # full tracebacks for user errors too (same as HYDRA_FULL_ERROR=1)
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    layerwise: LayerwiseConfig = field(default_factory=LayerwiseConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    step: StepConfig = field(default_factory=StepConfig)  # how a training step runs: speed only
    # lightning.Trainer arguments, one to one (stackwise/conf/trainer/, hardware/); every stage
    trainer: dict[str, Any] = field(default_factory=dict)
    logger: dict[str, Any] | None = None  # a Lightning logger for hydra.utils.instantiate; null = none
    callbacks: dict[str, Any] = field(default_factory=dict)  # name -> a Lightning callback to instantiate

    def __post_init__(self) -> None:
        check(self.stage in STAGES, "stage", f"unknown stage {self.stage!r}; allowed: {', '.join(STAGES)}")
        check(is_int(self.seed) and self.seed >= 0, "seed", f"must be an integer >= 0, got {self.seed!r}")
        self.name = identity.folder_name(self.name)
        check(isinstance(self.output_root, str), "output_root", f"must be a folder path, got {self.output_root!r}")
        # structure only: readers (load_run) may use a read-only folder; the CLI checks writability
        check_output_dir(self.exp_dir, "output_root", writable=False)
        m, n = self.layerwise.top_layers, self.model.n_layers
        check(
            m < n,
            "layerwise.top_layers",
            f"must be in 0..{n - 1} (n_layers={n} minus at least one layer stage), got {m}",
        )
        self._check_k()
        self.masking.validate(self.layer_stages)
        if self.masking.schedule == "per_layer" and self.cache.views != self.layer_stages:
            what = "n_layers" if m == 0 else "n_layers - layerwise.top_layers: the layer stages"
            raise ConfigError(
                "cache.views",
                f"the per_layer schedule caches one mask view per layer stage: set "
                f"cache.views={self.layer_stages} ({what}), got {self.cache.views}",
            )
        rates = self.finetune_rates()
        if rates is not None and rates[0] > rates[1]:
            raise ConfigError(
                "fusion.mask_fraction_min",
                f"the fine-tune's range [{rates[0]}, {rates[1]}] is empty: fusion.mask_fraction_min must be <= "
                "fusion.mask_fraction_max (a null bound is the masking node's)",
            )
        check_trainer(self.trainer, "trainer")
        for key in STAGE_KEYS:
            check_trainer(self.stages.of(key).trainer, f"stages.{key}.trainer")
        if "max_steps" in self.stages.fusion.trainer:
            raise ConfigError(
                "stages.fusion.trainer.max_steps", "the fine-tune's budget is fusion.finetune_steps; set that instead"
            )
        for key in ("embed", "layer", "e2e"):
            steps = self.trainer_kwargs(key).get("max_steps")
            check(
                is_int(steps) and steps > 0,
                "trainer.max_steps",
                f"must be a positive integer for stage {key}, got {steps!r}",
            )
        for key in STAGE_KEYS:
            self._check_fp16_eps(key)
            self._check_batch_split(key)

    def _check_batch_split(self, stage_key: str) -> None:
        """data.batch_size is the global batch: it must split evenly over the ranks and accumulated
        micro-batches. Checked here when the world size is known from the config (devices as a count
        or a list); `devices: auto` is resolved by Lightning and checked when the loaders are built."""
        kw = self.trainer_kwargs(stage_key)
        devices, nodes = kw.get("devices", 1), kw.get("num_nodes", 1)
        devices = len(devices) if isinstance(devices, (list, tuple)) else devices
        if not (is_int(devices) and devices > 0 and is_int(nodes) and nodes > 0):
            return
        accum = int(kw.get("accumulate_grad_batches", 1))
        split = devices * nodes * accum
        if self.data.batch_size % split:
            raise ConfigError(
                "data.batch_size",
                f"the global batch {self.data.batch_size} must be a multiple of devices {devices} x num_nodes {nodes}"
                f" x accumulate_grad_batches {accum} = {split} (stage {stage_key})",
            )

    def _check_fp16_eps(self, stage_key: str) -> None:
        eps = self.optim_for(stage_key).eps  # optim_for validates the stage's optimizer settings too
        if precision_weights(self.trainer_kwargs(stage_key).get("precision")) == "float16" and eps < FP16_MIN_EPS:
            where = f"stages.{stage_key}.optim.eps" if "eps" in self.stages.of(stage_key).optim else "optim.eps"
            raise ConfigError(
                where,
                f"is {eps:g}, too small for trainer.precision=16-true (fp16 weights and AdamW state: stage "
                f"{stage_key} would divide by ~0); set it >= {FP16_MIN_EPS:.2g} or use bf16-true or 16-mixed",
            )

    def _check_k(self) -> None:
        k, n = self.k, self.layer_stages
        last = "n_layers" if self.layerwise.top_layers == 0 else "n_layers - layerwise.top_layers"
        if self.stage == "layer":
            check(k is not None, "k", f"stage=layer needs k in 2..{n} (the layer to train), got null")
            check(
                is_int(k) and 2 <= k <= n,
                "k",
                f"must be an integer in 2..{last}={n} for stage=layer (k=1 is stage=embed), got {k!r}",
            )
        elif k is not None:
            check(is_int(k) and 1 <= k <= n, "k", f"must be in 1..{last}={n}, got {k!r}")

    # ------------------------------------------------------------------ derived
    @property
    def exp_dir(self) -> Path:
        return Path(self.output_root).expanduser() / str(self.name)

    @property
    def layer_stages(self) -> int:
        """The layer stages 1..L-m: with a top segment of m blocks (`layerwise.top_layers`) the last m
        layers train beside every stage instead of in stages of their own."""
        return self.model.n_layers - self.layerwise.top_layers

    @property
    def layer_init(self) -> str:
        return self.layerwise.init

    @property
    def embed_budget(self) -> float:
        """Stage 1's steps = this x trainer.max_steps."""
        return float(self.layerwise.embed_budget)

    def to_dict(self) -> dict[str, Any]:
        """The whole config as plain data (what run_config.json holds and `load_run` reads back)."""
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ per-stage settings
    def trainer_kwargs(self, stage_key: str) -> dict[str, Any]:
        """`trainer` merged with `stages.<stage>.trainer`; e2e's max_steps defaults to the layer-wise budget."""
        own = self.stages.of(stage_key).trainer
        kw = {**self.trainer, **own}
        if stage_key == "embed" and "max_steps" not in own:
            kw["max_steps"] = max(1, round(self.embed_budget * int(kw["max_steps"])))
        if stage_key == "e2e" and "max_steps" not in own:
            kw["max_steps"] = self.layerwise_steps()
        if stage_key == "fusion":  # the fine-tune budget has one home: fusion.finetune_steps
            kw["max_steps"] = self.fusion.finetune_steps
        return kw

    def optim_for(self, stage_key: str) -> OptimConfig:
        base = dataclasses.asdict(self.optim)
        if stage_key == "fusion":
            base["lr"] = self.fusion.lr
        base.update(self.stages.of(stage_key).optim)
        return OptimConfig.from_dict(base, f"stages.{stage_key}.optim")

    def finetune_rates(self) -> tuple[float, float] | None:
        """The fusion fine-tune's training range (fusion.mask_fraction_min/max), or None: the masking node's schedule."""
        return self.fusion.rates(self.masking.mask_fraction_min, self.masking.mask_fraction_max)

    def max_steps(self, stage_key: str) -> int:
        return int(self.trainer_kwargs(stage_key)["max_steps"])

    def layerwise_steps(self) -> int:
        """Optimizer steps of the whole layer-wise run: stage 1, stages 2..L-m and the fusion fine-tune."""
        return self.max_steps("embed") + (self.layer_stages - 1) * self.max_steps("layer") + self.fusion.finetune_steps

    def cache_train_sequences(self) -> int | None:
        """Training sequences to cache (None = all). `auto`: as many as the next stage reads, so
        that it sees every cached (sequence, view) row once and no row is cached for nothing."""
        n = self.cache.train_sequences
        if n != "auto":
            return n
        rows = self.max_steps("layer") * self.data.batch_size  # the global batch: every rank's rows
        views_read = 1 if self.masking.schedule == "per_layer" else self.cache.views  # per_layer: one view a stage
        return -(-rows // views_read)

    def tokens_per_step(self, stage_key: str) -> int:
        """data.batch_size is the global batch of an optimizer step (all ranks, all accumulated micro-batches)."""
        return self.data.batch_size * self.data.seq_len

    # ------------------------------------------------------------------ hashes
    def hashes(self) -> dict[str, str]:
        """The settings each artifact depends on: the experiment's identity (stackwise/identity.py)
        restricted to what that artifact reads, plus the budgets derived from it.

        `layer` covers every layer-wise stage (they share their settings), `fusion` adds the
        fusion settings on top, `e2e` is independent of the layer-wise settings but for its budget.
        """
        ident = identity.identity_tree(self.to_dict())
        stages = ident["stages"]
        common = {key: ident[key] for key in ("seed", "model", "masking", "data", "cache", "optim", "trainer")}
        common["frozen_init"] = FROZEN_INIT  # how the frozen tensors are drawn: another draw, another model
        layer = {
            **common,
            "layerwise": ident["layerwise"],
            "stages": {"embed": stages["embed"], "layer": stages["layer"]},
            "budget": {
                "embed": self.max_steps("embed"),
                "layer": self.max_steps("layer"),
                "cache_train_sequences": self.cache_train_sequences(),
            },
        }
        fusion = {"layer": identity.digest(layer), "fusion": ident["fusion"], "stages": stages["fusion"]}
        e2e = {**common, "stages": stages["e2e"], "budget": {"e2e": self.max_steps("e2e")}}
        return {"layer": identity.digest(layer), "fusion": identity.digest(fusion), "e2e": identity.digest(e2e)}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hydra(cls, cfg: DictConfig, task_overrides: Iterable[str] = ()) -> RunConfig:
        """Validate a composed config; `task_overrides` (Hydra's, without its own) name the folder
        when `name` is null. Raises ConfigError naming the first bad value."""
        if OmegaConf.get_type(cfg) is not cls or "hydra" in cfg:  # a plain tree (run_config.json), or
            cfg = _typed(cfg)  # one with Hydra's node (compose's return_hydra_config): type-check it as Hydra does
        data = build(DataConfig, cfg.data, "data")
        model = build(ModelConfig, cfg.model, "model", **_vocab(cfg.model, data))
        try:
            name = identity.folder_name(cfg.name, task_overrides)
        except OmegaConfBaseException as e:
            raise as_config_error(e, "") from None
        return build(cls, cfg, "", data=data, model=model, name=name)


def _typed(cfg: Mapping[str, Any]) -> DictConfig:
    tree = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    tree.pop("hydra", None)
    try:
        return OmegaConf.merge(OmegaConf.structured(RunConfig), tree)
    except OmegaConfBaseException as e:
        raise as_config_error(e, "") from None


def _vocab(model: DictConfig, data: DataConfig) -> dict[str, int]:
    """vocab_size, mask_id and pad_id: the data tokenizer's where the model node leaves them null.

    A padded vocabulary (rows no token uses, e.g. 128000 for a 258-id byte tokenizer, or a multiple of
    64 for speed) is fine; fewer rows than the tokenizer's ids, or other special ids, are not.
    """
    spec = vocab_spec(data)
    out = {}
    for key, value in zip(("vocab_size", "mask_id", "pad_id"), spec[:3], strict=True):
        given = model[key]
        if given is None:
            out[key] = value
        elif key == "vocab_size":
            check(
                given >= spec.n_ids,
                "model.vocab_size",
                f"is {given} but the data's tokenizer has {spec.n_ids} ids ([MASK] and [PAD] included); set it "
                f">= {spec.n_ids} or leave it null to take the tokenizer's ({value})",
            )
        elif given != value:
            raise ConfigError(
                f"model.{key}",
                f"is {given} but the data's tokenizer has {key}={value}; leave it null to take the tokenizer's",
            )
    return out


def load_run(exp_dir: Path, stage: str = "all") -> RunConfig:
    """The RunConfig an experiment folder was made with (its run_config.json), re-validated."""
    exp_dir = Path(exp_dir)
    path = ExperimentPaths(exp_dir).run_config
    if not path.is_file():
        raise ArtifactError(
            f"{exp_dir} is not a StackWise experiment folder (no {path.name}); "
            "give outputs/<experiment> of a stackwise-train run"
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not readable JSON ({_first_line(e)})") from None
    raw.pop("experiment", None)  # the folder's name, called `name` since; written by older versions
    raw.update(stage=stage, k=None, name=exp_dir.name, output_root=str(exp_dir.parent))
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


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
