"""The memory planner (stackwise/plan.py) and `stackwise-inspect --plan`: its counts are the real
model's, its activation formula matches what a block saves for backward (eager, on CPU), and the
CLI prints a table, JSON, or one line for a bad override."""

from __future__ import annotations

import json

import pytest
import torch

from stackwise.config import compose_run
from stackwise.model.transformer import Block, Transformer
from stackwise.model.weights import LayerWeights, first_layer
from stackwise.plan import GIB, Numerics, block_activation_bytes, format_plan, plan_run

TINY = ["model=tiny", "data.seq_len=32", "data.batch_size=4"]


def _numel(*modules) -> tuple[int, int]:
    """(every tensor a module holds: parameters and frozen buffers, trainable parameters)."""
    held = trainable = 0
    for m in modules:
        held += sum(p.numel() for p in m.parameters())
        trainable += sum(p.numel() for p in m.parameters() if p.requires_grad)
        for block in (b for b in m.modules() if isinstance(b, Block)):
            held += sum(t.numel() for t in block.frozen_tensors().values())
    return held, trainable


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # gqa, tied
        ["attention=mha", "model.tie_embeddings=false"],
        ["attention=mla", "model.mla_freeze_up=true"],
        ["attention=hybrid", "model.n_layers=3", "model.tie_embeddings=false"],
    ],
    ids=["gqa_tied", "mha_untied", "mla_frozen_up", "hybrid_untied"],
)
def test_counts_are_the_real_models(overrides, tmp_path):
    run = compose_run(TINY + overrides + [f"output_root={tmp_path}"])
    cfg, plan = run.model, plan_run(run)
    stages = {s.key: s for s in plan.stages}
    model = Transformer(cfg)
    assert (stages["e2e"].params, stages["e2e"].trainable) == _numel(model)
    assert (stages["finetune"].params, stages["finetune"].trainable) == _numel(model)
    layer1 = first_layer(cfg)
    assert (stages["embed"].params, stages["embed"].trainable) == _numel(*(m for m in layer1 if m is not None))
    # a layer stage: its block and the head; a tied stage also holds stage 1's matrix, untrained
    k_held = [_numel(model.blocks[k - 1], model.head) for k in range(2, cfg.n_layers + 1)]
    tied = cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
    assert (stages["layer"].params - tied, stages["layer"].trainable) in k_held
    # fp32 on CPU: every byte count is 4 per element
    assert stages["e2e"].memory["weights"] == 4 * stages["e2e"].params
    assert stages["e2e"].memory["gradients"] == 4 * stages["e2e"].trainable
    assert stages["e2e"].memory["optimizer"] == 8 * stages["e2e"].trainable
    # fp32 layer files (layerwise.save_dtype=auto on CPU); an untied projection is a file of its own
    proj = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    assert plan.layer_files["layer_1.pt"] == 4 * (LayerWeights.of(layer1).numel() - proj)
    assert plan.layer_files.get("layer_k.head.safetensors (the latest layer's only)", 0) == 4 * proj
    assert plan.layer_files["fused/model.safetensors"] == 4 * sum(t.numel() for t in model.state_dict().values())
    # fusion streams fused/ from the layer files; the fp32 model for the check is built on the host (CPU)
    assert plan.fusion_host["fp32 assembled model (check, fine-tune)"] == 4 * _numel(model)[0]
    assert plan.fusion_host["one shard of fused/ being written"] == plan.layer_files["fused/model.safetensors"]


def test_llama3_70b_is_planned_without_allocating(tmp_path):
    run = compose_run(["model=llama3_70b", "hardware=gpu", "data.seq_len=4096", "data.batch_size=2"])
    plan = plan_run(run)
    e2e = next(s for s in plan.stages if s.key == "e2e")
    assert 70.5e9 < e2e.params < 70.6e9  # Llama-3-70B's 70.6B, with the untied head
    stage1 = plan.stages[0]
    # the default 320 steps of stage 1 are too few for torch.compile to pay back (StepConfig.compiles)
    assert (stage1.tokens, stage1.precision, stage1.compiled) == (8192, "bf16-mixed", False)
    long = plan_run(compose_run(["model=llama3_70b", "hardware=gpu", "trainer.max_steps=500"])).stages
    assert [s.compiled for s in long if s.key in ("embed", "layer")] == [True, False]  # 1000 and 500 steps
    # bf16 layer files, the 1.05B-value untied head once, fused/ streamed through 5 GB shards on one GPU
    assert plan.layer_files["layer_k.head.safetensors (the latest layer's only)"] == 2 * 128256 * 8192
    assert plan.fusion_host["one shard of fused/ being written"] == 5 * 10**9
    assert "fp32 assembled model (check, fine-tune)" not in plan.fusion_host
    # bf16-mixed: fp32 weights, gradients and AdamW, bf16 copies for the matmuls
    assert stage1.memory["weights"] == 4 * stage1.params
    assert stage1.memory["autocast"] > 0
    # the default trainer writes checkpoints every 40 of 160+ steps: their device copy is planned
    assert stage1.memory["checkpoint"] == 3 * 4 * stage1.trainable
    assert stage1.peak > stage1.memory["weights"] + stage1.memory["optimizer"] + stage1.memory["checkpoint"]
    text = format_plan(plan)
    assert "stage 1 (embed)" in text and "layer k (2..80)" in text and "GiB" in text


def _saved_for_backward(block: Block, h: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward of block(h), its own weights excluded."""
    own = {t.untyped_storage().data_ptr() for t in [*block.parameters(), *block.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(h)
    return sum(seen.values())


@pytest.mark.parametrize("kind", ["gqa", "mha", "mla"])
def test_activation_formula_matches_what_a_block_saves(kind, tmp_path):
    """Eager fp32 on CPU. CPU's SDPA runs mla's unequal head dims through its math kernel, which also
    keeps the (B, H, T, T) scores that the GPU's memory-efficient kernel never holds: added here."""
    run = compose_run(TINY + [f"attention={kind}", f"output_root={tmp_path}"])
    block = Block(run.model, 1)
    B, T = 4, 64
    h = torch.randn(B, T, run.model.d_model, requires_grad=True)
    planned = block_activation_bytes(block, B * T, Numerics.of("32-true"), compiled=False)
    if kind == "mla":
        planned += B * run.model.n_heads * T * T * 4
    assert planned == pytest.approx(_saved_for_backward(block, h), rel=0.1)


def test_the_command_line_wins_and_shapes_follow(tmp_path):
    small = plan_run(compose_run(TINY + [f"output_root={tmp_path}"]))
    longer = plan_run(compose_run(TINY + ["data.seq_len=64", f"output_root={tmp_path}"]))
    assert longer.stages[0].tokens == 2 * small.stages[0].tokens
    assert longer.stages[0].memory["activations"] == 2 * small.stages[0].memory["activations"]
    assert longer.stages[0].memory["weights"] == small.stages[0].memory["weights"]


def test_cli_prints_a_table_and_json(capsys, tmp_path):
    from stackwise.cli.inspect import main

    main(["--plan", *TINY, f"output_root={tmp_path}"])
    out = capsys.readouterr().out
    assert "stage 1 (embed)" in out and "e2e" in out and "activation cache:" in out and "fusion host RAM" in out
    main(["--plan", "--json", *TINY, f"output_root={tmp_path}"])
    data = json.loads(capsys.readouterr().out)
    assert [s["key"] for s in data["stages"]] == ["embed", "layer", "finetune", "e2e"]
    assert data["stages"][0]["peak"] < GIB
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    "argv, name",
    [
        (["--plan", "model=nope"], "model"),
        (["--plan", "model.d_model=-3"], "model.d_model"),
        (["--json", "outputs/x"], "--json"),
        (["--plan", "--verify", "model=tiny"], "--verify"),
    ],
)
def test_cli_bad_arguments_one_line_exit_2(argv, name, capsys, monkeypatch):
    from stackwise.cli.inspect import main

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert name in err[-1] and "Traceback" not in "\n".join(err)


def test_checkpoint_interval_matches_the_pipelines():
    from stackwise.pipeline.trainers import CHECKPOINT_EVERY
    from stackwise.plan import CHECKPOINT_EVERY as PLANNED

    assert PLANNED == CHECKPOINT_EVERY
