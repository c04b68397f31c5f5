"""stackwise-import: a tiny random Llama saved here with `save_pretrained` becomes a StackWise
experiment (its embeddings, or embeddings and layers 1..K as finished stages with their caches),
whose numbers are the Llama's, and which stackwise-train continues."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest
import torch

from stackwise import artifacts as art
from stackwise.cli.import_hf import main as import_main
from stackwise.config import load_run
from stackwise.data.tokenizers import train_bpe
from stackwise.hf import bidirectional_mask
from stackwise.hf.export import export_model
from stackwise.hf.importer import LlamaFolder, import_overrides, read_llama_folder
from stackwise.model.transformer import Block, Embedding, Head
from stackwise.model.weights import LayerModules, LayerWeights, assemble
from tests.conftest import cli

transformers = pytest.importorskip("transformers")

TINY_RUN = [
    "data=dummy",
    "data.seq_len=32",
    "data.batch_size=16",
    "data.n_train=128",
    "data.n_val=32",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.enable_progress_bar=false",
    "optim.warmup_steps=1",
    "cache.shard_size=100",
    "layerwise.embed_budget=1",
    "fusion.finetune_steps=0",
    "logger=none",
    "callbacks=none",
]


def save_llama(folder, vocab_size=34, n_layers=3, tied=False, **kw):
    """A tiny random Llama (data=dummy's 34 ids: 32 symbols, [MASK] 32, [PAD] 33), its norms randomised too."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=5000.0,
        tie_word_embeddings=tied,
        max_position_embeddings=64,
        **kw,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape))
    model.save_pretrained(folder)
    return model


def run_import(capsys, *args):
    import_main([str(a) for a in args])
    out = capsys.readouterr().out
    exp = next(line.split(" into ")[1].split(";")[0] for line in out.splitlines() if line.startswith("imported "))
    return load_run(Path(exp))


def layer_files(run, ks):
    paths = art.ExperimentPaths(run.exp_dir)
    return [art.load_layer_checkpoint(paths.layer_ckpt(k))[0] for k in ks]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_imported_layers_give_the_llamas_logits_and_stackwise_train_continues(tmp_path, capsys, tied):
    """Layers 1..2 of a 3-layer Llama as finished stages: the StackWise prefix of those layers gives the
    Llama's (2-layer) logits, causal and bidirectional; the caches exist; stage=layer k=3 continues."""
    llama = save_llama(tmp_path / "llama", tied=tied)
    run = run_import(capsys, tmp_path / "llama", "--layers", 2, f"output_root={tmp_path}/out", *TINY_RUN)
    paths = art.ExperimentPaths(run.exp_dir)
    assert [paths.acts_manifest(k).is_file() for k in (1, 2)] == [True, True]
    cfg = run.model
    assert (cfg.d_model, cfg.n_layers, cfg.attention, cfg.tie_embeddings, cfg.rope_theta) == (
        32,
        3,
        "gqa",
        tied,
        5000.0,
    )
    weights = layer_files(run, (1, 2))
    assert "mlp.up" in weights[0].block  # the trained up-projection is stored, not regenerated
    torch.testing.assert_close(weights[1].block["mlp.up"], llama.model.layers[1].mlp.up_proj.weight, rtol=0, atol=0)

    hf2 = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama", num_hidden_layers=2).eval()
    ids = torch.randint(0, 32, (2, 32), generator=torch.Generator().manual_seed(1))
    for causal in (True, False):
        ours = assemble(dataclasses.replace(cfg, causal=causal), weights).eval()
        with torch.no_grad():
            got = ours.logits(ours.run_layers(ours.embed_tokens(ids), 1, 2))
            mask = None if causal else bidirectional_mask(torch.ones_like(ids))
            want = hf2(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    sha = {k: art.sha256_file(paths.layer_ckpt(k)) for k in (1, 2)}
    command = json.loads(paths.import_json.read_text())["continue"]
    args = shlex.split(command.split("#")[0])[1:]
    assert args[-2:] == ["stage=layer", "k=3"]
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {k: art.sha256_file(paths.layer_ckpt(k)) for k in (1, 2)} == sha  # the imported stages were kept
    third, meta = art.load_layer_checkpoint(paths.layer_ckpt(3))
    assert meta["prev_sha256"] == sha[2] and "mlp.up" not in third.block  # layer 3's own (seed, 3) up
    # importing again changes nothing: the finished stages and their caches are kept
    run_import(capsys, tmp_path / "llama", "--layers", 2, f"output_root={tmp_path}/out", *TINY_RUN)
    assert {k: art.sha256_file(paths.layer_ckpt(k)) for k in (1, 2)} == sha


def test_a_whole_llama_imported_fuses_at_once_and_exports_to_the_same_logits(tmp_path, capsys, monkeypatch):
    """--layers K = n_layers: every layer a finished stage with its validation scores, so stage=fusion
    (the command the import prints) fuses at once, its check passing against the last imported layer;
    the export of fused/ is the Llama again (its trained up-projections read from fused/, not drawn).
    The folder is read one layer at a time (the embedding and head once), never whole."""
    llama = save_llama(tmp_path / "llama", n_layers=3)
    reads, tensors = [], LlamaFolder.tensors

    def recorded(self, keep):
        got = tensors(self, keep)
        reads.append({n.split(".")[2] if n.startswith("model.layers.") else n for n in got})
        return got

    monkeypatch.setattr(LlamaFolder, "tensors", recorded)
    run = run_import(
        capsys, tmp_path / "llama", "--layers", 3, "model.causal=true", f"output_root={tmp_path}/out", *TINY_RUN
    )
    assert reads == [{"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}, {"0"}, {"1"}, {"2"}]
    paths = art.ExperimentPaths(run.exp_dir)
    metas = [art.read_layer_meta(paths.layer_ckpt(k)) for k in (1, 2, 3)]
    assert all(m["imported"]["layer"] == k and m["val_loss"] > 0 for k, m in enumerate(metas, 1))
    command = json.loads(paths.import_json.read_text())["continue"]
    args = shlex.split(command.split("#")[0])[1:]
    assert args[-1] == "stage=fusion"
    done = cli(*args, "fusion.check=true", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    fused = art.read_model_meta(paths.fused_dir)[1]
    assert "fusion_check" not in fused and fused["val_loss"] == pytest.approx(metas[-1]["val_loss"], rel=1e-5)

    export_model(run.exp_dir, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    ids = torch.randint(0, 32, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, llama(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_embeddings_only_start_stage_one_and_new_ids_start_at_the_mean_row(tmp_path, capsys):
    """--layers 0: stage 1 trains from the Llama's embedding (a tiny lr keeps it there) and head. The
    Llama has 32 ids; data=dummy's [MASK] (32) and [PAD] (33) rows start as the mean of its rows."""
    llama = save_llama(tmp_path / "llama", vocab_size=32, n_layers=2)
    run = run_import(capsys, tmp_path / "llama", f"output_root={tmp_path}/out", *TINY_RUN, "optim.lr=1e-9")
    (first,) = layer_files(run, (1,))
    emb = llama.model.embed_tokens.weight
    want = torch.cat([emb, emb.mean(0, keepdim=True).expand(2, -1)])
    assert first.embed["weight"].shape == (34, 32)
    torch.testing.assert_close(first.embed["weight"], want, atol=1e-6, rtol=0)
    torch.testing.assert_close(first.head["norm.weight"], llama.model.norm.weight, atol=1e-6, rtol=0)
    assert not torch.allclose(first.embed["weight"], Embedding(run.model).weight, atol=1e-3)
    assert "mlp.up" not in first.block  # layer 1 was trained by StackWise: its up is the (seed, 1) draw
    assert art.ExperimentPaths(run.exp_dir).acts_manifest(1).is_file()


def test_the_folders_tokenizer_is_the_datas_unless_one_is_given(tmp_path):
    """A folder with tokenizer.json: data.tokenizer points at it (ids [MASK] and [PAD] included); the
    Llama's 320 rows are kept although the tokenizer has 300 ids; the sizes are the folder's."""
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer\n" * 20
    (tmp_path / "c.txt").write_text(text)
    save_llama(tmp_path / "llama", vocab_size=320, n_layers=2)
    tok = train_bpe([tmp_path / "c.txt"], 300, tmp_path / "llama" / "tokenizer.json")
    hf = read_llama_folder(tmp_path / "llama")
    run, args = import_overrides(hf, 1, [f"output_root={tmp_path}/out", "data=text", f"data.path={tmp_path / 'c.txt'}"])
    assert (run.data.tokenizer.kind, run.data.tokenizer.path) == (
        "hf",
        str((tmp_path / "llama/tokenizer.json").resolve()),
    )
    assert (run.model.vocab_size, run.model.mask_id, run.model.pad_id) == (320, tok.mask_id, tok.pad_id)
    assert (run.model.d_model, run.model.n_layers, run.model.norm_eps) == (32, 2, 1e-5)
    assert run.name.startswith("import-llama-k1,") and f"name='{run.name}'" in args
    byte, _ = import_overrides(hf, 1, [f"output_root={tmp_path}/out", "data=shakespeare", "data.tokenizer.kind=byte"])
    assert byte.data.tokenizer.kind == "byte" and byte.model.vocab_size == 320


def test_a_stored_up_projection_survives_a_layer_file_and_is_never_trained():
    """Block.keep_frozen: the stored tensor is a buffer in the state dict (so in the layer file), it
    loads back through load_trainable_state_dict, and a block copied from it (init=previous) keeps its own."""
    from stackwise.model.config import ModelConfig

    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
    up = torch.randn(48, 32)
    block = Block(cfg, 1)
    block.keep_frozen({"mlp.up": up})
    assert "mlp.up" in block.state_dict() and "mlp.up" not in dict(block.named_parameters())
    weights = LayerWeights.of(LayerModules(block, Head(cfg), Embedding(cfg)))
    again = weights.modules(cfg, 1).block
    assert torch.equal(again.mlp.up, up) and again.stored == ("mlp.up",)
    nxt = Block(cfg, 2)
    before = nxt.mlp.up.clone()
    nxt.copy_trainable_state(weights.block, 1)
    assert torch.equal(nxt.mlp.up, before) and torch.equal(nxt.mlp.gate.weight, block.mlp.gate.weight)


def one_line_error(capsys, *args):
    capsys.readouterr()  # save_pretrained's progress bar
    with pytest.raises(SystemExit) as e:
        import_main([str(a) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("stackwise-import: error: ") and err.count("\n") == 1, err
    return err


def test_what_cannot_be_imported_is_one_line(tmp_path, capsys):
    save_llama(tmp_path / "llama", n_layers=2)
    out = f"output_root={tmp_path}/out"
    assert "must be in 0..2" in one_line_error(capsys, tmp_path / "llama", "--layers", 3, out, *TINY_RUN)
    shallow = one_line_error(capsys, tmp_path / "llama", "--layers", 2, "model.n_layers=1", out, *TINY_RUN)
    assert "must be in 0..1" in shallow and "model.n_layers=1" in shallow
    err = one_line_error(capsys, tmp_path / "llama", out, "model.d_model=64", *TINY_RUN)
    assert "model.d_model" in err and "takes the model's sizes from the folder" in err
    assert "stage" in one_line_error(capsys, tmp_path / "llama", out, "stage=all", *TINY_RUN)

    scaled = tmp_path / "scaled"
    save_llama(scaled, n_layers=2, rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert "RoPE type 'linear'" in one_line_error(capsys, scaled, out, *TINY_RUN)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "llama" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    assert "only pickle weights (pytorch_model.bin)" in one_line_error(capsys, pickled, out, *TINY_RUN)

    other = tmp_path / "gpt2"
    transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4).save_pretrained(other)
    assert "holds a 'gpt2' model" in one_line_error(capsys, other, out, *TINY_RUN)
    assert not (tmp_path / "out").exists()  # nothing was started
