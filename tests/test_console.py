"""What a user reads on the console: Lightning's advice that StackWise triggers knowingly is filtered
(and nothing else is), and the training bar counts steps out of the stage's budget."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities import data as fabric_data
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.trainer.connectors.data_connector import _worker_check
from lightning.pytorch.utilities import _pytree
from torch.utils.data import DataLoader

from stackwise.cli.common import quiet_known_advice
from stackwise.stages.callbacks import StepProgressBar, with_progress_bar
from tests.cli_runner import CliRun
from tests.conftest import TINY, cli_env

LEAFSPEC = "`isinstance(treespec, LeafSpec)` is deprecated"
WORKERS = "does not have many workers which may be a bottleneck"


def _lightning_advice(monkeypatch) -> list[str]:
    """Make Lightning emit, from its own code, the two warnings StackWise filters; return what showed."""
    monkeypatch.setattr(fabric_data, "_num_cpus_available", lambda: 8)  # the hint needs more than 2 cores
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _pytree._tree_flatten(1)  # Lightning builds a LeafSpec for a leaf
        _worker_check(types.SimpleNamespace(num_devices=1), DataLoader(range(4)), "train_dataloader")
        _worker_check(types.SimpleNamespace(num_devices=1), DataLoader(range(4)), "val_dataloader")
        quiet_known_advice()
        _pytree._tree_flatten(1)
        _worker_check(types.SimpleNamespace(num_devices=1), DataLoader(range(4)), "train_dataloader")
        _worker_check(types.SimpleNamespace(num_devices=1), DataLoader(range(4)), "val_dataloader")
        # the same texts from elsewhere, and other advice of the same category, still show
        warnings.warn(f"{LEAFSPEC}, from somewhere else", FutureWarning, stacklevel=1)
        warnings.warn("The 'train_dataloader' has other advice", PossibleUserWarning, stacklevel=1)
    return [str(w.message) for w in seen]


def test_filters_silence_exactly_the_known_lightning_advice(monkeypatch):
    seen = _lightning_advice(monkeypatch)
    # before the filters: the installed Lightning really emits both (the filters' patterns match them)
    assert LEAFSPEC in seen[0] and WORKERS in seen[1] and "val_dataloader" in seen[2], seen
    # after: from Lightning's own code they are gone; the rest shows
    assert seen[3:] == [f"{LEAFSPEC}, from somewhere else", "The 'train_dataloader' has other advice"], seen


def test_log_filter_drops_only_the_known_lightning_lines(monkeypatch):
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    for name in names:  # the test's own filters go when it ends
        monkeypatch.setattr(logging.getLogger(name), "filters", [])
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger(names[0])  # where Lightning's info lines are logged
    kw = dict(logger=False, limit_val_batches=1.0, enable_checkpointing=False, enable_model_summary=False)
    logger.addHandler(handler)
    try:
        pl.Trainer(**kw)
        before = list(seen)
        seen.clear()
        quiet_known_advice()
        quiet_known_advice()  # idempotent: one filter per logger
        pl.Trainer(**kw)
    finally:
        logger.removeHandler(handler)
    assert all(len(logging.getLogger(n).filters) == 1 for n in names)
    tip, limit = "Tip: For seamless cloud logging", "`Trainer(limit_val_batches=1.0)` was configured"
    assert any(tip in m for m in before) and any(limit in m for m in before), before
    assert not any(tip in m or limit in m for m in seen), seen
    assert any(m.startswith("GPU available") for m in seen), seen  # the rest of Lightning's info shows


# A `stackwise-train` run on a machine with more than 2 cores (the worker hint needs them), where
# Lightning also gives advice that StackWise does not filter: only that one reaches stderr.
_CLI = """
import sys, warnings
from lightning.fabric.utilities import data
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.trainer.connectors import data_connector

data._num_cpus_available = lambda: 8
check = data_connector._worker_check

def worker_check(trainer, dataloader, name):
    check(trainer, dataloader, name)
    warnings.warn(f"The '{name}' has advice that StackWise does not filter", PossibleUserWarning, stacklevel=1)

data_connector._worker_check = worker_check
sys.argv = ["stackwise-train", *sys.argv[1:]]
from stackwise.cli.train import main
main()
"""


def test_cli_run_console(tmp_path):
    args = [
        *TINY,
        "stage=embed",
        "logger=none",
        "callbacks=none",
        "trainer.enable_progress_bar=true",
        f"output_root={tmp_path / 'outputs'}",
    ]
    env = cli_env()
    env.pop("PYTHONWARNINGS", None)
    if "PYTHONWARNINGS" in os.environ or sys.warnoptions:  # the fork server's warning filters would be those
        out = subprocess.run(
            [sys.executable, "-c", _CLI, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
    else:  # a fresh interpreter's warning filters: the preloaded server's (Lightning imported before Hydra, as here)
        out = CliRun(args, tmp_path, env, timeout=300, code=_CLI).wait()
    assert out.returncode == 0, out.stderr[-3000:]
    assert LEAFSPEC not in out.stderr and WORKERS not in out.stderr, out.stderr[-3000:]
    assert "The 'train_dataloader' has advice that StackWise does not filter" in out.stderr, out.stderr[-3000:]
    # Lightning, imported before Hydra sets up logging, has its info lines printed through Hydra's
    # handlers (the console, train.log), once each: not the known noise
    console = out.stdout + out.stderr
    assert "Tip: For seamless" not in console and "limit_val_batches=1.0" not in console, console[-3000:]
    assert console.count("GPU available") == 1 and "`Trainer.fit` stopped" in console, console[-3000:]
    # the training bar: the stage's name and steps out of trainer.max_steps (12 in TINY)
    bar = out.stdout.replace("\r", "\n")
    assert "embed: " in bar and "step 6/12" in bar and "step 12/12" in bar, bar[-3000:]
    assert "Epoch" not in bar and "/-" not in bar, bar[-3000:]


def _fit(tmp_path, **trainer_kw) -> StepProgressBar:
    bar = StepProgressBar()
    trainer = pl.Trainer(
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
        **trainer_kw,
    )
    torch.manual_seed(0)
    trainer.fit(BoringModel())  # 64 batches per epoch
    return bar


def test_bar_counts_optimizer_steps_of_the_budget(tmp_path, capsys):
    bar = _fit(tmp_path, max_steps=12, max_epochs=-1, accumulate_grad_batches=3)
    line = str(bar.train_progress_bar)
    assert bar.train_progress_bar.total == 12 and bar.train_progress_bar.n == 12, line
    assert "step 12/12" in line and "-2" not in line, line
    printed = capsys.readouterr().out.replace("\r", "\n")
    assert "step 3/12" in printed and "Epoch" not in printed  # 3 optimizer steps = 9 batches
    # a budget in epochs: the steps those epochs hold (64 batches / 2 per step x 2 epochs)
    bar = _fit(tmp_path, max_steps=-1, max_epochs=2, accumulate_grad_batches=2)
    assert "step 64/64" in str(bar.train_progress_bar)


def test_bar_is_added_only_where_lightning_takes_one():
    assert [type(c) for c in with_progress_bar([], True)] == [StepProgressBar]
    assert [type(c) for c in with_progress_bar([], None)] == [StepProgressBar]  # Lightning's default: a bar
    assert with_progress_bar([], False) == []  # enable_progress_bar=false refuses a bar callback
    own = TQDMProgressBar()
    assert with_progress_bar([own], True) == [own]  # a bar from the callbacks config wins


@pytest.mark.parametrize("enabled", [True, False])
def test_pipeline_trainers_take_the_bar(make_run, enabled):
    from stackwise.pipeline import Pipeline

    pipe = Pipeline(make_run(f"trainer.enable_progress_bar={str(enabled).lower()}"))
    bars = [c for c in pipe.trainers.plain().callbacks if isinstance(c, TQDMProgressBar)]
    assert [type(b) for b in bars] == ([StepProgressBar] if enabled else [])
