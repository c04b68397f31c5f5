"""The typed run config: Hydra's schema (`RunConfig` and its nodes), its validation, and the
glue that registers it with Hydra. See stackwise/config/run.py."""

from stackwise.config.compose import CONFIG_MODULE, check_command_line, compose_run, register_configs
from stackwise.config.nodes import (
    CACHE_DTYPES,
    FULL_PRECISION,
    LAYER_INITS,
    PRECISION_WEIGHTS,
    STAGE_KEYS,
    CacheConfig,
    FusionConfig,
    LayerwiseConfig,
    OptimConfig,
    SampleConfig,
    StageOverrides,
    StagesConfig,
    StepConfig,
    precision_weights,
)
from stackwise.config.run import STAGES, RunConfig, check_output_dir, load_run

__all__ = [
    "CACHE_DTYPES",
    "CONFIG_MODULE",
    "FULL_PRECISION",
    "LAYER_INITS",
    "PRECISION_WEIGHTS",
    "STAGES",
    "STAGE_KEYS",
    "CacheConfig",
    "FusionConfig",
    "LayerwiseConfig",
    "OptimConfig",
    "RunConfig",
    "SampleConfig",
    "StageOverrides",
    "StagesConfig",
    "StepConfig",
    "check_command_line",
    "check_output_dir",
    "compose_run",
    "load_run",
    "precision_weights",
    "register_configs",
]
