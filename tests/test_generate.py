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
    SCHEDULES,
    STRATEGIES,
    GenerationError,
    build_ids,
    decode,
    generate,
    linear_counts,
    nucleus,
    reveal_counts,
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


def test_cosine_schedule():
    # revealed after step s of 4: floor(10 (1 - cos(pi s / 8))) = floor(0.76), floor(2.93), floor(6.17), 10
    assert reveal_counts(10, 4, "cosine") == [0, 2, 4, 4]
    assert reveal_counts(10, 4, "linear") == linear_counts(10, 4)
    for n in range(20):
        for steps in range(1, 12):
            counts = reveal_counts(n, steps, "cosine")
            assert len(counts) == steps and sum(counts) == n and min(counts) >= 0
            # cosine reveals no more than linear at every step: few first, many at the end
            done = [sum(counts[: s + 1]) for s in range(steps)]
            assert all(d <= n * (s + 1) // steps for s, d in enumerate(done))


def test_nucleus_by_hand():
    p = torch.tensor([[0.05, 0.5, 0.15, 0.3]])

    def kept(top_p: float, probs: torch.Tensor = p) -> list[bool]:
        out = nucleus(probs, top_p)
        assert torch.equal(out, probs * (out > 0))  # the kept tokens keep their probability
        return (out > 0)[0].tolist()

    # sorted 0.5, 0.3, 0.15, 0.05; the mass before each: 0, 0.5, 0.8, 0.95 -> kept while it is below p
    assert kept(0.7) == [False, True, False, True]
    assert kept(0.5) == [False, True, False, False]
    assert kept(0.81) == [False, True, True, True]
    assert kept(1.0) == [True] * 4
    assert kept(0.3, torch.tensor([[0.25] * 4])) == [True, True, False, False]  # ties: vocabulary order


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"strategy": "random"},
        {"strategy": "margin"},
        {"strategy": "entropy"},
        {"strategy": "confidence"},
        {"schedule": "cosine", "steps": 4},
        {"schedule": "cosine", "block_length": 5, "steps": 9},
        {"top_p": 0.5},
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


@pytest.mark.parametrize("strategy", ["confidence", "margin", "entropy"])
def test_greedy_ignores_the_seed(model, strategy):
    ids = start()
    kw = {"strategy": strategy}
    assert torch.equal(
        run(model, ids, temperature=0.0, generator=g(1), **kw), run(model, ids, temperature=0.0, generator=g(2), **kw)
    )
    greedy = run(model, ids, temperature=0.0, **kw)
    assert torch.equal(greedy, run(model, ids, top_k=1, generator=g(5), **kw))
    # a nucleus smaller than the most likely token's mass holds that token alone: greedy again
    assert torch.equal(greedy, run(model, ids, top_p=1e-6, generator=g(5), **kw))
    assert not torch.equal(greedy, run(model, ids, top_p=0.9, generator=g(5), **kw))


def test_top_p_one_is_no_limit_and_a_nucleus_changes_the_draws(model):
    ids = start(n=4, length=40)
    free = run(model, ids, top_p=None, generator=g(3))
    assert torch.equal(free, run(model, ids, top_p=1.0, generator=g(3)))
    assert not torch.equal(free, run(model, ids, top_p=0.3, generator=g(3)))


def test_the_strategies_reveal_in_other_orders(model):
    ids = start(prompt="", length=12)
    orders = {}
    for strategy in STRATEGIES:
        seen: list[torch.Tensor] = []
        run(model, ids, steps=12, strategy=strategy, callback=lambda step, x, seen=seen: seen.append(x[0].clone()))
        order = [int(((a == MASK) & (b != MASK)).nonzero()) for a, b in zip([ids[0]] + seen[:-1], seen, strict=True)]
        orders[strategy] = order
    assert len({tuple(o) for o in orders.values()}) == len(STRATEGIES), orders


def test_one_step_per_mask_reveals_one_each(model):
    ids = start(length=20)
    n = int((ids == MASK).sum())
    left = []
    run(model, ids, steps=n, schedule="linear", callback=lambda step, x: left.append(int((x == MASK).sum())))
    assert left == list(range(n - 1, -1, -1))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("schedule, left", [("linear", [8, 5, 3, 0]), ("cosine", [10, 8, 4, 0])])
def test_number_revealed_per_step_follows_the_schedule(model, strategy, schedule, left):
    ids = start(prompt="", length=10)
    seen = []
    kw = {"strategy": strategy, "schedule": schedule}
    run(model, ids, steps=4, **kw, callback=lambda step, x: seen.append(int((x == MASK).sum())))
    assert seen == left


def first_probs(model, ids):
    """(T, V): the model's distribution at each position of all-[MASK] row 0, over the allowed tokens."""
    logits = model(ids)
    logits[..., [MASK, PAD]] = float("-inf")  # never sampled: the probability is over the allowed tokens
    return logits.softmax(-1)[0]


def first_revealed(model, ids, strategy):
    seen = []
    out = run(model, ids, steps=12, temperature=0.0, strategy=strategy, callback=lambda step, x: seen.append(x.clone()))
    pos = (seen[0][0] != MASK).nonzero().flatten().tolist()
    assert len(pos) == 1
    return pos[0], out


def test_confidence_reveals_the_most_probable_first(model):
    ids = start(prompt="", length=12)
    first, out = first_revealed(model, ids, "confidence")
    # step 1 fills the position whose greedy token the model is surest of, given all masks
    probs = first_probs(model, ids)
    assert first == int(probs.max(-1).values.argmax())
    assert int(out[0, first]) == int(probs[first].argmax())


class FixedLogits(torch.nn.Module):
    """A stand-in model: the same logits (T, V) for every input."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(probs.log())

    def forward(self, ids, pad_mask=None):
        return self.logits.expand(ids.shape[0], -1, -1)


@pytest.mark.parametrize("strategy, first", [("confidence", 0), ("margin", 1), ("entropy", 2), ("random", 3)])
def test_each_strategy_reveals_first_what_its_measure_ranks_first(strategy, first):
    # tokens 0..3, [MASK] = 4; by hand (p(top 1), p(top 1) - p(top 2), entropy in nats):
    probs = torch.tensor(
        [
            [0.72, 0.14, 0.14, 0.0, 0.0],  # 0.72 (most confident), 0.58, 0.787
            [0.70, 0.10, 0.10, 0.10, 0.0],  # 0.70, 0.60 (largest margin), 0.940
            [0.60, 0.40, 0.0, 0.0, 0.0],  # 0.60, 0.20, 0.673 (lowest entropy)
            [0.25, 0.25, 0.25, 0.25, 0.0],  # 0.25, 0.00, 1.386 (last by every measure)
        ]
    )
    seen = []
    ids = torch.full((1, 4), 4)
    kw = {"steps": 4, "mask_id": 4, "temperature": 0.0, "strategy": strategy}
    # random: a seed whose uniform draws rank position 3 first (greedy draws nothing before them)
    gen = g(9)
    assert int(torch.rand(4, generator=g(9)).argmax()) == 3
    out = generate(FixedLogits(probs), ids, generator=gen, callback=lambda step, x: seen.append(x.clone()), **kw)
    assert (seen[0][0] != 4).nonzero().flatten().tolist() == [first]
    assert out[0].tolist() == [0, 0, 0, 0]  # greedy: each position's most likely token


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
        ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\]"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": True}, "top_p"),
        ({"schedule": "exponential"}, "unknown schedule 'exponential'; allowed: linear, cosine"),
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
    args = [text_exp, "--length", "24", "--steps", "6", "--top-p", "0.8", "--show-steps"]
    for strategy in STRATEGIES:
        for schedule in SCHEDULES:
            code, out, err = cli(capsys, *args, "--strategy", strategy, "--schedule", schedule)
            assert code == 0, err
            first = err.splitlines()[0]
            # the first of 6 steps over 24 masks reveals floor(24 (1 - cos(pi / 12))) = 0 (cosine) or 4 (linear)
            assert (first == "[step 1] " + "_" * 24) == (schedule == "cosine"), err


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
        (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
        (["--top-p", "1.2"], "--top-p must be in (0, 1]"),
        (["--schedule", "exp"], "--schedule: unknown schedule 'exp'; allowed: linear, cosine"),
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
