"""Crash and resume: a `stackwise-train stage=all` killed with SIGKILL at any point and started again
with the same command ends with fused weights BIT-IDENTICAL to a run that never stopped (CPU, fp32).

The kills land at exact places through an observer the test installs in the forked CLI process
(tests/kill_points.py, through the pipeline's public hooks in stackwise/pipeline/events.py):
mid-stage after a ModelCheckpoint save (so the rerun really resumes from ckpt/<stage>/last.ckpt and
redoes the steps after it), mid-cache (shards without a manifest), after a layer checkpoint or the
fused model is written, and mid fine-tune. One experiment folder is killed and rerun again and
again; each rerun must pick up where the last one died.
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch

from stackwise import artifacts as art
from stackwise.pipeline import Pipeline
from tests.cli_runner import CliRun
from tests.conftest import TINY, cli, cli_env

# checkpoints every 4 steps (the pipeline saves one per val_check_interval); dropout on, so the
# resumed stages must also continue the dropout stream where it was
ARGS = TINY + [
    "trainer.val_check_interval=4",
    "fusion.finetune_steps=8",
    "model.dropout=0.1",
    "callbacks=none",
    "logger=none",
]

# in order: each point is reached by the rerun after the previous kill
KILLS = [
    "train:embed:6",  # steps 1..6 done, last.ckpt from step 4: resume redoes 5, 6
    "cache:1:0:1",  # two cache batches of acts_layer1 written (one shard), no manifest
    "cached:1",  # every shard written, manifest not yet
    "train:layer_2:10",  # last.ckpt from step 8
    "saved:fused",  # fused/model.safetensors written beside the fine-tune (trained, not saved), no manifest yet
    "train:finetune:6",  # fine-tune step 6, last.ckpt from step 4
]


def files(exp):
    """Fused weights (and the fine-tuned model) as bytes, by relative path."""
    out = {}
    for p in sorted(exp.joinpath("fused").rglob("*")):
        if p.is_file():
            out[str(p.relative_to(exp))] = p.read_bytes()
    return out


def test_killed_anywhere_and_rerun_gives_identical_fused_weights(tmp_path, make_run):
    # the uninterrupted reference, in-process (same code, same config, same bytes: invariant 4)
    ref = Pipeline(make_run(*ARGS[len(TINY) :], "stage=all", name="ref"))
    ref.execute()
    want = files(ref.paths.root)
    assert {
        "fused/model.safetensors",
        "fused/config.json",
        "fused/finetuned/model.safetensors",
        "fused/finetuned/config.json",
    } <= set(want)

    # a stage trained without interruption records that it started from step 0
    assert {r["stage"]: r.get("resumed_from_step") for r in art.read_results(ref.paths)} == {
        "embed": 0,
        "layer_2": 0,
        "fused": None,
        "finetuned": 0,
    }

    exp = tmp_path / "outputs" / "crash"
    args = ["stage=all", "name=crash", *ARGS]
    ckpt_step = {}  # stage -> the optimizer step of the last.ckpt its killed run left
    for point in KILLS:
        out = CliRun(args, tmp_path, cli_env(), timeout=300, kill_at=point).wait()
        assert out.returncode == -signal.SIGKILL, (point, out.returncode, out.stderr[-3000:])
        stage = point.split(":")[1] if point.startswith("train:") else None
        if stage:
            # killed mid-stage after a checkpoint: the rerun must resume from it
            last = exp / "ckpt" / stage / "last.ckpt"
            assert last.is_file(), point
            ckpt_step[stage] = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
        if point.startswith("cache"):
            assert not (exp / "acts" / "acts_layer1" / "manifest.json").exists()
            assert list((exp / "acts" / "acts_layer1" / "train").glob("*.npy"))
        assert not (exp / "fused" / "finetuned" / "config.json").exists()
    out = cli(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    # every stage killed mid-training was resumed from its checkpoint, not retrained from step 0 (on
    # CPU both give the same bytes, so only the step training started from tells them apart)
    assert ckpt_step == {"embed": 4, "layer_2": 8, "finetune": 4}
    resumed = {r["stage"]: r.get("resumed_from_step") for r in art.read_results(art.ExperimentPaths(exp))}
    assert resumed == {"embed": 4, "layer_2": 8, "fused": None, "finetuned": 4}
    got = files(exp)
    assert got.keys() == want.keys()
    for rel in want:
        assert got[rel] == want[rel], f"{rel} differs from the uninterrupted run"
    assert not (exp / "ckpt").exists() or not any((exp / "ckpt").iterdir()), "mid-stage checkpoints are removed"
    # the layer checkpoints and caches are those of the uninterrupted run too
    for k in (1, 2):
        assert art.sha256_file(exp / "layers" / f"layer_{k}.pt") == art.sha256_file(ref.paths.layer_ckpt(k))


def test_the_product_holds_no_test_hook():
    """Kill points come from the tests (tests/kill_points.py), not from the package."""
    package = Path(__file__).resolve().parents[1] / "stackwise"
    assert not [p for p in package.rglob("*.py") if "STACKWISE_TEST" in p.read_text()]


def test_a_stage_checkpoints_before_its_last_step_only(tmp_path, make_run, monkeypatch):
    """Mid-stage checkpoints every val_check_interval steps, none at the last step or the end of fit:
    the stage's own artifact follows at once, so that write (weights and AdamW's state, tens of GB at
    large sizes) would only be deleted."""
    from stackwise.stages.callbacks import StageCheckpoint

    saved: list[tuple[str, int]] = []
    save = StageCheckpoint._save_checkpoint

    def spy(self, trainer, filepath):
        saved.append((Path(filepath).parent.name, trainer.global_step))
        save(self, trainer, filepath)

    monkeypatch.setattr(StageCheckpoint, "_save_checkpoint", spy)
    overrides = ["trainer.max_steps=5", "layerwise.embed_budget=1", "fusion.finetune_steps=4"]
    Pipeline(make_run("stage=all", *overrides, "trainer.val_check_interval=2", name="ckpt")).execute()
    # 5 steps a layer stage: saved at 2 and 4, not at 5; the 4-step fine-tune at 2 only
    assert saved == [("embed", 2), ("embed", 4), ("layer_2", 2), ("layer_2", 4), ("finetune", 2)]
