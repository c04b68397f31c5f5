"""`stackwise-train` as a user runs it: subprocesses with real overrides on a tiny model."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

from tests.conftest import TINY, cli

FAST = TINY + ["callbacks=none"]


def exp_dirs(root):
    return sorted(p.name for p in (root / "outputs").iterdir() if p.is_dir() and p.name != "multirun")


def test_default_chain_writes_the_documented_artifacts(tmp_path):
    out = cli(*FAST, cwd=tmp_path, console_script=True)  # the installed entry point itself, once
    assert out.returncode == 0, out.stderr[-3000:]
    (name,) = exp_dirs(tmp_path)
    # derived from the overrides that change the model / data / objective (sorted; long names end in a hash)
    assert name.startswith("data.batch_size=16,data.n_train=256") and "cache.shard_size" not in name
    exp = tmp_path / "outputs" / name
    for rel in (
        "layers/layer_1.pt",
        "layers/layer_2.pt",
        "acts/acts_layer1/manifest.json",
        "fused/model.safetensors",
        "fused/config.json",
        "results.json",
    ):
        assert (exp / rel).is_file(), rel
    assert not (exp / "acts" / "acts_layer2").exists()  # nothing reads the last layer's cache
    assert list((exp / "tb").glob("*/events.out.tfevents.*")), "one TensorBoard run per stage"
    assert list((exp / "hydra").glob("*/.hydra/config.yaml")), "Hydra's logs live beneath the experiment"
    stages = [r["stage"] for r in json.loads((exp / "results.json").read_text())]
    assert stages == ["embed", "layer_2", "fused"]
    assert "val loss" in out.stdout and "fused" in out.stdout  # the end-of-run table
    # Lightning's info lines reach Hydra's handlers, the console and train.log, once each: they were
    # lost (propagation stopped before Lightning was imported) and every Trainer of a stage repeated
    # them (test_console.py: the same where Lightning was imported first)
    assert (out.stdout + out.stderr).count("GPU available: ") == 1, out.stdout[-3000:]
    (log,) = (exp / "hydra").glob("*/train.log")
    assert log.read_text().count("GPU available: ") == 1


def test_stage_by_stage_finds_the_same_experiment(tmp_path):
    common = FAST + ["model.n_layers=3"]
    for args in (
        ["stage=embed", "attention=gqa"],
        ["stage=layer", "k=2", "attention=gqa"],
        ["stage=layer", "k=3", "attention=gqa"],
        ["stage=fusion", "attention=gqa"],
    ):
        out = cli(*common, *args, cwd=tmp_path)
        assert out.returncode == 0, (args, out.stderr[-3000:])
    (name,) = exp_dirs(tmp_path)
    assert "attention=gqa" in name
    exp = tmp_path / "outputs" / name
    assert [p.name for p in sorted((exp / "layers").iterdir())] == ["layer_1.pt", "layer_2.pt", "layer_3.pt"]
    assert (exp / "fused" / "model.safetensors").is_file()


def test_sweep_makes_one_experiment_per_combination(tmp_path):
    out = cli("-m", "attention=mha,gqa", "stage=embed", *FAST, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    names = exp_dirs(tmp_path)
    assert len(names) == 2 and any("attention=mha" in n for n in names) and any("attention=gqa" in n for n in names)
    for n in names:
        assert (tmp_path / "outputs" / n / "layers" / "layer_1.pt").is_file()


def test_e2e_baseline(tmp_path):
    out = cli("stage=e2e", "name=base", *FAST, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    exp = tmp_path / "outputs" / "base"
    assert (exp / "e2e" / "model.safetensors").is_file()
    (rec,) = json.loads((exp / "results.json").read_text())
    # same token budget as the layer-wise run: 2 stages of 12 steps of 16 x 32 tokens
    assert rec["stage"] == "e2e" and rec["tokens"] == 2 * 12 * 16 * 32


def test_missing_previous_layer_is_one_clear_line(tmp_path):
    out = cli("stage=layer", "k=3", "model.n_layers=3", "name=x", *FAST, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("stackwise-train: error:") and "layer_2.pt" in lines[-1]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "outputs" / "x" / "layers").exists() or not any(
        (tmp_path / "outputs" / "x" / "layers").iterdir()
    )


def test_ddp_on_two_cpu_processes(tmp_path):
    """hardware=ddp end to end with 2 ranks (gloo on CPU): per-rank cache shards, rank 0 writes the
    artifacts and the others wait for them, the fused model passes the fusion check."""
    out = cli(
        *FAST,
        "hardware=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "cache.dtype=float32",
        "name=ddp",
        "fusion.finetune_steps=2",
        cwd=tmp_path,
        console_script=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    exp = tmp_path / "outputs" / "ddp"
    manifest = json.loads((exp / "acts" / "acts_layer1" / "manifest.json").read_text())
    ranks = {s["rank"] for s in manifest["splits"]["train"]["shards"]}
    assert ranks == {0, 1}, ranks
    records = json.loads((exp / "results.json").read_text())
    assert [r["stage"] for r in records] == ["embed", "layer_2", "fused", "finetuned"]  # rank 0 alone writes
    assert records[0]["tokens"] == 12 * 16 * 32  # steps x global batch x seq_len: the 2 ranks share the batch
    assert len(re.findall(r"^stage\s+val loss", out.stdout, flags=re.M)) == 1  # the table, printed once
    assert "fusion check: fused val loss" in out.stdout + out.stderr


def test_tensorboard_gets_throughput_and_flops(tmp_path):
    """The default logger and callbacks: tokens/s and FLOP/s (from train_step_flops) per stage."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [a for a in TINY if not a.startswith("trainer.max_steps")]
    out = cli(*args, "stage=embed", "name=tb", "trainer.max_steps=24", "trainer.log_every_n_steps=4", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    events = EventAccumulator(str(tmp_path / "outputs" / "tb" / "tb" / "embed"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "train/device/items_per_sec", "train/device/flops_per_sec"} <= tags, tags
    assert events.Scalars("train/device/flops_per_sec")[-1].value > 0


def test_two_runs_started_in_the_same_second_log_into_their_own_hydra_folders():
    """Hydra's log folder of a run (and of each sweep job) is named by its start time down to the
    microsecond: two runs of one experiment started in the same second (the second one refused by
    the run lock, say) no longer write into one train.log."""
    from datetime import datetime

    import yaml

    from stackwise.config.compose import CONFIG_MODULE

    cfg = yaml.safe_load((Path(importlib.import_module(CONFIG_MODULE).__file__).parent / "config.yaml").read_text())
    patterns = [cfg["hydra"]["run"]["dir"], cfg["hydra"]["sweep"]["subdir"]]
    for pattern in patterns:
        (fmt,) = re.findall(r"\$\{now:([^}]*)\}", pattern)
        one, two = (datetime(2026, 12, 2, 17, 35, 13, us).strftime(fmt) for us in (1000, 2000))
        assert one != two, pattern
