"""The one place `lightning.Trainer`s are built.

Every Trainer comes from the `trainer` node (conf/trainer/default.yaml, `_target_: lightning.Trainer`,
merged with `stages.<name>.trainer` by RunConfig.trainer_kwargs) through Hydra's `instantiate`, with
what the pipeline adds to it decided here and nowhere else:

- fit: StageCheckpoint (a ModelCheckpoint) every `val_check_interval` steps into ckpt/<stage>/ (the mid-stage resume
  point), checkpoints written atomically (AtomicCheckpointIO, unless the node sets `plugins`) and,
  on a GPU (`step.async_checkpoints`), in the background while training goes on, the configured
  logger (one TensorBoard run per stage) and callbacks, the observers' callbacks; the module gets
  the run's `step` node (compile, fused AdamW, loss chunks: stackwise/stages/base.py);
- validate / predict: the same placement (accelerator, devices, strategy, precision) and nothing
  that trains, logs or checkpoints.
Distributed strategies (DDP, FSDP) come in through the node's `strategy` and reach every Trainer;
on CPU (gloo) with a collective timeout of minutes, not Lightning's 30 (`cpu_strategy`).
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Sequence
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback, LambdaCallback, LearningRateMonitor
from torch import Tensor

from stackwise.artifacts import ExperimentPaths, one_line
from stackwise.config import OptimConfig, RunConfig
from stackwise.errors import ConfigError
from stackwise.model.stats import train_step_flops
from stackwise.pipeline.events import StageObserver
from stackwise.pipeline.memory import one_gpu
from stackwise.pipeline.stage import Stage
from stackwise.stages import sharding
from stackwise.stages.base import StageModule
from stackwise.stages.callbacks import (
    AtomicCheckpointIO,
    KeepOnDevice,
    StageCheckpoint,
    async_checkpoint_io,
    with_progress_bar,
)
from stackwise.utils import derive_seed

TRAINER_TARGET = "lightning.Trainer"  # when the node names no _target_ (a run_config.json of an older run)
# the arguments that say where and how a stage runs, which the evaluate / predict Trainers share
PLACEMENT = ("accelerator", "devices", "num_nodes", "strategy", "precision", "enable_progress_bar")
CHECKPOINT_EVERY = 50  # steps between mid-stage checkpoints when val_check_interval is not a step count
BUDGETS = ("embed", "layer", "fusion", "e2e")
# How long a CPU (gloo) rank waits for the others in one collective before it fails naming it, instead
# of Lightning's 30 minutes: a CPU run's ranks meet every few seconds (each step's loss, each barrier),
# so minutes of waiting mean a rank is stuck or gone; GPU runs keep the default (a large model's
# checkpoint is written by rank 0 while the others wait).
CPU_COLLECTIVE_TIMEOUT = timedelta(minutes=3)


def _hydra_key(key: str) -> bool:
    return key.startswith("_") and key.endswith("_")  # _target_, _convert_, ...: instantiate's own


def build(node: dict[str, Any], **extra: Any) -> L.Trainer:
    """A Trainer from a `trainer` node and the objects the pipeline adds (callbacks, logger, plugins).
    On one GPU its strategy keeps the module there when it is done (KeepOnDevice); on CPU a DDP or
    sharded strategy waits at most CPU_COLLECTIVE_TIMEOUT in a collective."""
    device = one_gpu(node)
    if device is not None:
        extra["strategy"] = KeepOnDevice(device=device)
    elif (strategy := cpu_strategy(node)) is not None:
        extra["strategy"] = strategy
    try:
        return instantiate({"_target_": TRAINER_TARGET, **node}, **extra)
    except InstantiationException as e:  # a value Lightning refuses: one line naming it, not a traceback
        raise ConfigError("trainer", one_line(e.__cause__ or e)) from None


def cpu_strategy(node: dict[str, Any]) -> Any:
    """The node's `ddp` or sharded strategy with CPU_COLLECTIVE_TIMEOUT when its ranks run on CPU
    (gloo), else None (the node's own). The first Trainer of a run sets up the process group with it."""
    accelerator = str(node.get("accelerator", "auto"))
    if accelerator != "cpu" and (accelerator != "auto" or torch.cuda.is_available()):
        return None
    strategy = node.get("strategy")
    if strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(timeout=CPU_COLLECTIVE_TIMEOUT)
    if sharding.is_sharded_node(strategy):
        kwargs = {k: v for k, v in strategy.items() if not _hydra_key(k)}
        return sharding.strategy(**{"timeout": CPU_COLLECTIVE_TIMEOUT, **kwargs})
    return None


class Trainers:
    """The Trainers of one run: `fit` a stage, `validate` a module, `predict` (cache) with a writer."""

    def __init__(self, run: RunConfig, paths: ExperimentPaths, observers: Sequence[StageObserver] = ()):
        self.run, self.paths, self.observers = run, paths, list(observers)

    def check_node(self) -> None:
        """A `trainer` (or `stages.<name>.trainer`) key lightning.Trainer does not take stops here,
        before any work, rather than when that stage's Trainer is built."""
        known = set(inspect.signature(L.Trainer.__init__).parameters) - {"self", "logger", "callbacks"}
        for budget in BUDGETS:
            for key in self.run.trainer_kwargs(budget):
                if key not in known and not _hydra_key(key):
                    where = "trainer" if key in self.run.trainer else f"stages.{budget}.trainer"
                    raise ConfigError(f"{where}.{key}", "not an argument of lightning.Trainer (see its documentation)")
            sharded = sharding.is_sharded_node(self.run.trainer_kwargs(budget).get("strategy"))
            ema_callbacks(self.run.optim_for(budget), sharded)  # refused here, not stages later

    # ------------------------------------------------------------------ training
    def fit(
        self,
        stage: Stage,
        module: StageModule,
        data: L.LightningDataModule,
        resume: Path | None,
        extra: Sequence[Callback] = (),
    ) -> int:
        """Train `stage`, from the mid-stage checkpoint `resume` when a killed run left one; return
        the optimizer step training started from (0, or the checkpoint's). `extra`: callbacks the
        pipeline adds to this fit only (the fine-tune's timing, its watch on fused/'s write)."""
        run, node = self.run, self.run.trainer_kwargs(stage.budget)
        # per batch, what one forward + backward costs: read by ThroughputMonitor for FLOP/s and MFU
        module.flops_per_batch = train_step_flops(
            run.model,
            stage.budget,
            stage.k,
            run.data.batch_size,
            run.data.seq_len,
            run.masking.mean_rate(),
            run.layerwise.top_layers,
        )
        module.step_config = run.step
        # hardware=fsdp shards a copy, and the trained weights come back whole into `module` (stages/sharding.py)
        sharded = sharding.is_sharded_node(node.get("strategy"))
        fitted = sharding.fit_copy(module) if sharded else module
        logger = self._logger(stage)
        start: dict[str, int] = {}  # the step Lightning really continued from, read after it restored
        started = LambdaCallback(on_train_start=lambda trainer, _: start.setdefault("step", trainer.global_step))
        callbacks = [self._checkpoint(stage, node), started, *self._configured_callbacks(logger is not None)]
        callbacks += [*ema_callbacks(module.optim, sharded), *extra]
        callbacks = with_progress_bar(callbacks + self._observer_callbacks(stage), node.get("enable_progress_bar"))
        trainer = build(
            node,
            logger=logger if logger is not None else False,
            callbacks=callbacks,
            default_root_dir=str(self.paths.root),
            **({} if "plugins" in node else {"plugins": [self._checkpoint_io(node)]}),
        )
        L.seed_everything(derive_seed(run.seed, "dropout", stage.name) % (2**31), workers=True, verbose=False)
        if logger is not None:
            logger.log_hyperparams(hparams(run, stage))
        with warnings.catch_warnings():
            # our train loaders do resume mid-epoch (the sampler starts at global_step), whatever Lightning assumes
            warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended")
            # the stage's on_before_batch_transfer (StageModule.prepare_batch) is meant for every data module
            warnings.filterwarnings(
                "ignore", message="You have overridden `on_before_batch_transfer` in `LightningModule`"
            )
            trainer.fit(
                fitted,
                datamodule=data,
                ckpt_path=str(resume) if resume else None,
                **({"weights_only": True} if resume else {}),
            )
        if sharded:
            sharding.load_trained(module, fitted)
        return start.get("step", 0)

    def _checkpoint(self, stage: Stage, node: dict) -> StageCheckpoint:
        """Mid-stage checkpoints every `step.checkpoint_minutes` of training on a GPU (a large stage's
        weights and AdamW state are GBs: written every 40 steps they stall the fit even on a thread),
        else every `trainer.val_check_interval` steps."""
        common = dict(dirpath=self.paths.stage_ckpt_dir(stage.name), save_last=True, save_top_k=0)
        minutes = self.run.step.checkpoint_interval(on_gpu(node))
        if minutes > 0:
            return StageCheckpoint(**common, train_time_interval=timedelta(minutes=minutes))
        every = node.get("val_check_interval")
        every = every if isinstance(every, int) and not isinstance(every, bool) and every > 0 else CHECKPOINT_EVERY
        return StageCheckpoint(**common, every_n_train_steps=every)

    def _checkpoint_io(self, node: dict) -> CheckpointIO:
        """Atomic checkpoint files; written in the background where a synchronous write of a large
        stage's GBs would stall the GPU (on CPU the write is small, and a killed run's checkpoint
        is exactly the one of its last save step, as tests/test_resume.py expects)."""
        background = self.run.step.async_checkpoints
        if background == "auto":
            background = on_gpu(node)
        return async_checkpoint_io() if background else AtomicCheckpointIO()

    def _logger(self, stage: Stage):
        if not self.run.logger:
            return None
        return instantiate(self.run.logger, save_dir=str(self.paths.tb_dir), name="", version=stage.name)

    def _configured_callbacks(self, have_logger: bool) -> list[Callback]:
        out = []
        for node in (self.run.callbacks or {}).values():
            if not node:
                continue
            cb = instantiate(node)
            if isinstance(cb, LearningRateMonitor) and not have_logger:
                continue  # it refuses to run without a logger
            out.append(cb)
        return out

    def _observer_callbacks(self, stage: Stage) -> list[Callback]:
        return [cb for observer in self.observers for cb in observer.callbacks(stage)]

    # ------------------------------------------------------------------ evaluating and caching
    def plain(self, callbacks: Sequence[Callback] = (), inference_mode: bool = True) -> L.Trainer:
        """A Trainer that only runs a module (validate, predict): the node's placement, no logger, no checkpoints."""
        node = {k: v for k, v in self.run.trainer.items() if k in PLACEMENT or k == "_target_"}
        if "strategy" in node:  # a sharded fit's weights come back whole: scored and cached as under DDP
            node["strategy"] = sharding.plain_strategy(node["strategy"])
        return build(
            node,
            logger=False,
            callbacks=with_progress_bar(list(callbacks), node.get("enable_progress_bar")),
            limit_val_batches=1.0,
            enable_model_summary=False,
            default_root_dir=str(self.paths.root),
            inference_mode=inference_mode,
        )

    def validate(self, module: StageModule, loader) -> dict[str, float]:
        """{"val_loss", "val_acc"}: mean masked CE and accuracy over the whole validation set (every view)."""
        # no_grad, not inference mode: inference-mode metric states would break a later fit of the
        # same module (fusion evaluates the fused model, then fine-tunes it)
        (metrics,) = self.plain(inference_mode=False).validate(module, dataloaders=loader, verbose=False)
        return {"val_loss": float(metrics["val/loss"]), "val_acc": float(metrics["val/masked_acc"])}

    def predict(self, stage: Stage, module: StageModule, loaders: list, writer: Callback) -> None:
        """The caching pass of `stage`: every batch of `loaders` through `module`, into `writer`."""
        module.eval()
        trainer = self.plain(callbacks=[writer, *self._observer_callbacks(stage)])
        trainer.predict(module, dataloaders=loaders, return_predictions=False)


def on_gpu(node: dict) -> bool:
    """Whether a trainer node places its stage on a GPU (`accelerator` gpu / cuda, or auto with one)."""
    accelerator = str(node.get("accelerator", "auto"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def ema_callbacks(optim: OptimConfig, sharded: bool) -> list[Callback]:
    """Lightning's weight averaging as an EMA when `optim.ema_decay` > 0: updated after every optimizer
    step, swapped in for validation and, when the fit ends, for good, so the stage scores, saves and
    caches the averaged weights; its state (the average and its step count) rides in the mid-stage
    checkpoints. With `optim.ema_warmup` the decay after n averaged steps is min(decay, (1+n)/(10+n))."""
    decay = optim.ema_decay
    if not decay:
        return []
    try:
        from lightning.pytorch.callbacks import WeightAveraging
    except ImportError:  # lightning < 2.6
        raise ConfigError("optim.ema_decay", f"{decay} needs lightning >= 2.6 (EMAWeightAveraging)") from None
    if sharded:  # it keeps a whole copy of the module, which a sharded fit does not have
        raise ConfigError("optim.ema_decay", f"{decay} does not run under hardware=fsdp; use 0 there")
    # parameters only: every buffer of a stage is a constant (the frozen tensors, checked bit for bit
    # against their regeneration), and decay * x + (1 - decay) * x is not always x in floating point
    return [WeightAveraging(use_buffers=False, avg_fn=partial(ema_step, decay=decay, warmup=optim.ema_warmup))]


@torch.no_grad()
def ema_step(average: Tensor, current: Tensor, n_averaged: Tensor, *, decay: float, warmup: bool) -> Tensor:
    """One EMA update of a parameter (torch's AveragedModel calls it; it copies the first step itself).
    n_averaged: the steps averaged so far (>= 1), a 0-d tensor on the parameter's device."""
    d = torch.clamp((1 + n_averaged) / (10 + n_averaged), max=decay) if warmup else decay
    return d * average + (1 - d) * current


def hparams(run: RunConfig, stage: Stage) -> dict[str, Any]:
    """What TensorBoard's HPARAMS tab shows for a stage's run (flat, scalar values)."""
    out: dict[str, Any] = {
        "stage": stage.name,
        "experiment": run.exp_dir.name,
        "seed": run.seed,
        "lr": run.optim_for(stage.budget).lr,
    }
    for key, value in run.model.to_dict().items():
        out[f"model/{key}"] = str(value) if isinstance(value, list) else value
    for key, value in dataclasses.asdict(run.masking).items():
        out[f"masking/{key}"] = str(value) if isinstance(value, (list, tuple)) or value is None else value
    out["data/name"], out["data/seq_len"], out["data/batch_size"] = run.data.name, run.data.seq_len, run.data.batch_size
    return out
