"""The depth report: report.md + depth.png from results.json, one experiment or a sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from stackwise import artifacts as art
from stackwise.cli.report import main as report_main
from stackwise.errors import StackWiseError
from stackwise.pipeline import Pipeline
from stackwise.report import (
    DEPTH_PNG,
    REPORT_MD,
    load_depth_results,
    sweep_labels,
    write_report,
    write_sweep_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]

STAGE_TOKENS = 98_304  # per layer-wise stage
FT_TOKENS = 50 * 8_192  # the fine-tune


def records(losses, finetuned=4.20, e2e=4.00, e2e_tokens=None):
    """A results.json as the pipeline writes it: per-stage tokens/seconds for layer stages, cumulative
    for fused / fine-tuned, e2e its own budget."""
    out = []
    for k, loss in enumerate(losses, 1):
        out.append(
            {
                "stage": "embed" if k == 1 else f"layer_{k}",
                "kind": "layer",
                "k": k,
                "val_loss": loss,
                "val_acc": 0.1 + 0.01 * k,
                "tokens": STAGE_TOKENS,
                "seconds": 10.0,
            }
        )
    L = len(losses)
    out.append(
        {
            "stage": "fused",
            "kind": "fusion",
            "k": L,
            "val_loss": losses[-1],
            "val_acc": 0.3,
            "tokens": STAGE_TOKENS * L,
            "seconds": 10.0 * L + 1,
        }
    )
    if finetuned is not None:
        out.append(
            {
                "stage": "finetuned",
                "kind": "finetune",
                "k": L,
                "val_loss": finetuned,
                "val_acc": 0.31,
                "tokens": STAGE_TOKENS * L + FT_TOKENS,
                "seconds": 10.0 * L + 5,
            }
        )
    if e2e is not None:
        out.append(
            {
                "stage": "e2e",
                "kind": "e2e",
                "k": L,
                "val_loss": e2e,
                "val_acc": 0.35,
                "tokens": e2e_tokens if e2e_tokens is not None else STAGE_TOKENS * L + FT_TOKENS,
                "seconds": 60.0,
            }
        )
    return out


def make_exp(root: Path, name: str, recs) -> Path:
    exp = root / name
    exp.mkdir(parents=True)
    art.atomic_write_json(recs, art.ExperimentPaths(exp).results_json)
    return exp


def table_rows(md: str) -> dict[str, list[str]]:
    """First column -> the other cells of every Markdown table body row."""
    rows = {}
    for line in md.splitlines():
        if line.startswith("| ") and not set(line) <= set("|-: "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def verdict(md: str, what: str) -> str:
    (line,) = [ln for ln in md.splitlines() if what in ln]
    return line.split(":**", 1)[1].strip()


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


# ------------------------------------------------------------------------------ one experiment
def test_single_report_lists_every_stage_with_its_numbers(tmp_path):
    exp = make_exp(tmp_path, "exp", records([5.5, 4.9, 4.5, 4.3]))
    md_path, png_path = write_report(exp)
    assert (md_path, png_path) == (exp / REPORT_MD, exp / DEPTH_PNG)
    assert_png(png_path)
    md = md_path.read_text()
    rows = table_rows(md)
    for stage in ("embed", "layer_2", "layer_3", "layer_4", "fused", "fused + fine-tuned", "end-to-end (e2e)"):
        assert stage in rows, stage
    # model | k | val loss | Δ vs k-1 | val acc | tokens | time | gap to e2e
    assert rows["embed"][:2] == ["1", "5.5000"] and rows["embed"][2] == ""
    assert rows["layer_3"][:3] == ["3", "4.5000", "-0.4000"]
    assert rows["layer_3"][4] == "295k"  # tokens summed over stages 1..3
    assert rows["layer_4"][6] == "+7.5%"  # (4.3 - 4.0) / 4.0
    assert rows["fused"][1] == "4.3000" and rows["fused"][4] == "393k"
    assert rows["fused + fine-tuned"][1] == "4.2000" and rows["fused + fine-tuned"][6] == "+5.0%"
    assert rows["end-to-end (e2e)"][1] == "4.0000" and rows["end-to-end (e2e)"][6] == ""
    assert rows["end-to-end (e2e)"][5] == "1 m 00 s"
    assert verdict(md, "Every added layer").startswith("yes")
    within = verdict(md, "within 5%")
    assert within.startswith("yes") and "equal token budgets" in within  # exactly 5.0% counts as within


def test_layer_rows_count_the_caching_passes_that_fed_them(tmp_path):
    recs = records([5.5, 4.9, 4.5])
    for k, rec in enumerate(recs[:3], 1):  # stage k trained 10 s, then cached its output in k s
        rec["cache_seconds"] = float(k)
    md_path, _ = write_report(make_exp(tmp_path, "exp", recs))
    rows = table_rows(md_path.read_text())
    # row k: training 1..k (10 s each) and the caches 1..k-1 it was fed from; layer 3's own cache is not
    assert [rows[s][5] for s in ("embed", "layer_2", "layer_3")] == ["10.0 s", "21.0 s", "33.0 s"]


def test_layer_verdict_decreasing_and_not(tmp_path):
    up = make_exp(tmp_path, "up", records([5.5, 4.9, 5.0, 4.6], finetuned=None))
    md = write_report(up)[0].read_text()
    v = verdict(md, "Every added layer")
    assert v.startswith("no") and "2→3 +0.1000 ✗" in v and "1→2 -0.6000" in v and "1→2 -0.6000 ✗" not in v
    res = load_depth_results(up)
    assert [s.lowers for s in res.steps()] == [True, False, True] and res.every_layer_lowers() is False
    # a flat step does not lower the loss either
    flat = load_depth_results(make_exp(tmp_path, "flat", records([5.0, 5.0])))
    assert flat.every_layer_lowers() is False
    down = load_depth_results(make_exp(tmp_path, "down", records([5.0, 4.0, 3.9])))
    assert down.every_layer_lowers() is True
    one = load_depth_results(make_exp(tmp_path, "one", records([5.0])))
    assert one.every_layer_lowers() is None


def test_missing_stage_and_reruns(tmp_path):
    recs = records([5.5, 4.9, 4.5])
    recs = [r for r in recs if r["stage"] != "layer_2"]  # a hole: 1 -> 3 is not a step
    res = load_depth_results(make_exp(tmp_path, "hole", recs))
    assert res.every_layer_lowers() is False
    recs = records([5.5, 4.9, 4.5])
    recs.append({**recs[1], "val_loss": 6.0})  # layer_2 rerun: the last record wins
    res = load_depth_results(make_exp(tmp_path, "rerun", recs))
    assert [r.val_loss for r in res.layers] == [5.5, 6.0, 4.5]


def test_rows_come_from_each_record_s_kind_and_k_not_its_name(tmp_path):
    recs = records([5.5, 4.9, 4.5], finetuned=None, e2e=None)
    recs[1]["stage"] = "second layer"  # a layer record under any name is still layer k
    recs.append({**recs[0], "stage": "probe", "kind": "probe"})  # a kind the report does not know: left out
    res = load_depth_results(make_exp(tmp_path, "named", recs))
    assert [(r.stage, r.k) for r in res.layers] == [("embed", 1), ("second layer", 2), ("layer_3", 3)]
    assert res.every_layer_lowers() is True and [r.stage for r in res.rows()] == [
        "embed",
        "second layer",
        "layer_3",
        "fused",
    ]


def test_within_verdict_says_when_token_budgets_differ(tmp_path):
    exp = make_exp(tmp_path, "far", records([5.5, 4.9], finetuned=None, e2e=4.0, e2e_tokens=10**6))
    within = verdict(write_report(exp)[0].read_text(), "within 5%")
    assert within.startswith("no") and "token budgets differ" in within and "+22.5%" in within


def test_partial_run_without_e2e(tmp_path):
    recs = records([5.5, 4.9], finetuned=None, e2e=None)[:2]  # embed and layer_2 only
    md_path, png_path = write_report(make_exp(tmp_path, "partial", recs))
    md = md_path.read_text()
    assert "gap to e2e" not in md.splitlines()[2] and "n/a (no e2e record" in verdict(md, "within 5%")
    assert set(table_rows(md)) == {"model", "embed", "layer_2"}
    assert_png(png_path)


def test_write_report_raises_one_line_without_results(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StackWiseError, match="no results") as e:
        write_report(tmp_path / "empty")
    assert "\n" not in str(e.value)
    make_exp(tmp_path, "zero", [])
    with pytest.raises(StackWiseError, match="no results"):
        write_report(tmp_path / "zero")
    with pytest.raises(StackWiseError, match="does not exist"):
        write_report(tmp_path / "nowhere")
    assert not (tmp_path / "empty" / REPORT_MD).exists()


# ------------------------------------------------------------------------------------ a sweep
def test_sweep_report_one_row_and_curve_per_experiment(tmp_path, capsys):
    a = make_exp(tmp_path / "outputs", "layerwise.init=identity", records([5.5, 4.9, 4.5, 4.3]))
    b = make_exp(tmp_path / "outputs", "layerwise.init=random", records([5.5, 4.9, 5.0, 4.6], finetuned=None))
    c = make_exp(tmp_path / "outputs", "no_e2e", records([5.2, 4.8], e2e=None))
    report_main([str(a), str(b), str(c), "--out", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    md = (tmp_path / "cmp" / REPORT_MD).read_text()
    assert md in out and str(tmp_path / "cmp" / DEPTH_PNG) in out
    assert_png(tmp_path / "cmp" / DEPTH_PNG)
    rows = table_rows(md)
    # experiment | L | layer-wise (k=L) | fused | fine-tuned | e2e | gap to e2e | every layer lowers | tokens
    assert rows["layerwise.init=identity"][:8] == [
        "4",
        "4.3000",
        "4.3000",
        "4.2000",
        "4.0000",
        "+5.0%",
        "yes",
        "803k / 803k",
    ]
    assert rows["layerwise.init=random"][:7] == ["4", "4.6000", "4.6000", "–", "4.0000", "+15.0%", "no"]
    assert rows["no_e2e"][4:6] == ["–", "–"]
    # a sweep's output root stands for its experiments; the report goes into it by default
    report_main([str(tmp_path / "outputs")])
    assert set(table_rows((tmp_path / "outputs" / REPORT_MD).read_text())) == set(rows)
    # the Python API
    md2, png2 = write_sweep_report([a, b], tmp_path / "cmp2")
    assert md2.is_file() and png2.read_bytes()[:8] == PNG_SIGNATURE


# --------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case", ["missing", "no_results", "corrupt", "several_without_out"])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    good = make_exp(tmp_path, "good", records([5.0, 4.0]))
    (tmp_path / "hollow").mkdir()  # a folder with neither results.json nor experiments inside
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{not json")
    args = {
        "missing": [str(tmp_path / "nope")],
        "no_results": [str(tmp_path / "hollow")],
        "corrupt": [str(tmp_path / "bad")],
        "several_without_out": [str(good), str(good)],
    }[case]
    with pytest.raises(SystemExit) as e:
        report_main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("stackwise-report: error: ") and err.count("\n") == 1, err


def test_console_script_bad_input_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("HYDRA_FULL_ERROR", None)
    p = subprocess.run(
        [sys.executable, "-m", "stackwise.cli.report", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"stackwise-report: error: experiment folder {tmp_path / 'missing'} does not exist"
    ]


# ------------------------------------------------------------------------- a real tiny run
def test_real_tiny_run_and_e2e(make_run):
    """The report of a real `stage=all` + `stage=e2e` pair, built so the verdict is known: the e2e
    baseline trains at a negligible learning rate, so it stays at its initial loss, which the
    trained layer-wise model does not exceed by 5%; with no fine-tune the best layer-wise model is
    the fused one, whose token budget e2e matches by construction."""
    overrides = ("model.n_layers=2", "trainer.max_steps=4", "fusion.finetune_steps=0")
    run = make_run(*overrides)
    Pipeline(run).execute()
    Pipeline(make_run(*overrides, "stage=e2e", "+stages.e2e.optim.lr=1e-12")).execute()
    md_path, png_path = write_report(run.exp_dir)
    assert_png(png_path)
    md = md_path.read_text()
    rows = table_rows(md)
    recs = {r["stage"]: r for r in json.loads((Path(run.exp_dir) / "results.json").read_text())}
    assert set(recs) == {"embed", "layer_2", "fused", "e2e"}
    for stage, label in (
        ("embed", "embed"),
        ("layer_2", "layer_2"),
        ("fused", "fused"),
        ("e2e", "end-to-end (e2e)"),
    ):
        assert rows[label][1] == f"{recs[stage]['val_loss']:.4f}", stage
    fused, e2e = recs["fused"]["val_loss"], recs["e2e"]["val_loss"]
    assert fused <= 1.05 * e2e  # the constructed case holds
    assert recs["e2e"]["tokens"] == recs["fused"]["tokens"] == recs["embed"]["tokens"] + recs["layer_2"]["tokens"]
    within = verdict(md, "within 5%")
    assert within.startswith(f"yes: best layer-wise model = fused {fused:.4f} vs e2e {e2e:.4f} ("), within
    assert "equal token budgets" in within, within
    lowers = recs["layer_2"]["val_loss"] < recs["embed"]["val_loss"]
    assert verdict(md, "Every added layer").startswith("yes (" if lowers else "no ("), md


def test_sweep_labels_drop_what_every_experiment_shares():
    names = [
        "+stages.embed.trainer.max_steps=320,layerwise.init=previous,model.attention=[gqa,mla]",
        "+stages.embed.trainer.max_steps=320,layerwise.init=random,model.attention=[gqa,mla]",
    ]
    labels, common = sweep_labels(names)
    assert labels == ["layerwise.init=previous", "layerwise.init=random"]
    assert common == ["+stages.embed.trainer.max_steps=320", "model.attention=[gqa,mla]"]
    labels, _ = sweep_labels(["trainer.max_steps=400,seed=1", "+stages.layer.trainer.max_steps=400,seed=1"])
    assert labels == ["max_steps=400", "layer.max_steps=400"]
    assert sweep_labels(["default", "attention=mla"]) == (["default", "attention=mla"], [])  # not all overrides
