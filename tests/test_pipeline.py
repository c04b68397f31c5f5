"""DESIGN §5 invariants 1-4 on a tiny model, run in-process through the real pipeline."""

from __future__ import annotations

import hashlib

import lightning as L
import numpy as np
import pytest
import torch

from stackwise import artifacts as art
from stackwise.data import activations as acts
from stackwise.errors import ArtifactError
from stackwise.model.transformer import Transformer
from stackwise.objective.loss import masked_loss
from stackwise.pipeline import Pipeline
from stackwise.stages.layerwise import LayerwiseStage


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in list(module.named_parameters()) + list(module.named_buffers())}


@pytest.fixture
def done(make_run):
    """A finished tiny `all` run (2 layers, both caches kept) and its pipeline."""
    run = make_run("stage=all", "cache.last_layer=true")
    pipe = Pipeline(run)
    pipe.execute()
    return pipe


# ---------------------------------------------------------------- invariant 1
@pytest.mark.parametrize("tie", [True, False])
def test_stage_changes_only_its_trainable_tensors(make_run, tie):
    run = make_run("stage=all", f"model.tie_embeddings={str(tie).lower()}", "model.n_layers=3", "attention=hybrid")
    pipe = Pipeline(run)
    pipe.layer_stage(1)
    pipe.layer_stage(2)
    layer1 = sha(pipe.paths.layer_ckpt(1))
    # stage 3 trained by hand so every tensor can be compared before and after
    prev, _ = art.load_layer_checkpoint(pipe.paths.layer_ckpt(2))
    first, _ = art.load_layer_checkpoint(pipe.paths.layer_ckpt(1))
    module = LayerwiseStage(
        run.model, 3, run.optim, "mean", 5, previous=prev, embed_weight=first["embed.weight"] if tie else None
    )
    declared = {id(p) for p in module.trainable_parameters()}
    names_trainable = {n for n, p in module.named_parameters() if id(p) in declared}
    before = snapshot(module)
    data = acts.ActivationDataModule(pipe.open_cache(2), batch_size=16, seed=0, max_steps=5)
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
    data = pipe.token_data(1, 1)
    for k in (1, 2):
        cache = pipe.open_cache(k)
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
        for batch in pipe.token_data(0, 1).val_dataloader():
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
        sa, _ma = art.load_layer_checkpoint(a)
        sb, _mb = art.load_layer_checkpoint(b)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)
        ca = acts.ActivationDataset(first.open_cache(k), "train")
        cb = acts.ActivationDataset(again.open_cache(k), "train")
        assert len(ca) == len(cb)
        for i in (0, len(ca) // 2, len(ca) - 1):
            assert all(torch.equal(ca[i][f], cb[i][f]) for f in ("hidden", "mask", "t", "targets"))
    assert (first.paths.fused_dir / "model.safetensors").read_bytes() == (
        again.paths.fused_dir / "model.safetensors"
    ).read_bytes()

    # `all` again: every stage is complete, nothing trains or caches
    def boom(*a, **k):
        raise AssertionError("a complete stage ran again")

    monkeypatch.setattr(Pipeline, "fit", boom)
    monkeypatch.setattr(Pipeline, "write_cache", boom)
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
