"""A stage=all run keeps what its stages just built: stage k+1 starts from the weights stage k saved,
the frozen prefix (cache.store=recompute) holds layers 1..k-1, and fusion assembles the fused model
from both, none of them read (or their checksums drawn and hashed) again from the layer files. Each
is keyed by the file's identity (path, inode, size, mtime): a file replaced since is read again.
Whatever the source, the artifacts are the bytes of a run in separate processes, where every stage
reads its inputs from the files."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from stackwise import artifacts as art
from stackwise.artifacts import checkpoints
from stackwise.model import transformer
from stackwise.model.weights import LayerWeights, first_layer
from stackwise.pipeline import Pipeline
from stackwise.pipeline.events import StageObserver
from stackwise.pipeline.stage import Stage
from stackwise.pipeline.state import ExperimentState

FAST = ["trainer.max_steps=4", "trainer.val_check_interval=2", "cache.store=recompute"]
VARIANTS = {
    "tied_fp32": ["model.n_layers=3"],
    # layer stages 1..3 under a top segment of 1; bf16 files; an untied head; a fine-tune after the check
    "untied_bf16_top1_finetune": [
        "model.n_layers=4",
        "layerwise.top_layers=1",
        "model.tie_embeddings=false",
        "layerwise.save_dtype=bfloat16",
        "cache.keep=all",
        "fusion.finetune_steps=2",
    ],
}
TIMING = ("seconds", "cache_seconds", "peak_gpu_gib")


def layer_stages(overrides: list[str]) -> int:
    n = int(next(o for o in overrides if o.startswith("model.n_layers=")).split("=")[1])
    top = [int(o.split("=")[1]) for o in overrides if o.startswith("layerwise.top_layers=")]
    return n - (top[0] if top else 0)


def fingerprint(exp: Path) -> dict:
    """sha256 of every file under layers/ and fused/ (names relative to the experiment), and
    results.json's records without their wall times."""
    files = sorted(p for d in ("layers", "fused") for p in (exp / d).rglob("*") if p.is_file())
    out = {str(p.relative_to(exp)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    records = [{k: v for k, v in r.items() if k not in TIMING} for r in art.read_results(art.ExperimentPaths(exp))]
    return {"files": out, "results": sorted(records, key=lambda r: r["stage"])}


_REFERENCE: dict[str, dict] = {}


@pytest.fixture
def reference(tmp_path_factory):
    """The same experiment run one stage per Pipeline (`stage=embed`, `stage=layer k=..`,
    `stage=fusion`), as separate processes run it: every input read from the layer files."""

    def get(variant: str, make_run) -> dict:
        if variant not in _REFERENCE:
            overrides = [*FAST, *VARIANTS[variant]]
            stages = ["stage=embed"]
            stages += [f"stage=layer k={k}" for k in range(2, layer_stages(overrides) + 1)]
            stages.append("stage=fusion")
            for stage in stages:
                run = make_run(*stage.split(), *overrides, name=f"ref_{variant}")
                Pipeline(run).execute()
            _REFERENCE[variant] = fingerprint(Path(run.exp_dir))
        return _REFERENCE[variant]

    return get


class Counts:
    """Layer files read whole (load_layer_checkpoint) or hashed (sha256), by name, and frozen
    checksums computed (drawn tensors hashed: once a layer when it is written, with nothing read again)."""

    def __init__(self, monkeypatch):
        self.reads, self.hashed, self.checksums = Counter(), Counter(), 0
        load, sha, checksum = art.load_layer_checkpoint, art.sha256_file, transformer._checksum

        def counted_load(path, *args, **kwargs):
            self.reads[Path(path).name] += 1
            return load(path, *args, **kwargs)

        def counted_sha(path):
            self.hashed[Path(path).name] += 1
            return sha(path)

        def counted_checksum(tensors):
            self.checksums += 1
            return checksum(tensors)

        monkeypatch.setattr(art, "load_layer_checkpoint", counted_load)
        monkeypatch.setattr(art, "sha256_file", counted_sha)
        monkeypatch.setattr(transformer, "_checksum", counted_checksum)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stage_all_recompute_reads_no_layer_file_again(make_run, reference, monkeypatch, caplog, variant):
    """stage=all (recompute): no layer file is read back, hashed again or has its frozen checksum
    recomputed (one checksum a layer and top block: the one written), and fused/ comes from the
    layers in memory; layer files, fused/ and results are those of the one-stage-per-process run."""
    overrides = [*FAST, *VARIANTS[variant]]
    counts = Counts(monkeypatch)
    run = make_run("stage=all", *overrides, name=variant)
    with caplog.at_level(logging.INFO, logger="stackwise"):
        Pipeline(run).execute()
    last = layer_stages(overrides)
    top = run.layerwise.top_layers
    assert counts.reads == {} and counts.hashed == {}
    assert counts.checksums == last * (1 + top)
    assert "fused model assembled on cpu from the trained layers in memory" in caplog.text
    assert "fusion check: fused val loss" in caplog.text
    got = fingerprint(Path(run.exp_dir))
    assert {f"layers/layer_{k}.pt" for k in range(1, last + 1)} | {"fused/model.safetensors"} <= set(got["files"])
    assert got == reference(variant, make_run)


class Replace(StageObserver):
    """Replaces layer files with a copy of their bytes (a new inode) once `stage` is saved."""

    def __init__(self, paths: art.ExperimentPaths, when: dict[str, list[int]]):
        self.paths, self.when = paths, when

    def saved(self, stage: Stage) -> None:
        for k in self.when.get(stage.name, []):
            path = self.paths.layer_ckpt(k)
            tmp = path.with_name(path.name + ".copy")
            shutil.copyfile(path, tmp)
            os.replace(tmp, path)


def test_stage_all_recompute_reads_a_replaced_layer_file_again(make_run, reference, monkeypatch, caplog):
    """layer_2.pt replaced once saved: stage 3 reads it, once (its inputs and its frozen prefix), and
    checks its frozen checksum; layer_1.pt replaced after stage 3: fusion reads it, the other two
    layers come from memory. Same artifacts as the one-stage-per-process run."""
    overrides = [*FAST, *VARIANTS["tied_fp32"]]
    counts = Counts(monkeypatch)
    run = make_run("stage=all", *overrides, name="replaced")
    replace = Replace(art.ExperimentPaths(run.exp_dir), {"layer_2": [2], "layer_3": [1]})
    with caplog.at_level(logging.INFO, logger="stackwise"):
        Pipeline(run, observers=[replace]).execute()
    assert counts.reads == {"layer_2.pt": 1, "layer_1.pt": 1}
    assert counts.hashed == {"layer_2.pt": 1, "layer_1.pt": 1}  # the new identities' digests, once each
    assert counts.checksums == 3 + 2  # the three written, layer 2's and layer 1's read from their files
    assert "fused model assembled on cpu from 2 trained layers in memory and 1 layer file" in caplog.text
    assert fingerprint(Path(run.exp_dir)) == reference("tied_fp32", make_run)


def test_kept_weights_are_the_files_until_it_is_replaced_or_removed(make_run, monkeypatch):
    """ExperimentState serves a layer file it saved from memory: the same tensors, names, order and
    meta as reading the file (an untied projection and a top segment beside it included), for each
    `head` mode; a replaced file (other weights) is read, a removed one is no longer in memory."""
    run = make_run("model.n_layers=3", "layerwise.top_layers=1", "model.tie_embeddings=false")
    paths = art.ExperimentPaths(run.exp_dir)
    paths.layers_dir.mkdir(parents=True)
    state = ExperimentState(run, paths, run.hashes())
    stage = Stage.layer(1)
    meta = {"stage": "embed", "k": 1, "config_hash": run.hashes()["layer"], "scores": (1.5, 2)}
    weights = LayerWeights.of(first_layer(run.model, top_layers=1), torch.bfloat16)
    digest = art.save_layer_checkpoint(paths.layer_ckpt(1), weights, meta)
    state.remember(stage, weights, meta, digest)
    counts = Counts(monkeypatch)

    def same(a: LayerWeights, b: LayerWeights) -> None:
        assert a.frozen_sha256 == b.frozen_sha256
        for x, y in [*zip(a.sections().values(), b.sections().values(), strict=True)] + [
            (a.top[j].block, b.top[j].block) for j in (a.top or {})
        ]:
            assert list(x) == list(y) and all(x[n].dtype == y[n].dtype and torch.equal(x[n], y[n]) for n in x)
        assert list(a.top or {}) == list(b.top or {})
        assert [t.frozen_sha256 for t in (a.top or {}).values()] == [t.frozen_sha256 for t in (b.top or {}).values()]

    for head in ("load", "if_present", "skip"):
        kept, kept_meta = state.read_layer(stage, head)
        assert counts.reads == {}
        read, read_meta = checkpoints.load_layer_checkpoint(paths.layer_ckpt(1), head=head)  # not counted
        same(kept, read)
        assert kept_meta == read_meta
    assert state.sha256(paths.layer_ckpt(1)) == digest and counts.hashed == {}

    other = LayerWeights.of(first_layer(dataclasses.replace(run.model, seed=run.model.seed + 1), top_layers=1))
    art.save_layer_checkpoint(paths.layer_ckpt(1), other, meta)  # replaced: a new inode
    assert not state.in_memory(1)
    counts.reads.clear()
    got, _ = state.read_layer(stage)
    assert counts.reads == {"layer_1.pt": 1}
    assert torch.equal(got.embed["weight"], other.embed["weight"])
    assert not torch.equal(got.embed["weight"], weights.embed["weight"].float())

    state.remember(stage, other, meta)
    assert state.in_memory(1)
    paths.top_file(1).unlink()  # a file it keeps beside it gone: read as the file says (here: an error)
    assert not state.in_memory(1)
    paths.layer_ckpt(1).unlink()
    assert not state.in_memory(1) and state.kept_layer(1) is None


@pytest.mark.parametrize(
    ("save_dtype", "source"),
    [
        ("bfloat16", "from the trained layers in memory"),
        ("float32", "from 1 trained layer in memory and 2 layer files"),  # bf16 blocks do not hold fp32 files
    ],
)
def test_stage_all_recompute_bf16_true(make_run, caplog, save_dtype, source):
    """bf16-true: stage 3 runs the prefix block it reuses from stage 2 (cast to bf16 there) and the one
    built for it in one dtype; fusion takes the layers from the bf16 prefix blocks only where they
    hold the files' values exactly (bf16 files), else reads the files."""
    run = make_run(
        "stage=all", *FAST, "model.n_layers=3", "trainer.precision=bf16-true", f"layerwise.save_dtype={save_dtype}"
    )
    with caplog.at_level(logging.INFO, logger="stackwise"):
        Pipeline(run).execute()
    assert f"fused model assembled on cpu {source}" in caplog.text
    assert "fusion check: fused val loss" in caplog.text
