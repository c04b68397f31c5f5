"""Experiment identity: which settings make a different experiment.

One list, `NOT_IDENTITY`, names the settings that do not change what a run learns: where and how
fast it runs, what it prints, what it is called. Every other setting is part of the experiment's
identity, and both places that need identity derive it from this list:

- the folder name (`outputs/<name>/`): the command line's overrides of identity settings, sorted
  and joined (`folder_name`, called by the `sw.experiment` resolver in stackwise/conf/config.yaml);
  a group choice counts unless the group is itself listed (`logger=none`, `callbacks=none`);
- the settings hashes recorded in every artifact (`RunConfig.hashes`): digests of the config tree
  without the listed settings (`identity_tree`).

So an override changes both the folder and a hash, or neither (tests/test_identity.py checks every
key). `trainer.precision` and `cache.dtype` change the numbers a run computes, so they are identity:
`hardware=gpu` (bf16) is another experiment than the CPU default (fp32).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser

from stackwise.errors import ConfigError

# lightning.Trainer arguments that decide where, how fast or how verbosely a stage runs, and when it
# validates or checkpoints, not what it learns
_RUNTIME_TRAINER_KEYS = (
    "accelerator",
    "devices",
    "num_nodes",
    "strategy",
    "enable_progress_bar",
    "enable_model_summary",
    "log_every_n_steps",
    "val_check_interval",
    "check_val_every_n_epoch",
    "limit_val_batches",
    "num_sanity_val_steps",
    "deterministic",
    "benchmark",
    "profiler",
    "default_root_dir",
    "enable_checkpointing",
)

# Dotted keys (with everything beneath them); `*` stands for any one key.
NOT_IDENTITY: tuple[str, ...] = (
    "stage",
    "k",
    "name",
    "output_root",
    "overwrite",
    "verify",
    "debug",
    "logger",
    "callbacks",
    "sample",
    "data.num_workers",
    "data.cache_dir",
    "cache.batch_size",
    "cache.shard_size",
    "cache.last_layer",
    "cache.pin_memory",
    "cache.prefetch_factor",
    "cache.device_prefetch",
    "cache.store",
    "cache.memory_dir",
    "cache.keep",
    "fusion.check",
    "step",  # how fast a training step runs (compile, fused kernels, loss chunks, checkpoint writes)
    "trainer._target_",  # the class every Trainer is built as (stackwise/pipeline/trainers.py), not a setting
    *(f"trainer.{key}" for key in _RUNTIME_TRAINER_KEYS),
    *(f"stages.*.trainer.{key}" for key in _RUNTIME_TRAINER_KEYS),
)
_PATTERNS = [p.split(".") for p in NOT_IDENTITY]


def is_identity(key: str) -> bool:
    """Whether setting `key` (a dotted key, or a config group) is part of the experiment's identity."""
    parts = key.split(".")
    return not any(
        len(parts) >= len(p) and all(want in ("*", got) for want, got in zip(p, parts, strict=False)) for p in _PATTERNS
    )


def identity_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`tree` without its non-identity settings (lists are values, not subtrees)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if not is_identity(dotted):
            continue
        out[key] = identity_tree(value, dotted + ".") if isinstance(value, Mapping) else value
    return out


def folder_name(name: str | None, task_overrides: Iterable[str] = ()) -> str:
    """The experiment folder: `name` if given, else the identity overrides, else "default"."""
    if name is not None:
        name = str(name)
        if not name or "/" in name or name in (".", ".."):
            raise ConfigError("name", f"must be a plain folder name, got {name!r}")
        return name
    overrides = OverridesParser.create().parse_overrides([str(o) for o in task_overrides])
    lines = sorted(o.input_line for o in overrides if is_identity(o.key_or_group))
    if not lines:
        return "default"
    folder = re.sub(r"[/\\\s]+", "_", ",".join(lines))
    if len(folder) > 120:  # keep it readable and within file-name limits
        folder = folder[:100] + "-" + hashlib.sha256(folder.encode()).hexdigest()[:12]
    return folder


def digest(obj: Any) -> str:
    """A short, stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
