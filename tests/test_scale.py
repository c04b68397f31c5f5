"""Scale by stages, on tiny sizes: weights built without draws that are thrown away, layer files in
the training dtype with an untied head kept once, and a fusion that streams layer by layer into
one safetensors file or Hugging Face shards, checked and fine-tuned only where the model fits."""

from __future__ import annotations

import dataclasses
import json
import logging
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from stackwise import artifacts as art
from stackwise.artifacts import models as art_models
from stackwise.errors import ArtifactError, ConfigError
from stackwise.evaluation import EvalSettings, evaluate_experiment
from stackwise.generation.experiment import load_experiment_model, sample_ids
from stackwise.model import layers as model_layers
from stackwise.model import transformer as model_transformer
from stackwise.model.stats import param_counts
from stackwise.model.transformer import Block, Embedding, Head, Transformer, empty, init_layer
from stackwise.model.weights import (
    LayerModules,
    LayerWeights,
    TopBlock,
    assemble,
    assembled_problem,
    assembled_tensors,
    first_layer,
    fused_tensors,
    next_layer,
)
from stackwise.pipeline import Pipeline, Stage, graph
from stackwise.pipeline import memory as pipeline_memory
from stackwise.utils import derive_seed
from tests.test_model import tiny

KINDS = {
    "mha": dict(attention="mha"),
    "gqa": dict(attention="gqa"),
    "mla": dict(attention="mla"),
    "mla_frozen_up": dict(attention="mla", mla_freeze_up=True),
    "hybrid": dict(attention=["gqa", "mla", "mha"], n_layers=3, mla_freeze_up=True),
}


def tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (frozen, non-persistent ones too)."""
    return {n: t.detach() for n, t in [*module.named_parameters(), *module.named_buffers()]}


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for name, t in ta.items():
        assert t.dtype == tb[name].dtype and torch.equal(t, tb[name]), name


class Draws:
    """Counts the trainable draws (torch.randn through `normal`) and the frozen ones the modules ask
    for (`frozen_normal`, its cache of recent draws bypassed: what is asked, not what is reused)."""

    def __init__(self, monkeypatch):
        self.trainable, self.frozen = 0, 0
        normal, portable = model_transformer.normal, model_layers.portable_normal

        def count_normal(*a, **kw):
            self.trainable += 1
            return normal(*a, **kw)

        def count_frozen(shape, std, key):
            self.frozen += 1
            return portable(shape, std, key)

        monkeypatch.setattr(model_transformer, "normal", count_normal)
        monkeypatch.setattr(model_layers, "_frozen_normal", count_frozen)

    def reset(self) -> None:
        self.trainable, self.frozen = 0, 0


def trained_layers(cfg) -> list[LayerWeights]:
    """Layer files' weights of a "trained" model: every trainable tensor moved off its init."""
    model = Transformer(cfg)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.01 * (i + 1))
    return [
        LayerWeights.of(LayerModules(block, model.head, model.embed if k == 1 else None))
        for k, block in enumerate(model.blocks, start=1)
    ]


# ---------------------------------------------------------------------------- initialisation
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("kind", KINDS)
def test_meta_init_gives_the_constructors_weights(kind, tie):
    """A model built on the meta device and filled by init_weights() holds, bit for bit, what the
    constructor draws (every attention kind, frozen tensors included); so do the stage-1 modules."""
    cfg = tiny(**KINDS[kind], tie_embeddings=tie)
    model = empty(lambda: Transformer(cfg))
    model.init_weights()
    assert_same(model, Transformer(cfg))
    block, head, embed = first_layer(cfg)[:3]
    assert_same(block, Block(cfg, 1))
    assert_same(head, Head(cfg))
    assert_same(embed, Embedding(cfg))


@pytest.mark.parametrize("kind", ["gqa", "mla_frozen_up", "hybrid"])
def test_loading_draws_nothing_it_overwrites(kind, monkeypatch, tmp_path):
    """Modules filled from a state dict draw no trainable tensor and each frozen tensor once; the
    values are those of building the modules whole and loading into them."""
    cfg = tiny(**KINDS[kind], tie_embeddings=False)
    layers = trained_layers(cfg)
    n_frozen = sum(len(Block(cfg, k).frozen_names) for k in range(1, cfg.n_layers + 1))
    old = Transformer(cfg)  # the way it was: draw everything, then load over it
    old.embed.load_state_dict(layers[0].embed)
    for block, weights in zip(old.blocks, layers, strict=True):
        weights.load_block(block)
    old.head.load_state_dict(layers[-1].head)

    draws = Draws(monkeypatch)
    model = assemble(cfg, layers)
    assert (draws.trainable, draws.frozen) == (0, n_frozen)
    assert_same(model, old)

    draws.reset()
    block = layers[1].modules(cfg, 2).block
    assert (draws.trainable, draws.frozen) == (0, len(block.frozen_names))
    assert_same(block, old.blocks[1])

    art.save_safetensors_model(tmp_path / "m", model.state_dict(), cfg.to_dict(), {})
    draws.reset()
    loaded, _ = art.load_model(tmp_path / "m")
    assert (draws.trainable, draws.frozen) == (0, n_frozen)
    assert_same(loaded, old)

    # next_layer: `previous` draws only the attention of a layer whose kind differs from the one below
    for policy in ("random", "identity", "previous"):
        draws.reset()
        got, got_head = next_layer(cfg, 2, policy, layers[0])[:2]
        drawn = draws.trainable
        want = Block(cfg, 2)
        init_layer(want, policy, layers[0].block if policy == "previous" else None)
        assert_same(got, want)
        assert torch.equal(got_head.proj.weight, layers[0].head["proj.weight"])
        same_kind = cfg.kind(1) == cfg.kind(2)
        matrices = sum(p.ndim > 1 for p in want.parameters())
        attention = sum(p.ndim > 1 for n, p in want.named_parameters() if n.startswith("attn."))
        expect = matrices if policy != "previous" else (0 if same_kind else attention)
        assert drawn == expect, policy


def test_assemble_takes_the_frozen_tensors_the_layer_stages_left_cached_first(monkeypatch):
    """The layer stages leave the last 4 layers' frozen draws cached; assemble reads the layers in
    order but regenerates their frozen tensors top layer first, so it draws only the others (reading
    1, 2, ... first would evict them all), with the same values and every checksum still checked."""
    cfg = tiny(n_layers=6, tie_embeddings=False)
    layers = trained_layers(cfg)
    model_layers._frozen_normal.cache_clear()
    for k in range(1, cfg.n_layers + 1):  # what stages 1..6 drew last
        with torch.device("meta"):
            Block(cfg, k).frozen_values()
    drawn = []
    portable = model_layers.portable_normal
    monkeypatch.setattr(model_layers, "portable_normal", lambda *a: drawn.append(a) or portable(*a))
    model = assemble(cfg, layers)
    assert len(drawn) == 2  # layers 1 and 2; 3..6 were still cached
    old = Transformer(cfg)
    old.embed.load_state_dict(layers[0].embed)
    for block, weights in zip(old.blocks, layers, strict=True):
        weights.load_block(block)
    old.head.load_state_dict(layers[-1].head)
    assert_same(model, old)
    bad = LayerWeights(layers[1].block, "0" * 64, layers[1].head)
    with pytest.raises(ArtifactError, match="layer 2: frozen up-projection checksum mismatch"):
        assemble(cfg, [layers[0], bad, *layers[2:]])


def test_fused_tensors_stream_the_assembled_state_dict():
    """fused_tensors yields Transformer.state_dict() (names, order, values) without building the
    model, in the dtype the layers were saved in, and checks each layer as assemble does."""
    cfg = tiny(**KINDS["hybrid"], tie_embeddings=False)
    layers = trained_layers(cfg)
    want = assemble(cfg, layers).state_dict()
    got = list(fused_tensors(cfg, iter(layers)))
    assert [n for n, _ in got] == list(want)
    assert all(torch.equal(t, want[n]) for n, t in got)
    half = [
        LayerWeights(
            {n: t.bfloat16() for n, t in w.block.items()},
            w.frozen_sha256,
            {n: t.bfloat16() for n, t in w.head.items()},
            None if w.embed is None else {n: t.bfloat16() for n, t in w.embed.items()},
        )
        for w in layers
    ]
    assert {t.dtype for _, t in fused_tensors(cfg, half)} == {torch.bfloat16}
    bad = LayerWeights(layers[1].block, "0" * 64, layers[1].head)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        list(fused_tensors(cfg, [layers[0], bad, layers[2]]))
    with pytest.raises(ValueError, match="all n_layers=3"):
        list(fused_tensors(cfg, layers[:2]))


def _in_dtype(w: LayerWeights, dtype: torch.dtype) -> LayerWeights:
    """`w` as a layer file of `dtype` holds it (top segment included)."""

    def cast(sd):
        return {n: t.to(dtype) for n, t in sd.items()}

    top = {j: TopBlock(cast(b.block), b.frozen_sha256) for j, b in (w.top or {}).items()} or None
    return LayerWeights(cast(w.block), w.frozen_sha256, cast(w.head), w.embed and cast(w.embed), top)


@pytest.mark.parametrize("top", [0, 1], ids=["plain", "top1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_the_assembled_model_writes_the_bytes_the_layer_files_stream(tmp_path, tie, dtype, top):
    """fused/ written from the assembled model (assembled_tensors) is, byte for byte, fused/ streamed
    from the same layer files (fused_tensors): the same names in the same order, in the files'
    dtype (bf16 files through an fp32 model), with a tied or untied head and a top segment."""
    cfg = tiny(**KINDS["hybrid"], tie_embeddings=tie)
    layers = [_in_dtype(w, dtype) for w in trained_layers(cfg)]
    if top:  # stage L-m holds blocks L-m+1..L beside its own, as layer_{L-m}.top.safetensors does
        kept = {j: TopBlock(layers[j - 1].block, layers[j - 1].frozen_sha256) for j in range(3 - top + 1, 4)}
        layers = [*layers[: 3 - top - 1], dataclasses.replace(layers[3 - top - 1], top=kept)]
    paths = art.ExperimentPaths(tmp_path)
    paths.layers_dir.mkdir()
    for k, w in enumerate(layers, start=1):
        art.save_layer_checkpoint(paths.layer_ckpt(k), w, {"k": k})

    def from_files():
        n = len(layers)
        return (
            art.load_layer_checkpoint(paths.layer_ckpt(k), head="load" if k == n else "skip")[0]
            for k in range(1, n + 1)
        )

    layout: dict = {}
    model = assemble(cfg, from_files(), layout=layout)
    assert assembled_problem(model, layout) is None
    got = list(assembled_tensors(model, layout))
    want = list(fused_tensors(cfg, from_files()))
    assert [n for n, _ in got] == [n for n, _ in want] and {n for n, _ in got} == set(model.state_dict())
    for (name, a), (_, b) in zip(got, want, strict=True):
        assert a.dtype == b.dtype == dtype and a.device.type == "cpu" and torch.equal(a, b), name
    assert ("head.proj.weight" in layout) is not tie

    meta = {"val_loss": 1.0, "layers_sha256": ["x"]}
    for shard in (None, 3000):  # one file, and Hugging Face shards (where the order decides the shard)
        a, b = tmp_path / f"assembled_{shard}", tmp_path / f"streamed_{shard}"
        art.save_safetensors_model(a, assembled_tensors(model, layout), cfg.to_dict(), meta, max_shard_bytes=shard)
        art.save_safetensors_model(b, fused_tensors(cfg, from_files()), cfg.to_dict(), meta, max_shard_bytes=shard)
        files = sorted(f.name for f in a.iterdir())
        assert files == sorted(f.name for f in b.iterdir())
        assert shard or files == ["config.json", "model.safetensors"]
        assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files), files
    assert len(list((tmp_path / "assembled_3000").glob("model-*.safetensors"))) > 2
    # the written tensors are copies: training the model on (the fine-tune) changes nothing written
    first, t = next(assembled_tensors(model, layout))
    with torch.no_grad():
        model.state_dict()[first].add_(1.0)
    assert not torch.equal(t, model.state_dict()[first].to(dtype))


def test_an_assembled_model_that_no_longer_holds_the_files_values_is_not_written_from(tmp_path):
    """A precision plugin casting the model below the layer files' dtype, or a partial stack,
    makes assembled_problem say why (fused/ is then streamed from the layer files)."""
    cfg = tiny(tie_embeddings=False)
    layers = trained_layers(cfg)
    layout: dict = {}
    model = assemble(cfg, layers, layout=layout)
    assert assembled_problem(model, layout) is None
    assert "torch.bfloat16 in the model, torch.float32 in the layer files" in assembled_problem(
        model.to(torch.bfloat16), layout
    )
    bf16_layout: dict = {}
    bf16 = assemble(cfg, [_in_dtype(w, torch.bfloat16) for w in layers], layout=bf16_layout)
    assert assembled_problem(bf16.to(torch.bfloat16), bf16_layout) is None  # bf16 files: exact in bf16
    assert assembled_problem(bf16.double(), bf16_layout) is None
    partial: dict = {"stale": torch.float32}
    assemble(cfg, layers[:1], layout=partial)
    assert partial == {} and "no layout" in assembled_problem(model, partial)


# ---------------------------------------------------------------------------- layer files
def test_bf16_layer_file_round_trips_and_upcasts_exactly(tmp_path):
    cfg = tiny(tie_embeddings=True)
    modules = first_layer(cfg)
    weights = LayerWeights.of(modules, torch.bfloat16)
    assert {t.dtype for sd in weights.sections().values() for t in sd.values()} == {torch.bfloat16}
    art.save_layer_checkpoint(tmp_path / "layer_1.pt", weights, {"k": 1})
    got, _ = art.load_layer_checkpoint(tmp_path / "layer_1.pt")
    for module, sd in weights.sections().items():
        assert all(torch.equal(t, got.sections()[module][n]) and t.dtype == torch.bfloat16 for n, t in sd.items())
    weights.load_into(modules)  # fp32 modules holding exactly the file's values
    block = got.modules(cfg, 1).block
    assert block.attn.q_proj.weight.dtype == torch.float32
    assert torch.equal(block.attn.q_proj.weight, modules.block.attn.q_proj.weight)
    assert torch.equal(block.attn.q_proj.weight, got.block["attn.q_proj.weight"].float())


def test_untied_head_is_kept_once_beside_the_latest_layer(tmp_path):
    cfg = tiny(tie_embeddings=False, n_layers=3)
    layers = trained_layers(cfg)
    paths = art.ExperimentPaths(tmp_path)
    paths.layers_dir.mkdir()
    for k, weights in enumerate(layers, start=1):
        art.save_layer_checkpoint(paths.layer_ckpt(k), weights, {"k": k})
        raw = torch.load(paths.layer_ckpt(k), weights_only=True)
        assert "proj.weight" not in raw["modules"]["head"] and raw["head_file"]["name"] == paths.head_file(k).name
        assert sorted(p.name for p in paths.layers_dir.glob("*.safetensors")) == [paths.head_file(k).name]
    assert torch.equal(load_file(paths.head_file(3))["proj.weight"], layers[2].head["proj.weight"])
    got, _ = art.load_layer_checkpoint(paths.layer_ckpt(3), head="load")
    assert torch.equal(got.head["proj.weight"], layers[2].head["proj.weight"])
    below, _ = art.load_layer_checkpoint(paths.layer_ckpt(2))  # if_present: a later stage replaced it
    assert set(below.head) == {"norm.weight"}
    with pytest.raises(ArtifactError) as e:
        art.load_layer_checkpoint(paths.layer_ckpt(2), head="load")
    assert "\n" not in str(e.value) and paths.head_file(2).name in str(e.value)
    # another projection in its place is refused
    save_file({"proj.weight": layers[2].head["proj.weight"] + 1}, str(paths.head_file(3)))
    with pytest.raises(ArtifactError, match="digest mismatch"):
        art.load_layer_checkpoint(paths.layer_ckpt(3))
    # a tied model writes no head file
    tied = tiny(tie_embeddings=True)
    art.save_layer_checkpoint(tmp_path / "t" / "layer_1.pt", trained_layers(tied)[0], {"k": 1})
    assert not list((tmp_path / "t").glob("*.safetensors"))


def test_old_layer_files_read_or_refused_in_one_line(tmp_path):
    """Version 2 (the projection inside the head section) still reads; an unknown version is one line."""
    cfg = tiny(tie_embeddings=False)
    weights = trained_layers(cfg)[0]
    sections = weights.sections()
    digest = art.checkpoints._weights_digest(sections)
    v2 = {"format": "stackwise.layer", "version": 2, "modules": sections, "frozen_sha256": weights.frozen_sha256}
    torch.save({**v2, "state_sha256": digest, "meta": {"k": 1}}, tmp_path / "layer_1.pt")
    got, _ = art.load_layer_checkpoint(tmp_path / "layer_1.pt", head="load")
    assert torch.equal(got.head["proj.weight"], weights.head["proj.weight"])
    torch.save({**v2, "version": 9, "state_sha256": digest, "meta": {}}, tmp_path / "layer_2.pt")
    with pytest.raises(ArtifactError) as e:
        art.load_layer_checkpoint(tmp_path / "layer_2.pt")
    assert "\n" not in str(e.value) and "version 9" in str(e.value) and "layer_2.pt" in str(e.value)


# ---------------------------------------------------------------------------- model folders
def test_sharded_model_folder_is_hugging_faces_layout_and_reads_back(tmp_path):
    cfg = tiny(**KINDS["hybrid"], tie_embeddings=False)
    model = assemble(cfg, trained_layers(cfg))
    state = model.state_dict()
    limit = 3 * max(t.numel() * t.element_size() for t in state.values())
    art.save_safetensors_model(tmp_path / "one", state, cfg.to_dict(), {"val_loss": 1.0})
    art.save_safetensors_model(tmp_path / "many", state, cfg.to_dict(), {"val_loss": 1.0}, max_shard_bytes=limit)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["config.json", "model.safetensors"]
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for f in files:
        assert load_file(tmp_path / "many" / f).keys() <= set(state)
    try:  # the same shards huggingface_hub would plan, when it is installed
        from huggingface_hub import split_torch_state_dict_into_shards
    except ImportError:
        pass
    else:
        plan = split_torch_state_dict_into_shards(state, max_shard_size=limit)
        assert {f: sorted(ns) for f, ns in plan.filename_to_tensors.items()} == {
            f: sorted(n for n, g in index["weight_map"].items() if g == f) for f in files
        }
    a, _, meta_a = art.load_safetensors_model(tmp_path / "one", verify=True)
    b, _, meta_b = art.load_safetensors_model(tmp_path / "many", verify=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and meta_a == meta_b
    assert_same(art.load_model(tmp_path / "many")[0], art.load_model(tmp_path / "one")[0])
    assert art.read_model_meta(tmp_path / "many", expect={"val_loss": 1.0}) == (cfg.to_dict(), {"val_loss": 1.0})

    # new meta, tensors untouched, in both layouts
    for folder in ("one", "many"):
        art.rewrite_model_meta(tmp_path / folder, {"val_loss": 2.0})
        got, _, meta = art.load_safetensors_model(tmp_path / folder, verify=True)
        assert meta == {"val_loss": 2.0} and all(torch.equal(got[k], a[k]) for k in a)
    # rewritten with one file where shards were: no shard is left behind
    art.save_safetensors_model(tmp_path / "many", state, cfg.to_dict(), {})
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["config.json", "model.safetensors"]
    # a missing shard is one line naming it
    art.save_safetensors_model(tmp_path / "many", state, cfg.to_dict(), {}, max_shard_bytes=limit)
    (tmp_path / "many" / files[1]).unlink()
    with pytest.raises(ArtifactError) as e:
        art.load_model(tmp_path / "many")
    assert "\n" not in str(e.value) and files[1] in str(e.value)


# ---------------------------------------------------------------------------- the pipeline
UNTIED_BF16 = (
    "model.n_layers=3",
    "model.tie_embeddings=false",
    "layerwise.save_dtype=bfloat16",
    "fusion.finetune_steps=2",
)


def test_stream_fusion_bf16_layers_untied_head_sharded(make_run, monkeypatch):
    """stage=all with bf16 layer files, an untied head and a tiny shard size: the layer files hold
    bf16 and no projection, one head file is left, fusion reads one layer at a time into shards that
    load to the layer files' tensors, and evaluation and generation read them."""
    monkeypatch.setattr(art_models, "MAX_SHARD_BYTES", 40_000)
    refs: list[weakref.ref] = []
    peak = {"alive": 0}  # the most layer weights alive at once while fusion reads a layer file
    real_load = art.load_layer_checkpoint

    def load(path, *a, **kw):
        weights, meta = real_load(path, *a, **kw)
        refs.append(weakref.ref(weights))
        peak["alive"] = max(peak["alive"], sum(r() is not None for r in refs))
        return weights, meta

    run = make_run("stage=all", *UNTIED_BF16)
    pipe = Pipeline(run)
    real_fusion = pipe.fusion_stage

    def fusion(stage):
        monkeypatch.setattr(art, "load_layer_checkpoint", load)
        refs.clear()
        real_fusion(stage)

    monkeypatch.setattr(pipe, "fusion_stage", fusion)
    pipe.execute()
    paths = pipe.paths
    # fusion never held more than two layers' weights (the one being read and the one before it)
    assert 1 <= peak["alive"] <= 2

    raw = [torch.load(paths.layer_ckpt(k), weights_only=True) for k in (1, 2, 3)]
    assert all("proj.weight" not in r["modules"]["head"] for r in raw)
    assert {t.dtype for r in raw for sd in r["modules"].values() for t in sd.values()} == {torch.bfloat16}
    assert sorted(p.name for p in paths.layers_dir.glob("*.safetensors")) == [paths.head_file(3).name]

    fused_files = sorted(p.name for p in paths.fused_dir.glob("model*.safetensors*"))
    assert "model.safetensors.index.json" in fused_files and len(fused_files) > 2
    state, _, meta = art.load_safetensors_model(paths.fused_dir, verify=True)
    assert meta["finetuned"] is True and "fusion_check" not in meta  # checked, then fine-tuned
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    stream = dict(fused_tensors(run.model, pipe.state.layers(Stage.fusion(3))))
    assert stream.keys() == state.keys() and all(torch.equal(stream[k], state[k]) for k in state)
    assert torch.equal(state["head.proj.weight"], load_file(paths.head_file(3))["proj.weight"])
    assert (paths.finetuned_dir / "config.json").is_file()

    report = evaluate_experiment(paths.root, EvalSettings(rates=(0.5,), bound_samples=2, batch_size=16))
    assert [m["name"] for m in report["models"]] == ["depth_1", "depth_2", "depth_3", "fused", "finetuned"]
    em = load_experiment_model(paths.root, "fused")
    assert torch.equal(em.model.head.proj.weight, state["head.proj.weight"].float())
    _, out = sample_ids(em, length=16, seed=1)
    assert out.shape == (1, 16)

    # layer 3 retrained needs layer 2's projection, which only the latest stage keeps: one line
    paths.layer_ckpt(3).unlink()
    with pytest.raises(ArtifactError) as e:
        Pipeline(make_run("stage=layer", "k=3", *UNTIED_BF16)).execute()
    assert "\n" not in str(e.value) and paths.head_file(2).name in str(e.value)


@pytest.mark.parametrize(
    "overrides",
    [(), (*UNTIED_BF16, "layerwise.top_layers=1", "cache.keep=all")],
    ids=["tied_fp32", "untied_bf16_top1"],
)
def test_fusion_writes_fused_from_the_assembled_model_as_streamed(make_run, monkeypatch, caplog, overrides):
    """stage=all writes fused/ from the model it assembled for the check (and then fine-tunes, when
    asked); fused/ streamed from the layer files instead, where the model does not hold their
    values, is the same bytes, every file (config.json's manifest included)."""
    run = make_run("stage=all", *overrides)
    with caplog.at_level(logging.INFO, logger="stackwise"):
        pipe = Pipeline(run)
        pipe.execute()
    assert "fused/ written from the assembled model" in caplog.text
    fused = pipe.paths.fused_dir
    files = sorted(f.name for f in fused.glob("*") if f.is_file())
    assert "model.safetensors" in files and "config.json" in files
    before = {f: (fused / f).read_bytes() for f in files}

    (fused / "config.json").unlink()  # fusion redone, this time streamed
    monkeypatch.setattr(graph, "assembled_problem", lambda model, layout: "a bf16-true cast")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stackwise"):
        Pipeline(make_run("stage=fusion", *overrides)).execute()
    assert "fused/ written from the layer files" in caplog.text and "a bf16-true cast" in caplog.text
    assert {f: (fused / f).read_bytes() for f in files} == before


def test_bf16_layer_file_gives_the_same_cache_when_rebuilt(make_run):
    """The stage caches acts_layer1 with the weights its bf16 file holds: a run that finds the file
    (killed while caching) rebuilds the very same cache, and the fusion check stays exact."""
    run = make_run("stage=embed", "layerwise.save_dtype=bfloat16")
    pipe = Pipeline(run)
    pipe.execute()
    acts = pipe.paths.acts_dir(1)
    before = {p.relative_to(acts): p.read_bytes() for p in sorted(acts.rglob("*.npy"))}
    assert before
    pipe.paths.acts_manifest(1).unlink()
    Pipeline(make_run("stage=embed", "layerwise.save_dtype=bfloat16")).execute()
    after = {p.relative_to(acts): p.read_bytes() for p in sorted(acts.rglob("*.npy"))}
    assert after == before
    Pipeline(make_run("stage=all", "layerwise.save_dtype=bfloat16")).execute()  # fp32 compute: check at 1e-5


def test_fusion_where_the_model_does_not_fit(make_run, monkeypatch, caplog):
    """No room for the fused model: the check is skipped (fused/ still written, from the layer
    files, recording the last stage's scores); a fine-tune is refused in one line naming FSDP
    before fusion writes anything."""
    run = make_run("stage=all")
    pipe = Pipeline(run)
    pipe.execute()
    want, _, _ = art.load_safetensors_model(pipe.paths.fused_dir)
    monkeypatch.setattr(pipeline_memory, "free_bytes", lambda device: 1000)
    small = make_run("stage=fusion", "fusion.lr=0.5")  # another fusion config: fused/ is redone
    Pipeline(small).execute()
    got, _, meta = art.load_safetensors_model(pipe.paths.fused_dir)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    last = art.read_layer_meta(pipe.paths.layer_ckpt(2))
    assert meta["fusion_check"].startswith("skipped") and meta["val_loss"] == last["val_loss"]

    before = (pipe.paths.fused_dir / "config.json").read_bytes()
    with pytest.raises(ConfigError) as e:  # not even the weights fit
        Pipeline(make_run("stage=fusion", "fusion.finetune_steps=2")).execute()
    assert "\n" not in str(e.value) and "do not fit" in str(e.value) and "fusion.finetune_steps=0" in str(e.value)
    weights = 4 * param_counts(run.model)["total"]
    monkeypatch.setattr(pipeline_memory, "free_bytes", lambda device: weights + 1)  # the weights fit, AdamW not
    with pytest.raises(ConfigError) as e:
        Pipeline(make_run("stage=fusion", "fusion.finetune_steps=2")).execute()
    assert "\n" not in str(e.value) and "hardware=fsdp" in str(e.value) and "fusion.finetune_steps" in str(e.value)
    assert (pipe.paths.fused_dir / "config.json").read_bytes() == before


@pytest.mark.parametrize(
    "node, gpus, stage_on, model_on, sharded",
    [
        ({"accelerator": "cpu"}, 1, "cpu", "cpu", False),
        ({"accelerator": "gpu", "devices": 1}, 2, "cuda:0", "cuda:0", False),
        ({"accelerator": "gpu", "devices": [1]}, 2, "cuda:1", "cuda:1", False),
        ({"accelerator": "auto", "devices": "auto"}, 1, "cuda:0", "cuda:0", False),
        ({"accelerator": "gpu", "devices": 2, "strategy": "ddp"}, 2, "cpu", "cpu", False),
        ({"accelerator": "gpu", "devices": "auto", "strategy": "fsdp"}, 4, "cpu", "cpu", True),
    ],
)
def test_where_modules_are_built(monkeypatch, node, gpus, stage_on, model_on, sharded):
    """One-GPU runs build straight on their GPU; several devices, or a sharding strategy, on the host.
    A fine-tune that does not fit is refused unless the strategy shards it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(pipeline_memory, "free_bytes", lambda device: 10**12 if device.type == "cpu" else 10**6)
    cfg = tiny()

    class Run:
        trainer, model = node, cfg

        def trainer_kwargs(self, budget):
            return node

    run = Run()
    assert str(pipeline_memory.stage_device(run, "layer")) == stage_on
    room = pipeline_memory.fusion_room(run)
    assert str(room.device) == model_on and room.sharded == sharded
    room.free = room.check_bytes + 1  # the weights fit, the fine-tune does not
    if sharded:
        room.refuse_finetune(5)
    else:
        with pytest.raises(ConfigError, match="hardware=fsdp"):
            room.refuse_finetune(5)
    room.refuse_finetune(0)


def test_a_frozen_tensor_asked_for_again_is_not_drawn_again(monkeypatch):
    """A stage builds a block (its frozen tensors drawn) and then records their checksum (drawn
    again before): the second time is the same tensor, not a second draw; other keys are drawn."""
    model_layers._frozen_normal.cache_clear()
    calls = []
    portable = model_layers.portable_normal
    monkeypatch.setattr(model_layers, "portable_normal", lambda *a: calls.append(a) or portable(*a))
    a = model_layers.frozen_normal((64, 32), 0.02, 7, "up", 2)
    b = model_layers.frozen_normal([64, 32], 0.02, 7, "up", 2)
    c = model_layers.frozen_normal((64, 32), 0.02, 7, "up", 3)
    assert a is b and len(calls) == 2 and not torch.equal(a, c)
    assert torch.equal(a, portable((64, 32), 0.02, derive_seed(7, "up", 2)))
