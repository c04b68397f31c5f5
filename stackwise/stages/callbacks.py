"""Callbacks the config instantiates (`conf/callbacks/default.yaml`), the pipeline's progress bar and
checkpoint IO."""

from __future__ import annotations

import math
import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ProgressBar, ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.plugins.io import TorchCheckpointIO

from stackwise.artifacts import atomic_torch_save, write_errors


def token_throughput_monitor(**kwargs) -> ThroughputMonitor:
    """Lightning's ThroughputMonitor counting sequences and tokens of our dict batches (tokens/s)."""
    return ThroughputMonitor(
        batch_size_fn=lambda b: b["targets"].shape[0], length_fn=lambda b: b["targets"].numel(), **kwargs
    )


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
        n = trainer.global_step
        if self._should_update(n, self.train_progress_bar.total) and not self.train_progress_bar.disable:
            self.train_progress_bar.n = n
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the line

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


def with_progress_bar(callbacks: list[Callback], enabled: bool | None) -> list[Callback]:
    """callbacks + StepProgressBar, unless the trainer shows no bar (`enable_progress_bar: false`, where
    Lightning refuses a bar callback) or the callbacks config already brings its own."""
    if enabled is False or any(isinstance(c, ProgressBar) for c in callbacks):
        return list(callbacks)
    return [*callbacks, StepProgressBar()]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints (ckpt/<stage>/last.ckpt) written under a temporary name beside the final
    one and renamed (artifacts.atomic_torch_save), so a run killed mid-save keeps the previous one.

    Lightning's own save stages the file in the system temp folder and moves it, which is a plain,
    interruptible copy when that folder is on another filesystem, and leaves the temp file behind.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # remote paths: Lightning's own way
            # a full or read-only disk is an ArtifactWriteError naming the file, not an OSError traceback
            with write_errors(path):
                return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
