"""stackwise.generation (the iterative-unmasking sampler) and the stackwise-generate CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from stackwise import artifacts as art
from stackwise.cli.generate import main as generate_main
from stackwise.data.tokenizers import ByteTokenizer
from stackwise.generation import (
    GenerationError,
    build_ids,
    decode,
    generate,
    linear_counts,
    sample_generators,
    sample_text,
)
from stackwise.model.config import ModelConfig
from stackwise.model.transformer import Transformer
from tests.conftest import TINY, compose_cfg

MASK, PAD = 256, 257
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def model() -> Transformer:
    # untrained: its logits are far from uniform, which is all the sampler's mechanics need
    return Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, seed=3)).eval()


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def start(prompt: str = "ROMEO:", length: int = 16, n: int = 1) -> torch.Tensor:
    return torch.tensor([build_ids(TOK, mask_id=MASK, vocab_size=258, length=length, prompt=prompt)] * n)


def run(model, ids, **kw):
    kw = {"steps": int((ids == MASK).sum(1).max()), "mask_id": MASK, "pad_id": PAD, "generator": g(0), **kw}
    return generate(model, ids, **kw)


# ------------------------------------------------------------------------------ the sampler
def test_linear_schedule():
    assert linear_counts(10, 10) == [1] * 10
    assert linear_counts(10, 4) == [2, 3, 2, 3]  # floor(10 s / 4): 2, 5, 7, 10
    assert linear_counts(3, 5) == [0, 1, 0, 1, 1]
    assert all(sum(linear_counts(n, s)) == n for n in range(20) for s in range(1, 12))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"strategy": "random"},
        {"block_length": 5, "steps": 9},
        {"top_k": 3},
        {"temperature": 0.0},
        {"steps": 3},
        {"steps": 50},
    ],
)
def test_fills_every_mask_and_keeps_given_tokens(model, kw):
    ids = start(n=3)
    out = run(model, ids, **kw)
    assert not (out == MASK).any() and not (out == PAD).any()
    given = ids != MASK
    assert torch.equal(out[given], ids[given])
    assert decode(TOK, out[0].tolist()).startswith("ROMEO:")


def test_same_seed_same_output_other_seed_differs(model):
    ids = start(n=2)
    a, b = run(model, ids, generator=g(1)), run(model, ids, generator=g(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, run(model, ids, generator=g(2)))
    assert not torch.equal(a[0], a[1])  # rows drawing from one generator differ too


def test_greedy_ignores_the_seed(model):
    ids = start()
    assert torch.equal(
        run(model, ids, temperature=0.0, generator=g(1)), run(model, ids, temperature=0.0, generator=g(2))
    )
    assert torch.equal(run(model, ids, temperature=0.0), run(model, ids, top_k=1, generator=g(5)))


def test_one_step_per_mask_reveals_one_each(model):
    ids = start(length=20)
    n = int((ids == MASK).sum())
    left = []
    run(model, ids, steps=n, callback=lambda step, x: left.append(int((x == MASK).sum())))
    assert left == list(range(n - 1, -1, -1))


@pytest.mark.parametrize("strategy", ["confidence", "random"])
def test_linear_number_revealed_per_step(model, strategy):
    ids = start(prompt="", length=10)
    left = []
    run(model, ids, steps=4, strategy=strategy, callback=lambda step, x: left.append(int((x == MASK).sum())))
    assert left == [8, 5, 3, 0]


def test_confidence_reveals_the_most_probable_first(model):
    ids = start(prompt="", length=12)
    seen = []
    out = run(model, ids, steps=12, temperature=0.0, callback=lambda step, x: seen.append(x.clone()))
    # step 1 fills the position whose greedy token the model is surest of, given all masks
    logits = model(ids)
    logits[..., [MASK, PAD]] = float("-inf")  # never sampled: the probability is over the allowed tokens
    probs = logits.softmax(-1)
    first = int(probs.max(-1).values[0].argmax())
    assert (seen[0][0] != MASK).nonzero().flatten().tolist() == [first]
    assert int(out[0, first]) == int(probs[0, first].argmax())


def test_blocks_fill_left_to_right(model):
    ids = start(prompt="abc", length=3 + 12)
    seen = []
    run(model, ids, steps=6, block_length=4, callback=lambda step, x: seen.append((x[0, 3:] == MASK).tolist()))
    # 3 blocks of 4 masks, 2 steps each: after steps 2, 4, 6 the blocks are complete in order
    assert [sum(m) for m in seen] == [10, 8, 6, 4, 2, 0]
    assert not any(seen[1][:4]) and all(seen[1][4:])
    assert not any(seen[3][:8]) and all(seen[3][8:])
    with pytest.raises(GenerationError, match="fewer than the 3 blocks"):
        run(model, ids, steps=2, block_length=4)


def test_infill_changes_only_the_marks(model):
    text = "To be or ___ to be[MASK] that"
    ids = torch.tensor([build_ids(TOK, mask_id=MASK, vocab_size=258, infill=text)])
    assert int((ids == MASK).sum()) == 4 and ids.shape[1] == len(text) - len("[MASK]") + 1
    out = run(model, ids, steps=2)
    assert torch.equal(out[ids != MASK], ids[ids != MASK]) and not (out == MASK).any()
    s = decode(TOK, out[0].tolist())  # a filled byte that is not UTF-8 shows as U+FFFD; ASCII stays
    assert s.startswith("To be or ") and " to be" in s and s.endswith(" that")


def test_padding_is_kept_and_rows_are_independent(model):
    ids = start(n=1, length=16)
    padded = ids.clone()
    padded[0, -3:] = PAD
    out = run(model, padded, steps=7)
    assert (out[0, -3:] == PAD).all() and not (out == MASK).any()
    # per-row generators: a row's sample does not depend on the rest of the batch
    batch = torch.cat([start(length=16), start(prompt="Hi", length=16)])
    gens = sample_generators(7, 2)
    both = run(model, batch, generator=gens)
    alone = run(model, batch[1:], generator=sample_generators(7, 2)[1:])
    assert torch.equal(both[1:], alone)


def test_training_flag_restored(model):
    model.train()
    run(model, start(length=10))
    assert model.training
    model.eval()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"steps": 0}, "steps must be"),
        ({"strategy": "lowest"}, "unknown strategy"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"block_length": 0}, "block_length"),
    ],
)
def test_bad_arguments(model, kw, match):
    with pytest.raises(GenerationError, match=match):
        run(model, start(), **kw)


def test_build_ids_errors():
    with pytest.raises(GenerationError, match="prompt is 6 tokens"):
        build_ids(TOK, mask_id=MASK, vocab_size=258, length=6, prompt="ROMEO:")
    with pytest.raises(GenerationError, match="nothing to fill"):
        build_ids(TOK, mask_id=MASK, vocab_size=258, infill="no marks")
    # no tokenizer (dummy data): ids separated by spaces, marks as for text
    assert build_ids(None, mask_id=9, vocab_size=10, infill="1 2 __ 3") == [1, 2, 9, 9, 3]
    with pytest.raises(GenerationError, match="token ids"):
        build_ids(None, mask_id=9, vocab_size=10, length=5, prompt="hello")


# ------------------------------------------------------------------------------ experiments and the CLI
@pytest.fixture(scope="module")
def text_exp(tmp_path_factory):
    """A trained tiny Shakespeare experiment (byte tokenizer), through the real pipeline."""
    from stackwise.config import RunConfig
    from stackwise.pipeline import Pipeline

    root = tmp_path_factory.mktemp("gen")
    tiny = [o for o in TINY if not o.startswith("data.")]
    cfg = compose_cfg(
        tiny
        + [
            "data=shakespeare",
            "data.seq_len=32",
            "data.batch_size=8",
            "data.val_fraction=0.002",
            "trainer.max_steps=4",
            "cache.train_sequences=16",
            f"output_root={root}",
            "name=text",
            "logger=none",
            "callbacks=none",
        ]
    )
    Pipeline(RunConfig.from_hydra(cfg)).execute()
    return root / "text"


@pytest.fixture(scope="module")
def dummy_exp(tmp_path_factory):
    """A dummy-data experiment folder with an (untrained) fused model: no training needed."""
    from stackwise.config import RunConfig

    root = tmp_path_factory.mktemp("gen")
    run = RunConfig.from_hydra(compose_cfg(TINY + [f"output_root={root}", "name=dummy", "logger=none"]))
    paths = art.ExperimentPaths(run.exp_dir)
    paths.root.mkdir(parents=True)
    art.atomic_write_json(run.to_dict(), paths.run_config)
    art.save_safetensors_model(paths.fused_dir, Transformer(run.model).state_dict(), run.model.to_dict(), {})
    return run.exp_dir


def cli(capsys, *args):
    try:
        generate_main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_text_sample(text_exp, capsys):
    code, out, err = cli(capsys, text_exp, "--prompt", "ROMEO:", "--length", "16", "--seed", "3")
    assert code == 0, err
    assert out.startswith("ROMEO:")
    assert cli(capsys, text_exp, "--prompt", "ROMEO:", "--length", "16", "--seed", "3")[1] == out
    assert cli(capsys, text_exp, "--prompt", "ROMEO:", "--length", "16", "--seed", "4")[1] != out
    # the library entry point the training run prints a sample with
    assert sample_text(text_exp, prompt="ROMEO:", length=16, seed=3) + "\n" == out


def test_cli_infill_blocks_samples(text_exp, capsys):
    code, out, err = cli(
        capsys,
        text_exp,
        "--infill",
        "To be or ___ to be, [MASK]hat is",
        "--steps",
        "2",
        "--num-samples",
        "2",
        "--strategy",
        "random",
        "--show-steps",
    )
    assert code == 0, err
    parts = re.split(r"=== sample (\d)/2 \(seed (\d)\) ===\n", out)  # a sample may hold newlines itself
    assert parts[0] == "" and parts[1::3] == ["1", "2"] and parts[2::3] == ["0", "1"]
    for s in parts[3::3]:
        assert s.startswith("To be or ") and " to be, " in s and s.endswith("hat is\n")
    assert "[step 1 sample 1] To be or " in err and "_" in err
    code, out, err = cli(
        capsys,
        text_exp,
        "--length",
        "12",
        "--steps",
        "4",
        "--block-length",
        "3",
        "--temperature",
        "0.7",
        "--top-k",
        "10",
    )
    assert code == 0, err


def test_cli_samples_are_labelled_with_the_seed_that_reproduces_them(text_exp, capsys):
    args = [text_exp, "--prompt", "ROMEO:", "--length", "16"]
    code, out, err = cli(capsys, *args, "--seed", "5", "--num-samples", "3")
    assert code == 0, err
    parts = re.split(r"=== sample (\d)/3 \(seed (\d+)\) ===\n", out)
    assert parts[0] == "" and parts[1::3] == ["1", "2", "3"]
    assert parts[2::3] == ["5", "6", "7"]  # every label names another seed, not the same one three times
    texts = parts[3::3]
    assert len(set(texts)) == 3, texts
    for seed, text in zip(parts[2::3], texts, strict=True):
        assert cli(capsys, *args, "--seed", seed)[1] == text  # the label's seed alone prints that sample


def test_cli_dummy_prints_ids(dummy_exp, capsys):
    code, out, err = cli(capsys, dummy_exp, "--length", "12", "--prompt", "5 6 7")
    assert code == 0, err
    ids = [int(t) for t in out.split()]
    assert len(ids) == 12 and ids[:3] == [5, 6, 7]
    cfg = json.loads((art.ExperimentPaths(dummy_exp).fused_dir / "config.json").read_text())["config"]
    assert cfg["mask_id"] not in ids


@pytest.mark.parametrize(
    "args, match",
    [
        (["--prompt", "1 2 3 4 5", "--length", "4"], "prompt is 5 tokens"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--strategy", "lowest"], "unknown strategy 'lowest'"),
        (["--length", "8", "--steps", "1", "--block-length", "2"], "fewer than the 4 blocks"),
        (["--infill", "1 2 _", "--length", "8"], "--length does not apply"),
        (["--model", "e2e"], "has no e2e model"),
        (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
        (["--prompt", "1", "--infill", "1 _"], "not allowed with argument"),
    ],
)
def test_cli_bad_input_one_line(dummy_exp, capsys, args, match):
    code, out, err = cli(capsys, dummy_exp, *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("stackwise-generate: error: ") and match in err, err


def test_cli_missing_folder_and_model(tmp_path, dummy_exp, capsys):
    code, _, err = cli(capsys, tmp_path / "nope")
    assert code == 2 and err == f"stackwise-generate: error: experiment folder {tmp_path / 'nope'} does not exist\n"
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "run_config.json").write_text(art.ExperimentPaths(dummy_exp).run_config.read_text())
    code, _, err = cli(capsys, tmp_path / "exp")
    assert code == 2 and "has no fused model" in err and err.count("\n") == 1


def test_cli_subprocess_no_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "stackwise.cli.generate", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [f"stackwise-generate: error: experiment folder {tmp_path / 'nope'} does not exist"]


def test_a_padded_vocabulary_samples_only_the_tokenizers_ids(tmp_path, capsys):
    """A model with more vocabulary rows than its tokenizer uses (model=seed's 128000 over the byte
    tokenizer's 258; here 384) samples: the padded rows are never drawn, even where they score highest."""
    from stackwise.config import RunConfig
    from stackwise.generation.experiment import load_experiment_model, sample_ids

    tiny = [o for o in TINY if not o.startswith("data.")]
    overrides = [*tiny, "data=shakespeare", "data.seq_len=32", "model.vocab_size=384", f"output_root={tmp_path}"]
    run = RunConfig.from_hydra(compose_cfg([*overrides, "name=padded", "logger=none"]))
    paths = art.ExperimentPaths(run.exp_dir)
    paths.root.mkdir(parents=True)
    art.atomic_write_json(run.to_dict(), paths.run_config)
    model = Transformer(run.model)
    with torch.no_grad():  # make the padded rows the most likely tokens everywhere
        model.embed.weight[258:] = model.embed.weight[:258].abs().max() * 50
    art.save_safetensors_model(paths.fused_dir, model.state_dict(), run.model.to_dict(), {})

    em = load_experiment_model(run.exp_dir, "fused")
    _, samples = sample_ids(em, length=24, num_samples=2, temperature=1.0)
    assert int(samples.max()) < 258 and int(samples.min()) >= 0
    code, out, err = cli(capsys, run.exp_dir, "--length", "24")
    assert code == 0 and out.strip(), err
