"""Hydra glue: the schema in Hydra's ConfigStore, the resolvers, and composing a command line
up front so that any bad value, of any job of a sweep, is one line before anything runs."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from stackwise import identity
from stackwise.config.run import RunConfig, check_output_dir
from stackwise.errors import ConfigError
from stackwise.structured import as_config_error, message_of

CONFIG_MODULE = "stackwise.conf"  # conf/ ships inside the package: found from any working directory
SCHEMA = "stackwise_schema"  # RunConfig's name in the ConfigStore: the first entry of conf/config.yaml's defaults


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore and register the resolvers of conf/. Every entry point
    calls it before composing (the ConfigStore is per process)."""
    ConfigStore.instance().store(name=SCHEMA, node=RunConfig)
    if not OmegaConf.has_resolver("sw.experiment"):
        # ${sw.experiment:${name},${hydra:overrides.task}}: the experiment folder (stackwise/identity.py)
        OmegaConf.register_new_resolver(
            "sw.experiment", lambda name, overrides=(): identity.folder_name(name, overrides or ())
        )
    if not OmegaConf.has_resolver("sw.alternate"):
        # sw.alternate:gqa,mla,4 -> [gqa, mla, gqa, mla]
        OmegaConf.register_new_resolver("sw.alternate", lambda a, b, n: [a if i % 2 == 0 else b for i in range(int(n))])


def check_command_line(
    overrides: Sequence[str], multirun: bool, config_name: str = "config", validate: bool = True
) -> None:
    """Compose and validate every job the command line makes (with `-m`, each combination of the
    sweep's values, an experiment preset's `hydra.sweeper.params` included) and check that its output
    folder can be created (`validate=False`: compose only). Raises ConfigError, one line naming the
    bad value: Hydra's own errors (an unknown key or group option, a wrong type) included."""
    try:
        register_configs()
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            jobs = sweep_jobs(overrides) if multirun else [list(overrides)]
            first = jobs[0]
            params = _check_job(first, config_name, validate, multirun).sweeper.get("params")
            if multirun and params:  # the sweeper takes them first; the command line's win
                jobs = sweep_jobs([f"{key}={value}" for key, value in params.items()] + list(overrides))
            for job in jobs:
                if job != first:
                    _check_job(job, config_name, validate, multirun)
    except (HydraException, OmegaConfBaseException) as e:
        raise user_error(e) from None


def compose_run(overrides: Sequence[str], config_name: str = "config") -> RunConfig:
    """The validated RunConfig that `stackwise-train OVERRIDES` would run, without running it (for
    tools that read a config: `stackwise-inspect --plan`). Raises ConfigError, one line."""
    try:
        register_configs()
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise user_error(e) from None
    return RunConfig.from_hydra(cfg, list(overrides))


def _check_job(overrides: list[str], config_name: str, validate: bool, multirun: bool = False) -> DictConfig:
    """Compose and validate one job; its `hydra` node."""
    cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    hydra_node = cfg.hydra
    if not validate:
        return hydra_node
    with open_dict(cfg):
        del cfg["hydra"]  # as the job will see it
    run = RunConfig.from_hydra(cfg, list(hydra_node.overrides.task))
    check_output_dir(Path(run.output_root).expanduser(), "output_root")
    if multirun:
        check_sweepable(run, str(hydra_node.launcher.get("_target_", BASIC_LAUNCHER)))
    return hydra_node


# strategies Lightning launches by running the script again in every rank
_RELAUNCHED = ("ddp", "fsdp", "deepspeed")
# the launcher that runs a sweep's jobs one after another in this process (Hydra's default)
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def _relaunched(strategy: Any) -> str | None:
    """The strategy's name when Lightning starts its ranks by rerunning the command line, else None."""
    if isinstance(strategy, Mapping):  # an instantiated one: hardware=fsdp's (stackwise/stages/sharding.py)
        target = str(strategy.get("_target_", ""))
        return "fsdp" if target.endswith("sharding.strategy") else None
    name = str(strategy)
    return name if name.startswith(_RELAUNCHED) else None


def check_sweepable(run: RunConfig, launcher: str = BASIC_LAUNCHER) -> None:
    """A `-m` sweep run by Hydra's basic launcher cannot run multi-process jobs: Lightning starts
    ranks > 0 by running the same command line again, `-m` and all, so every rank would run the
    whole sweep. One line instead. A cluster launcher (hydra/launcher=slurm) starts every rank of a
    job itself, and Lightning then launches nothing: that sweep runs."""
    if launcher != BASIC_LAUNCHER:
        return
    for budget in ("embed", "layer", "fusion", "e2e"):
        strategy = _relaunched(run.trainer_kwargs(budget).get("strategy", "auto"))
        if strategy:
            raise ConfigError(
                "trainer.strategy",
                f"{strategy} cannot run inside a -m sweep (Lightning would rerun the whole sweep in every "
                f"rank); run one command per combination, e.g. `for s in 0 1 2; do stackwise-train "
                f"hardware=ddp seed=$s; done`, or sweep on a cluster with hydra/launcher=slurm",
            )


def sweep_jobs(overrides: Sequence[str]) -> list[list[str]]:
    """The override lists of a `-m` run's jobs, as Hydra's basic sweeper makes them: every
    combination of the comma-separated values (`range(...)`, `choice(...)` too); a later override
    of the same key replaces an earlier one."""
    choices: dict[str, list[str]] = {}
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.get_key_element()
        if o.is_sweep_override() and o.is_discrete_sweep():
            choices[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:  # one value (an interval sweep is left to the sweeper plugin that takes it)
            choices[key] = [o.input_line]
    return [list(combination) for combination in itertools.product(*choices.values())]


def user_error(e: Exception) -> ConfigError:
    """A Hydra or OmegaConf error raised while composing, as one ConfigError line `<key>: <message>`,
    keeping Hydra's own words (they say what is allowed)."""
    cause = e.__cause__
    if isinstance(e, OmegaConfBaseException):
        return as_config_error(e, "")
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        message = _one_line(str(e))
        detail = message_of(as_config_error(cause, ""))
        if message.startswith("Error merging override"):  # Hydra's wrapper adds nothing to the cause
            message = detail
        elif "not in struct" not in detail:  # a schema node: Hydra's advice to add the key with + is wrong
            message = f"{_one_line(str(e).splitlines()[0])} ({detail})"
        else:
            message = f"{message} ({detail})"
        return ConfigError(str(cause.full_key), message)
    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        key = e.missing_cfg_file.rsplit("/", 1)[0].replace("/", ".")
    elif isinstance(e, OverrideParseException):
        key = e.override.split("=", 1)[0].lstrip("+~")
    else:
        found = re.search(r"'([+~]*)([\w.\[\]/-]+?)[=']", str(e))
        key = found.group(2) if found else "overrides"
    return ConfigError(key, _one_line(str(e).split("\nConfig search path")[0]))


def _one_line(text: str) -> str:
    return " ".join(text.split())
