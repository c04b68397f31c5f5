"""DDP correctness on CPU: data.batch_size is the global batch (1 and N ranks take the same rows per
optimizer step) and validation counts every row once whatever `len(val) % world`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from stackwise import artifacts as art
from stackwise.config import RunConfig
from stackwise.config.run import load_run
from stackwise.data import sampling
from stackwise.data.sampling import RankSliceSampler, per_device_batch
from stackwise.data.stage_data import TokenStageData
from stackwise.errors import ConfigError, StackWiseError
from stackwise.objective.masking import build_schedule
from stackwise.pipeline.inputs import StageInputs
from stackwise.pipeline.stage import Stage
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


def test_ddp_validation_counts_each_row_once(tmp_path):
    """2 ranks (gloo), 33 validation rows: the fused model's val loss recorded under DDP equals a
    single-process validation of the same weights (a padded DistributedSampler counts a row twice)."""
    out = cli(
        *TINY,
        "callbacks=none",
        "hardware=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "cache.dtype=float32",
        "cache.views=1",
        "data.n_val=33",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "fusion.finetune_steps=0",
        "name=ddpval",
        cwd=tmp_path,
        console_script=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    exp = tmp_path / "outputs" / "ddpval"
    records = {r["stage"]: r for r in json.loads((exp / "results.json").read_text())}
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

    # the caches the two ranks wrote hold every row once, in order (no padded repeats, not interleaved)
    from stackwise.data.cache.reader import ActivationCache, ActivationDataset

    cache = ActivationCache.open(exp / "acts" / "acts_layer1")
    for split in ("train", "val"):
        ds = ActivationDataset(cache, split)
        index = ds.__getitems__(list(range(len(ds))))["index"].tolist()
        assert index == sorted(set(index)), (split, index)
    assert cache.rows("val") == 33
