"""Model presets carry the optimizer settings their size needs; the command line still wins."""

from __future__ import annotations

import pytest

from stackwise.config import RunConfig
from stackwise.config.nodes import FusionConfig, OptimConfig
from tests.conftest import compose_cfg


def _run(*overrides: str) -> RunConfig:
    return RunConfig.from_hydra(compose_cfg(list(overrides)))


def test_llama3_70b_preset_sets_its_learning_rate():
    run = _run("model=llama3_70b")
    assert (run.model.d_model, run.model.n_layers, run.model.vocab_size) == (8192, 80, 128256)
    assert (run.optim.lr, run.optim.warmup_steps, run.fusion.lr) == (4.7e-5, 20, 1.6e-5)
    assert run.optim_for("embed").lr == run.optim_for("layer").lr == run.optim_for("e2e").lr == 4.7e-5
    assert run.optim_for("fusion").lr == 1.6e-5
    # what the preset does not set stays the default
    assert (run.optim.betas, run.optim.weight_decay) == (OptimConfig().betas, OptimConfig().weight_decay)


def test_the_command_line_wins_over_the_preset():
    run = _run("model=llama3_70b", "optim.lr=1e-4", "optim.warmup_steps=5", "fusion.lr=2e-5")
    assert (run.optim.lr, run.optim.warmup_steps, run.fusion.lr) == (1e-4, 5, 2e-5)
    # in either order: Hydra applies command-line values after the defaults list
    assert _run("optim.lr=1e-4", "model=llama3_70b").optim.lr == 1e-4
    staged = _run("model=llama3_70b", "+stages.embed.optim.lr=7e-5")
    assert (staged.optim_for("embed").lr, staged.optim_for("layer").lr) == (7e-5, 4.7e-5)


@pytest.mark.parametrize("model", ["small", "tiny", "seed"])
def test_other_presets_keep_the_defaults(model):
    run = _run(f"model={model}")
    assert run.optim == OptimConfig() and run.fusion == FusionConfig()
