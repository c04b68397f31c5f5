"""The invariants on a tiny model, run in-process through the real pipeline: a stage changes only what it
trains (1), the cache equals the fused prefix (2), the fused model reproduces the last stage's loss (3),
same settings give the same bytes and a finished run does nothing again (4); and the pipeline's own
parts: the Stage value, the Trainer factory, the observer hooks."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import ClassVar

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from stackwise import artifacts as art
from stackwise.data import activations as acts
from stackwise.errors import ArtifactError, ConfigError
from stackwise.model.transformer import Transformer
from stackwise.model.weights import next_layer
from stackwise.objective.loss import masked_loss
from stackwise.pipeline import Pipeline, Stage, StageObserver, plan
from stackwise.pipeline.trainers import Trainers
from stackwise.stages.callbacks import AtomicCheckpointIO
from stackwise.stages.layerwise import LayerwiseStage


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in list(module.named_parameters()) + list(module.named_buffers())}


class Recorder(StageObserver):
    """Every event the pipeline offers an observer, in order."""

    def __init__(self):
        self.events: list[tuple] = []

    def callbacks(self, stage: Stage) -> list[Callback]:
        events = self.events

        class Batches(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                events.append(("train", stage.name, trainer.global_step))

            def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
                events.append(("cache", stage.name, dataloader_idx, batch_idx))

        return [Batches()]

    def saved(self, stage: Stage) -> None:
        self.events.append(("saved", stage.record))

    def cached(self, stage: Stage) -> None:
        self.events.append(("cached", stage.k))


@pytest.fixture
def done(make_run):
    """A finished tiny `all` run (2 layers, both caches kept) and its pipeline (observers[-1]: a Recorder)."""
    run = make_run("stage=all", "cache.last_layer=true")
    pipe = Pipeline(run, observers=[Recorder()])
    pipe.execute()
    return pipe


# ---------------------------------------------------------------- invariant 1
@pytest.mark.parametrize("tie", [True, False])
def test_stage_changes_only_its_trainable_tensors(make_run, tie):
    run = make_run("stage=all", f"model.tie_embeddings={str(tie).lower()}", "model.n_layers=3", "attention=hybrid")
    pipe = Pipeline(run)
    pipe.layer_stage(Stage.layer(1))
    pipe.layer_stage(Stage.layer(2))
    layer1 = sha(pipe.paths.layer_ckpt(1))
    # stage 3 trained by hand so every tensor can be compared before and after
    prev, _ = art.load_layer_checkpoint(pipe.paths.layer_ckpt(2))
    first, _ = art.load_layer_checkpoint(pipe.paths.layer_ckpt(1))
    layer = next_layer(run.model, 3, "random", prev)
    module = LayerwiseStage(
        run.model, layer, run.optim, "mean", 5, "layer_3", embed_weight=first.embed["weight"] if tie else None
    )
    declared = {id(p) for p in module.trainable_parameters()}
    names_trainable = {n for n, p in module.named_parameters() if id(p) in declared}
    before = snapshot(module)
    data = acts.ActivationDataModule(pipe.state.open_cache(Stage.layer(2)), batch_size=16, seed=0, max_steps=5)
    L.Trainer(
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        accelerator="cpu",
    ).fit(module, datamodule=data)
    after = snapshot(module)
    frozen_up = [n for n in before if "up" in n and n not in names_trainable]
    assert frozen_up, "the SwiGLU up-projection must be a frozen tensor of the block"
    for name in before:
        changed = not torch.equal(before[name], after[name])
        if name in names_trainable:
            assert changed, f"{name} is declared trainable but did not change"
        else:
            assert not changed, f"{name} is not trainable in stage 3 but changed"
    assert any(n.startswith("head.") for n in names_trainable)
    assert not tie or "embed_weight" in before  # the tied matrix is present, frozen
    assert (not tie) == any(n.startswith("head.proj") for n in names_trainable)
    assert sha(pipe.paths.layer_ckpt(1)) == layer1  # stage 3 never rewrites earlier layers
    # no optimizer ever holds a frozen tensor
    opt = module.configure_optimizers()["optimizer"]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == declared


# ---------------------------------------------------------------- invariant 2
def test_cache_equals_the_fused_prefix(done):
    pipe = done
    fused = Transformer(pipe.cfg)
    state, _, _ = art.load_safetensors_model(pipe.paths.fused_dir)
    fused.load_state_dict(state)
    fused.eval()
    data = pipe.inputs.tokens(Stage.layer(1), 1)
    for k in (1, 2):
        cache = pipe.state.open_cache(Stage.layer(k))
        ds = acts.ActivationDataset(cache, "val")
        tokens = data.val_dataloader().dataset
        assert len(ds) == len(tokens)
        for i in range(0, len(ds), 7):
            row, item = ds[i], tokens[i]
            assert int(row["index"]) == int(item["index"]) and int(row["view"]) == int(item["view"])
            assert torch.equal(row["mask"], item["mask"]) and torch.equal(row["targets"].long(), item["targets"])
            with torch.no_grad():
                h = fused.run_layers(fused.embed_tokens(item["ids"][None]), 1, k)[0]
            torch.testing.assert_close(row["hidden"].float(), h, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- invariant 3
def test_fused_model_reproduces_last_stage_val_loss(done):
    pipe = done
    _, meta = art.load_layer_checkpoint(pipe.paths.layer_ckpt(2))
    fused = Transformer(pipe.cfg)
    state, _, _ = art.load_safetensors_model(pipe.paths.fused_dir)
    fused.load_state_dict(state)
    fused.eval()
    ce, n = 0.0, 0
    with torch.no_grad():
        for batch in pipe.inputs.tokens(Stage.fusion(2), 1).val_dataloader():
            h = fused.run_layers(fused.embed_tokens(batch["ids"]), 1, 2)
            out = masked_loss(h, batch["targets"], batch["mask"], batch["t"], fused.logits, weighting="mean")
            ce, n = ce + float(out.ce_sum), n + int(out.n_masked)
    assert abs(ce / n - meta["val_loss"]) <= 1e-5 * meta["val_loss"]
    records = {r["stage"]: r for r in art.read_results(pipe.paths)}
    assert abs(records["fused"]["val_loss"] - meta["val_loss"]) <= 1e-5 * meta["val_loss"]


# ---------------------------------------------------------------- invariant 4
def test_same_config_same_bytes_and_second_run_does_nothing(done, make_run, monkeypatch):
    first = done
    again = Pipeline(make_run("stage=all", "cache.last_layer=true", experiment="exp2"))
    again.execute()
    for k in (1, 2):
        a, b = first.paths.layer_ckpt(k), again.paths.layer_ckpt(k)
        wa, _ma = art.load_layer_checkpoint(a)
        wb, _mb = art.load_layer_checkpoint(b)
        sa, sb = wa.sections(), wb.sections()
        assert sa.keys() == sb.keys()
        for m in sa:
            assert sa[m].keys() == sb[m].keys() and all(torch.equal(sa[m][n], sb[m][n]) for n in sa[m])
        ca = acts.ActivationDataset(first.state.open_cache(Stage.layer(k)), "train")
        cb = acts.ActivationDataset(again.state.open_cache(Stage.layer(k)), "train")
        assert len(ca) == len(cb)
        for i in (0, len(ca) // 2, len(ca) - 1):
            assert all(torch.equal(ca[i][f], cb[i][f]) for f in ("hidden", "mask", "t", "targets"))
    assert (first.paths.fused_dir / "model.safetensors").read_bytes() == (
        again.paths.fused_dir / "model.safetensors"
    ).read_bytes()

    # `all` again: every stage is complete, nothing trains or caches
    def boom(*a, **k):
        raise AssertionError("a complete stage ran again")

    monkeypatch.setattr(Trainers, "fit", boom)
    monkeypatch.setattr(Pipeline, "cache", boom)
    stamps = {p: p.stat().st_mtime_ns for p in first.paths.root.rglob("*") if p.is_file()}
    Pipeline(make_run("stage=all", "cache.last_layer=true")).execute()
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}


# ---------------------------------------------------------------- learning
def test_training_learns_and_depth_helps(make_run):
    run = make_run(
        "stage=all",
        "model.n_layers=3",
        "model.d_model=64",
        "model.d_ff=128",
        "trainer.max_steps=150",
        "trainer.val_check_interval=150",
        "optim.lr=3e-3",
        "data.n_train=1024",
        "data.n_val=64",
        "cache.shard_size=1000",
        experiment="learn",
    )
    pipe = Pipeline(run)
    pipe.execute()
    losses = [art.load_layer_checkpoint(pipe.paths.layer_ckpt(k))[1]["val_loss"] for k in (1, 2, 3)]
    uniform = float(np.log(run.model.vocab_size - 2))  # guessing among the real symbols
    assert losses[0] < 0.8 * uniform, (losses, uniform)
    assert losses[1] < losses[0] and losses[2] < losses[1], losses


# ---------------------------------------------------------------- stage order errors
def test_layer_without_previous_layer_stops_clearly(make_run):
    run = make_run("stage=layer", "k=2")
    with pytest.raises(ArtifactError, match="layer_1.pt"):
        Pipeline(run).execute()


def test_foreign_artifacts_stop_or_are_replaced(done, make_run):
    with pytest.raises(ArtifactError, match="overwrite=true"):
        Pipeline(make_run("stage=all", "optim.lr=1e-2")).execute()
    Pipeline(make_run("stage=all", "optim.lr=1e-2", "overwrite=true")).execute()
    _, meta = art.load_layer_checkpoint(done.paths.layer_ckpt(1))
    assert meta["config_hash"] == Pipeline(make_run("stage=all", "optim.lr=1e-2")).hashes["layer"]


# ---------------------------------------------------------------- the pipeline's own parts
def test_stage_value_names_each_stage_once():
    first, third = Stage.layer(1), Stage.layer(3)
    assert (first.name, first.budget, first.hash_key, first.record, first.first, first.below) == (
        "embed",
        "embed",
        "layer",
        "embed",
        True,
        None,
    )
    assert (third.name, third.budget, third.hash_key, third.record, third.below) == (
        "layer_3",
        "layer",
        "layer",
        "layer_3",
        Stage.layer(2),
    )
    fusion, finetune, e2e = Stage.fusion(3), Stage.finetune(3), Stage.e2e(3)
    assert (fusion.record, fusion.hash_key, fusion.below) == ("fused", "fusion", None)
    assert (finetune.name, finetune.budget, finetune.record) == ("finetune", "fusion", "finetuned")
    assert (e2e.name, e2e.budget, e2e.hash_key, e2e.record, e2e.k) == ("e2e", "e2e", "e2e", "e2e", 3)
    assert [s.name for s in plan("all", None, 3)] == ["embed", "layer_2", "layer_3", "fusion"]
    assert plan("embed", None, 3) == [Stage.layer(1)] and plan("layer", 2, 3) == [Stage.layer(2)]
    assert (first.command, third.command, fusion.command) == ("stage=embed", "stage=layer k=3", "stage=fusion")


def test_records_say_what_each_stage_is(done):
    recs = [(r["stage"], r["kind"], r["k"]) for r in art.read_results(done.paths)]
    assert recs == [("embed", "layer", 1), ("layer_2", "layer", 2), ("fused", "fusion", 2)]


def test_observers_see_every_stage_boundary_and_batch(done):
    events = done.observers[-1].events
    bounds = [e for e in events if e[0] in ("saved", "cached")]
    assert bounds == [("saved", "embed"), ("cached", 1), ("saved", "layer_2"), ("cached", 2), ("saved", "fused")]
    assert [e[2] for e in events if e[:2] == ("train", "embed")] == list(range(12))  # every training batch
    cache_1 = [e for e in events if e[:2] == ("cache", "embed")]
    assert {e[2] for e in cache_1} == {0, 1}  # the train and the val split
    assert events.index(cache_1[-1]) < events.index(("cached", 1)) < events.index(("saved", "layer_2"))


class CountingTrainer(L.Trainer):
    """A lightning.Trainer that remembers what it was built with."""

    built: ClassVar[list[dict]] = []

    def __init__(self, **kwargs):
        CountingTrainer.built.append(kwargs)
        super().__init__(**kwargs)


def test_every_trainer_is_built_from_the_trainer_node(make_run):
    CountingTrainer.built.clear()
    run = make_run("stage=embed", f"trainer._target_={__name__}.CountingTrainer")
    pipe = Pipeline(run)
    pipe.execute()
    assert pipe.paths.acts_manifest(1).exists()
    fit, validate, predict = CountingTrainer.built  # train, evaluate, cache: all from the node's _target_
    assert "_target_" not in fit and fit["max_steps"] == 12
    (checkpoint,) = [cb for cb in fit["callbacks"] if isinstance(cb, ModelCheckpoint)]
    assert Path(checkpoint.dirpath) == pipe.paths.stage_ckpt_dir("embed") and checkpoint._every_n_train_steps == 6
    assert [type(p) for p in fit["plugins"]] == [AtomicCheckpointIO]
    for plain in (validate, predict):
        assert plain["logger"] is False and "max_steps" not in plain and plain["accelerator"] == "cpu"
    assert validate["inference_mode"] is False
    assert any(isinstance(cb, acts.CacheWriter) for cb in predict["callbacks"])
    # the node's target is not a setting of the experiment
    assert run.hashes() == make_run("stage=embed").hashes()


def test_a_trainer_value_lightning_refuses_is_a_one_line_config_error(make_run):
    with pytest.raises(ConfigError, match=r"^trainer: .*bogus") as e:
        Pipeline(make_run("stage=embed", "+trainer.gradient_clip_algorithm=bogus")).execute()
    assert "\n" not in str(e.value)


def test_a_layer_stage_reads_each_layer_file_once(make_run, monkeypatch):
    pipe = Pipeline(make_run("stage=all", "model.n_layers=3"))
    pipe.layer_stage(Stage.layer(1))
    reads = []
    real = art.load_layer_checkpoint

    def spy(path, *args, **kwargs):
        reads.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(art, "load_layer_checkpoint", spy)
    pipe.layer_stage(Stage.layer(2))  # tied: the embedding comes with layer_1.pt, read once
    assert reads == ["layer_1.pt"]
    reads.clear()
    pipe.layer_stage(Stage.layer(3))
    assert sorted(reads) == ["layer_1.pt", "layer_2.pt"]
