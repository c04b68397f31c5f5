"""Callbacks the config instantiates (`conf/callbacks/default.yaml`), and the pipeline's checkpoint IO."""

from __future__ import annotations

from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.plugins.io import TorchCheckpointIO


def token_throughput_monitor(**kwargs) -> ThroughputMonitor:
    """Lightning's ThroughputMonitor counting sequences and tokens of our dict batches (tokens/s)."""
    return ThroughputMonitor(
        batch_size_fn=lambda b: b["targets"].shape[0], length_fn=lambda b: b["targets"].numel(), **kwargs
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints (ckpt/<stage>/last.ckpt) written under a temporary name beside the final
    one and renamed (artifacts.atomic_torch_save), so a run killed mid-save keeps the previous one.

    Lightning's own save stages the file in the system temp folder and moves it, which is a plain,
    interruptible copy when that folder is on another filesystem, and leaves the temp file behind.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        # a full or read-only disk is an ArtifactWriteError naming the file, not an OSError traceback
        from stackwise.artifacts import atomic_torch_save, write_errors

        if storage_options is not None or "://" in str(path):  # remote paths: Lightning's own way
            with write_errors(path):
                return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
