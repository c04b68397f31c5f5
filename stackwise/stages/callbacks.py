"""Callbacks the config instantiates (`conf/callbacks/default.yaml`), the pipeline's progress bar and
checkpoint IO."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar, ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from lightning_utilities.core.apply_func import apply_to_collection

from stackwise.artifacts import atomic_torch_save, write_errors


def token_throughput_monitor(**kwargs) -> ThroughputMonitor:
    """Lightning's ThroughputMonitor counting sequences and tokens of our dict batches (tokens/s),
    timing training over the logging interval (see WindowedThroughputMonitor)."""
    return WindowedThroughputMonitor(
        batch_size_fn=lambda b: b["targets"].shape[0], length_fn=lambda b: b["targets"].numel(), **kwargs
    )


class WindowedThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor, reading the clock only where it logs.

    Lightning's synchronizes with the GPU after every batch so that the clock reads when the batch's
    kernels have run; that stalls the host each step, and the GPU idles until the host queues the
    next step. Here a training batch is only counted (on the host); the GPU is synchronized and
    the clock read once per logging interval (`trainer.log_every_n_steps` optimizer steps) and
    before validation, and FLOPs are counted for every batch of the interval. The rates are then
    over whole intervals: `window_size` clock readings give an average over window_size - 1
    intervals (2: the last interval). Validation batches are timed as Lightning does.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unclocked: dict[RunningStage, int] = {}  # batches counted since the last clock reading

    @torch.inference_mode()
    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, iter_num: int) -> None:
        stage = trainer.state.stage
        if self.length_fn is not None:
            self._lengths[stage] += self.length_fn(batch)
        self._samples[stage] += self.batch_size_fn(batch)
        self._batches[stage] += 1
        self._unclocked[stage] = self._unclocked.get(stage, 0) + 1
        if stage == RunningStage.TRAINING and not _logs_now(trainer):
            return
        self._clock(trainer, pl_module, stage)

    def _clock(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: RunningStage) -> None:
        """One clock reading: the batches since the last one are done on the device by now."""
        batches = self._unclocked.get(stage, 0)
        if not batches:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        if self._module_has_flops is None:
            self._module_has_flops = hasattr(pl_module, "flops_per_batch")
        flops = pl_module.flops_per_batch * batches if self._module_has_flops else None
        self._throughputs[stage].update(
            time=time.perf_counter() - self._t0s[stage],
            batches=self._batches[stage],
            samples=self._samples[stage],
            lengths=None if self.length_fn is None else self._lengths[stage],
            flops=flops,
        )
        self._unclocked[stage] = 0

    def _start(self, trainer: pl.Trainer) -> None:
        super()._start(trainer)
        if trainer.state.fn == TrainerFn.FITTING or trainer.state.stage not in self._unclocked:
            self._unclocked[trainer.state.stage] = 0

    @rank_zero_only
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the training batches since the last reading end where validation begins (Lightning then
        # moves the training clock past the validation time)
        if not trainer.sanity_checking and RunningStage.TRAINING in self._throughputs:
            self._clock(trainer, pl_module, RunningStage.TRAINING)
        super().on_validation_start(trainer, pl_module)


def _logs_now(trainer: pl.Trainer) -> bool:
    """Whether ThroughputMonitor logs after this training batch: an optimizer step at the logging cadence."""
    return not trainer.fit_loop._should_accumulate() and trainer._logger_connector.should_update_logs


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting optimizer steps over the whole stage: `layer_2: 25%|... | step 40/160`.

    Stages are budgeted in steps (`trainer.max_steps`, `max_epochs: -1`), so Lightning's per-epoch bar
    showed `Epoch 0/-2` and batches of an epoch the stage does not stop at. Here the total is
    `trainer.estimated_stepping_batches` (max_steps, or what max_epochs allows when that is smaller),
    the count is `trainer.global_step` (so gradient accumulation and a resumed run count right), and
    the description is the stage's name. `v_num` is dropped: the logger's version is the stage name,
    cut to its last four characters. Validation and prediction bars are Lightning's own.
    """

    BAR_FORMAT_STEPS = "{l_bar}{bar}| step {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"

    def init_train_tqdm(self) -> Tqdm:
        trainer = self.trainer
        total = trainer.estimated_stepping_batches
        step = trainer.global_step  # a resumed stage starts where its checkpoint left off
        return Tqdm(
            desc=getattr(trainer.lightning_module, "stage_name", self.train_description),
            total=None if math.isinf(total) else int(total),
            initial=step,
            unit="step",
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT_STEPS,
        )

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one bar for the whole stage: an epoch is where the data loader wraps, not a unit of the budget

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        n, bar = trainer.global_step, self.train_progress_bar
        if not self._should_update(n, bar.total) or bar.disable:
            return
        bar.n = n
        # the logged values (loss, ...) are copied from the device when read: a GPU sync, so the
        # postfix is refreshed only at the logging cadence and at the end, the step count every step
        if n % max(1, trainer.log_every_n_steps) == 0 or n == bar.total:
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the line
        else:
            bar.refresh()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        # the training loss is logged without prog_bar (stages/base.py: Lightning would copy it to the
        # host after every batch); read here, where the bar refreshes, from the values logged last
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and "train/loss" not in items:
            items = {"train/loss": f"{float(loss):.3g}", **items}
        return items


def with_progress_bar(callbacks: list[Callback], enabled: bool | None) -> list[Callback]:
    """callbacks + StepProgressBar, unless the trainer shows no bar (`enable_progress_bar: false`, where
    Lightning refuses a bar callback) or the callbacks config already brings its own."""
    if enabled is False or any(isinstance(c, ProgressBar) for c in callbacks):
        return list(callbacks)
    return [*callbacks, StepProgressBar()]


class RaiseIfFailed(Callback):
    """Raise, after a training batch, the error work beside the fit has failed with (`failed()`
    returns it once it has; fused/'s write beside the joint fine-tune): a full disk stops the fit at
    once, not when its last step is done."""

    def __init__(self, failed: Callable[[], BaseException | None]):
        self.failed = failed

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if (error := self.failed()) is not None:
            raise error


class FitTimes(Callback):
    """Where a fit's wall time goes, on the host's clock: Lightning's set-up until the first training
    batch, the training batches (validation within the fit apart), validation within the fit. On a
    GPU the clock reads when the host has queued the work; the device catches up by the end of
    training, which the non-finite guard reads."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}
        self.validating = 0.0
        self.steps = 0
        self._val_t0 = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.marks["fit_start"] = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self.marks.setdefault("first_batch", time.perf_counter())

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self.steps += 1

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validating += time.perf_counter() - self._val_t0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.marks["train_end"] = time.perf_counter()

    def summary(self) -> str:
        """One line for the log: "set-up 1.2 s, 8 batches 4.0 s, validation in the fit 0.0 s"."""
        m = self.marks
        if "fit_start" not in m or "first_batch" not in m:
            return "no training batch"
        setup = m["first_batch"] - m["fit_start"]
        batches = m.get("train_end", time.perf_counter()) - m["first_batch"] - self.validating
        return (
            f"set-up {setup:.1f} s, {self.steps} batches {batches:.1f} s, validation in the fit {self.validating:.1f} s"
        )


class StageCheckpoint(ModelCheckpoint):
    """`ckpt/<stage>/last.ckpt` for resuming a stage part-way: every `every_n_train_steps` steps before
    its last, never at the end of training. A finished stage writes its own artifact right after fit
    (layers/layer_k.pt, fused/, e2e/) and drops the checkpoint, so one of its last step (weights and
    AdamW's state: 33 GB for stage 1 of the 70B shape, 72 GB for e2e at the seed's sizes with 8
    layers) would only be written to be deleted. A run killed between fit and that artifact redoes
    the steps after the last checkpoint, to the same bytes (tests/test_resume.py)."""

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            return
        super().on_train_batch_end(trainer, *args, **kwargs)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # Lightning's saves a last.ckpt here when none was saved at the last step


class KeepOnDevice(SingleDeviceStrategy):
    """One device, and the module left on it when the Trainer is done. Lightning's teardown moves the
    module and the optimizer's state to the CPU to free the device, but a stage is scored and cached
    on the same device right after fit and then dropped: on one H200 those moves (and the moves back)
    took 6.4 s of a 20-step layer stage at the seed's sizes, and 50 GiB of host RAM for stage 1 of the
    70B shape. The device is freed instead by releasing what training alone needs: the optimizer
    (its state), its schedulers and the last step's gradients."""

    def teardown(self) -> None:
        if self.lightning_module is not None:
            self.lightning_module.zero_grad(set_to_none=True)
        self.optimizers, self.lr_scheduler_configs = [], []
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints (ckpt/<stage>/last.ckpt) written under a temporary name beside the final
    one and renamed (artifacts.atomic_torch_save), so a run killed mid-save keeps the previous one.

    Lightning's own save stages the file in the system temp folder and moves it, which is a plain,
    interruptible copy when that folder is on another filesystem, and leaves the temp file behind.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        with _copy_stream(checkpoint):
            if storage_options is not None or "://" in str(path):  # remote paths: Lightning's own way
                # a full or read-only disk is an ArtifactWriteError naming the file, not an OSError traceback
                with write_errors(path):
                    return super().save_checkpoint(checkpoint, path, storage_options)
            atomic_torch_save(checkpoint, path)


def async_checkpoint_io() -> AsyncCheckpointIO:
    """AtomicCheckpointIO in Lightning's background writer: the checkpoint's tensors are cloned on
    the training thread (a device copy), then written (and renamed into place) while training goes
    on; the Trainer's teardown waits for the last write. A killed run leaves at most a temporary file."""
    return AsyncCheckpointIO(AtomicCheckpointIO())


@contextlib.contextmanager
def _copy_stream(checkpoint: Any):
    """torch.save copies CUDA tensors to the host on the thread's current stream. From the background
    writer that would be the training's own stream, whose kernels would queue behind the copy; a
    stream of its own (after the work queued so far, which includes the snapshot) lets them overlap."""
    devices: list[torch.device] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        apply_to_collection(checkpoint, torch.Tensor, lambda t: devices.append(t.device) if t.is_cuda else None)
    if not devices:
        yield
        return
    with torch.cuda.device(devices[0]):  # a thread's current device is its own: not the training's
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.default_stream())
        with torch.cuda.stream(stream):
            yield
