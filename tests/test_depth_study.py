"""The depth study: benchmarks/depth_study.py (plan, parts, a real tiny run), its report
(stackwise/report/study.py) and benchmarks/prepare_corpus.py's HTML-to-text on a small .deb."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import re
import sys
import tarfile
from pathlib import Path

import pytest

from stackwise.cli.report import main as report_main
from stackwise.report import STUDY_MD, load_study, study_markdown, write_study_report

REPO = Path(__file__).resolve().parents[1]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


study = _module("depth_study")
corpus = _module("prepare_corpus")


# ---------------------------------------------------------------------------------------------- the plan
def _args(*argv: str):
    return study.parser().parse_args(["--root", "/tmp/unused", *argv])


def test_plan_one_chain_per_depth_budget_lever_seed_with_the_lever_last():
    args = _args(
        "--depths", "4", "8", "--budgets", "1", "4", "--seeds", "0", "1",
        "--levers", "top1=layerwise.top_layers=1 fusion.finetune_steps=7", "pl=masking=per_layer cache.views={L}",
    )  # fmt: skip
    plan = study.build_plan(args, ["data=text", "data.path=/c.txt"])
    ids = [c.id for c in plan.chains]
    assert len(ids) == 2 * 2 * 3 * 2 == len(set(ids))
    assert "L8-x4-top1-s1" in ids and "L4-x1-base-s0" in ids
    top = next(c for c in plan.chains if c.id == "L8-x4-top1-s1")
    assert "model.n_layers=8" in top.overrides and "seed=1" in top.overrides
    assert "trainer.max_steps=800" in top.overrides  # 200 steps a layer stage at budget 1
    # the lever's own value replaces the budget's (Hydra refuses one key twice)
    assert [o for o in top.overrides if o.startswith("fusion.finetune_steps=")] == ["fusion.finetune_steps=7"]
    assert "layerwise.top_layers=1" in top.overrides
    base = next(c for c in plan.chains if c.id == "L8-x4-base-s1")
    assert "fusion.finetune_steps=320" in base.overrides and not any("top_layers" in o for o in base.overrides)
    assert "cache.views=4" in next(c for c in plan.chains if c.id == "L4-x1-pl-s0").overrides


@pytest.mark.parametrize("bad", ["top1", "base=optim.lr=1", "to p=x=1"])
def test_bad_lever_is_one_line_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as e:
        study.parse_levers([bad])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--levers" in err and "\n" not in err


def test_parts_split_the_chains_once_each():
    plan = study.build_plan(_args("--seeds", "0", "1", "2"), ["data=shakespeare"])
    for c in plan.chains:
        c.lw_steps = 100 * c.L
    parts = [study.select_part(plan.chains, f"{i}/3") for i in (1, 2, 3)]
    got = sorted(c.id for p in parts for c in p)
    assert got == sorted(c.id for c in plan.chains)
    assert all(p for p in parts)
    with pytest.raises(SystemExit):
        study.select_part(plan.chains, "4/3")


def test_the_whole_part_is_a_copy_of_the_plan():
    """Two invocations on one root (the base chains, then the levers with --no-base): the second adds
    the first's chains to its plan, which must not add them to the chains it runs (a GPU run of
    2026-12-02 ran the base chains twice side by side that way)."""
    plan = study.build_plan(_args(), ["data=shakespeare"])
    mine = study.select_part(plan.chains, None)
    plan.chains = plan.chains + [plan.chains[0]]
    assert len(mine) == len(plan.chains) - 1
    mine.pop()
    assert len(plan.chains) == len(mine) + 2


# ---------------------------------------------------------------------------------------------- a real run
def test_smoke_study_runs_every_step_and_writes_the_table(tmp_path, capsys):
    """A real tiny chain (stage=all, e2e at equal tokens, eval, e2e at equal wall time, eval) in this
    process; the table holds the numbers of its eval.json files; a second run trains nothing."""
    root = tmp_path / "study"
    argv = ["--smoke", "--root", str(root), "--jobs", "0", "--depths", "2", "--steps", "2", "--finetune-steps", "1"]
    study.main(argv)
    out = capsys.readouterr().out
    assert "1 chains in the plan" in out and "1 to do" in out
    lw, wall = root / "runs" / "L2-x1-base-s0", root / "runs" / "L2-x1-base-s0-wall"
    ev = json.loads((lw / "eval.json").read_text())
    assert {m["name"] for m in ev["models"]} == {"depth_1", "depth_2", "fused", "finetuned", "e2e"}
    wall_ev = json.loads((wall / "eval.json").read_text())
    steps = json.loads((wall / "wall.json").read_text())["steps"]
    assert 1 <= steps <= 2 * 7  # --smoke caps it at 2x the equal-token steps: 2*2 + 2 + 1 = 7
    assert json.loads((wall / "run_config.json").read_text())["stages"]["e2e"]["trainer"]["max_steps"] == steps
    by_name = {m["name"]: m for m in ev["models"]}
    ft, e2e, e2e_wall = by_name["finetuned"]["bound"], by_name["e2e"]["bound"], wall_ev["models"][0]["bound"]
    unit = "bits_per_token"  # the dummy language has no bytes
    md = (root / STUDY_MD).read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 2 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == f"{ft[unit]:.4f}" and cells[5] == f"{e2e[unit]:.4f}"
    assert cells[6].rstrip(" †") == f"{100 * (ft[unit] - e2e[unit]) / e2e[unit]:+.1f} %"
    assert cells[7] == f"{100 * (ft[unit] - e2e_wall[unit]) / e2e_wall[unit]:+.1f} %"
    assert all(math.isfinite(float(re.sub(r"[^0-9.+-].*", "", c))) for c in cells[4:8])
    for png in ("study_depth.png", "study_gaps.png"):
        assert (root / png).read_bytes().startswith(b"\x89PNG")
    mtimes = {p: p.stat().st_mtime_ns for p in (lw / "results.json", wall / "results.json", lw / "eval.json")}
    study.main(argv)
    assert "0 to do (1 finished)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # the samplers on the study's models (--samplers N, here with --report-only): once per chain, in study.md
    scored = ["--report-only", "--samplers", "2", "--sampler-settings", "confidence,random_t0.8_p0.9"]
    study.main([*argv, *scored])
    rep = json.loads((lw / "samplers.json").read_text())
    assert rep["num_samples"] == 2 and set(rep["summary"]) == {"confidence", "random_t0.8_p0.9"}
    assert {r["model"] for r in rep["rows"]} == {"fused", "finetuned", "e2e"}
    md = (root / STUDY_MD).read_text()
    assert "## Samplers on the study's models" in md and re.search(rf"\|\s*\*\*{re.escape(rep['best'])}\*\*\s*\|", md)
    first = (lw / "samplers.json").stat().st_mtime_ns
    study.main([*argv, *scored])
    assert (lw / "samplers.json").stat().st_mtime_ns == first


# ---------------------------------------------------------------------------------------------- the report
def _model(name, kind, depth, bound_bits, ce, paired=None):
    return {
        "name": name,
        "kind": kind,
        "depth": depth,
        "rates": {r: {"ce": v, "acc": 0.5} for r, v in ce.items()},
        "bound": {
            "nats_per_token": bound_bits * math.log(2),
            "bits_per_token": bound_bits,
            "bits_per_byte": bound_bits,
        },
        "paired": paired,
    }


def _fake_chain(root: Path, cid: str, curve, ft, e2e, wall, paired=None, seconds=(100.0, 50.0, 100.0), stages=()):
    lw, wl = root / "runs" / cid, root / "runs" / f"{cid}-wall"
    lw.mkdir(parents=True)
    wl.mkdir(parents=True)
    ce = lambda b: {"0.15": b, "0.5": b + 1, "0.9": b + 2}  # noqa: E731
    models = [_model(f"depth_{k}", "prefix", k, b, ce(b)) for k, b in enumerate(curve, 1)]
    models += [
        _model("finetuned", "finetuned", len(curve), ft, ce(ft), paired),
        _model("e2e", "e2e", len(curve), e2e, ce(e2e)),
    ]
    (lw / "eval.json").write_text(json.dumps({"unit": "bits/byte", "models": models}))
    (wl / "eval.json").write_text(
        json.dumps({"unit": "bits/byte", "models": [_model("e2e", "e2e", 2, wall, ce(wall))]})
    )
    rec = {"val_loss": 1.0, "val_acc": 0.5, "tokens": 1000}
    (lw / "results.json").write_text(
        json.dumps(
            [*({**rec, "stage": f"layer_{k}", "kind": "layer", "k": k, "val_loss": v, "seconds": 1.0}
               for k, v in enumerate(stages, 1)),
             {**rec, "stage": "finetuned", "kind": "finetune", "seconds": seconds[0]},
             {**rec, "stage": "e2e", "kind": "e2e", "seconds": seconds[1]}]
        )
    )  # fmt: skip
    (wl / "results.json").write_text(json.dumps([{**rec, "stage": "e2e", "kind": "e2e", "seconds": seconds[2]}]))
    (wl / "wall.json").write_text(json.dumps({"steps": 40, "uncapped_steps": 40}))
    lever = cid.split("-")[2]
    return {"id": cid, "L": len(curve) or len(stages), "budget": 1.0, "lever": lever, "seed": int(cid[-1])}


def test_study_table_mean_and_std_over_seeds_noise_and_missing(tmp_path):
    chains = [
        _fake_chain(tmp_path, "L2-x1-base-s0", [3.0, 2.5], ft=2.2, e2e=2.0, wall=2.1),  # +10 %, +4.76 %
        _fake_chain(tmp_path, "L2-x1-base-s1", [3.0, 3.1], 2.4, 2.0, 2.0, seconds=(100.0, 50.0, 200.0)),  # +20 %
        _fake_chain(tmp_path, "L3-x1-base-s0", [3.0, 2.9, 2.8], 2.01, 2.0, 2.0, paired={"delta_nats_per_token": 0.01, "se": 0.02}),
    ]  # fmt: skip
    chains.append({"id": "L4-x1-base-s0", "L": 4, "budget": 1.0, "lever": "base", "seed": 0})  # not run yet
    (tmp_path / "study.json").write_text(json.dumps({"rates": [0.15, 0.5, 0.9], "chains": chains}))
    plan, results = load_study(tmp_path)
    md = study_markdown(plan, results)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
            if re.match(r"\| [234] ", line)}  # fmt: skip
    two = rows["2"]
    assert two[3] == "0,1" and two[4] == "2.3000 ± 0.1414"
    assert two[6] == "+15.0 ± 7.1 %"  # gaps +10 % and +20 %
    assert two[7] == f"+{100 * (0.1 / 2.1 + 0.2) / 2:.1f} ± 10.8 %"
    assert two[8] == "1.50 ± 0.71"  # the wall-time e2e took 1x and 2x the layer-wise seconds
    assert two[-1] == "1/2"  # seed 1's layer 2 raised the bound
    assert rows["3"][6] == "+0.5 % †" and "run these with `--seeds 0 1 2`: L3-x1-base-s0" in md
    assert rows["4"][3] == "–" and "Not finished" in md and "L4-x1-base-s0" in md


def test_every_layer_lowers_reads_the_stage_losses_when_no_bound_by_depth_is_drawn(tmp_path):
    """A top-segment run (layerwise.top_layers > 0) has no bound by depth: the column reads its stages'
    own validation losses instead, and says so (‡)."""
    chains = [
        _fake_chain(tmp_path, "L3-x1-top1-s0", [], 2.2, 2.0, 2.1, stages=[3.0, 2.9, 2.8]),
        _fake_chain(tmp_path, "L3-x1-top2-s0", [], 2.2, 2.0, 2.1, stages=[3.0, 3.1, 2.8]),
        _fake_chain(tmp_path, "L3-x1-base-s0", [3.0, 2.9, 2.95], 2.2, 2.0, 2.1, stages=[3.0, 2.9, 2.8]),
    ]
    (tmp_path / "study.json").write_text(json.dumps({"rates": [0.15, 0.5, 0.9], "chains": chains}))
    plan, results = load_study(tmp_path)
    md = study_markdown(plan, results)
    last = {line.split("|")[3].strip(): line.strip().strip("|").split("|")[-1].strip() for line in md.splitlines()
            if re.match(r"\| 3 ", line)}  # fmt: skip
    assert last == {"top1": "1/1 ‡", "top2": "0/1 ‡", "base": "0/1"}, last  # base: its bound by depth rose at k=3
    assert "‡: the bound by depth is not drawn" in md


def test_stackwise_report_writes_the_study(tmp_path, capsys):
    chains = [_fake_chain(tmp_path, "L2-x1-base-s0", [3.0, 2.5], ft=2.2, e2e=2.0, wall=2.1)]
    (tmp_path / "study.json").write_text(json.dumps({"rates": [0.15, 0.5, 0.9], "chains": chains}))
    report_main([str(tmp_path), "--out", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert "# Depth study" in out and (tmp_path / "rep" / STUDY_MD).is_file()
    assert (tmp_path / "rep" / "study_gaps.png").read_bytes().startswith(b"\x89PNG")
    md, pngs = write_study_report(tmp_path)
    assert md == tmp_path / STUDY_MD and len(pngs) == 2


def test_study_report_without_plan_is_one_line(tmp_path, capsys):
    (tmp_path / "study.json").write_text("[]")
    with pytest.raises(SystemExit) as e:
        report_main([str(tmp_path)])
    assert e.value.code == 2
    assert "not a depth study plan" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the corpus
def _deb(path: Path, files: dict[str, str]) -> None:
    """A minimal .deb: an ar archive with debian-binary and data.tar.xz."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    members = [("debian-binary", b"2.0\n"), ("data.tar.xz", buf.getvalue())]
    out = bytearray(b"!<arch>\n")
    for name, body in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(body):<10}`\n".encode()
        out += body + (b"\n" if len(body) % 2 else b"")
    path.write_bytes(bytes(out))


PAGE = """<html><head><script>var x = 1;</script></head><body>
<div class="sphinxsidebar">Navigation</div>
<div role="main" class="document"><section><h1>Title<a class="headerlink" href="#t">¶</a></h1>
<p>First   paragraph &amp; more
 text.</p><div class="highlight"><pre>code  line 1
  indented</pre></div><p>Last.</p></section></div>
<div class="footer">© someone</div></body></html>"""


def test_prepare_corpus_keeps_the_main_text_of_the_pages_it_should(tmp_path):
    root = "usr/share/doc/x/html/"
    deb = tmp_path / "x.deb"
    _deb(
        deb,
        {root + "a/page.html": PAGE, root + "translations/zh/page.html": PAGE, root + "genindex.html": PAGE,
         root + "_static/x.html": PAGE, "usr/share/doc/x/other.html": PAGE},
    )  # fmt: skip
    pkg = corpus.Package("x", "1", "0" * 64, 0, root, corpus._SPHINX_SKIP + r"|^translations/", "MIT")
    docs = corpus.documents(pkg, deb)
    assert [name for name, _ in docs] == ["x/a/page.html"]
    text = docs[0][1]
    assert text == "Title\n\nFirst paragraph & more text.\n\ncode  line 1\n  indented\n\nLast."


def test_resumed_stages_count_their_steps_before_the_kill_at_the_rate_after_it():
    from stackwise.report.study import full_seconds, layerwise_seconds

    assert full_seconds({"seconds": 30.0}, 100) == (30.0, False)
    assert full_seconds({"seconds": 30.0, "resumed_from_step": 40}, 100) == (50.0, True)  # 60 steps in 30 s
    recs = {
        "embed": {"kind": "layer", "k": 1, "seconds": 20.0, "cache_seconds": 5.0},
        "layer_2": {"kind": "layer", "k": 2, "seconds": 10.0, "resumed_from_step": 50, "cache_seconds": 5.0},
        "fused": {"kind": "fusion", "seconds": 45.0},
        "finetuned": {"kind": "finetune", "seconds": 55.0, "resumed_from_step": 5},
    }
    # layer_2 ran 50 of 100 steps in 10 s: +10 s; the fine-tune 5 of 10 steps in 10 s: +10 s
    assert layerwise_seconds(recs, {"embed": 200, "layer": 100, "finetune": 10}) == (75.0, True)
    assert layerwise_seconds({k: v for k, v in recs.items() if k != "finetuned"}, {"layer": 100}) == (55.0, True)


def test_a_run_folder_whose_files_are_gone_is_set_aside(tmp_path, capsys):
    """An --export copy (small files only) brought to another machine: its stages cannot be resumed."""
    run = tmp_path / "runs" / "L2-x1-base-s0-wall"
    (run / "e2e").mkdir(parents=True)
    (run / "results.json").write_text(json.dumps([{"stage": "e2e", "kind": "e2e", "seconds": 1.0}]))
    assert study._stale(run)
    (run / "e2e" / "config.json").write_text("{}")
    assert not study._stale(run)
    (run / "results.json").write_text(json.dumps([{"stage": "embed", "kind": "layer", "k": 1, "seconds": 1.0}]))
    assert study._stale(run)
    study._set_aside(run)
    assert not run.exists() and (tmp_path / "runs" / "L2-x1-base-s0-wall.stale-1").is_dir()
