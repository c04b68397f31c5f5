"""Every config in conf/ composes, is validated, and is found from any folder after install."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stackwise.config import RunConfig, check_command_line
from stackwise.errors import ConfigError
from stackwise.model.stats import param_counts
from tests.conftest import compose_cfg

CONF = Path(__file__).resolve().parents[1] / "stackwise" / "conf"
REPO = Path(__file__).resolve().parents[1]


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group", ["model", "attention", "masking", "data", "hardware", "trainer", "logger", "callbacks", "experiment"]
)
def test_every_group_option_composes(group, tmp_path):
    """Every option of every group, the experiment presets included, composes into a valid RunConfig."""
    assert group_options(group), group
    for option in group_options(group):
        overrides = [f"{group}={option}", f"output_root={tmp_path}"]
        if group == "data" and option == "text":
            corpus = tmp_path / "c.txt"
            corpus.write_text("hello world " * 2000)
            overrides.append(f"data.path={corpus}")
        if group == "masking" and option == "per_layer":
            overrides.append("cache.views=4")  # one view per layer of the small model
        cfg = compose_cfg(overrides)
        run = RunConfig.from_hydra(cfg)
        assert run.model.n_layers >= 1, (group, option)


def test_presets_hold_the_settings_of_the_published_figures():
    from hydra import compose, initialize_config_module

    from stackwise.config import CONFIG_MODULE, register_configs
    from stackwise.config.compose import sweep_jobs

    greedy = RunConfig.from_hydra(compose_cfg(["experiment=plain_greedy"]))
    steps = tuple(greedy.max_steps(s) for s in ("embed", "layer", "fusion", "e2e"))
    assert (greedy.layer_init, steps, greedy.cache_train_sequences()) == ("random", (200, 200, 0, 800), None)
    assert (greedy.trainer["precision"], greedy.cache.dtype) == ("bf16-mixed", "bfloat16")  # hardware=gpu
    assert RunConfig.from_hydra(compose_cfg(["experiment=plain_greedy", "hardware=cpu"])).cache.dtype == "float32"
    fp32 = RunConfig.from_hydra(compose_cfg(["experiment=levers_default_fp32"]))
    assert (fp32.trainer["precision"], fp32.cache.dtype, fp32.layer_init) == ("32-true", "float32", "previous")
    b = RunConfig.from_hydra(compose_cfg(["experiment=levers_b"]))
    assert (b.max_steps("embed"), b.max_steps("layer")) == (320, 160)
    register_configs()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        sweeps = {
            name: compose(config_name="config", overrides=[f"experiment={name}"], return_hydra_config=True)
            for name in ("levers_a", "levers_b", "levers_c", "plain_greedy")
        }
    jobs = {name: sweep_jobs([f"{k}={v}" for k, v in c.hydra.sweeper.params.items()]) for name, c in sweeps.items()}
    assert {name: len(j) for name, j in jobs.items()} == {
        "levers_a": 12,
        "levers_b": 12,
        "levers_c": 6,
        "plain_greedy": 2,
    }
    assert all(any(o in ("stage=all", "stage=e2e") for o in job) for j in jobs.values() for job in j)


def test_root_declares_stage_k_name_seed():
    cfg = compose_cfg(["stage=layer", "k=3"])  # no `+` needed
    assert cfg.stage == "layer" and cfg.k == 3 and "name" in cfg and "seed" in cfg


def test_attention_groups_set_the_model_kind():
    assert RunConfig.from_hydra(compose_cfg(["attention=mla"])).model.layer_kinds() == ["mla"] * 4
    hybrid = RunConfig.from_hydra(compose_cfg(["attention=hybrid"])).model
    assert hybrid.layer_kinds() == ["gqa", "mla", "gqa", "mla"]
    per_layer = RunConfig.from_hydra(compose_cfg(["model.attention=[gqa,mla,mla,gqa]"])).model
    assert per_layer.layer_kinds() == ["gqa", "mla", "mla", "gqa"]


def test_vocab_follows_the_tokenizer():
    run = RunConfig.from_hydra(compose_cfg(["data=shakespeare"]))
    assert (run.model.vocab_size, run.model.mask_id, run.model.pad_id) == (258, 256, 257)
    with pytest.raises(ConfigError, match="model.vocab_size"):
        RunConfig.from_hydra(compose_cfg(["data=shakespeare", "model.vocab_size=200"]))
    with pytest.raises(ConfigError, match="model.mask_id"):
        RunConfig.from_hydra(compose_cfg(["data=shakespeare", "model.mask_id=3"]))
    # a padded vocabulary (more rows than the tokenizer has ids) is allowed, as Megatron/nanoGPT do
    assert RunConfig.from_hydra(compose_cfg(["data=shakespeare", "model.vocab_size=320"])).model.vocab_size == 320


def test_seed_and_70b_param_counts_without_allocating():
    seed = RunConfig.from_hydra(compose_cfg(["model=seed"])).model
    llama = RunConfig.from_hydra(compose_cfg(["model=llama3_70b"])).model
    assert param_counts(llama)["total"] == 70_553_706_496
    # seed: 8 GQA layers (q,o: D*D; k,v: D*D/4; SwiGLU 3*D*F; 2 norms) + tied embedding + final norm
    d, f, v, L = 4096, 14336, 128000, 8
    per_layer = 2 * d * d + 2 * d * (d // 4) + 3 * d * f + 2 * d
    assert param_counts(seed)["total"] == L * per_layer + v * d + d


@pytest.mark.parametrize(
    "override,field",
    [
        ("stage=bogus", "stage"),
        ("attention=gqa model.n_kv_heads=3", "model.n_kv_heads"),
        ("model.d_model=130", "model.d_model"),
        ("masking.mask_fraction_min=0.95", "masking"),
        ("stage=layer k=9", "k"),
        ("stage=layer", "k"),
        ("model.attention=[gqa,mla]", "model.attention"),
        ("model.attention=[gqa,foo,gqa,gqa]", "model.attention"),
        ("cache.dtype=int8", "cache.dtype"),
        ("optim.lr=-1", "optim.lr"),
        ("model.dropout=1.5", "model.dropout"),
        ("seed=-3", "seed"),
        ("layerwise.embed_budget=0", "layerwise.embed_budget"),
        ("layerwise.embed_budget=abc", "layerwise.embed_budget"),
        ("+layerwise.foo=1", "layerwise.foo"),
        ("model.d_model=abc", "model.d_model"),
        ("overwrite=maybe", "overwrite"),
        ("+optim.momentum=0.9", "optim.momentum"),
        ("+stages.layer.optim.lr=abc", "stages.layer.optim.lr"),
        ("+stages.fusion.trainer.max_steps=5", "stages.fusion.trainer.max_steps"),
        ("+stages.bogus.trainer.max_steps=5", "stages.bogus"),
        ("model.foo=1", "model.foo"),
        ("attention=bogus", "attention"),
        ("attention=mha,gqa", "attention"),
        ("data=text", "data.path"),
        ("name=a/b", "name"),
    ],
)
def test_bad_values_name_the_field(override, field, tmp_path):
    """Hydra's errors while composing (wrong types, unknown keys) and ours after it: one ConfigError
    naming the value, as `stackwise-train` prints it."""
    with pytest.raises(ConfigError) as e:
        check_command_line([*override.split(), f"output_root={tmp_path}"], multirun=False)
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


def test_every_job_of_a_sweep_is_checked_before_any_runs(tmp_path):
    check_command_line(["attention=mha,gqa", f"output_root={tmp_path}"], multirun=True)
    with pytest.raises(ConfigError, match="model.n_kv_heads"):  # only the last combination is bad
        check_command_line(["model.n_kv_heads=2,3", "attention=mha,gqa", f"output_root={tmp_path}"], multirun=True)
    assert not list(tmp_path.iterdir())


def test_a_sweep_of_multi_process_jobs_stops_with_one_line(tmp_path):
    """Lightning starts DDP/FSDP ranks by rerunning the command line, `-m` included: refused up front."""
    check_command_line(["hardware=ddp", "seed=0", f"output_root={tmp_path}"], multirun=False)  # no sweep: fine
    for hardware in ("ddp", "fsdp"):
        with pytest.raises(ConfigError, match=r"trainer.strategy: .* cannot run inside a -m sweep"):
            check_command_line([f"hardware={hardware}", "seed=0,1", f"output_root={tmp_path}"], multirun=True)
    with pytest.raises(ConfigError, match="trainer.strategy"):  # a per-stage strategy counts too
        check_command_line(["+stages.e2e.trainer.strategy=ddp", "seed=0,1", f"output_root={tmp_path}"], multirun=True)
    check_command_line(["seed=0,1", f"output_root={tmp_path}"], multirun=True)


def test_default_budget_split_and_e2e_budget():
    run = RunConfig.from_hydra(compose_cfg([]))
    # the README's winning levers: stage 1 twice a layer stage, ~9% fine-tune, layer k from layer k-1
    assert (run.max_steps("embed"), run.max_steps("layer"), run.max_steps("fusion")) == (320, 160, 80)
    assert run.layer_init == "previous"
    assert run.max_steps("e2e") == run.layerwise_steps() == 320 + 3 * 160 + 80
    run = RunConfig.from_hydra(compose_cfg(["trainer.max_steps=10", "layerwise.embed_budget=1.5"]))
    assert (run.max_steps("embed"), run.max_steps("layer")) == (15, 10)
    run = RunConfig.from_hydra(compose_cfg(["+stages.embed.trainer.max_steps=7"]))  # an explicit budget wins
    assert run.max_steps("embed") == 7
    base, other = (RunConfig.from_hydra(compose_cfg(o)).hashes()["layer"] for o in ([], ["layerwise.embed_budget=1"]))
    assert base != other  # a different stage-1 budget is a different experiment


def test_cache_auto_holds_what_the_next_stage_reads():
    run = RunConfig.from_hydra(compose_cfg([]))  # 160 steps x 32 sequences, 2 views each
    assert run.cache.train_sequences == "auto" and run.cache_train_sequences() == 160 * 32 // 2
    run = RunConfig.from_hydra(compose_cfg(["cache.views=1", "trainer.accumulate_grad_batches=2"]))
    assert run.cache_train_sequences() == 160 * 32  # data.batch_size is the global batch, accumulation included
    run = RunConfig.from_hydra(compose_cfg(["masking=per_layer", "cache.views=4"]))  # a stage reads one view
    assert run.cache_train_sequences() == 160 * 32
    assert RunConfig.from_hydra(compose_cfg(["cache.train_sequences=null"])).cache_train_sequences() is None
    with pytest.raises(ConfigError, match="cache.train_sequences"):
        RunConfig.from_hydra(compose_cfg(["cache.train_sequences=some"]))


def test_config_found_from_another_folder_editable(tmp_path):
    """The installed console script composes conf/ from any working directory."""
    exe = shutil.which("stackwise-train")
    cmd = [exe] if exe else [sys.executable, "-m", "stackwise.cli.train"]
    out = subprocess.run(
        cmd + ["--cfg", "job", "attention=mla"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "attention: mla" in out.stdout and "d_model: 128" in out.stdout


def _wheel_builds_here() -> bool:
    """Whether this interpreter's setuptools builds a wheel without pip fetching one: setuptools >= 70.1
    has bdist_wheel itself; 64 (the floor pyproject.toml asks for) to 70.0 need the `wheel` package."""
    try:
        version = tuple(int(x) for x in re.findall(r"\d+", importlib.metadata.version("setuptools"))[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return version >= (70, 1) or (version >= (64, 0) and importlib.util.find_spec("wheel") is not None)


def test_plain_pip_install_finds_config(tmp_path):
    """The built wheel, installed plainly (not editable), composes the packaged config from another folder.

    It is installed with `pip install --no-deps --target DIR` and run with DIR first on PYTHONPATH by
    the interpreter running the tests, whose own environment (a venv, the user site, the system
    site-packages, PYTHONPATH) provides the dependencies: the test does not depend on how that
    interpreter was installed, as a venv of its own would (a venv sees its base interpreter's
    site-packages, not the ones of the venv or user site the tests run from).
    """
    # Build from a copy of the source: setuptools leaves build/ and *.egg-info beside what it builds.
    src = tmp_path / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", "outputs", "multirun", "build", "*.egg-info", "__pycache__", "tests", "benchmarks", ".venv", ".whl"
        ),
    )
    # Dependencies may come from PYTHONPATH too: keep it, minus the checkout (the installed copy must
    # be what is imported). pip installs only where it is told: no --user or --prefix from the environment.
    outer = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_TARGET", "PIP_PREFIX", "PIP_ROOT")}
    env["PIP_USER"] = "0"
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    # No build isolation where this interpreter can build the wheel (nothing to download); otherwise
    # pip fetches setuptools into an isolated build environment, as `pip install -e .` did at install.
    isolation = ["--no-build-isolation"] if _wheel_builds_here() else []
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            *isolation,
            "-w",
            str(wheels),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("stackwise-*.whl")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    assert (target / "stackwise" / "conf" / "attention" / "gqa.yaml").is_file(), "the configs ship in the wheel"
    env["PYTHONPATH"] = os.pathsep.join([str(target), *outer])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import stackwise, pathlib; from hydra import compose, initialize_config_module;"
        "from stackwise.config import register_configs; register_configs();"
        "initialize_config_module(config_module='stackwise.conf', version_base='1.3');"
        "cfg = compose(config_name='config', overrides=['attention=gqa']);"
        "print(pathlib.Path(stackwise.__file__).resolve()); print(cfg.model.attention, cfg.model.d_model)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    where, values = out.stdout.strip().splitlines()[-2:]
    assert Path(where).is_relative_to(target.resolve()), f"imported {where}, not the installed copy"
    assert values == "gqa 128"
    # the console script pip wrote, run as a user runs it (its shebang names this interpreter)
    script = subprocess.run(
        [str(target / "bin" / "stackwise-train"), "--cfg", "job", "attention=mla"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert script.returncode == 0, script.stderr[-2000:]
    assert "stage: all" in script.stdout and "attention: mla" in script.stdout


def test_slurm_launcher_config_composes():
    """`hydra/launcher=slurm` is Hydra's submitit SLURM launcher with the shipped defaults, and a
    ddp sweep through it is not refused (SLURM starts every rank; Lightning relaunches nothing)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_module

    from stackwise.config.compose import CONFIG_MODULE, register_configs

    register_configs()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("config", ["hydra/launcher=slurm", "hydra.launcher.nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    check_command_line(["hydra/launcher=slurm", "hardware=ddp", "seed=0,1"], multirun=True)
