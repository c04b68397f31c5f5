"""stackwise-export: a model folder of an experiment -> a transformers folder that
`AutoModelForCausalLM.from_pretrained` loads offline, whose logits equal StackWise's (CPU, fp32).

The experiment folders are made directly (run_config.json + a fused model with random weights, the
norms randomised too so that a swapped norm shows), not trained: the export only reads them.
"""

from __future__ import annotations

import gc
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers

from stackwise import artifacts as art
from stackwise.cli.export import main as export_main
from stackwise.data.tokenizers import train_bpe
from stackwise.hf import bidirectional_mask, export
from stackwise.hf.export import export_model
from stackwise.model import layers as model_layers
from stackwise.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

TOL = dict(atol=1e-4, rtol=1e-4)
B, T = 2, 32


def make_experiment(
    make_run, *overrides: str, name: str = "exp", finetuned: bool = False, max_shard_bytes: int | None = None
):
    """An experiment folder holding run_config.json and a fused (+ fine-tuned) model: (run, model);
    `max_shard_bytes` stores fused/ sharded, as fusion stores a large model."""
    run = make_run("data.seq_len=32", *overrides, name=name)
    paths = art.ExperimentPaths(run.exp_dir)
    paths.root.mkdir(parents=True)
    art.atomic_write_json(run.to_dict(), paths.run_config)
    model = Transformer(run.model).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norms start at 1: make a swapped norm visible in the logits
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    meta = {"finetuned": finetuned}
    art.save_safetensors_model(
        paths.fused_dir, model.state_dict(), run.model.to_dict(), meta, max_shard_bytes=max_shard_bytes
    )
    if finetuned:
        with torch.no_grad():
            model.embed.weight.mul_(1.5)
        art.save_safetensors_model(paths.finetuned_dir, model.state_dict(), run.model.to_dict(), {"finetuned": True})
    return run, model


def ids_and_pad(run, padded: bool):
    cfg = run.model
    ids = torch.randint(0, cfg.vocab_size - 2, (B, T), generator=torch.Generator().manual_seed(0))
    pad = torch.zeros(B, T, dtype=torch.bool)
    if padded:
        pad[0, -5:] = True
        pad[1, :3] = True
        ids = ids.masked_fill(pad, cfg.pad_id)
    return ids, pad


CASES = [
    # (attention, causal, tied)
    ("mha", False, True),
    ("gqa", False, True),
    ("mla", False, True),
    ("mha", True, False),
    ("gqa", True, True),
    ("gqa", False, False),
    ("mla", True, False),
]


@pytest.mark.parametrize(
    "attention, causal, tied",
    CASES,
    ids=[f"{a}-{'causal' if c else 'bidir'}-{'tied' if t else 'untied'}" for a, c, t in CASES],
)
def test_exported_logits_equal_stackwise_logits(make_run, tmp_path, attention, causal, tied):
    # mla also with its latent up-projections frozen: buffers, regenerated from the seed like the SwiGLU up
    frozen = [f"model.mla_freeze_up={not tied}"] if attention == "mla" else []
    run, ours = make_experiment(
        make_run, f"attention={attention}", f"model.causal={causal}", f"model.tie_embeddings={tied}", *frozen
    )
    out = tmp_path / "hf"
    done = export_model(run.exp_dir, out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == ("DeepseekV3ForCausalLM" if attention == "mla" else "LlamaForCausalLM")
    assert done.architecture == type(hf).__name__
    info = json.loads((out / "config.json").read_text())["stackwise"]
    assert info["causal"] is causal and info["mask_token_id"] == run.model.mask_id
    assert info["config"] == run.model.to_dict()
    for padded in (False, True) if not causal else (False,):
        ids, pad = ids_and_pad(run, padded)
        with torch.no_grad():
            want = ours(ids, pad_mask=pad if padded else None)
            # a causal model needs nothing; a bidirectional one reads both sides through a 4-D mask
            mask = None if causal else bidirectional_mask(~pad)
            got = hf(input_ids=ids, attention_mask=mask).logits
        keep = ~pad
        torch.testing.assert_close(got[keep], want[keep], **TOL)
    if not causal:  # without the mask transformers' class is causal: the numbers differ, so the mask matters
        ids, _ = ids_and_pad(run, False)
        with torch.no_grad():
            assert not torch.allclose(hf(input_ids=ids).logits, ours(ids), **TOL)


def test_only_safetensors_and_json_are_written_and_the_tokenizer_round_trips(make_run, tmp_path):
    """data=shakespeare (the byte tokenizer): tokenizer files that AutoTokenizer loads and that give
    StackWise's ids; every file is JSON or safetensors, nothing a pickle loader would read."""
    run, _ = make_experiment(make_run, "data=shakespeare", "model.vocab_size=null", "data.seq_len=32")
    out = tmp_path / "hf"
    done = export_model(run.exp_dir, out)
    assert done.tokenizer == "byte"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"], names
    # readable as any new file of the user's (safetensors alone makes its files 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(names, 0o666 & ~umask)
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "ROMEO: O, she doth teach the torches — ü"
    assert tok(text, add_special_tokens=False).input_ids == list(text.encode())
    assert (tok.mask_token_id, tok.pad_token_id) == (run.model.mask_id, run.model.pad_id)
    assert tok.decode(list(text.encode())) == text


def test_a_bpe_tokenizer_is_exported_with_the_ids_stackwise_trained_on(make_run, tmp_path):
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer\n" * 20
    (tmp_path / "c.txt").write_text(text)
    ours = train_bpe([tmp_path / "c.txt"], 300, tmp_path / "tok.json")
    run, _ = make_experiment(
        make_run,
        "data=text",
        f"data.path={tmp_path / 'c.txt'}",
        "data.tokenizer.kind=hf",
        f"data.tokenizer.path={tmp_path / 'tok.json'}",
        "model.vocab_size=null",
    )
    done = export_model(run.exp_dir, tmp_path / "hf")
    assert done.tokenizer == "hf"
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    line = "whether 'tis nobler in the mind"
    assert tok(line, add_special_tokens=False).input_ids == ours.encode(line)
    assert (tok.mask_token_id, tok.pad_token_id, len(tok)) == (ours.mask_id, ours.pad_id, ours.vocab_size)


def test_mask_and_pad_taken_from_reserved_tokens_are_the_exported_tokenizers(make_run, tmp_path):
    """A tokenizer with Llama-3's reserved special tokens: [MASK] and [PAD] took two of them, so the
    exported tokenizer's mask and pad tokens are those (ids the model has), not new "[MASK]" ids."""
    words = ["to", "be", "or", "not", "that", "is", "the", "question", ","]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=","))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_special_tokens(["<|begin_of_text|>", *(f"<|reserved_special_token_{n}|>" for n in range(3))])
    raw.save(str(tmp_path / "tok.json"))
    (tmp_path / "c.txt").write_text("to be , or not to be , that is the question\n" * 20)
    run, _ = make_experiment(
        make_run,
        "data=text",
        f"data.path={tmp_path / 'c.txt'}",
        "data.tokenizer.kind=hf",
        f"data.tokenizer.path={tmp_path / 'tok.json'}",
        "model.vocab_size=null",
    )
    assert (run.model.mask_id, run.model.pad_id, run.model.vocab_size) == (10, 11, 13)  # reserved 0 and 1
    export_model(run.exp_dir, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert (tok.mask_token_id, tok.pad_token_id, len(tok)) == (10, 11, 13)
    assert tok("to be , or not", add_special_tokens=False).input_ids == [0, 1, 8, 2, 3]


class LiveTensors:
    """Bytes of the tensor storages alive now that were not alive when it was made: every tensor is a
    Python object the garbage collector tracks, so `sample()` sees every tensor the export holds."""

    def __init__(self):
        # kept alive, so that no new storage can take one of their addresses
        self.before = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
        self.old = {t.untyped_storage().data_ptr() for t in self.before if not t.is_meta}
        self.peak = 0

    def sample(self) -> None:
        storages = {}
        for o in gc.get_objects():
            if isinstance(o, torch.Tensor) and not o.is_meta and o.untyped_storage().data_ptr() not in self.old:
                storages[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
        self.peak = max(self.peak, sum(storages.values()))


@pytest.mark.parametrize(
    "overrides",
    [
        ("attention=gqa", "model.tie_embeddings=false"),
        ("attention=mla", "model.mla_freeze_up=true", "model.n_layers=3"),
    ],
    ids=["gqa-untied", "mla-frozen-up"],
)
def test_a_sharded_export_holds_one_shard_at_a_time_and_loads_through_its_index(
    make_run, tmp_path, monkeypatch, overrides
):
    """fused/ stored in shards, exported with a small --max-shard-size: several HF shards and their
    index (no partial file left), that transformers loads with StackWise's logits; while the export
    writes a shard, the tensors it holds come to at most one shard plus the largest tensor, far less
    than the model (the whole model in memory, as load_model gives it, fails this)."""
    run, ours = make_experiment(make_run, *overrides, max_shard_bytes=30_000)
    assert (art.ExperimentPaths(run.exp_dir).fused_dir / "model.safetensors.index.json").is_file()
    max_shard = 20_000
    tensors = {
        **ours.state_dict(),
        **{f"b{i}.{n}": t for i, b in enumerate(ours.blocks) for n, t in b.frozen_tensors().items()},
    }
    total = sum(t.nbytes for t in tensors.values())
    largest = max(t.nbytes for t in tensors.values())
    assert total > 2 * (max_shard + largest)  # big enough for the bound to tell

    # the frozen draws' cache (stackwise/model/layers.py: the last 4 drawn) is a fixed overhead, not
    # the model's: counted here without it
    model_layers._frozen_normal.cache_clear()
    monkeypatch.setattr(model_layers, "_frozen_normal", model_layers.portable_normal)
    live, save = LiveTensors(), export.save_file

    def sampled_save(shard, *args, **kw):
        live.sample()
        return save(shard, *args, **kw)

    monkeypatch.setattr(export, "save_file", sampled_save)
    out = tmp_path / "hf"
    done = export_model(run.exp_dir, out, max_shard_size=max_shard)
    assert 0 < live.peak <= max_shard + largest, (live.peak, max_shard, largest, total)

    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert "model.safetensors.index.json" in done.files and not list(out.glob(".*"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert all((out / s).stat().st_size <= max_shard + largest + 4096 for s in shards)  # + the header
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids, pad = ids_and_pad(run, True)
    with torch.no_grad():
        got = hf(input_ids=ids, attention_mask=bidirectional_mask(~pad)).logits
        torch.testing.assert_close(got[~pad], ours(ids, pad_mask=pad)[~pad], **TOL)


def test_stored_bf16_weights_export_as_they_are_stored(make_run, tmp_path):
    """fused/ in bf16 (layerwise.save_dtype on a GPU): exported as bf16 by default, each stored tensor
    bit for bit, the frozen up-projection its (seed, k) draw rounded to bf16."""
    run, ours = make_experiment(make_run)
    fused = art.ExperimentPaths(run.exp_dir).fused_dir
    stored = {n: t.to(torch.bfloat16) for n, t in ours.state_dict().items()}
    art.save_safetensors_model(fused, stored, run.model.to_dict(), {"finetuned": False})
    out = tmp_path / "hf"
    export_model(run.exp_dir, out)
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"  # transformers 5 names it dtype
    got = load_file(out / "model.safetensors")
    assert torch.equal(got["model.embed_tokens.weight"], stored["embed.weight"])
    assert torch.equal(got["model.layers.1.self_attn.q_proj.weight"], stored["blocks.1.attn.q_proj.weight"])
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], ours.blocks[1].mlp.up.to(torch.bfloat16))


def test_a_damaged_model_folder_is_one_line(make_run, tmp_path, capsys):
    run, _ = make_experiment(make_run, max_shard_bytes=30_000)
    fused = art.ExperimentPaths(run.exp_dir).fused_dir
    shard = sorted(fused.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    code, cap = run_cli(capsys, run.exp_dir, "--out", tmp_path / "hf")
    *progress, line = cap.err.splitlines()  # progress lines ("reading fused/"), then the error's one line
    assert code == 2 and line.startswith("stackwise-export: error: ") and "Traceback" not in cap.err, cap.err
    assert shard.name in line and "truncated" in line and not any("error" in p for p in progress), cap.err
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.tmp-*"))


def test_default_is_the_finetuned_model_and_dtype_casts(make_run, tmp_path):
    run, ours = make_experiment(make_run, finetuned=True)
    done = export_model(run.exp_dir, tmp_path / "hf", dtype="bfloat16")
    assert done.model == "finetuned"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert hf.dtype == torch.bfloat16
    torch.testing.assert_close(hf.model.embed_tokens.weight.float(), ours.embed.weight.bfloat16().float())
    assert export_model(run.exp_dir, tmp_path / "fused", which="fused").model == "fused"


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as e:
        export_main([str(a) for a in args])
    return e.value.code, capsys.readouterr()


def test_a_per_layer_mix_is_refused_in_one_line_naming_each_layers_kind(make_run, tmp_path, capsys):
    run, _ = make_experiment(make_run, "attention=hybrid", "model.n_layers=3")
    code, cap = run_cli(capsys, run.exp_dir, "--out", tmp_path / "hf")
    assert code == 2
    assert cap.err.startswith("stackwise-export: error: ") and cap.err.count("\n") == 1
    assert "layer 1: gqa, layer 2: mla, layer 3: gqa" in cap.err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "e2e"], "has no e2e model"),
        (["--max-shard-size", "lots"], "--max-shard-size 'lots'"),
    ],
)
def test_bad_arguments_are_one_line_and_leave_nothing(make_run, tmp_path, capsys, args, message):
    run, _ = make_experiment(make_run)
    code, cap = run_cli(capsys, run.exp_dir, "--out", tmp_path / "hf", *args)
    assert code == 2 and message in cap.err and cap.err.startswith("stackwise-export: error:"), cap.err
    assert cap.err.count("\n") == 1, cap.err
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.tmp-*"))


def test_an_existing_folder_is_replaced_only_with_overwrite(make_run, tmp_path, capsys):
    run, _ = make_experiment(make_run)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, cap = run_cli(capsys, run.exp_dir, "--out", out)
    assert code == 2 and "--overwrite" in cap.err and (out / "keep.txt").exists()
    export_main([str(run.exp_dir), "--out", str(out), "--overwrite"])
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert "wrote" in capsys.readouterr().out
