"""Callbacks the config instantiates (`conf/callbacks/default.yaml`)."""

from __future__ import annotations

from lightning.pytorch.callbacks import ThroughputMonitor


def token_throughput_monitor(**kwargs) -> ThroughputMonitor:
    """Lightning's ThroughputMonitor counting sequences and tokens of our dict batches (tokens/s)."""
    return ThroughputMonitor(batch_size_fn=lambda b: b["targets"].shape[0],
                             length_fn=lambda b: b["targets"].numel(), **kwargs)
