"""What every StackWise CLI shares: one-line user errors, the filters of known noise."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from stackwise.errors import StackWiseError


@contextmanager
def user_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """Turn a StackWiseError into `prog: error: <one line>` and exit status 2, no traceback.

    HYDRA_FULL_ERROR=1 or debug=true re-raises it, for developers who want the traceback.
    """
    try:
        yield
    except StackWiseError as e:
        if debug or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = " ".join(str(e).split())  # one line, whatever the message held
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def quiet_known_advice() -> None:
    """Hide the library advice that StackWise triggers knowingly and that a user can do nothing about.

    Each filter names one message (and, for warnings, where it can, the module that emits it); every
    other warning and log line, these libraries' included, still shows. The warning filters go in
    front of the user's own (`-W`, PYTHONWARNINGS), so they win for these messages only.
    """
    # torch 2.13 deprecated constructing `LeafSpec`; Lightning's own pytree helper still does it each
    # time Lightning wraps a data loader (every fit, validation and caching pass), so a run printed it
    # again and again. Nothing StackWise calls or could change: only that module of Lightning is
    # silenced, the same deprecation raised from anywhere else still shows.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    # Lightning advises worker processes for every loader with fewer than 2 on a machine with more
    # than 2 cores. StackWise's loaders only index token arrays and activation shards that are in
    # memory or memory-mapped, and draw masks from a seeded generator: microseconds per batch next
    # to a training step, where worker processes would add a copy of every batch between processes.
    # num_workers=0 is the default on purpose; `data.num_workers` is there for who measures otherwise.
    warnings.filterwarnings(
        "ignore",
        message=r"The '\w+_dataloader' does not have many workers which may be a bottleneck",
        category=UserWarning,  # Lightning's PossibleUserWarning; importing it here would import torch
    )
    # Lightning's info lines go through one logger (its rank_zero module's; fabric's when only
    # Fabric is imported). A logger's filter holds whatever handler prints its records.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningNoise) for f in logger.filters):
            logger.addFilter(_DropLightningNoise())


class _DropLightningNoise(logging.Filter):
    PATTERNS = (
        # Advertisements for Lightning's cloud packages, printed by every Trainer: StackWise logs to
        # TensorBoard and keeps its own checkpoints, and needs neither.
        re.compile(r"Tip: For seamless cloud (logging|uploads)"),
        # The pipeline's evaluation and caching passes set limit_val_batches=1.0 on purpose (the
        # whole validation set, every view): Lightning only echoes that setting back.
        re.compile(r"`Trainer\(limit_val_batches=1\.0\)` was configured so 100% of the batches will be used"),
    )

    # Every Trainer (a stage's fit, its scoring, its caching pass) reports the devices it found:
    # the same lines several times a stage. Each is shown the first time only.
    ONCE = re.compile(r"^(GPU|TPU|HPU|IPU) available: |^LOCAL_RANK: ")

    def __init__(self) -> None:
        super().__init__()
        self.shown: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(p.search(message) for p in self.PATTERNS):
            return False
        if self.ONCE.search(message):
            if message in self.shown:
                return False
            self.shown.add(message)
        return True


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error of the CLI (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def doc_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A OneLineParser whose description is the first line of a command's module docstring and
    whose epilog is the rest (the examples)."""
    return OneLineParser(
        prog=prog,
        description=doc.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(doc.splitlines()[2:]),
    )
