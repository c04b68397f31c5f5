"""cache.store=recompute: stage k >= 2 runs the frozen layers 1..k-1 on token batches instead of
reading acts_layer{k-1}, and sees exactly what that cache would have given it: the same rows in the
same order (train stream, validation, caching pass), the same masks, targets, t, index and view,
and the same hidden states to the cache dtype's rounding. On CPU every kernel computes a row the
same way whatever batch it is in, so the recomputed states are bit-identical to the cached ones for
an fp32 cache, and a whole `stage=all` trains bit-identical layer weights."""

from __future__ import annotations

import signal
from itertools import islice
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stackwise import artifacts as art
from stackwise.config import RunConfig
from stackwise.data.cache.reader import ActivationCache, ActivationDataset
from stackwise.pipeline import Pipeline
from stackwise.pipeline.stage import Stage
from tests.cli_runner import CliRun
from tests.conftest import TINY, cli, cli_env, compose_cfg

FAST = ["trainer.max_steps=4", "trainer.val_check_interval=2"]
# dropout on: the prefix must run as the caching passes did, in eval mode, while the stage trains
THREE = ["stage=all", "model.n_layers=3", "cache.last_layer=true", "cache.shuffle_block=4", "model.dropout=0.1", *FAST]
FIELDS = ("targets", "mask", "t", "index", "view")


def run_config(root: Path, *overrides: str, name: str) -> RunConfig:
    ovr = [*TINY, f"output_root={root}", f"name={name}", "logger=none", "callbacks=none", *overrides]
    return RunConfig.from_hydra(compose_cfg(ovr))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Pipeline]:
    """The same 3-layer experiment (fp32, the last layer cached too) fed from disk and by recomputing."""
    root = tmp_path_factory.mktemp("recompute")
    out = {}
    for store in ("disk", "recompute"):
        out[store] = Pipeline(run_config(root, *THREE, f"cache.store={store}", name=store))
        out[store].execute()
    return out


def pad_of(batch: dict, pad_id: int) -> torch.Tensor | None:
    pad = batch["targets"] == pad_id
    return pad if bool(pad.any()) else None


def compare_loaders(disk, recomputed, prefix, pad_id: int, exact: bool, n_train: int = 4) -> int:
    """Batch for batch: every field equal, the cache's hidden states == the prefix on the ids."""
    pairs = [(disk.train_dataloader(), recomputed.train_dataloader(), n_train)]
    pairs.append((disk.val_dataloader(), recomputed.val_dataloader(), None))
    pairs += [(a, b, None) for a, b in zip(disk.predict_dataloader(), recomputed.predict_dataloader(), strict=True)]
    seen = 0
    for a_loader, b_loader, limit in pairs:
        a_batches, b_batches = list(islice(a_loader, limit)), list(islice(b_loader, limit))
        assert len(a_batches) == len(b_batches) > 0
        for a, b in zip(a_batches, b_batches, strict=True):
            for f in FIELDS:
                assert torch.equal(a[f], b[f]), f
            h = prefix(b["ids"], pad_of(b, pad_id))
            assert h.dtype == a["hidden"].dtype and h.shape == a["hidden"].shape
            if exact:
                assert torch.equal(h, a["hidden"])
            else:  # the same roundings, up to kernel order: nearly all equal, the rest within a step
                assert (h == a["hidden"]).float().mean() > 0.99
                torch.testing.assert_close(h.float(), a["hidden"].float(), rtol=2**-6, atol=1e-3)
            seen += 1
    return seen


def test_a_recomputing_stage_gets_the_batches_of_its_disk_cache(runs) -> None:
    """fp32 cache: train stream, validation and caching-pass batches, field for field, hidden bit for bit."""
    disk = runs["disk"]
    again = Pipeline(run_config(disk.run.output_root, *THREE, "cache.store=recompute", name="disk"))
    for k in (2, 3):
        stage = Stage.layer(k)
        from_disk = disk.layer_inputs(stage)[0]
        data, below, _, prefix = again.layer_inputs(stage)
        assert prefix is not None and prefix.n_layers == k - 1 and below is not None
        assert compare_loaders(from_disk, data, prefix, disk.cfg.pad_id, exact=True) > 6


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3"])
def test_recomputed_states_are_rounded_as_the_cache_stores_them(tmp_path, dtype) -> None:
    """A half-precision cache rounds each layer's output: the recomputed chain rounds it the same way
    (here with the per_layer schedule: stage k trains on view k-1 only)."""
    args = ["stage=all", "model.n_layers=3", f"cache.dtype={dtype}", "masking=per_layer", "cache.views=3", *FAST]
    disk = Pipeline(run_config(tmp_path, *args, name="x"))
    disk.execute()
    recompute = Pipeline(run_config(tmp_path, *args, "cache.store=recompute", name="x"))
    data, _, _, prefix = recompute.layer_inputs(Stage.layer(3))
    compare_loaders(disk.layer_inputs(Stage.layer(3))[0], data, prefix, disk.cfg.pad_id, exact=False, n_train=2)


def test_stage_all_recomputing_trains_the_same_weights_and_writes_no_cache_it_does_not_need(runs) -> None:
    """Bit-identical (fp32 on CPU): every layer file's tensors, the fused model, the last layer's
    cache (cache.last_layer, written by a caching pass that recomputes layers 1..L-1) and every
    stage's validation loss. No acts_layer{k} is written for k < L."""
    disk, rec = runs["disk"], runs["recompute"]
    for k in (1, 2, 3):
        a, _ = art.load_layer_checkpoint(disk.paths.layer_ckpt(k))
        b, _ = art.load_layer_checkpoint(rec.paths.layer_ckpt(k))
        for section, tensors in a.sections().items():
            assert all(torch.equal(t, b.sections()[section][n]) for n, t in tensors.items()), (k, section)
    fused = [load_file(p.paths.fused_dir / "model.safetensors") for p in (disk, rec)]
    assert fused[0].keys() == fused[1].keys() and all(torch.equal(fused[0][n], fused[1][n]) for n in fused[0])
    losses = [{r["stage"]: r["val_loss"] for r in art.read_results(p.paths)} for p in (disk, rec)]
    assert losses[0] == losses[1]
    assert sorted(p.name for p in rec.paths.acts_root.iterdir()) == ["acts_layer3"]
    assert {"acts_layer1", "acts_layer2", "acts_layer3"} <= {p.name for p in disk.paths.acts_root.iterdir()}
    rows = [ActivationDataset(ActivationCache.open(p.paths.acts_dir(3)), "val") for p in (disk, rec)]
    a, b = (r.__getitems__(list(range(len(r)))) for r in rows)
    assert all(torch.equal(a[f], b[f]) for f in a)
    records = {r["stage"]: r for r in art.read_results(rec.paths)}
    assert "cache_seconds" not in records["embed"] and "cache_seconds" in records["layer_3"]


def test_a_recomputing_stage_needs_the_layers_below(tmp_path) -> None:
    from stackwise.errors import ArtifactError

    pipe = Pipeline(run_config(tmp_path, "stage=layer", "k=2", "cache.store=recompute", name="alone"))
    with pytest.raises(ArtifactError, match=r"needs .*layer_1\.pt, which does not exist"):
        pipe.execute()


# a checkpoint every 4 steps, 8 a stage; dropout on: the resumed stages continue its stream too
ARGS = [
    *TINY,
    "trainer.max_steps=8",
    "trainer.val_check_interval=4",
    "model.dropout=0.1",
    "callbacks=none",
    "logger=none",
]


def test_killed_and_rerun_recomputing_gives_identical_fused_weights(tmp_path) -> None:
    """SIGKILL mid stage 2: the rerun skips stage 1 (complete without a cache) and resumes stage 2 from
    its checkpoint, the recomputed stream continued: the uninterrupted run's bytes."""
    ref = Pipeline(run_config(tmp_path, "stage=all", "cache.store=recompute", *ARGS[len(TINY) :], name="ref"))
    ref.execute()
    exp = tmp_path / "outputs" / "crash"
    args = ["stage=all", "name=crash", "cache.store=recompute", *ARGS]
    for point in ("train:layer_2:6",):
        out = CliRun(args, tmp_path, cli_env(), timeout=300, kill_at=point).wait()
        assert out.returncode == -signal.SIGKILL, (point, out.returncode, out.stderr[-3000:])
        assert not (exp / "acts").exists()
    assert torch.load(exp / "ckpt" / "layer_2" / "last.ckpt", weights_only=True)["global_step"] == 4
    out = cli(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = {r["stage"]: r.get("resumed_from_step") for r in art.read_results(art.ExperimentPaths(exp))}
    assert resumed == {"embed": 0, "layer_2": 4, "fused": None}
    assert (exp / "fused" / "model.safetensors").read_bytes() == ref.paths.fused_weights.read_bytes()
    assert not (exp / "acts").exists()


def test_stage_all_builds_each_frozen_layer_once(tmp_path, monkeypatch) -> None:
    """Stage k of one stage=all process reuses the blocks stage k-1 recomputed with (it builds layer
    k-1 only, not 1..k-1 again), and fusion takes them into the fused model: none is left after it."""
    made: list = []
    frozen_prefix = Pipeline.frozen_prefix

    def spy(self, stage, below=None):
        made.append(frozen_prefix(self, stage, below))
        return made[-1]

    monkeypatch.setattr(Pipeline, "frozen_prefix", spy)
    p = Pipeline(run_config(tmp_path, *THREE, "cache.last_layer=false", "cache.store=recompute", name="once"))
    p.execute()
    assert [m.n_layers for m in made] == [1, 2]
    assert made[1].blocks[0] is made[0].blocks[0] and made[1].embed is made[0].embed
    assert p._prefix_layers == {}
