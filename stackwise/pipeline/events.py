"""Hooks at stage boundaries: a public extension point for code that watches a run.

An observer sees each stage at three kinds of place: every batch of its training and of its
caching pass (through the Lightning callbacks it returns for that stage), the moment the stage's
weights are written, and the moment every shard of its activation cache is written (before the
manifest that makes the cache complete). Observers are passed to `Pipeline(run, observers=[...])`
or installed for the whole process with `observe(...)`, which is how a wrapper around
`stackwise-train`'s `main()` adds one (tests/cli_runner.py installs one that kills the process at
exact places for tests/test_resume.py). The pipeline never depends on what an observer does.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from stackwise.pipeline.stage import Stage


class StageObserver:
    """Every hook is a no-op here; override the ones you need."""

    def callbacks(self, stage: Stage) -> list[Callback]:
        """Lightning callbacks added to the Trainers that train and cache `stage` (per-batch events)."""
        return []

    def saved(self, stage: Stage) -> None:
        """After the stage's weights are written (layers/layer_k.pt, fused/, fused/finetuned/, e2e/)."""

    def cached(self, stage: Stage) -> None:
        """After every shard of acts_layer{k} is written, before its manifest."""


_INSTALLED: list[StageObserver] = []


def observe(observer: StageObserver) -> None:
    """Install an observer for every Pipeline this process builds from now on."""
    _INSTALLED.append(observer)


def installed() -> list[StageObserver]:
    return list(_INSTALLED)
