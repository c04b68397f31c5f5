"""The pipeline's invariants on a tiny model, run in-process through the real pipeline:
1. a stage changes only the tensors it declares trainable, and no artifact of an earlier stage;
2. the activation cache equals the fused prefix on the same masked input, row for row;
3. the fused model reproduces the last stage's validation loss;
4. the same config and seed give the same bytes, and a second run does nothing.
And the pipeline's own parts: the Stage value, the Trainer factory, the observer hooks."""

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
from stackwise.data.cache.reader import ActivationDataset
from stackwise.data.cache.writer import CacheWriter
from stackwise.errors import ArtifactError, ConfigError
from stackwise.model.transformer import Block, Transformer
from stackwise.model.weights import LayerWeights
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
def capture_fit(monkeypatch) -> dict:
    """Trainers.fit, unchanged, but every tensor of the stage's module is kept before and after it:
    {stage name: (module, before, after)}."""
    seen, real_fit = {}, Trainers.fit

    def fit(self, stage, module, data, resume, extra=()):
        before = snapshot(module)
        out = real_fit(self, stage, module, data, resume, extra)
        seen[stage.name] = (module, before, snapshot(module))
        return out

    monkeypatch.setattr(Trainers, "fit", fit)
    return seen


def saved_equals_trained(weights: LayerWeights, after: dict) -> bool:
    """Every tensor of layer_k.pt equals the stage module's tensor of that module (`block.`, `head.`, `embed.`)."""
    return all(
        torch.equal(t, after[f"{module}.{name}"]) for module, sd in weights.sections().items() for name, t in sd.items()
    )


def artifact_digests(root) -> dict[str, str]:
    """sha256 of every file the stages write (weights, caches, tokens), by relative path."""
    return {
        str(p.relative_to(root)): sha(p)
        for d in ("layers", "acts", "tokens", "fused")
        for p in sorted((root / d).rglob("*"))
        if p.is_file()
    }


def block_tensors(block: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of a block, parameter or buffer (persistent or not)."""
    return {n: t.detach() for n, t in list(block.named_buffers()) + list(block.named_parameters())}


def assert_only_declared_trainable_changed(module: LayerwiseStage, before: dict, after: dict, cfg) -> None:
    declared = {id(p) for p in module.trainable_parameters()}
    trainable_names = {n for n, p in module.named_parameters() if id(p) in declared}
    assert trainable_names and trainable_names <= set(before)
    for name in before:
        changed = not torch.equal(before[name], after[name])
        if name in trainable_names:
            assert changed, f"stage {module.stage_name}: {name} is declared trainable but did not change"
        else:
            assert not changed, f"stage {module.stage_name}: {name} is not trainable but changed"
    # what stays fixed in the block is exactly its regeneration from (seed, k)
    fresh = block_tensors(Block(cfg, module.k))
    fixed = sorted(n for n in before if n.startswith("block.") and n not in trainable_names)
    assert any("up" in n for n in fixed), f"the SwiGLU up-projection must be a fixed tensor of the block: {fixed}"
    for name in fixed:
        assert torch.equal(after[name], fresh[name[len("block.") :]]), f"{name} differs from its (seed, k) regeneration"
    module.block.verify_frozen()


@pytest.mark.parametrize("tie, freeze_mla", [(True, True), (False, False)], ids=["tied", "untied"])
def test_stage_run_changes_only_its_trainable_tensors(make_run, monkeypatch, tie, freeze_mla):
    """Invariant 1 through the pipeline's own runs of `stage=embed` then `stage=layer k=2` (a gqa
    layer 1, an mla layer 2): inside each stage only what it declares trainable changes; stage 2
    leaves every artifact of stage 1 (layer_1.pt, acts_layer1, tokens) byte for byte as it was."""
    seen = capture_fit(monkeypatch)
    common = (
        f"model.tie_embeddings={str(tie).lower()}",
        "attention=hybrid",
        f"model.mla_freeze_up={str(freeze_mla).lower()}",
    )
    run1 = make_run("stage=embed", *common)
    pipe = Pipeline(run1)
    pipe.execute()
    module1, before1, after1 = seen["embed"]
    assert {n for n in before1 if n.startswith("embed.")} == {"embed.weight"}
    assert_only_declared_trainable_changed(module1, before1, after1, run1.model)

    stage1_files = artifact_digests(pipe.paths.root)
    assert "layers/layer_1.pt" in stage1_files and any(f.startswith("acts/acts_layer1/") for f in stage1_files)
    layer1, _ = art.load_layer_checkpoint(pipe.paths.layer_ckpt(1))
    # what stage 1 saved is what it trained
    assert saved_equals_trained(layer1, after1)

    run2 = make_run("stage=layer", "k=2", *common)
    Pipeline(run2).execute()
    module2, before2, after2 = seen["layer_2"]
    assert_only_declared_trainable_changed(module2, before2, after2, run2.model)
    assert run2.model.kind(1) == "gqa" and run2.model.kind(2) == "mla"
    trains = {n for n, p in module2.named_parameters() if p.requires_grad}
    mla_ups = [n for n in before2 if ".q_b" in n or ".kv_b" in n]
    assert mla_ups and all((n in trains) != freeze_mla for n in mla_ups), (mla_ups, freeze_mla)
    # the tied matrix rides along in stage 2, frozen; untied, the head matrix trains in every stage
    assert ("embed_weight" in before2) == tie
    if tie:
        assert torch.equal(after2["embed_weight"], layer1.embed["weight"])
    assert any(n.startswith("head.proj") for n in trains) == (not tie)
    # stage 2 wrote its own files and changed none of stage 1's but for the untied projection,
    # which is kept for the latest stage only
    after_files = artifact_digests(pipe.paths.root)
    head1, head2 = "layers/layer_1.head.safetensors", "layers/layer_2.head.safetensors"
    assert (head1 in stage1_files, head2 in after_files, head1 in after_files) == (not tie, not tie, False)
    stage1_files.pop(head1, None)
    assert {f: after_files.get(f) for f in stage1_files} == stage1_files
    assert "layers/layer_2.pt" in set(after_files) - set(stage1_files)
    layer2, _ = art.load_layer_checkpoint(pipe.paths.layer_ckpt(2))
    assert saved_equals_trained(layer2, after2)


# ---------------------------------------------------------------- invariant 2
def test_every_cached_row_equals_the_fused_prefix(done):
    """acts_layer{k} holds, row for row, what the fused model's embeddings and layers 1..k give on the
    same masked input: every row of the split the next stage trains on (train) and validates on (val)."""
    pipe = done
    fused = Transformer(pipe.cfg)
    state, _, _ = art.load_safetensors_model(pipe.paths.fused_dir)
    fused.load_state_dict(state)
    fused.eval()
    # the masked token rows the caches were made from, in cache order (stage 1's caching loaders)
    for split, inputs in zip(("train", "val"), pipe.inputs.tokens(Stage.layer(1), 1).predict_dataloader(), strict=True):
        items = [item for batch in inputs for item in _rows(batch)]
        targets = torch.stack([it["targets"] for it in items])
        ids = torch.stack([it["ids"] for it in items])
        pad = targets == pipe.cfg.pad_id
        for k in (1, 2):
            ds = ActivationDataset(pipe.state.open_cache(Stage.layer(k)), split)
            assert len(ds) == len(items) > 0
            rows = [ds[i] for i in range(len(ds))]
            for field in ("index", "view", "mask", "t"):
                got_field = torch.stack([r[field] for r in rows])
                assert torch.equal(got_field, torch.stack([it[field] for it in items])), (split, k, field)
            assert torch.equal(torch.stack([r["targets"].long() for r in rows]), targets)
            with torch.no_grad():
                want = fused.run_layers(fused.embed_tokens(ids), 1, k, pad_mask=pad if bool(pad.any()) else None)
            got = torch.stack([r["hidden"].float() for r in rows])
            for i in range(len(rows)):  # every row; the first that differs is named
                torch.testing.assert_close(
                    got[i], want[i], rtol=1e-5, atol=1e-5, msg=lambda m, i=i, k=k, s=split: f"k={k} {s} row {i}: {m}"
                )


def _rows(batch: dict) -> list[dict]:
    n = len(batch["index"])
    return [{f: v[i] for f, v in batch.items()} for i in range(n)]


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
    again = Pipeline(make_run("stage=all", "cache.last_layer=true", name="exp2"))
    again.execute()
    for k in (1, 2):
        a, b = first.paths.layer_ckpt(k), again.paths.layer_ckpt(k)
        wa, _ma = art.load_layer_checkpoint(a)
        wb, _mb = art.load_layer_checkpoint(b)
        sa, sb = wa.sections(), wb.sections()
        assert sa.keys() == sb.keys()
        for m in sa:
            assert sa[m].keys() == sb[m].keys() and all(torch.equal(sa[m][n], sb[m][n]) for n in sa[m])
        ca = ActivationDataset(first.state.open_cache(Stage.layer(k)), "train")
        cb = ActivationDataset(again.state.open_cache(Stage.layer(k)), "train")
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
    stamps = {p: p.stat().st_mtime_ns for p in first.paths.root.rglob("*") if p.is_file() and p.name != "run.lock"}
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
        name="learn",
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
    assert any(isinstance(cb, CacheWriter) for cb in predict["callbacks"])
    # the node's target is not a setting of the experiment
    assert run.hashes() == make_run("stage=embed").hashes()


def test_a_trainer_value_lightning_refuses_is_a_one_line_config_error(make_run):
    with pytest.raises(ConfigError, match=r"^trainer: .*bogus") as e:
        Pipeline(make_run("stage=embed", "+trainer.gradient_clip_algorithm=bogus")).execute()
    assert "\n" not in str(e.value)


def test_a_layer_stage_reads_each_layer_file_once(make_run, monkeypatch):
    """In a new process (a new Pipeline) stage k reads layer_{k-1}.pt once (and layer_1.pt for the
    tied embedding); in the process that saved layer_{k-1}.pt, not even that: it is in memory."""
    pipe = Pipeline(make_run("stage=all", "model.n_layers=3"))
    pipe.layer_stage(Stage.layer(1))
    reads = []
    real = art.load_layer_checkpoint

    def spy(path, *args, **kwargs):
        reads.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(art, "load_layer_checkpoint", spy)
    Pipeline(make_run("stage=all", "model.n_layers=3")).layer_stage(Stage.layer(2))  # tied: the embedding with it
    assert reads == ["layer_1.pt"]
    reads.clear()
    Pipeline(make_run("stage=all", "model.n_layers=3")).layer_stage(Stage.layer(3))
    assert sorted(reads) == ["layer_1.pt", "layer_2.pt"]

    same = Pipeline(make_run("stage=all", "model.n_layers=3", name="same"))
    same.layer_stage(Stage.layer(1))
    reads.clear()
    same.layer_stage(Stage.layer(2))
    assert reads == []
    same.layer_stage(Stage.layer(3))  # layer 2 in memory, the tied embedding read with layer_1.pt
    assert reads == ["layer_1.pt"]
