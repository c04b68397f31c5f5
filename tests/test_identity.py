"""Experiment identity (stackwise/identity.py): one definition for the folder name and the hashes.

For every leaf key of the default composed config, an override to another valid value changes both
the experiment folder's name and at least one settings hash, or neither of them.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from stackwise import identity
from stackwise.config import RunConfig
from stackwise.errors import ConfigError
from tests.conftest import compose_cfg

# keys whose generic new value (see new_value) is not valid: a valid other value
VALID_OTHER = {
    "stage": "e2e",
    "k": 2,
    "model.attention": "mha",
    "model.n_heads": 8,
    "model.n_kv_heads": 1,
    "model.vocab_size": 320,
    "masking.schedule": "fixed",
    "masking.weighting": "elbo",
    "masking.rates": [0.2, 0.4, 0.6, 0.8],
    "data.name": "dummy",
    "optim.betas": [0.8, 0.9],
    "layerwise.init": "random",
    "layerwise.save_dtype": "bfloat16",
    "masking.per_layer_order": "descending",
    "fusion.mask_fraction_min": 0.1,
    "fusion.mask_fraction_max": 0.5,
    "cache.dtype": "bfloat16",
    "cache.train_sequences": 100,
    "cache.store": "memory",
    "cache.shard_size": 100,
    "cache.keep": "last",
    "trainer.max_epochs": 5,
    "trainer.precision": "64-true",
    "step.compile": True,
    "step.fused_adamw": True,
    "step.loss_chunk": 512,
    "step.async_checkpoints": True,
    "step.checkpoint_minutes": 5,
    "sample.strategy": "margin",
    "sample.schedule": "cosine",
    "sample.top_p": 0.5,
}
# keys without another valid value
NO_OTHER = {
    "name": "it is the folder name itself",
    "model.mask_id": "only the tokenizer's id is valid, and the composed config already takes it",
    "model.pad_id": "only the tokenizer's id is valid, and the composed config already takes it",
    "data.tokenizer.kind": "the other kind, hf, needs a tokenizer file as well",
}
# keys the default config does not hold (stages.<name>.trainer / .optim start empty): added with `+`
ADDED = {
    **{f"stages.{s}.trainer.max_steps": 7 for s in ("embed", "layer", "e2e")},
    **{f"stages.{s}.trainer.gradient_clip_val": 0.5 for s in ("embed", "layer", "fusion", "e2e")},
    **{f"stages.{s}.trainer.val_check_interval": 3 for s in ("embed", "layer", "fusion", "e2e")},
    **{f"stages.{s}.optim.lr": 0.01 for s in ("embed", "layer", "fusion", "e2e")},
}


def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf (a list is a value; an empty mapping has no leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(leaves(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
    return out


def new_value(key: str, value: Any) -> Any:
    if key in VALID_OTHER:
        return VALID_OTHER[key]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * 2 if value > 0 else value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.1
    if isinstance(value, str):
        return value + "x"
    if value is None:
        return 4 if key.startswith(("sample.", "trainer.")) else "/tmp/elsewhere"
    raise AssertionError(f"no new value for {key}={value!r}")


def override(key: str, value: Any, added: bool) -> str:
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    text = text.replace(" ", "").replace("'", "")
    return f"{'+' if added else ''}{key}={text}"


@pytest.fixture(scope="module")
def base():
    cfg = compose_cfg([])
    return cfg, RunConfig.from_hydra(cfg).hashes()


def perturbed(base_cfg, key: str, value: Any, added: bool) -> dict[str, str]:
    cfg = copy.deepcopy(base_cfg)
    if added:
        with open_dict(cfg):
            OmegaConf.update(cfg, key, value, force_add=True)
    else:
        OmegaConf.update(cfg, key, value, merge=False)
    return RunConfig.from_hydra(cfg).hashes()


def test_every_key_changes_both_the_folder_and_a_hash_or_neither(base):
    base_cfg, base_hashes = base
    tree = OmegaConf.to_container(base_cfg, resolve=True)
    cases = [(k, new_value(k, v), False) for k, v in leaves(tree).items() if k not in NO_OTHER]
    cases += [(k, v, True) for k, v in ADDED.items()]
    in_identity, outside = [], []
    for key, value, added in cases:
        folder = identity.folder_name(None, [override(key, value, added)])
        hashes = perturbed(base_cfg, key, value, added)
        changed = {name for name in hashes if hashes[name] != base_hashes[name]}
        assert (folder != "default") == bool(changed), (key, value, folder, changed)
        (in_identity if changed else outside).append(key)
    assert len(leaves(tree)) == len(cases) - len(ADDED) + len(NO_OTHER) >= 90  # nothing skipped silently
    assert len(in_identity) >= 60 and len(outside) >= 35, (in_identity, outside)
    # what the list says, on a few keys
    for key in ("trainer.precision", "cache.dtype", "trainer.max_steps", "data.batch_size", "fusion.lr"):
        assert key in in_identity
    for key in (
        "trainer.val_check_interval",
        "stages.layer.trainer.val_check_interval",
        "data.num_workers",
        "step.compile",
        "cache.store",
    ):
        assert key in outside


def test_precision_and_a_group_choice_are_identity(base):
    _, base_hashes = base
    gpu = RunConfig.from_hydra(compose_cfg(["hardware=gpu"])).hashes()
    assert all(gpu[name] != base_hashes[name] for name in gpu)  # bf16 on a GPU is another experiment
    assert identity.folder_name(None, ["hardware=gpu"]) == "hardware=gpu"
    assert identity.folder_name(None, ["logger=none", "callbacks=none", "stage=e2e"]) == "default"
    assert identity.folder_name(None, ["+stages.layer.trainer.max_steps=3"]) == "+stages.layer.trainer.max_steps=3"


def test_hydra_folder_is_the_identity_folder(tmp_path):
    """conf/config.yaml's run and sweep folders come from the same function as RunConfig's name."""
    overrides = [f"output_root={tmp_path}", "attention=mla", "trainer.val_check_interval=20", "seed=3", "k=2"]
    from hydra import compose, initialize_config_module

    from stackwise.config import CONFIG_MODULE, register_configs

    register_configs()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    run_dir = cfg.hydra.run.dir
    task = list(cfg.hydra.overrides.task)
    assert run_dir.startswith(f"{tmp_path}/attention=mla,seed=3/hydra/")
    assert RunConfig.from_hydra(cfg, task).exp_dir == tmp_path / "attention=mla,seed=3"
    assert cfg.hydra.sweep.subdir.startswith("attention=mla,seed=3/hydra/")


def test_folder_name_rules():
    assert identity.folder_name(None, []) == "default"
    assert identity.folder_name("mine", ["attention=gqa"]) == "mine"
    long = identity.folder_name(None, [f"model.d_model={64 * i}" for i in range(1, 2)] + ["data.path=" + "a" * 200])
    assert len(long) == 100 + 1 + 12
    with pytest.raises(ConfigError, match="name"):
        identity.folder_name("a/b", [])
