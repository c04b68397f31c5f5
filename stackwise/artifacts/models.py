"""Model folders (`fused/`, `fused/finetuned/`, `e2e/`): `<name>.safetensors` + `config.json`, its
manifest, written last. `load_model` is the one place a model folder becomes a model."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from stackwise.artifacts.atomic import atomic_path, atomic_write_json, sha256_file
from stackwise.artifacts.messages import check_expected, json_normal, one_line, short_value
from stackwise.artifacts.paths import PathLike
from stackwise.errors import ArtifactError
from stackwise.model.config import ModelConfig
from stackwise.model.transformer import Transformer

MODEL_FORMAT = "stackwise.model"
MODEL_FORMAT_VERSION = 1


def _dedupe_shared(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Drop tensors that alias an earlier one (tied embeddings): safetensors refuses shared storage.

    Returns (tensors to store, {dropped name: kept name}); loading restores the alias.
    """
    kept: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state_dict.items():
        t = t.detach()
        key = (
            (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if t.numel()
            else None
        )
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        kept[name] = t.to("cpu").contiguous()
    # any remaining partial overlap (views of one buffer) is cut by cloning
    ptrs: dict[int, int] = {}
    for name, t in kept.items():
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptrs.get(ptr, 0) > 0:
            kept[name] = t.clone()
        ptrs[ptr] = ptrs.get(ptr, 0) + 1
    return kept, aliases


def save_safetensors_model(
    out_dir: PathLike,
    state_dict: Mapping[str, Tensor],
    config: Mapping[str, Any],
    meta: Mapping[str, Any],
    name: str = "model",
) -> str:
    """Write `<out_dir>/<name>.safetensors` then `<out_dir>/config.json` (last); return the weights' sha256.

    The safetensors header carries `meta` (JSON) and the tied-weight aliases, so the weights file
    describes itself; config.json is `{"format", "version", "config": <model config>, "meta"}`.
    A folder is complete once config.json exists. `name` picks another weights file in the same folder.
    """
    out = Path(out_dir)
    tensors, aliases = _dedupe_shared(state_dict)
    meta_n, config_n = json_normal(dict(meta)), json_normal(dict(config))
    # One header key only: safetensors stores the metadata in a hash map whose order varies from
    # process to process, so several keys would make identical runs write different bytes.
    header = {"stackwise": json.dumps({"meta": meta_n, "aliases": aliases}, sort_keys=True)}
    weights = out / f"{name}.safetensors"
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    sha = sha256_file(weights)
    # config.json is the folder's manifest: written last, it records the weights' size and sha256
    atomic_write_json(
        {
            "format": MODEL_FORMAT,
            "version": MODEL_FORMAT_VERSION,
            "config": config_n,
            "meta": meta_n,
            "files": {weights.name: {"sha256": sha, "bytes": weights.stat().st_size}},
        },
        out / "config.json",
    )
    return sha


def load_safetensors_model(
    out_dir: PathLike,
    expect: Mapping[str, Any] | None = None,
    name: str = "model",
    verify_sha256: str | None = None,
    verify: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """Read `<out_dir>/<name>.safetensors` + config.json; return (state_dict, config, meta).

    `meta` is the weights file's own (header) metadata, which `expect` is checked against. The size
    recorded in config.json is always checked, its sha256 with `verify` (folders written before
    config.json recorded them are read without these checks).
    """
    out = Path(out_dir)
    cfg_path, weights = out / "config.json", out / f"{name}.safetensors"
    cfg_obj = _model_manifest(cfg_path)
    if not weights.is_file():
        raise ArtifactError(f"{weights} does not exist; rerun the stage that writes it")
    recorded = (cfg_obj.get("files") or {}).get(weights.name)
    if isinstance(recorded, dict):
        size = weights.stat().st_size
        if size != recorded.get("bytes"):
            raise ArtifactError(
                f"{weights} is {size} bytes but {cfg_path.name} records {recorded.get('bytes')} "
                f"(truncated or replaced); rerun the stage that writes it"
            )
        if verify and verify_sha256 is None:
            verify_sha256 = recorded.get("sha256")
    if verify_sha256 is not None and (have := sha256_file(weights)) != verify_sha256:
        raise ArtifactError(
            f"{weights} has sha256 {short_value(have)} but {short_value(verify_sha256)} was recorded: "
            f"the file changed after it was written; rerun its stage (overwrite=true)"
        )
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        own = json.loads(header.get("stackwise", "{}"))
        meta, aliases = own.get("meta", {}), own.get("aliases", {})
    except Exception as e:
        raise ArtifactError(
            f"{weights} is not a readable safetensors file (truncated or corrupt: "
            f"{type(e).__name__}: {one_line(e, 120)}); rerun the stage that writes it"
        ) from None
    for dup, src in aliases.items():
        if src not in state:
            raise ArtifactError(f"{weights} ties {dup!r} to missing tensor {src!r}; rerun the stage that writes it")
        state[dup] = state[src]
    check_expected(weights, meta, expect)
    return state, cfg_obj["config"], meta


def _model_manifest(cfg_path: Path) -> dict[str, Any]:
    """A model folder's config.json: {"format", "version", "config", "meta", "files"}."""
    if not cfg_path.is_file():
        raise ArtifactError(
            f"{cfg_path} does not exist: {cfg_path.parent} is missing or incomplete; rerun the stage that writes it"
        )
    try:
        cfg_obj = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(
            f"{cfg_path} is not valid JSON ({one_line(e, 120)}); rerun the stage that writes it"
        ) from None
    if not isinstance(cfg_obj, dict) or cfg_obj.get("format") != MODEL_FORMAT or "config" not in cfg_obj:
        raise ArtifactError(f"{cfg_path} is not a StackWise model config (expected format {MODEL_FORMAT!r})")
    return cfg_obj


def load_model(
    out_dir: PathLike, expect: Mapping[str, Any] | None = None, verify: bool = False
) -> tuple[Transformer, dict[str, Any]]:
    """The Transformer of a model folder (fused/, fused/finetuned/, e2e/) and its weights' metadata:
    the one place a model folder becomes a model. Raises ArtifactError (one line, naming the folder)
    when it is incomplete, corrupt, or its weights do not fit its own config."""
    state, config, meta = load_safetensors_model(out_dir, expect=expect, verify=verify)
    source = Path(out_dir) / "config.json"
    if not isinstance(config, dict):
        raise ArtifactError(f"{source} holds no model config; rerun the stage that writes it")
    model = Transformer(ModelConfig.from_dict(config, prefix=f"{source}: model"))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ArtifactError(f"{out_dir}: the weights do not fit its config ({one_line(e, 160)})") from None
    return model, meta
