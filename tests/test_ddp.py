"""DDP correctness on CPU: data.batch_size is the global batch (1 and N ranks take the same rows per
optimizer step) and validation counts every row once whatever `len(val) % world`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from stackwise import artifacts as art
from stackwise.config import RunConfig
from stackwise.config.run import load_run
from stackwise.data import sampling, workers
from stackwise.data.sampling import RankSliceSampler, per_device_batch
from stackwise.data.stage_data import TokenStageData
from stackwise.errors import ConfigError, StackWiseError
from stackwise.objective.masking import build_schedule
from stackwise.pipeline.inputs import StageInputs
from stackwise.pipeline.stage import Stage
from stackwise.pipeline.trainers import CPU_COLLECTIVE_TIMEOUT, build, cpu_strategy
from stackwise.stages.full import FullModelStage
from tests.conftest import TINY, cli, compose_cfg


def _fake_dist(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(sampling.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(sampling.dist, "get_rank", lambda: rank)
    monkeypatch.setattr(sampling.dist, "get_world_size", lambda: world)


@pytest.mark.parametrize("n,world", [(33, 2), (7, 3), (8, 2), (5, 1)])
def test_rank_slices_cover_every_row_once(monkeypatch, n, world):
    slices = []
    for rank in range(world):
        _fake_dist(monkeypatch, rank, world)
        sampler = RankSliceSampler(list(range(n)))
        slices.append(list(sampler))
        assert len(sampler) == len(slices[-1])
    assert sorted(i for s in slices for i in s) == list(range(n))  # no row twice, none left out


def test_per_device_batch_splits_the_global_batch():
    assert per_device_batch(16, 1, 1) == 16  # one process: the global batch itself
    assert per_device_batch(16, 2, 1) == 8 and per_device_batch(16, 2, 2) == 4
    with pytest.raises(StackWiseError, match=r"data.batch_size=12 .* world size 2 x .*accumulate_grad_batches 4 = 8"):
        per_device_batch(12, 2, 4)


def test_config_rejects_a_global_batch_that_does_not_split():
    with pytest.raises(ConfigError, match=r"data.batch_size: the global batch 15 .* devices 2 .* = 2"):
        RunConfig.from_hydra(compose_cfg(["data.batch_size=15", "trainer.devices=2"]))
    with pytest.raises(ConfigError, match="accumulate_grad_batches 4"):
        RunConfig.from_hydra(compose_cfg(["data.batch_size=6", "trainer.accumulate_grad_batches=4"]))
    RunConfig.from_hydra(compose_cfg(["data.batch_size=16", "trainer.devices=auto"]))  # checked by the loaders


def _token_data(batch_size: int) -> TokenStageData:
    tokens = np.arange(40 * 8, dtype=np.uint16).reshape(40, 8) % 50 + 2
    return TokenStageData(
        tokens,
        tokens[:5],
        batch_size=batch_size,
        seed=1,
        schedule=build_schedule(compose_run().masking, 2),
        mask_id=1,
        pad_id=0,
        k=1,
        max_steps=6,
        views=1,
    )


def compose_run() -> RunConfig:
    return RunConfig.from_hydra(compose_cfg([]))


def _rows(dm: TokenStageData, rank: int, world: int, accum: int) -> list[list[int]]:
    dm.trainer = SimpleNamespace(
        global_step=0, accumulate_grad_batches=accum, global_rank=rank, world_size=world, max_steps=6
    )
    return [b["index"].tolist() for b in dm.train_dataloader()]


def test_one_and_two_ranks_and_accumulation_take_the_same_rows_per_step():
    one = _rows(_token_data(8), 0, 1, 1)
    assert len(one) == 6 and all(len(b) == 8 for b in one)
    r0, r1 = _rows(_token_data(8), 0, 2, 1), _rows(_token_data(8), 1, 2, 1)
    assert all(len(b) == 4 for b in r0 + r1)  # each rank its share of the global batch
    assert [a + b for a, b in zip(r0, r1, strict=True)] == one
    acc = _rows(_token_data(8), 0, 1, 2)  # two micro-batches of 4 per optimizer step
    assert [acc[i] + acc[i + 1] for i in range(0, len(acc), 2)] == one
    acc2 = _rows(_token_data(8), 1, 2, 2)  # rank 1 of 2, accumulating 2: micro-batches of 2
    assert all(len(b) == 2 for b in acc2)
    with pytest.raises(StackWiseError, match="data.batch_size=8"):
        _rows(_token_data(8), 0, 3, 1)


def test_loader_workers_start_from_a_fork_server_where_a_fork_can_deadlock(monkeypatch):
    """A worker forked while a gloo thread holds CPython's thread-list lock waits on it forever
    (CPython < 3.12), and the run hangs: there the loaders start their workers from a fork server."""
    data = _token_data(8)
    data.num_workers = 2

    def context():
        return data.train_dataloader().multiprocessing_context

    data.trainer = SimpleNamespace(global_step=0, accumulate_grad_batches=1, global_rank=0, world_size=2, max_steps=6)
    monkeypatch.setattr(workers, "FORK_CAN_DEADLOCK", True)
    monkeypatch.setattr(workers.multiprocessing, "get_start_method", lambda allow_none=False: None)
    monkeypatch.setattr(workers.sys, "platform", "linux")
    assert context().get_start_method() == "forkserver"
    monkeypatch.setattr(workers, "FORK_CAN_DEADLOCK", False)
    assert context() is None  # fork, the default: workers share the parent's memory
    monkeypatch.setattr(workers, "FORK_CAN_DEADLOCK", True)
    data.num_workers = 0
    assert context() is None  # no workers, nothing started


def test_cpu_ranks_wait_minutes_not_half_an_hour_in_a_collective():
    """On CPU (gloo) a rank whose peer is stuck outside a collective fails after CPU_COLLECTIVE_TIMEOUT,
    naming the operation, instead of waiting Lightning's 30 minutes; GPU runs keep their strategy."""
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    trainer = build({"accelerator": "cpu", "devices": 2, "strategy": "ddp"}, logger=False)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.strategy._timeout == CPU_COLLECTIVE_TIMEOUT
    sharded = cpu_strategy({"accelerator": "cpu", "strategy": {"_target_": "stackwise.stages.sharding.strategy"}})
    assert isinstance(sharded, ModelParallelStrategy) and sharded._timeout == CPU_COLLECTIVE_TIMEOUT
    assert cpu_strategy({"accelerator": "gpu", "devices": 2, "strategy": "ddp"}) is None
    assert cpu_strategy({"accelerator": "cpu", "devices": 1}) is None  # one process: no collective


# one configuration, run by 1 process, by 2 DDP ranks and by 2 FSDP ranks (gloo, CPU): 33 validation
# rows (an uneven split), an untied head (a second trained matrix), fp32 everywhere
RANKS_RUN = [
    *TINY,
    "callbacks=none",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "model.tie_embeddings=false",
    "cache.dtype=float32",
    "cache.views=1",
    "data.n_val=33",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "fusion.finetune_steps=2",
    "data.num_workers=0",  # the correctness of the placements: loader workers under DDP are test_cli.py's (hardware=ddp, 4 a rank)
]
PLACEMENTS = {
    "one": ["trainer.devices=1"],
    "ddp": ["hardware=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
    "fsdp": ["hardware=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"],
}


@pytest.fixture(scope="module")
def placed_runs(tmp_path_factory) -> dict[str, Path]:
    """{placement: experiment folder} after `stage=all` (and `stage=e2e` for one and fsdp)."""
    out = {}
    for name, extra in PLACEMENTS.items():
        cwd = tmp_path_factory.mktemp(name)
        stages = ("all", "e2e") if name != "ddp" else ("all",)
        for stage in stages:
            run = cli(*RANKS_RUN, *extra, f"stage={stage}", "name=x", cwd=cwd)
            assert run.returncode == 0, (name, stage, run.stderr[-3000:])
        out[name] = cwd / "outputs" / "x"
    return out


def _records(exp) -> dict[str, dict]:
    return {r["stage"]: r for r in json.loads((exp / "results.json").read_text())}


def test_ddp_validation_counts_each_row_once(placed_runs):
    """2 ranks, 33 validation rows: the fused model's val loss recorded under DDP equals a
    single-process validation of the same weights (a padded DistributedSampler counts a row twice)."""
    exp = placed_runs["ddp"]
    records = _records(exp)
    assert records["embed"]["tokens"] == 4 * 16 * 32  # the global batch, counted once

    run = load_run(exp)
    data = StageInputs(run, art.ExperimentPaths(exp)).tokens(Stage.fusion(run.model.n_layers), 1)
    assert len(data.val_dataloader().dataset) == 33
    model, _ = art.load_model(exp / "fused")
    module = FullModelStage(run.model, run.optim_for("fusion"), run.masking.weighting, 1, "fused", model)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, inference_mode=False, precision="32-true"
    )
    (metrics,) = trainer.validate(module, dataloaders=data.val_dataloader(), verbose=False)
    torch.testing.assert_close(float(metrics["val/loss"]), records["fused"]["val_loss"], rtol=1e-5, atol=0)


def _cache_rows(exp) -> dict[str, dict[str, np.ndarray]]:
    from stackwise.data.cache.reader import ActivationCache, ActivationDataset

    cache = ActivationCache.open(exp / "acts" / "acts_layer1")
    out = {}
    for split in ("train", "val"):
        ds = ActivationDataset(cache, split)
        out[split] = {k: v.numpy() for k, v in ds.__getitems__(list(range(len(ds)))).items()}
    return out


def test_two_ranks_cache_the_rows_and_values_of_one(placed_runs):
    """acts_layer1 written by 2 ranks holds exactly the rows of the 1-process cache, in order, none
    twice; the values are those of its own layer_1 weights (which differ from the 1-process ones only
    by the optimisation's rounding: tests below)."""
    one, two = _cache_rows(placed_runs["one"]), _cache_rows(placed_runs["ddp"])
    for split in ("train", "val"):
        index = two[split]["index"].tolist()
        assert index == sorted(set(index)), split
        for key in ("index", "view", "targets", "mask", "t"):
            np.testing.assert_array_equal(two[split][key], one[split][key], err_msg=f"{split} {key}")
    assert len(one["val"]["index"]) == 33
    # and each row's values are layer 1's output for it, whichever rank wrote it
    weights, _ = art.load_layer_checkpoint(placed_runs["ddp"] / "layers" / "layer_1.pt")
    cfg = load_run(placed_runs["ddp"]).model
    embed, block = weights.modules(cfg, 1).embed, weights.modules(cfg, 1).block
    for split in ("train", "val"):
        rows = two[split]
        ids = np.where(rows["mask"], cfg.mask_id, rows["targets"])
        with torch.no_grad():
            hidden = block(embed(torch.from_numpy(ids).long()))
        np.testing.assert_allclose(rows["hidden"], hidden.numpy(), rtol=0, atol=1e-5, err_msg=split)


def _weights(exp, what: str) -> dict[str, torch.Tensor]:
    if what.startswith("layer_"):
        weights, _ = art.load_layer_checkpoint(exp / "layers" / f"{what}.pt")
        return {f"{m}.{k}": t for m, sec in weights.sections().items() for k, t in sec.items()}
    model, _ = art.load_model(exp / what)
    return model.state_dict()


# The loss is the mean over every masked position of the global batch on any number of ranks
# (StageModule._global_mean): 1 and 2 ranks differ only by fp32 summation order. A mean of the
# ranks' own means (what DDP gives by default) moved these weights by 1.2e-2 after 4 steps.
WEIGHTS_ATOL = 1e-5


@pytest.mark.parametrize("placement", ["ddp", "fsdp"])
def test_two_ranks_train_the_weights_of_one(placed_runs, placement):
    """The same global batch on 1 process and on 2 ranks: the same weights, for every layer file,
    the fused and the fine-tuned model (and e2e under FSDP), and the same scores."""
    one, two = placed_runs["one"], placed_runs[placement]
    models = ["layer_1", "layer_2", "fused", "fused/finetuned"] + (["e2e"] if placement == "fsdp" else [])
    for what in models:
        a, b = _weights(one, what), _weights(two, what)
        assert a.keys() == b.keys(), what
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=WEIGHTS_ATOL, msg=f"{what} {name}")
    r1, r2 = _records(one), _records(two)
    assert r1.keys() == r2.keys() if placement == "fsdp" else set(r2) <= set(r1)
    for stage, rec in r2.items():
        assert rec["tokens"] == r1[stage]["tokens"], stage
        torch.testing.assert_close(rec["val_loss"], r1[stage]["val_loss"], rtol=1e-5, atol=0)


def _write_once_rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from stackwise.pipeline.ranks import write_once

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)

    def full_disk() -> None:
        raise OSError(28, "No space left on device", "layers/layer_2.pt")

    try:
        write_once(lambda: None)  # a write that works: every rank goes on
        write_once(full_disk)
        result = "went on"
    except StackWiseError as e:
        result = f"StackWiseError: {e}"
    except OSError as e:
        result = f"OSError: {e.strerror}"
    Path(out, f"rank{rank}.txt").write_text(result)
    dist.destroy_process_group()


def test_a_failed_write_on_rank_0_stops_every_rank_at_once(tmp_path):
    """Rank 0 alone writes the pipeline's files; when its write fails (a full disk) it raises its own
    error and every other rank stops with one line at once, instead of waiting at a barrier for a
    rank that has exited until the process group's timeout."""
    import torch.multiprocessing as mp

    # forked (the test process has no process group; spawning two interpreters would import torch twice)
    mp.start_processes(
        _write_once_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    assert (tmp_path / "rank0.txt").read_text() == "OSError: No space left on device"
    other = (tmp_path / "rank1.txt").read_text()
    assert other.startswith("StackWiseError: rank 1: stopped, rank 0 could not write"), other
