"""Shared fixtures: compose the real configs (Hydra compose API) on tiny sizes."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from stackwise.config import CONFIG_MODULE, RunConfig, register_configs
from tests.cli_runner import CliRun

# A tiny experiment: seconds per stage on 2 CPU cores.
TINY = [
    "model=tiny",
    "data=dummy",
    "data.seq_len=32",
    "data.batch_size=16",
    "data.n_train=256",
    "data.n_val=32",
    "trainer.max_steps=12",
    "trainer.val_check_interval=6",
    "trainer.enable_progress_bar=false",
    "optim.warmup_steps=2",
    "cache.shard_size=100",
    "cache.batch_size=64",
    # every stage the same steps and no fine-tune, unless a test asks for them (the defaults are tested as such)
    "layerwise.embed_budget=1",
    "fusion.finetune_steps=0",
]


# Hydra composes each distinct override list once per session (~0.1 s a composition, hundreds of
# them): every call gets a copy of it of its own. `output_root=` (a test's tmp_path: different in
# every test) is left out of the key and set on the copy, as its override would set it.
_COMPOSED: dict[tuple[str, ...], DictConfig] = {}


def compose_cfg(overrides: list[str]) -> DictConfig:
    register_configs()
    GlobalHydra.instance().clear()
    roots = [o.split("=", 1)[1] for o in overrides if o.startswith("output_root=")]
    key = tuple(o for o in overrides if not o.startswith("output_root="))
    if key not in _COMPOSED:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            _COMPOSED[key] = compose(config_name="config", overrides=list(key))
    cfg = copy.deepcopy(_COMPOSED[key])
    if roots:
        cfg.output_root = roots[-1]
    return cfg


@pytest.fixture
def make_run(tmp_path):
    """RunConfig for a tiny experiment under tmp_path: make_run("attention=mla", name="x")."""

    def _make(*overrides: str, name: str = "exp", tiny: bool = True):
        ovr = (TINY if tiny else []) + [
            f"output_root={tmp_path}",
            f"name={name}",
            "logger=none",
            "callbacks=none",
            *overrides,
        ]
        return RunConfig.from_hydra(compose_cfg(ovr))

    return _make


def cli_env(env_extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def cli_start(*args: str, cwd: Path, env_extra: dict | None = None, timeout: int = 300) -> CliRun:
    """Start `stackwise-train ARGS` in a fresh process forked from a preloaded server (see
    tests/cli_runner.py: same code path, exit status and output, without Lightning's import each time)."""
    return CliRun(list(args), cwd, cli_env(env_extra), timeout)


def cli(
    *args: str, cwd: Path, env_extra: dict | None = None, timeout: int = 300, console_script: bool = False
) -> subprocess.CompletedProcess:
    """Run `stackwise-train ARGS` as a user would; `console_script=True` execs the installed script itself."""
    if not console_script:
        return cli_start(*args, cwd=cwd, env_extra=env_extra, timeout=timeout).wait()
    exe = shutil.which("stackwise-train")
    cmd = [exe] if exe else [sys.executable, "-m", "stackwise.cli.train"]
    return subprocess.run(
        cmd + list(args), cwd=cwd, env=cli_env(env_extra), capture_output=True, text=True, timeout=timeout
    )
