"""`trainer.precision`: validated before any work, every value runs `stage=all`, and every value is
part of the settings' identity (stackwise/identity.py)."""

from __future__ import annotations

import json
from typing import get_args

import pytest
import torch

from stackwise import artifacts as art
from stackwise import identity
from stackwise.config import PRECISION_WEIGHTS, load_run
from stackwise.errors import ConfigError, StackWiseError
from stackwise.model.transformer import Block, Transformer
from stackwise.objective.loss import masked_loss
from stackwise.pipeline import Pipeline, Stage
from stackwise.pipeline.graph import check_fused
from tests.conftest import TINY, cli

FAST = TINY + ["callbacks=none", "logger=none", "trainer.max_steps=6", "trainer.val_check_interval=3"]


def error_line(out) -> str:
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("stackwise-train: error:"), out.stderr[-3000:]
    return last


# ---------------------------------------------------------------------------- validation
def test_allowed_values_are_lightnings():
    """Every value Lightning's Trainer takes (ints and aliases too) but transformer-engine*, which
    swaps in Transformer Engine layers: the model has none."""
    from lightning.fabric.plugins.precision import precision as lp

    lightning = set(get_args(lp._PRECISION_INPUT_STR) + get_args(lp._PRECISION_INPUT_INT))
    lightning |= set(get_args(lp._PRECISION_INPUT_STR_ALIAS))
    ours = set(PRECISION_WEIGHTS) - {None}
    assert ours == {v for v in lightning if not str(v).startswith("transformer-engine")}


@pytest.mark.parametrize(
    "override,field",
    [
        ("trainer.precision=bf17", "trainer.precision"),
        ("trainer.precision=32.0", "trainer.precision"),
        ("trainer.precision=true", "trainer.precision"),
        ("trainer.precision=transformer-engine", "trainer.precision"),
        ("+stages.layer.trainer.precision=fp8", "stages.layer.trainer.precision"),
    ],
)
def test_unknown_precision_stops_before_any_work(make_run, override, field):
    with pytest.raises(ConfigError) as e:
        make_run(override)
    msg = str(e.value)
    assert msg.startswith(field) and "allowed: 32-true, 32, " in msg and "bf16-true" in msg and "\n" not in msg


def test_unknown_precision_through_the_cli(tmp_path):
    line = error_line(cli(*FAST, "trainer.precision=bf17", "name=x", cwd=tmp_path, timeout=120))
    assert (
        "trainer.precision: unknown precision 'bf17'; allowed: 32-true, 32, bf16-mixed, bf16, 16-mixed, 16, bf16-true, 16-true, 64-true, 64"
        in line
    )
    assert not (tmp_path / "outputs" / "x" / "layers").exists()


def test_fp16_weights_need_an_eps_fp16_can_hold(make_run):
    with pytest.raises(ConfigError, match=r"^optim\.eps: is 1e-08, too small for trainer\.precision=16-true"):
        make_run("trainer.precision=16-true")
    with pytest.raises(ConfigError, match=r"^stages\.fusion\.optim\.eps: is 1e-07"):
        make_run("+stages.fusion.trainer.precision=16-true", "+stages.fusion.optim.eps=1e-7")
    make_run("trainer.precision=16-true", "optim.eps=1e-4")
    make_run("trainer.precision=16-mixed")  # fp32 weights: any eps


# ---------------------------------------------------------------------------- identity
def test_every_precision_enters_the_hashes(make_run):
    """Autocast changes the numbers too: every value is another identity (stackwise/identity.py)."""
    fp32 = make_run().hashes()
    for other in ("bf16-mixed", "16-mixed", "bf16-true", "64-true"):
        h = make_run(f"trainer.precision={other}").hashes()
        assert h["layer"] != fp32["layer"] and h["fusion"] != fp32["fusion"] and h["e2e"] != fp32["e2e"], other
    assert make_run("trainer.precision=16-true", "optim.eps=1e-4").hashes()["layer"] != fp32["layer"]
    per_stage = make_run("+stages.layer.trainer.precision=bf16-true").hashes()
    assert per_stage["layer"] != fp32["layer"] and per_stage["e2e"] == fp32["e2e"]


def test_folder_name_keeps_every_precision():
    assert identity.folder_name(None, ["trainer.precision=bf16-mixed"]) == "trainer.precision=bf16-mixed"
    assert identity.folder_name(None, ["trainer.precision=bf16-true"]) == "trainer.precision=bf16-true"
    stage = "+stages.layer.trainer.precision=64"
    assert identity.folder_name(None, [stage, "attention=mla"]) == f"{stage},attention=mla"


def test_folder_names_from_the_command_line(tmp_path):
    """The folder Hydra makes for the run: a missing layer stops the run after Hydra made it, at no
    training cost."""
    names = {}
    for precision in (None, "bf16-mixed", "bf16-true"):
        cwd = tmp_path / str(precision)
        cwd.mkdir()
        extra = [f"trainer.precision={precision}"] if precision else []
        out = cli("data=dummy", "stage=layer", "k=2", *extra, cwd=cwd, timeout=120)
        assert "layer_1.pt" in error_line(out)
        (names[precision],) = [d.name for d in (cwd / "outputs").iterdir()]
    assert names[None] == "data=dummy"
    assert names["bf16-mixed"] == "data=dummy,trainer.precision=bf16-mixed"
    assert names["bf16-true"] == "data=dummy,trainer.precision=bf16-true"


def test_another_precision_never_takes_fp32_artifacts(tmp_path):
    """One experiment folder: stage 1 in fp32, then bf16-true or bf16-mixed must stop (other settings)."""
    args = [*FAST, "stage=embed", "name=same"]
    assert cli(*args, cwd=tmp_path, timeout=300).returncode == 0
    for precision in ("bf16-true", "bf16-mixed"):
        line = error_line(cli(*args, f"trainer.precision={precision}", cwd=tmp_path, timeout=300))
        assert "layer_1.pt was made by other settings" in line, precision


def test_fusion_check_tolerance_follows_every_stages_precision(make_run):
    def passes(*overrides: str, rel: float) -> bool:
        try:
            check_fused(make_run(*overrides), 1.0 + rel, 1.0)
        except StackWiseError:
            return False
        return True

    for exact in ((), ("trainer.precision=32",), ("trainer.precision=64-true",)):
        assert passes(*exact, rel=5e-6) and not passes(*exact, rel=5e-5), exact
    for half in (
        ("trainer.precision=bf16-true",),
        ("trainer.precision=bf16-mixed",),
        ("+stages.layer.trainer.precision=bf16-true",),
        ("cache.dtype=bfloat16",),
    ):
        assert passes(*half, rel=1e-2) and not passes(*half, rel=3e-2), half


# ---------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "bf16-true"])
def test_stage_all_end_to_end(tmp_path, precision):
    """stage=all with a fine-tune in each precision on CPU; the fusion check passes in the precision
    the stages ran in, and every frozen-weight checksum is the canonical fp32 one."""
    out = cli(*FAST, f"trainer.precision={precision}", "name=p", "fusion.finetune_steps=2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fusion check: fused val loss" in out.stdout + out.stderr
    exp = tmp_path / "outputs" / "p"
    records = json.loads((exp / "results.json").read_text())
    assert [r["stage"] for r in records] == ["embed", "layer_2", "fused", "finetuned"]
    run = load_run(exp)
    # layerwise.save_dtype=auto: a stage trained under a bf16 precision saves its layer in bf16
    dtype = torch.float32 if precision == "32" else torch.bfloat16
    for k in (1, 2):
        weights, _ = art.load_layer_checkpoint(exp / "layers" / f"layer_{k}.pt")
        assert {t.dtype for sd in weights.sections().values() for t in sd.values()} == {dtype}
        assert weights.frozen_sha256 == Block(run.model, k).frozen_up_checksum()  # fp32 draw, whatever ran
    if precision == "bf16-true":
        check_bf16_loss_is_summed_in_fp32(run, exp, records[2]["val_loss"])


def check_bf16_loss_is_summed_in_fp32(run, exp, recorded: float) -> None:
    """The fused record's loss, recomputed by hand: bf16 model, fp32 cross-entropy, fp64 sums. A
    bf16-true plugin casts the metric states too; summed in bf16 the loss kept ~3 digits."""
    state, _, _ = art.load_safetensors_model(exp / "fused")
    model = Transformer(run.model)
    model.load_state_dict(state)
    model.to(torch.bfloat16).eval()
    ce, n = 0.0, 0
    with torch.no_grad():
        for batch in Pipeline(run).inputs.tokens(Stage.e2e(run.model.n_layers), 1).val_dataloader():
            h = model.run_layers(model.embed_tokens(batch["ids"]), 1, run.model.n_layers)
            o = masked_loss(h, batch["targets"], batch["mask"], batch["t"], model.logits, pad_id=run.model.pad_id)
            ce, n = ce + float(o.ce_sum), n + int(o.n_masked)
    assert abs(ce / n - recorded) <= 1e-5 * recorded, (ce / n, recorded)
