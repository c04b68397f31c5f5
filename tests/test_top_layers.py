"""`layerwise.top_layers=m`: a trainable top segment (blocks L-m+1..L, SegProp) trained beside every
layer stage, carried from stage to stage, kept beside the latest layer file, and fused from the last
layer stage L-m. m = 0 is plain greedy layer-wise training, byte for byte."""

from __future__ import annotations

import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from stackwise import artifacts as art
from stackwise.config import RunConfig
from stackwise.data.cache.reader import ActivationDataset
from stackwise.errors import ArtifactError, ConfigError
from stackwise.evaluation import evaluate_experiment
from stackwise.model.stats import train_step_flops
from stackwise.model.weights import LayerWeights, first_layer, next_layer
from stackwise.pipeline import Pipeline, Stage
from stackwise.pipeline.stage import plan
from stackwise.plan import plan_run
from tests.cli_runner import CliRun
from tests.conftest import TINY, cli, cli_env, compose_cfg

TOP = ["model.n_layers=3", "layerwise.top_layers=1", "cache.keep=all"]


def _state(path):
    return load_file(str(path))


@pytest.fixture(scope="module")
def top_run(tmp_path_factory):
    """stage=embed, then stage=all: the m=1, L=3 experiment, with layer_1's top segment kept aside
    (stage 2 replaces it)."""
    root = tmp_path_factory.mktemp("top")

    def make(*overrides):
        ovr = TINY + [f"output_root={root}", "name=top", "logger=none", "callbacks=none", *TOP, *overrides]
        return RunConfig.from_hydra(compose_cfg(ovr))

    first = Pipeline(make("stage=embed"))
    first.execute()
    top_1 = _state(first.paths.top_file(1))
    pipe = Pipeline(make("stage=all"))
    pipe.execute()
    return pipe, top_1


def test_the_stages_are_1_to_L_minus_m_and_the_top_moves_up(top_run):
    pipe, top_1 = top_run
    paths = pipe.paths
    assert [s.name for s in pipe.stages] == ["embed", "layer_2", "fusion"]
    assert paths.existing_layers() == [1, 2]
    # the latest stage's top segment only is kept, under the fused model's names (block 3 = blocks.2)
    assert sorted(p.name for p in paths.layers_dir.glob("*.safetensors")) == ["layer_2.top.safetensors"]
    top_2 = _state(paths.top_file(2))
    assert set(top_2) == set(top_1) and all(n.startswith("blocks.2.") for n in top_2)
    # stage 2 really trained the top block: it moved from where stage 1 left it
    assert all(top_2[n].shape == top_1[n].shape for n in top_1)
    assert any(not torch.equal(top_2[n], top_1[n]) for n in top_1)
    # the fused model: blocks 1..2 from their stages, block 3 and the head from stage 2
    fused, _, _ = art.load_safetensors_model(paths.fused_dir)
    for name, t in top_2.items():
        assert torch.equal(fused[name], t), name
    for k in (1, 2):
        w, _ = art.load_layer_checkpoint(paths.layer_ckpt(k))
        for name, t in w.block.items():
            assert torch.equal(fused[f"blocks.{k - 1}.{name}"], t), (k, name)
    w2, meta2 = art.load_layer_checkpoint(paths.layer_ckpt(2), head="load")
    assert sorted(w2.top) == [3]
    for name, t in w2.head.items():
        assert torch.equal(fused[f"head.{name}"], t)
    # the fusion check held (1e-5) and fused/ records stage 2's loss
    results = {r["stage"]: r for r in art.read_results(paths)}
    assert results["fused"]["val_loss"] == pytest.approx(meta2["val_loss"], rel=1e-5)
    # the cache stage 2 read is layer 1's own output, not the top segment's (same as without one)
    assert paths.acts_manifest(1).exists() and not paths.acts_dir(2).exists()


def test_a_stage_loss_is_block_k_then_the_top_segment_then_the_head(top_run):
    """Stage 2's recorded validation loss, rebuilt by hand: acts_layer1 -> block 2 -> block 3 -> norm + tied head."""
    pipe, _ = top_run
    cfg = pipe.cfg
    w1, _ = art.load_layer_checkpoint(pipe.paths.layer_ckpt(1))
    w2, meta = art.load_layer_checkpoint(pipe.paths.layer_ckpt(2), head="load")
    block, head, _, top = w2.modules(cfg, 2)
    assert [b.k for b in top] == [3]
    embed_w = w1.embed["weight"]
    ds = ActivationDataset(pipe.state.open_cache(Stage.layer(1)), "val")
    ce, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            row = ds[i]
            pad = (row["targets"] == cfg.pad_id)[None]
            h = block(row["hidden"].float()[None], pad_mask=pad if bool(pad.any()) else None)
            h = top[0](h, pad_mask=pad if bool(pad.any()) else None)
            logits = head(h, embed_w)[0]  # (T, V)
            mask = row["mask"].bool()
            ce += torch.nn.functional.cross_entropy(logits[mask], row["targets"].long()[mask], reduction="sum").item()
            n += int(mask.sum())
    assert ce / n == pytest.approx(meta["val_loss"], rel=1e-5)


def test_the_fused_model_loads_and_evaluates(top_run):
    pipe, _ = top_run
    model, _ = art.load_model(pipe.paths.fused_dir)
    assert model.cfg.n_layers == 3
    report = evaluate_experiment(pipe.paths.root)
    names = {m["name"] for m in report["models"]}
    assert "fused" in names


def test_stage_by_stage_and_recompute_give_the_same_fused_model(top_run, make_run):
    """stage=embed, stage=layer k=2, stage=fusion, reading layer 1 recomputed instead of cached:
    the same fused weights as stage=all from the cache."""
    pipe, _ = top_run
    for stage in ("stage=embed", "stage=layer k=2", "stage=fusion"):
        Pipeline(make_run(*TOP, "cache.store=recompute", *stage.split(), name="steps")).execute()
    got, _, _ = art.load_safetensors_model(make_run(*TOP, name="steps").exp_dir / "fused")
    want, _, _ = art.load_safetensors_model(pipe.paths.fused_dir)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


def test_top_layers_zero_is_plain_layerwise(make_run):
    """m = 0: no top modules, no top file, no `top_file` key: the layer files of before."""
    run = make_run()
    assert run.layer_stages == run.model.n_layers
    layer = first_layer(run.model)
    assert layer.top is None
    weights = LayerWeights.of(layer)
    assert weights.top is None
    path = run.exp_dir / "layers" / "layer_1.pt"
    path.parent.mkdir(parents=True)
    art.save_layer_checkpoint(path, weights, {"k": 1})
    assert "top_file" not in torch.load(path, weights_only=True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["layer_1.pt"]
    assert plan("all", None, 2, 2) == plan("all", None, 2)
    cfg = run.model
    assert train_step_flops(cfg, "layer", 2, 4, 32, 0.5) == train_step_flops(cfg, "layer", 2, 4, 32, 0.5, 0)


def test_next_layer_needs_the_top_segment_it_carries(make_run):
    run = make_run("model.n_layers=3", "layerwise.top_layers=1")
    below = LayerWeights.of(first_layer(run.model))  # no top segment
    with pytest.raises(ArtifactError, match="top segment"):
        next_layer(run.model, 2, "previous", below, top_layers=1)


@pytest.mark.parametrize(
    ("value", "message"),
    [("-1", "integer >= 0"), ("3", "0..2"), ("4", "0..2")],
)
def test_bad_top_layers_is_one_line(make_run, value, message):
    with pytest.raises(ConfigError) as e:
        make_run("model.n_layers=3", f"layerwise.top_layers={value}")
    text = str(e.value)
    assert "layerwise.top_layers" in text and message in text and "\n" not in text


def test_k_and_per_layer_rates_count_the_layer_stages(make_run):
    with pytest.raises(ConfigError, match=r"k: .*2\.\.n_layers - layerwise\.top_layers=2"):
        make_run(*TOP, "stage=layer", "k=3")
    with pytest.raises(ConfigError, match="2 layer stages"):
        make_run(*TOP, "masking=per_layer", "cache.views=2", "masking.rates=[0.5,0.4,0.3]")
    with pytest.raises(ConfigError, match=r"cache\.views=2"):
        make_run(*TOP, "masking=per_layer", "cache.views=3")
    run = make_run(*TOP, "masking=per_layer", "cache.views=2", "masking.rates=[0.5,0.3]")
    # the e2e baseline's budget: stage 1 + one layer stage + fine-tune
    assert run.max_steps("e2e") == run.max_steps("embed") + run.max_steps("layer") + run.fusion.finetune_steps


def test_the_planner_counts_the_top_segment(make_run):
    run0, run1 = make_run("model.n_layers=3"), make_run("model.n_layers=3", "layerwise.top_layers=1")
    p0, p1 = ({s.key: s for s in plan_run(r).stages} for r in (run0, run1))
    block = sum(p.numel() for p in first_layer(run1.model, top_layers=1).top.parameters())
    frozen = sum(t.numel() for b in first_layer(run1.model, top_layers=1).top for t in b.frozen_tensors().values())
    assert p1["embed"].trainable == p0["embed"].trainable + block
    assert p1["embed"].params == p0["embed"].params + block + frozen
    assert p1["layer"].trainable == p0["layer"].trainable + block
    assert p1["layer"].memory["activations"] > p0["layer"].memory["activations"]
    files = plan_run(run1).layer_files
    assert files["layer_k.top.safetensors (the latest layer's only)"] == 4 * block
    assert p1["e2e"].params == p0["e2e"].params


def test_killed_and_resumed_gives_the_same_bytes(tmp_path, make_run):
    """Killed mid stage 1, mid caching its output, and mid stage 2 (each stage after a checkpoint
    holding the top segment): the rerun ends with the bytes of a run that never stopped."""
    args = [*TOP, "trainer.val_check_interval=4", "callbacks=none", "logger=none"]
    ref = Pipeline(make_run(*args, name="ref"))
    ref.execute()
    exp = tmp_path / "outputs" / "crash"
    cmd = ["stage=all", "name=crash", *TINY, *args]
    for point in ("train:embed:6", "cache:1:0:1", "train:layer_2:6"):
        out = CliRun(cmd, tmp_path, cli_env(), timeout=300, kill_at=point).wait()
        assert out.returncode == -signal.SIGKILL, (point, out.returncode, out.stderr[-3000:])
    out = cli(*cmd, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = {r["stage"]: r.get("resumed_from_step") for r in art.read_results(art.ExperimentPaths(exp))}
    assert resumed == {"embed": 4, "layer_2": 4, "fused": None}
    for rel in ("layers/layer_1.pt", "layers/layer_2.pt", "layers/layer_2.top.safetensors", "fused/model.safetensors"):
        assert (exp / rel).read_bytes() == (ref.paths.root / rel).read_bytes(), rel
    shutil.rmtree(exp)


def test_an_untied_head_trains_beside_the_top_segment_and_both_move_up(make_run):
    """Untied: the projection and the top segment are both kept beside the latest layer file only,
    stage 2 trains both, and the fusion check holds."""
    untied = [*TOP, "model.tie_embeddings=false", "trainer.max_steps=4", "trainer.val_check_interval=2"]
    first = Pipeline(make_run(*untied, "stage=embed"))
    first.execute()
    proj_1 = _state(first.paths.head_file(1))["proj.weight"]
    pipe = Pipeline(make_run(*untied))
    pipe.execute()
    names = sorted(p.name for p in pipe.paths.layers_dir.glob("*.safetensors"))
    assert names == ["layer_2.head.safetensors", "layer_2.top.safetensors"]
    fused, _, _ = art.load_safetensors_model(pipe.paths.fused_dir)
    proj_2 = _state(pipe.paths.head_file(2))["proj.weight"]
    assert not torch.equal(proj_2, proj_1) and torch.equal(fused["head.proj.weight"], proj_2)
    assert {r["stage"] for r in art.read_results(pipe.paths)} == {"embed", "layer_2", "fused"}


def test_the_top_file_is_checked_and_only_the_latest_is_kept(make_run, tmp_path):
    """layer_k.top.safetensors: read back exactly, required where a stage starts from it, its
    digest checked, and the one of the layer below deleted once layer_k.pt is written."""
    from safetensors.torch import save_file

    run = make_run(*TOP)
    cfg = run.model
    w1 = LayerWeights.of(first_layer(cfg, top_layers=1))
    w2 = LayerWeights.of(next_layer(cfg, 2, "previous", w1, top_layers=1))
    paths = art.ExperimentPaths(tmp_path / "exp")
    paths.layers_dir.mkdir(parents=True)
    art.save_layer_checkpoint(paths.layer_ckpt(1), w1, {"k": 1})
    got, _ = art.load_layer_checkpoint(paths.layer_ckpt(1), head="load")
    assert sorted(got.top) == [3] and got.top[3].frozen_sha256 == w1.top[3].frozen_sha256
    assert all(torch.equal(t, w1.top[3].block[n]) for n, t in got.top[3].block.items())
    assert got.top_blocks(cfg)[0].k == 3
    assert art.load_layer_checkpoint(paths.layer_ckpt(1), head="skip")[0].top is None
    art.save_layer_checkpoint(paths.layer_ckpt(2), w2, {"k": 2})
    assert not paths.top_file(1).exists() and paths.top_file(2).exists()
    # layer 1's top segment is gone: fine for a reader that only runs layer 1, an error for one starting from it
    assert art.load_layer_checkpoint(paths.layer_ckpt(1), head="if_present")[0].top is None
    with pytest.raises(ArtifactError) as e:
        art.load_layer_checkpoint(paths.layer_ckpt(1), head="load")
    assert paths.top_file(1).name in str(e.value) and "\n" not in str(e.value)
    # another top segment in its place: refused
    tensors = _state(paths.top_file(2))
    save_file({n: t + 1 for n, t in tensors.items()}, str(paths.top_file(2)))
    with pytest.raises(ArtifactError, match="digest mismatch"):
        art.load_layer_checkpoint(paths.layer_ckpt(2), head="load")


def test_a_third_stage_reads_the_tied_embedding_without_the_replaced_top_segment(make_run):
    """Stage 3 of a tied model reads layer 1's embedding from layer_1.pt, whose top segment stage 2
    has replaced (only the latest is kept): it needs the embedding only. L=4, m=1: stages 1..3."""
    run = make_run("model.n_layers=4", "layerwise.top_layers=1", "stage=all", "fusion.finetune_steps=0", name="deep")
    pipe = Pipeline(run)
    pipe.execute()
    assert [r["stage"] for r in art.read_results(pipe.paths)] == ["embed", "layer_2", "layer_3", "fused"]
    assert not pipe.paths.top_file(1).exists() and pipe.paths.top_file(3).exists()
