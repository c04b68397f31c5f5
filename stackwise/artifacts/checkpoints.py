"""Layer checkpoints: `layers/layer_k.pt`, one state dict per module, read without running code.

Why no pickle: opening a checkpoint must never run code, so `torch.load` is always called with
`weights_only=True`; a digest of every tensor, stored in the file, is checked on every load.

An untied output projection (V x D, as large as several layers at a 128k vocabulary) is not kept in
every layer file: stage k writes it to `layer_k.head.safetensors` beside its layer file (first, so
that a layer file never names a projection that is not there), records its digest in `layer_k.pt`,
then deletes the projections of the layers below: only the latest stage's is kept, which is the
one the next stage starts from and the fused model holds. The tensors are stored in the dtype the
stage saved them in (`layerwise.save_dtype`).

The top segment (`layerwise.top_layers=m` > 0: blocks L-m+1..L, trained and carried by every
stage) follows the same rule in `layer_k.top.safetensors`: its tensors under the fused model's
names (`blocks.{j-1}.<name>`), written before the layer file, which records its digest and the
blocks' frozen checksums (`top_file`); the latest stage's only is kept.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from stackwise.artifacts.atomic import atomic_path, atomic_torch_save, sha256_file
from stackwise.artifacts.messages import check_expected, json_normal, one_line, short_value
from stackwise.artifacts.paths import PathLike, top_segment_path, untied_head_path
from stackwise.errors import ArtifactError
from stackwise.model.weights import LayerWeights, TopBlock

LAYER_FORMAT = "stackwise.layer"
# 2: layer_k.pt holds one state dict per module ("block", "head", "embed") instead of one prefixed dict
# 3: an untied output projection lives in layer_k.head.safetensors, not in the "head" section
LAYER_FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)  # a version 2 file holds its projection in its "head" section: read as it is
PROJ = "proj.weight"  # the untied projection's name in the head's state dict
HeadMode = Literal["load", "if_present", "skip"]
SIDE_SUFFIXES = (".head.safetensors", ".top.safetensors")  # the latest stage's only: see the module doc


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
            # numpy has no bf16: hash the bits through a same-size integer view; the array itself,
            # not a bytes copy of it (half the time of a layer file's check)
            h.update(t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy())
    return h.hexdigest()


def _weights_digest(sections: Mapping[str, Mapping[str, Tensor]]) -> str:
    """state_digest of every module's state dict, in module order."""
    return hashlib.sha256("".join(f"{m}|{state_digest(sections[m])}\n" for m in sorted(sections)).encode()).hexdigest()


def save_layer_checkpoint(path: PathLike, weights: LayerWeights, meta: Mapping[str, Any]) -> str:
    """Write `layers/layer_k.pt` atomically (and an untied projection beside it); return its sha256.

    The file is `{"format", "version", "modules": {"block": {name: Tensor}, "head": {...}[, "embed": {...}]},
    "frozen_sha256", "state_sha256", "head_file", "meta": {...JSON}}`, which `torch.load(weights_only=True)`
    reads in any torch >= 2.1. `head_file` is null for a tied head, else `{"name", "sha256"}` of the
    untied projection's file (see the module doc); a stage that trained a top segment adds `top_file`,
    `{"name", "sha256", "frozen_sha256": {j: checksum}}`. `meta` is normalised through JSON so it
    reads back exactly as written (and a non-JSON value fails here, before any byte is written).
    """
    path = Path(path)
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
    proj = sections["head"].pop(PROJ, None)
    head_file = None
    if proj is not None:
        head_path = untied_head_path(path)
        head_file = {"name": head_path.name, "sha256": state_digest({PROJ: proj})}
        with atomic_path(head_path) as tmp:
            save_file({PROJ: proj}, str(tmp), metadata={"stackwise": json.dumps({"layer": path.name, **head_file})})
        del proj
    record = {
        "format": LAYER_FORMAT,
        "version": LAYER_FORMAT_VERSION,
        "modules": sections,
        "frozen_sha256": str(weights.frozen_sha256),
        "state_sha256": _weights_digest(sections),
        "head_file": head_file,
        "meta": meta_n,
    }
    if weights.top:  # only then: a layer file without a top segment is byte for byte what it was before
        top = {
            f"blocks.{j - 1}.{name}": t.detach().to("cpu").contiguous()
            for j, b in weights.top.items()
            for name, t in b.block.items()
        }
        top_path = top_segment_path(path)
        frozen = {str(j): str(b.frozen_sha256) for j, b in sorted(weights.top.items())}
        record["top_file"] = {"name": top_path.name, "sha256": state_digest(top), "frozen_sha256": frozen}
        with atomic_path(top_path) as tmp:
            save_file(top, str(tmp), metadata={"stackwise": json.dumps({"layer": path.name, **record["top_file"]})})
        del top
    atomic_torch_save(record, path)
    if head_file is not None or weights.top:
        _drop_side_files_below(path)
    return sha256_file(path)


def _drop_side_files_below(path: Path) -> None:
    """Delete the untied projections and top segments of the layers below `layer_k.pt`: the next
    stage starts from layer k's."""
    k = _layer_index(path.stem)
    for suffix in SIDE_SUFFIXES if k is not None else ():
        for other in path.parent.glob(f"*{suffix}"):
            j = _layer_index(other.name[: -len(suffix)])
            if j is not None and j < k:
                other.unlink(missing_ok=True)


def _layer_index(stem: str) -> int | None:
    m = re.fullmatch(r"layer_(\d+)", stem)
    return int(m.group(1)) if m else None


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
    path: PathLike,
    expect: Mapping[str, Any] | None = None,
    verify_sha256: str | None = None,
    head: HeadMode = "if_present",
) -> tuple[LayerWeights, dict[str, Any]]:
    """Read a layer checkpoint on CPU, without running any code; return (weights, meta).

    An untied projection kept beside the file is read into `weights.head` (checked against the
    digest the layer file records) with `head="load"` (its absence is an error: a stage that starts
    from this layer, or the fused model, needs it), `"if_present"` (absent once a later stage has
    replaced it: `weights.head` then holds the final norm only) or not at all (`"skip"`). A top
    segment kept beside it is read into `weights.top` by the same rule (the same readers need it).

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
    if obj.get("version") not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{p} has format version {obj.get('version')!r} but this StackWise reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}; rerun its stage (overwrite=true)"
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
    if head != "skip" and obj.get("head_file") is not None:
        proj = _read_side(p, obj["head_file"], head == "load", "its untied output projection")
        if proj is not None:
            sections["head"][PROJ] = proj[PROJ]
    top = None
    if head != "skip" and obj.get("top_file") is not None:
        top = _top_blocks(p, obj["top_file"], _read_side(p, obj["top_file"], head == "load", "its top segment"))
    weights = LayerWeights(
        block=sections["block"],
        frozen_sha256=obj["frozen_sha256"],
        head=sections["head"],
        embed=sections.get("embed"),
        top=top,
    )
    return weights, obj["meta"]


def _top_blocks(layer: Path, record: dict, tensors: dict[str, Tensor] | None) -> dict[int, TopBlock] | None:
    """`layer_k.top.safetensors`'s tensors (fused-model names) as {j: TopBlock}, each with the frozen
    checksum the layer file records for it."""
    if tensors is None:
        return None
    frozen = record.get("frozen_sha256")
    blocks: dict[int, dict[str, Tensor]] = {}
    for name, t in tensors.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if m is None:
            raise ArtifactError(
                f"{layer.with_name(record['name'])} holds {name!r}, not a block's tensor; rerun its stage"
            )
        blocks.setdefault(int(m.group(1)) + 1, {})[m.group(2)] = t
    if not isinstance(frozen, dict) or sorted(frozen) != sorted(str(j) for j in blocks):
        raise ArtifactError(f"{layer} records no frozen checksum for each block of its top segment; rerun its stage")
    return {j: TopBlock(state, str(frozen[str(j)])) for j, state in sorted(blocks.items())}


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


def _read_side(layer: Path, record: Any, required: bool, what: str) -> dict[str, Tensor] | None:
    """The tensors of a file `layer` keeps beside it (`record`: `{"name", "sha256", ...}`: its untied
    projection or its top segment), read and checked; None when it is not there and not `required`."""
    if not isinstance(record, dict) or not isinstance(record.get("name"), str) or "/" in record["name"]:
        raise ArtifactError(f"{layer} records no readable file name for {what}; delete it and rerun its stage")
    path = layer.with_name(record["name"])
    if not path.is_file():
        if not required:
            return None
        raise ArtifactError(
            f"{path} does not exist: {layer.name} keeps {what} there, and only the "
            f"latest stage's is kept (a later stage replaced it, or it was deleted); rerun {layer.name}'s "
            f"stage and the ones after it (overwrite=true)"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no mapping)
    except Exception as e:
        raise ArtifactError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {one_line(e, 120)}); "
            f"delete it and {layer.name} and rerun its stage"
        ) from None
    if state_digest(tensors) != record.get("sha256"):
        raise ArtifactError(
            f"{path} is not {what} {layer.name} was saved with (digest mismatch: another run's, "
            f"or corrupt); rerun {layer.name}'s stage (overwrite=true)"
        )
    return tensors
