"""fused/ written beside the joint fine-tune (stackwise/pipeline/graph.py FusedWrite).

In a single process, fused/ is copied to the host and written on a thread while the fine-tune
trains; its manifest (config.json) is written last, once fused/finetuned/ is complete. These tests
hold it to what the plain path gives (written before the fine-tune, as under DDP, where `world_size`
is more than one): the same bytes in every file, the same one-line error for a failed write, and
a run killed or failed during the fine-tune leaves a fused/ no later run trusts, which the rerun
completes to the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from stackwise import artifacts as art
from stackwise.artifacts import models as art_models
from stackwise.errors import ArtifactError, ArtifactWriteError
from stackwise.pipeline import Pipeline, StageObserver, graph
from tests.cli_runner import CliRun
from tests.conftest import TINY

FINETUNE = ("fusion.finetune_steps=4",)
REPO = Path(__file__).resolve().parents[1]


def shas(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (fused/finetuned/ included), hidden ones too, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def untrusted(pipe: Pipeline) -> None:
    """fused/ as a killed or failed fusion stage must leave it: no manifest, nothing a reader takes."""
    assert not (pipe.paths.fused_dir / "config.json").exists()
    with pytest.raises(ArtifactError):
        art.read_model_meta(pipe.paths.fused_dir)
    assert not pipe.state.fusion_complete()


class FinetuneCallback(StageObserver):
    """Adds one Lightning callback to the fine-tune's fit only."""

    def __init__(self, callback: Callback):
        self.callback = callback

    def callbacks(self, stage):
        return [self.callback] if stage.name == "finetune" else []


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fused-write"]


@pytest.fixture
def trained(make_run):
    """A finished stage=all with a fine-tune (written beside it): the pipeline and fused/'s file hashes."""
    pipe = Pipeline(make_run("stage=all", *FINETUNE))
    pipe.execute()
    return pipe, shas(pipe.paths.fused_dir)


@pytest.mark.parametrize("sharded", [False, True], ids=["one_file", "sharded"])
def test_fused_bytes_do_not_depend_on_the_background_write(make_run, monkeypatch, caplog, tmp_path, sharded):
    if sharded:
        monkeypatch.setattr(art_models, "MAX_SHARD_BYTES", 40_000)
    with caplog.at_level(logging.INFO, logger="stackwise"):
        pipe = Pipeline(make_run("stage=all", *FINETUNE))
        pipe.execute()
    assert "fused/ written from the assembled model" in caplog.text and "beside the fine-tune" in caplog.text
    for line in ("stage finetune: fit in", "stage finetune: scored in", "fused/finetuned/ saved in"):
        assert line in caplog.text
    fused = pipe.paths.fused_dir
    background = shas(fused)
    assert "config.json" in background and "finetuned/config.json" in background
    assert ("model.safetensors.index.json" in background) is sharded
    assert not leftovers(fused) and not writer_threads()

    # as under DDP: fused/ written before the fine-tune, by the pipeline's own thread
    shutil.rmtree(fused)
    monkeypatch.setattr(graph, "world_size", lambda: 2)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stackwise"):
        Pipeline(make_run("stage=fusion", *FINETUNE)).execute()
    assert "fused/ written from the assembled model in" in caplog.text and "beside the fine-tune" not in caplog.text
    assert shas(fused) == background

    # the bytes fused/ always ended with: written unmarked before the fine-tune, then its meta rewritten
    manifest = json.loads((fused / "config.json").read_text())
    assert manifest["meta"]["finetuned"] is True
    state, _, _ = art.load_safetensors_model(fused, verify=True)
    before = tmp_path / "rewritten"
    art.save_safetensors_model(before, state, manifest["config"], {**manifest["meta"], "finetuned": False})
    art.rewrite_model_meta(before, manifest["meta"])
    if not sharded:  # (sharded, the order tensors were written in picks their shard: a state dict's is another)
        assert shas(before) == {k: v for k, v in background.items() if not k.startswith("finetuned/")}


def _no_space(real):
    def save_file(tensors, filename, metadata=None):
        if Path(filename).parent.name == "fused":
            raise OSError(28, os.strerror(28))  # ENOSPC, as safetensors' write would report it
        return real(tensors, filename, metadata=metadata)

    return save_file


class CountBatches(Callback):
    """Counts the fine-tune's training batches; the first one waits until fused/'s writer is done
    (here: has failed), so that the batch after which it is seen is known."""

    def __init__(self):
        self.batches = 0

    def on_train_batch_start(self, *args, **kwargs):
        if self.batches == 0:
            for t in writer_threads():
                t.join(60)
        self.batches += 1


def test_a_failed_background_write_is_the_same_one_line_and_stops_the_fine_tune(trained, make_run, monkeypatch):
    pipe, _ = trained
    monkeypatch.setattr(art_models, "save_file", _no_space(art_models.save_file))
    errors = {}
    for where in ("beside", "before"):
        shutil.rmtree(pipe.paths.fused_dir)
        if where == "before":
            monkeypatch.setattr(graph, "world_size", lambda: 2)
        count = CountBatches()
        failed = Pipeline(make_run("stage=fusion", *FINETUNE), observers=[FinetuneCallback(count)])
        with pytest.raises(ArtifactWriteError) as e:
            failed.execute()
        errors[where] = str(e.value)
        untrusted(failed)
        assert not leftovers(pipe.paths.fused_dir) and not writer_threads()
        assert not (pipe.paths.finetuned_dir / "config.json").exists()
        # beside the fine-tune: it stops after the first batch that sees the failure, not after its 4 steps
        assert count.batches == (1 if where == "beside" else 0)
    assert errors["beside"] == errors["before"]
    assert "\n" not in errors["beside"] and "model.safetensors" in errors["beside"] and "space" in errors["beside"]


def test_a_fine_tune_that_fails_mid_write_leaves_fused_untrusted_then_the_rerun_completes(
    trained, make_run, monkeypatch
):
    pipe, want = trained
    fused = pipe.paths.fused_dir
    shutil.rmtree(fused)
    release = threading.Event()
    real = art_models.save_file

    def slow(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        if threading.current_thread().name == "fused-write":
            release.wait(60)  # in the temporary file: not yet fsync'ed, renamed or hashed

    class Boom(Callback):
        def on_train_batch_start(self, trainer, *args, **kwargs):
            if trainer.global_step == 2:
                assert writer_threads() and not (fused / "config.json").exists()  # mid-write
                release.set()
                raise RuntimeError("the fine-tune failed")

    monkeypatch.setattr(art_models, "save_file", slow)
    failed = Pipeline(make_run("stage=fusion", *FINETUNE), observers=[FinetuneCallback(Boom())])
    with pytest.raises(RuntimeError, match="the fine-tune failed"):
        failed.execute()
    assert not writer_threads()  # waited for: no write runs on past the error
    untrusted(failed)
    assert not leftovers(fused)

    monkeypatch.setattr(art_models, "save_file", real)
    Pipeline(make_run("stage=fusion", *FINETUNE)).execute()
    assert shas(fused) == want


KILLED = r"""
import os, signal, sys, threading, time
from pathlib import Path
from lightning.pytorch.callbacks import Callback
from stackwise.artifacts import models
from stackwise.config import RunConfig
from stackwise.pipeline import Pipeline, StageObserver
from tests.conftest import compose_cfg

written = threading.Event()
real = models.save_file

def stuck(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    if threading.current_thread().name == "fused-write":
        written.set()  # the bytes are in the temporary file, not yet fsync'ed nor renamed
        time.sleep(600)

models.save_file = stuck

class Kill(Callback):
    def on_train_batch_start(self, trainer, *args, **kwargs):
        if trainer.global_step == 2:
            written.wait(120)
            os.kill(os.getpid(), signal.SIGKILL)

class AtStep2(StageObserver):
    def callbacks(self, stage):
        return [Kill()] if stage.name == "finetune" else []

Pipeline(RunConfig.from_hydra(compose_cfg(sys.argv[1:])), observers=[AtStep2()]).execute()
"""


def test_a_run_killed_mid_write_during_the_fine_tune_leaves_fused_untrusted(trained, make_run, tmp_path):
    pipe, want = trained
    fused = pipe.paths.fused_dir
    shutil.rmtree(fused)
    overrides = [*TINY, f"output_root={tmp_path}", "name=exp", "logger=none", "callbacks=none"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # a process of its own to SIGKILL: `python -c KILLED ...`, forked from the preloaded server
    out = CliRun([*overrides, "stage=fusion", *FINETUNE], tmp_path, env, timeout=300, code=KILLED).wait()
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    assert [n for n in leftovers(fused) if n.startswith(".model.safetensors.")], "killed mid-write"
    assert not (fused / "model.safetensors").exists()
    rerun = Pipeline(make_run("stage=fusion", *FINETUNE))
    untrusted(rerun)
    rerun.execute()
    assert shas(fused) == want  # the killed write's temporary file is gone too
