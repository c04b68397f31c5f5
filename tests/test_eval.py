"""stackwise.evaluation and the stackwise-eval CLI."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stackwise import artifacts as art
from stackwise.cli.eval import main as eval_main
from stackwise.config import RunConfig, load_run
from stackwise.data.tokenizers import ByteTokenizer, train_bpe
from stackwise.data.tokens import load_token_splits
from stackwise.evaluation import (
    EvalSettings,
    WholeModel,
    bytes_per_token,
    draw_masks,
    eval_json_path,
    evaluate_experiment,
    masked_ce_per_sequence,
    paired_difference,
    score,
    stratified_counts,
)
from stackwise.model.config import ModelConfig
from stackwise.model.transformer import Transformer
from stackwise.model.weights import assemble
from stackwise.objective.loss import masked_loss
from stackwise.pipeline import Pipeline
from tests.conftest import TINY, compose_cfg

REPO = Path(__file__).resolve().parents[1]
RATES = (0.15, 0.5, 0.9)
FAST = EvalSettings(rates=RATES, bound_samples=4, batch_size=16)


# ------------------------------------------------------------------------------ the estimator
def small_model(seed: int = 1) -> Transformer:
    # a large init_std: the masked CE then depends strongly on how many positions are masked
    cfg = ModelConfig(
        vocab_size=12,
        mask_id=10,
        pad_id=11,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        init_std=0.3,
        seed=seed,
    )
    return Transformer(cfg).eval()


def exact_bound(model: Transformer, x: torch.Tensor) -> tuple[float, list[float]]:
    """sum_l f(l), every subset of every size enumerated: the any-order bound of one sequence (nats)."""
    n, mask_id, f = len(x), model.cfg.mask_id, []
    with torch.no_grad():
        for size in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), size))
            ids = x.repeat(len(subsets), 1)
            mask = torch.zeros_like(ids, dtype=torch.bool)
            for row, s in enumerate(subsets):
                mask[row, list(s)] = True
            logits = model(ids.masked_fill(mask, mask_id))
            f.append(float(F.cross_entropy(logits[mask], ids[mask], reduction="sum")) / (len(subsets) * size))
    return sum(f), f


def test_bound_estimator_is_unbiased_against_exact_enumeration():
    model = small_model()
    x = torch.tensor([3, 1, 4, 1, 5, 9])
    exact, f = exact_bound(model, x)
    assert max(f) - min(f) > 0.3  # f(l) varies with l: a wrong weighting or count law would show
    toks = x.repeat(60, 1)  # 60 copies: each draw's stratified t gives every count l = 1..6 to 10 copies
    masks = draw_masks(toks, seed=0, rates=(0.5,), bound_samples=32, mask_id=10, pad_id=11)
    assert torch.equal(masks.bound_masks.sum(2), (masks.bound_t * 6).round().long())  # exactly l masks, t = l/n
    b = score(WholeModel("m", model), toks, masks, mask_id=10, pad_id=11)["m"]["bound"]
    assert b["n_samples"] == 60 * 32 and b["samples_per_sequence"] == 32
    assert abs(b["nats_per_token"] - exact / 6) < 3 * b["se"], (b, exact / 6)
    assert b["se"] < 0.05


def test_stratified_counts_are_uniform_and_stratified():
    n = torch.tensor([6] * 60)
    counts = stratified_counts(n, samples=5, seed=0)
    assert counts.shape == (5, 60)
    for s in range(5):  # one sequence per stratum of u: each l = 1..6 exactly 10 times among the 60
        assert torch.bincount(counts[s], minlength=7)[1:].tolist() == [10] * 6
    assert not torch.equal(counts[0], counts[1])  # re-permuted per draw
    assert torch.equal(counts, stratified_counts(n, samples=5, seed=0))
    odd = stratified_counts(torch.tensor([0, 3, 1, 40]), samples=50, seed=1)  # l in 1..n (1 for an empty row)
    assert ((odd >= 1) & (odd <= torch.tensor([1, 3, 1, 40]))).all()


def test_masks_are_common_random_numbers():
    toks = torch.randint(0, 10, (20, 12), generator=torch.Generator().manual_seed(0))
    toks[2, 9:] = 11  # padding is never masked and does not count as a token
    kw = dict(seed=3, rates=RATES, bound_samples=3, mask_id=10, pad_id=11)
    a, b = draw_masks(toks, **kw), draw_masks(toks, **kw, chunk=7)
    assert torch.equal(a.rate_masks, b.rate_masks) and torch.equal(a.bound_masks, b.bound_masks)
    assert a.n_tokens[2] == 9 and not a.rate_masks[:, 2, 9:].any() and not a.bound_masks[:, 2, 9:].any()
    # one view for the fixed rates: the masks are nested
    assert (a.rate_masks[0] <= a.rate_masks[1]).all() and (a.rate_masks[1] <= a.rate_masks[2]).all()
    # numbers do not depend on the batch size
    m = small_model()
    r1 = score(WholeModel("m", m), toks, a, mask_id=10, pad_id=11, batch_size=4)["m"]
    r2 = score(WholeModel("m", m), toks, a, mask_id=10, pad_id=11, batch_size=64)["m"]
    assert r1["bound"]["nats_per_token"] == pytest.approx(r2["bound"]["nats_per_token"], rel=1e-6)
    assert r1["rates"]["0.5"]["ce"] == pytest.approx(r2["rates"]["0.5"]["ce"], rel=1e-6)


def test_per_sequence_ce_is_masked_loss():
    m = small_model()
    toks = torch.randint(0, 10, (8, 12), generator=torch.Generator().manual_seed(1))
    mask = draw_masks(toks, seed=0, rates=(0.5,), bound_samples=1, mask_id=10, pad_id=11).rate_masks[0]
    with torch.no_grad():
        h = m.run_layers(m.embed_tokens(toks.masked_fill(mask, 10)), 1, 2)
        ce, ok = masked_ce_per_sequence(h, toks, mask, m.logits)
        ref = masked_loss(h, toks, mask, torch.full((8,), 0.5), m.logits, "mean", pad_id=11)
    assert float(ce.sum()) == pytest.approx(float(ref.ce_sum), rel=1e-6)
    assert int(ok.sum()) == int(ref.n_correct)


def test_bytes_per_token(tmp_path):
    ids = np.arange(20).reshape(2, 10)
    assert bytes_per_token(ids, None, pad_id=None)[0] is None  # dummy data: bits/token
    assert bytes_per_token(ids, ByteTokenizer(), pad_id=257)[0] == 1.0
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer\n" * 20
    (tmp_path / "c.txt").write_text(text)
    tok = train_bpe([tmp_path / "c.txt"], 300, tmp_path / "tok.json")
    enc = tok.encode(text)
    rows = np.full((2, (len(enc) + 1) // 2), tok.pad_id)  # padded to two rows: padding is not text
    rows.reshape(-1)[: len(enc)] = enc
    bpt, note = bytes_per_token(rows, tok, pad_id=tok.pad_id)
    assert bpt == pytest.approx(len(text.encode()) / len(enc)) and bpt > 1.5 and "decoded" in note


# ------------------------------------------------------------------------------ a real experiment
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny dummy-data experiment: stage=all (2 layers, fused) then stage=e2e, and its evaluation."""
    root = tmp_path_factory.mktemp("eval")
    common = TINY + [f"output_root={root}", "name=exp", "logger=none", "callbacks=none"]
    for stage in ("all", "e2e"):
        Pipeline(RunConfig.from_hydra(compose_cfg(common + [f"stage={stage}"]))).execute()
    exp = root / "exp"
    return exp, evaluate_experiment(exp, FAST)


def by_name(report):
    return {m["name"]: m for m in report["models"]}


def test_lists_every_depth_prefix_fused_and_e2e(trained):
    _, report = trained
    assert [m["name"] for m in report["models"]] == ["depth_1", "depth_2", "fused", "e2e"]
    assert [m["depth"] for m in report["models"]] == [1, 2, 2, 2]
    assert report["unit"] == "bits/token" and report["bytes_per_token"] is None  # dummy data has no bytes
    for m in report["models"]:
        assert set(m["rates"]) == {"0.15", "0.5", "0.9"}
        b = m["bound"]
        assert b["n_sequences"] == 32 and b["samples_per_sequence"] == 4 and b["n_samples"] == 128
        assert math.isfinite(b["nats_per_token"]) and b["se"] > 0
        assert b["bits_per_token"] == pytest.approx(b["nats_per_token"] / math.log(2))


def test_depth_L_prefix_is_the_fused_model(trained):
    exp, report = trained
    m = by_name(report)
    for r in ("0.15", "0.5", "0.9"):
        assert m["depth_2"]["rates"][r]["ce"] == pytest.approx(m["fused"]["rates"][r]["ce"], rel=1e-6)
        assert m["depth_2"]["rates"][r]["acc"] == m["fused"]["rates"][r]["acc"]
    assert m["depth_2"]["bound"]["nats_per_token"] == pytest.approx(m["fused"]["bound"]["nats_per_token"], rel=1e-6)
    # and prefix 1 is assemble(layer_1) run to depth 1, as stage 1 reported it
    paths = art.ExperimentPaths(exp)
    run = load_run(exp)
    first = assemble(run.model, [art.load_layer_checkpoint(paths.layer_ckpt(1))[0]])
    val = torch.from_numpy(np.asarray(load_val(exp)).astype(np.int64))
    masks = draw_masks(
        val, seed=run.seed, rates=RATES, bound_samples=4, mask_id=run.model.mask_id, pad_id=run.model.pad_id
    )
    got = score(WholeModel("a", first, depth=1), val, masks, mask_id=run.model.mask_id, pad_id=run.model.pad_id)["a"]
    assert got["bound"]["nats_per_token"] == pytest.approx(m["depth_1"]["bound"]["nats_per_token"], rel=1e-6)
    assert got["rates"]["0.5"]["ce"] == pytest.approx(m["depth_1"]["rates"]["0.5"]["ce"], rel=1e-6)


def load_val(exp):
    run = load_run(exp)
    return load_token_splits(run.data, run.seed, art.ExperimentPaths(exp).tokens_dir).val


def test_bound_inequalities(trained):
    """What provably holds for any model (in expectation over the masks), per sequence of n tokens:

        n * bound = sum_{l=1..n} f(l)  >=  f(l_r) = CE@r           (every term is >= 0)
                                       >=  sum over the evaluated rates of CE@r   (distinct l_r)

    i.e. the per-token bound is >= CE@r / n: the 1/t-weighted integrand over t's grid cell of
    width 1/n. "bound >= CE@r" per token is NOT a theorem (a trained model has f(l) growing with
    l, so CE@0.9 usually exceeds the average of f): the test does not claim it.
    """
    exp, report = trained
    n = report["n_tokens"] / report["n_sequences"]
    for m in report["models"]:
        ces = [m["rates"][r]["ce"] for r in ("0.15", "0.5", "0.9")]
        per_seq = m["bound"]["nats_per_token"] * n
        assert per_seq >= sum(ces) >= max(ces), m["name"]
    # on the same draws, the 1/t weights (t <= 1) can only raise the masked CE per token
    model = Transformer(ModelConfig.from_dict(json.loads(art.ExperimentPaths(exp).fused_config.read_text())["config"]))
    state, _, _ = art.load_safetensors_model(art.ExperimentPaths(exp).fused_dir)
    model.load_state_dict(state)
    val = torch.from_numpy(np.asarray(load_val(exp)).astype(np.int64))
    cfg = model.cfg
    masks = draw_masks(val, seed=0, rates=(0.5,), bound_samples=2, mask_id=cfg.mask_id, pad_id=cfg.pad_id)
    with torch.no_grad():
        for s in range(2):
            mask = masks.bound_masks[s]
            h = model.run_layers(model.embed_tokens(val.masked_fill(mask, cfg.mask_id)), 1, cfg.n_layers)
            ce, _ = masked_ce_per_sequence(h, val, mask, model.logits)
            assert (ce / masks.bound_t[s] >= ce).all() and (masks.bound_t[s] <= 1).all()


def load_model(folder) -> Transformer:
    state, config, _ = art.load_safetensors_model(folder)
    model = Transformer(ModelConfig.from_dict(config))
    model.load_state_dict(state)
    return model


def test_bound_decreases_after_training(trained):
    exp, report = trained
    run = load_run(exp)
    cfg, paths = run.model, art.ExperimentPaths(exp)
    val = torch.from_numpy(np.asarray(load_val(exp)).astype(np.int64))
    masks = draw_masks(
        val, seed=run.seed, rates=RATES, bound_samples=4, mask_id=cfg.mask_id, pad_id=cfg.pad_id
    )  # the very masks evaluate_experiment drew
    kw = dict(mask_id=cfg.mask_id, pad_id=cfg.pad_id)
    fresh = score(WholeModel("fresh", Transformer(cfg)), val, masks, **kw)["fresh"]
    assert fresh["bound"]["nats_per_token"] == pytest.approx(math.log(cfg.vocab_size), rel=0.05)  # ~uniform
    for name, folder in (("fused", paths.fused_dir), ("e2e", paths.e2e_dir)):
        got = score(WholeModel(name, load_model(folder)), val, masks, **kw)[name]
        reported = by_name(report)[name]["bound"]
        assert (got["bound"]["nats_per_token"], got["bound"]["se"]) == pytest.approx(
            (reported["nats_per_token"], reported["se"]), rel=1e-9
        )  # deterministic: the same masks again
        # same masks for both: the paired se is the honest yardstick of the difference
        diff = paired_difference(got, fresh, masks.n_tokens)
        assert diff["delta_nats_per_token"] < -3 * diff["se"], (name, diff)
        assert got["bound"]["nats_per_token"] < fresh["bound"]["nats_per_token"]


# ------------------------------------------------------------------------------ the CLI
def run_cli(capsys, *args):
    try:
        eval_main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_the_table_and_writes_json(trained, capsys, tmp_path):
    exp, report = trained
    code, out, err = run_cli(capsys, exp, "--bound-samples", "4", "--batch-size", "16")
    assert code == 0, err
    assert out.splitlines()[0].split()[:3] == ["model", "ce@0.15", "acc@0.15"]
    for name in ("depth_1", "depth_2", "fused", "e2e"):
        assert any(line.startswith(name) for line in out.splitlines())
    assert eval_json_path(exp) == exp / "eval.json"
    written = json.loads((exp / "eval.json").read_text())
    assert written["models"] == json.loads(json.dumps(report["models"]))  # deterministic: same masks, same numbers
    code, _, err = run_cli(
        capsys,
        exp,
        "--bound-samples",
        "2",
        "--rates",
        "0.3",
        "--max-sequences",
        "8",
        "--json",
        tmp_path / "sub" / "e.json",
    )
    assert code == 0, err
    small = json.loads((tmp_path / "sub" / "e.json").read_text())
    assert small["n_sequences"] == 8 and small["rates"] == [0.3] and small["bound_samples"] == 2


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    # not a folder
    code, _out, err = run_cli(capsys, tmp_path / "nope")
    assert code == 2 and err.count("\n") == 1 and err.startswith("stackwise-eval: error: ") and "nope" in err
    # a folder that is not an experiment
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, tmp_path / "empty")
    assert code == 2 and err.count("\n") == 1 and "not a StackWise experiment" in err
    # an experiment without any model
    run = RunConfig.from_hydra(compose_cfg(TINY + [f"output_root={tmp_path}", "name=bare", "logger=none"]))
    run.exp_dir.mkdir(parents=True)
    art.atomic_write_json(run.to_dict(), art.ExperimentPaths(run.exp_dir).run_config)
    code, _, err = run_cli(capsys, run.exp_dir)
    assert code == 2 and err.count("\n") == 1 and "no model" in err
    code, _, err = run_cli(capsys, run.exp_dir, "--bound-samples", "0")
    assert code == 2 and "--bound-samples" in err


def test_cli_bad_path_as_a_user_runs_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    out = subprocess.run(
        [sys.executable, "-m", "stackwise.cli.eval", str(tmp_path / "missing")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"stackwise-eval: error: experiment folder {tmp_path / 'missing'} does not exist"
    ]
    assert "Traceback" not in out.stderr
