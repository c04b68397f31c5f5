"""Layer checkpoints: `layers/layer_k.pt`, one state dict per module, read without running code.

Why no pickle: opening a checkpoint must never run code, so `torch.load` is always called with
`weights_only=True`; a digest of every tensor, stored in the file, is checked on every load.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stackwise.artifacts.atomic import atomic_torch_save, sha256_file
from stackwise.artifacts.messages import check_expected, json_normal, one_line, short_value
from stackwise.artifacts.paths import PathLike
from stackwise.errors import ArtifactError
from stackwise.model.weights import LayerWeights

LAYER_FORMAT = "stackwise.layer"
# 2: layer_k.pt holds one state dict per module ("block", "head", "embed") instead of one prefixed dict
LAYER_FORMAT_VERSION = 2


def state_digest(state: Mapping[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict (in name order).

    Stored inside each layer checkpoint: a zip archive loads bit flips in tensor data silently,
    this catches them on every load without needing a hash recorded elsewhere.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            # numpy has no bf16: hash the bits through a same-size integer view
            h.update(t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
    return h.hexdigest()


def _weights_digest(sections: Mapping[str, Mapping[str, Tensor]]) -> str:
    """state_digest of every module's state dict, in module order."""
    return hashlib.sha256("".join(f"{m}|{state_digest(sections[m])}\n" for m in sorted(sections)).encode()).hexdigest()


def save_layer_checkpoint(path: PathLike, weights: LayerWeights, meta: Mapping[str, Any]) -> str:
    """Write `layers/layer_k.pt` atomically and return its sha256.

    The file is `{"format", "version", "modules": {"block": {name: Tensor}, "head": {...}[, "embed": {...}]},
    "frozen_sha256", "state_sha256", "meta": {...JSON}}`, which `torch.load(weights_only=True)` reads in
    any torch >= 2.1. `meta` is normalised through JSON so it reads back exactly as written (and a
    non-JSON value fails here, before any byte is written).
    """
    sections: dict[str, dict[str, Tensor]] = {}
    for module, state in weights.sections().items():
        for name, t in state.items():
            if not isinstance(name, str) or not isinstance(t, Tensor):
                raise TypeError(f"layer weights {module} must map str -> Tensor, got {name!r}: {type(t).__name__}")
        # clone: a view of a larger tensor would otherwise save the whole storage
        sections[module] = {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}
    try:
        meta_n = json_normal(dict(meta))
    except (TypeError, ValueError) as e:
        raise TypeError(f"layer checkpoint meta must be JSON-able: {e}") from e
    atomic_torch_save(
        {
            "format": LAYER_FORMAT,
            "version": LAYER_FORMAT_VERSION,
            "modules": sections,
            "frozen_sha256": str(weights.frozen_sha256),
            "state_sha256": _weights_digest(sections),
            "meta": meta_n,
        },
        path,
    )
    return sha256_file(path)


def read_layer_meta(path: PathLike) -> dict[str, Any]:
    """The metadata of a layer checkpoint without reading its tensors (memory-mapped, nothing run):
    what a run needs to tell whether the folder's layer files were made by its settings. A file
    that is not a readable layer checkpoint is an ArtifactError; its tensors are not checked here."""
    p = Path(path)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ArtifactError(f"{p} is not a readable checkpoint ({type(e).__name__}: {one_line(e, 120)})") from None
    if not isinstance(obj, dict) or obj.get("format") != LAYER_FORMAT or not isinstance(obj.get("meta"), dict):
        raise ArtifactError(f"{p} is not a StackWise layer checkpoint")
    return obj["meta"]


def load_layer_checkpoint(
    path: PathLike, expect: Mapping[str, Any] | None = None, verify_sha256: str | None = None
) -> tuple[LayerWeights, dict[str, Any]]:
    """Read a layer checkpoint on CPU, without running any code; return (weights, meta).

    Every way it can be wrong (missing, truncated, corrupt, not ours, another config, changed since
    its hash was recorded) is an ArtifactError of one line naming the file.
    """
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{p} does not exist; run the stage that writes it first")
    if verify_sha256 is not None:
        have = sha256_file(p)
        if have != verify_sha256:
            raise ArtifactError(
                f"{p} has sha256 {short_value(have)} but {short_value(verify_sha256)} was recorded: "
                f"the file changed after it was written; rerun its stage (overwrite=true)"
            )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ArtifactError(
            f"{p} is not a readable checkpoint (truncated or corrupt: "
            f"{type(e).__name__}: {one_line(e, 120)}); delete it and rerun its stage"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != LAYER_FORMAT or not isinstance(obj.get("meta"), dict):
        raise ArtifactError(
            f"{p} is not a StackWise layer checkpoint (expected a dict with format "
            f"{LAYER_FORMAT!r}, 'modules' and 'meta'); delete it and rerun its stage"
        )
    if obj.get("version") != LAYER_FORMAT_VERSION:
        raise ArtifactError(
            f"{p} has format version {obj.get('version')!r} but this StackWise reads "
            f"version {LAYER_FORMAT_VERSION}; rerun its stage (overwrite=true)"
        )
    sections = obj.get("modules")
    problem = _layer_sections_problem(sections, obj.get("frozen_sha256"))
    if problem:
        raise ArtifactError(f"{p} {problem}; delete it and rerun its stage")
    if _weights_digest(sections) != obj.get("state_sha256"):
        raise ArtifactError(
            f"{p} holds tensor data that does not match its checksum (corrupt bytes); delete it and rerun its stage"
        )
    check_expected(p, obj["meta"], expect)
    weights = LayerWeights(
        block=sections["block"], frozen_sha256=obj["frozen_sha256"], head=sections["head"], embed=sections.get("embed")
    )
    return weights, obj["meta"]


def _layer_sections_problem(sections: Any, frozen_sha256: Any) -> str | None:
    """What is wrong with a layer checkpoint's "modules" (None when nothing)."""
    if not isinstance(sections, dict) or not {"block", "head"} <= set(sections) <= {"block", "head", "embed"}:
        return "has no 'block' and 'head' state dicts"
    for module, state in sections.items():
        if not isinstance(state, dict):
            return f"has no state dict for {module}"
        bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
        if bad:
            return f"has a non-tensor entry {bad[0]!r} in its {module} state"
    if not isinstance(frozen_sha256, str):
        return "records no frozen_sha256 of its frozen tensors"
    return None
