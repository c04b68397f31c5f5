"""Model folders (`fused/`, `fused/finetuned/`, `e2e/`): the weights, then `config.json`, the
folder's manifest, written last. `load_model` is the one place a model folder becomes a model.

The weights are one `model.safetensors` while they fit in one shard (`max_shard_bytes`, Hugging
Face's default 5 GB), else Hugging Face's sharded layout: `model-00001-of-0000N.safetensors` ...
plus `model.safetensors.index.json` (`{"metadata": {"total_size", "stackwise"}, "weight_map": {name:
file}}`), which `transformers` and `huggingface_hub` read as they are. Either is written from a
stream of (name, tensor) and read back tensor by tensor, so host memory holds one shard on the way
out and one tensor on the way in, never the whole model.

Each weights file describes itself: its own (or, sharded, the index's) safetensors metadata holds
the meta it was written with and the tied-weight aliases; config.json records every file's size and
sha256 besides the model config and meta.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from stackwise.artifacts.atomic import atomic_path, atomic_write_json, sha256_file
from stackwise.artifacts.messages import check_expected, json_normal, one_line, short_value
from stackwise.artifacts.paths import PathLike
from stackwise.errors import ArtifactError
from stackwise.model.config import ModelConfig
from stackwise.model.transformer import Transformer, empty

MODEL_FORMAT = "stackwise.model"
# 2: the weights may be sharded (Hugging Face's layout); version 1 folders (one file) read as before
MODEL_FORMAT_VERSION = 2
MAX_SHARD_BYTES = 5 * 10**9  # huggingface_hub's default max_shard_size ("5GB")

Tensors = Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]


def _header(meta: Any, aliases: Mapping[str, str]) -> dict[str, str]:
    # One key only: safetensors stores the metadata in a hash map whose order varies from process to
    # process, so several keys would make identical runs write different bytes.
    return {"stackwise": json.dumps({"meta": meta, "aliases": dict(aliases)}, sort_keys=True)}


def _storage_key(t: Tensor) -> tuple | None:
    if not t.numel():
        return None
    return t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype


class _ShardWriter:
    """Tensors in, safetensors shards out, one shard held in memory at a time.

    A tensor that aliases one seen before (tied embeddings: safetensors refuses shared storage) is
    recorded as an alias instead, restored on load. An earlier tensor is recognised only while it is
    alive (a weak reference), so a freed tensor's reused address is never taken for an alias.
    """

    def __init__(self, out: Path, name: str, max_bytes: int, hasher: Executor):
        self.out, self.name, self.max_bytes = out, name, max_bytes
        self.hasher = hasher  # hashes a written shard while the next one is gathered and written
        self.hashes: list[Future[str]] = []  # the sha256 of each part, in order
        self.shard: dict[str, Tensor] = {}
        self.shard_bytes = 0
        self.parts: list[tuple[Path, list[str]]] = []  # written shards (temporary names) and their tensors
        self.aliases: dict[str, str] = {}
        self.seen: dict[tuple, tuple[str, weakref.ref]] = {}
        self.total = 0

    def add(self, name: str, t: Tensor) -> None:
        if not isinstance(name, str) or not isinstance(t, Tensor):
            raise TypeError(f"model weights must map str -> Tensor, got {name!r}: {type(t).__name__}")
        key = _storage_key(t)
        if key is not None:
            if key in self.seen and self.seen[key][1]() is not None:
                self.aliases[name] = self.seen[key][0]
                return
            self.seen[key] = (name, weakref.ref(t))  # the caller's tensor: detach() would be a new object
        t = t.detach()
        nbytes = t.numel() * t.element_size()
        if self.shard and self.shard_bytes + nbytes > self.max_bytes:
            self._flush()
        self.shard[name] = t.to("cpu").contiguous()
        self.shard_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        tmp = self.out / f".{self.name}-{len(self.parts) + 1:05d}.safetensors.partial"
        _save(self.shard, tmp, None)
        self.parts.append((tmp, list(self.shard)))
        self.hashes.append(self.hasher.submit(sha256_file, tmp))
        self.shard, self.shard_bytes = {}, 0

    def close(self, meta: Any) -> dict[str, tuple[Path, str]]:
        """Write what is left; return {final file name: (path, sha256)} of every file written (the index last)."""
        header = _header(meta, self.aliases)
        if not self.parts:  # one file, as a small model always was
            single = self.out / f"{self.name}.safetensors"
            _save(self.shard, single, header)
            return {single.name: (single, sha256_file(single))}
        self._flush()
        n = len(self.parts)
        files: dict[str, tuple[Path, str]] = {}
        weight_map: dict[str, str] = {}
        for i, ((tmp, names), sha) in enumerate(zip(self.parts, self.hashes, strict=True), start=1):
            final = self.out / f"{self.name}-{i:05d}-of-{n:05d}.safetensors"
            files[final.name] = (final, sha.result())  # hashed under its temporary name: renamed once read
            tmp.replace(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = self.out / f"{self.name}.safetensors.index.json"
        metadata = {"total_size": self.total, **header}
        atomic_write_json({"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}, index)
        files[index.name] = (index, sha256_file(index))
        return files

    def abort(self) -> None:
        for tmp, _ in self.parts:
            tmp.unlink(missing_ok=True)


def _save(tensors: dict[str, Tensor], path: Path, header: dict[str, str] | None) -> None:
    # views of one buffer that are not aliases of each other (partial overlaps) are cut by cloning
    ptrs: set[int] = set()
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in ptrs:
            tensors[name] = t.clone()
        ptrs.add(ptr)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def _weight_files(out: Path, name: str) -> list[Path]:
    """Every weights file of `name` in `out`, in either layout (and partial shards and the temporary
    files of atomic writes a killed write left: `.model.safetensors.<random>.tmp`, atomic.py)."""
    final = rf"{re.escape(name)}(\.safetensors|-\d{{5}}-of-\d{{5}}\.safetensors|\.safetensors\.index\.json)"
    partial = rf"\.{re.escape(name)}-\d{{5}}\.safetensors\.partial"
    pattern = re.compile(rf"{final}|{partial}|\.({final}|{partial})\.\w+\.tmp")
    return [p for p in out.iterdir() if pattern.fullmatch(p.name)] if out.is_dir() else []


def begin_model_write(out_dir: PathLike) -> Path:
    """Make `out_dir` (created if need be) a folder no reader trusts: its config.json, the manifest,
    is removed, until `write_model_manifest` writes it again. A writer that hands the weights to
    another thread calls it first, so that the folder is untrusted before anything else happens."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)
    return out


def write_model_weights(
    out_dir: PathLike,
    tensors: Tensors,
    meta: Mapping[str, Any],
    name: str = "model",
    max_shard_bytes: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Write the weights of a model folder from `tensors` (a state dict, or (name, tensor) pairs
    consumed one at a time) and return their records for config.json ({file: {"sha256", "bytes"}}).

    config.json goes first: from then on the folder is incomplete (no reader trusts it) until
    `write_model_manifest` writes it again. Files of an earlier layout are removed at the end.
    """
    out = begin_model_write(out_dir)
    meta_n = json_normal(dict(meta))
    # a shard is hashed (read back from the page cache) on a thread while the next one is written:
    # hashlib and file reads release the GIL
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-sha256") as hasher:
        writer = _ShardWriter(out, name, MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes, hasher)
        try:
            for key, t in tensors.items() if isinstance(tensors, Mapping) else tensors:
                writer.add(key, t)
            files = writer.close(meta_n)
        except BaseException:
            writer.abort()
            raise
    for stale in _weight_files(out, name):
        if stale.name not in files:
            stale.unlink(missing_ok=True)
    return {f: {"sha256": sha, "bytes": p.stat().st_size} for f, (p, sha) in files.items()}


def write_model_manifest(
    out_dir: PathLike, config: Mapping[str, Any], meta: Mapping[str, Any], files: Mapping[str, Any]
) -> None:
    """config.json, the folder's manifest: written last, it records every weights file's size and sha256."""
    atomic_write_json(
        {
            "format": MODEL_FORMAT,
            "version": MODEL_FORMAT_VERSION,
            "config": json_normal(dict(config)),
            "meta": json_normal(dict(meta)),
            "files": dict(files),
        },
        Path(out_dir) / "config.json",
    )


def save_safetensors_model(
    out_dir: PathLike,
    state_dict: Tensors,
    config: Mapping[str, Any],
    meta: Mapping[str, Any],
    name: str = "model",
    max_shard_bytes: int | None = None,
) -> str:
    """Write the weights (`<name>.safetensors`, or shards and their index past `max_shard_bytes`)
    then `<out_dir>/config.json` (last); return the sha256 of the one weights file (sharded: of the index).

    A folder is complete once config.json exists. `name` picks another weights file in the same folder.
    """
    files = write_model_weights(out_dir, state_dict, meta, name, max_shard_bytes)
    write_model_manifest(out_dir, config, meta, files)
    return files[next(reversed(files))]["sha256"]


def rewrite_model_meta(out_dir: PathLike, meta: Mapping[str, Any], name: str = "model") -> None:
    """Give a complete model folder new meta, tensors unchanged: the one weights file is rewritten
    (it holds its meta; a single file is at most one shard), a sharded model only its index; then
    config.json."""
    out = Path(out_dir)
    cfg_obj = _model_manifest(out / "config.json")
    weights, index = _layout(out, name, cfg_obj)
    meta_n = json_normal(dict(meta))
    (out / "config.json").unlink()
    if index is None:
        with safe_open(str(weights[0]), framework="pt", device="cpu") as f:
            aliases = json.loads((f.metadata() or {}).get("stackwise", "{}")).get("aliases", {})
        _save(load_file(str(weights[0])), weights[0], _header(meta_n, aliases))
        touched = weights[0]
    else:
        obj = json.loads(index.read_text())
        aliases = json.loads(obj["metadata"].get("stackwise", "{}")).get("aliases", {})
        obj["metadata"] = {**obj["metadata"], **_header(meta_n, aliases)}
        atomic_write_json(obj, index)
        touched = index
    files = dict(cfg_obj.get("files") or {})
    files[touched.name] = {"sha256": sha256_file(touched), "bytes": touched.stat().st_size}
    write_model_manifest(out, cfg_obj["config"], meta_n, files)


# ------------------------------------------------------------------------------------- reading
def _layout(out: Path, name: str, cfg_obj: Mapping[str, Any]) -> tuple[list[Path], Path | None]:
    """(weights files, index or None): sharded when config.json records the index (or, for a folder
    whose config.json records no files, when the index is there), else the one file."""
    index = out / f"{name}.safetensors.index.json"
    recorded = cfg_obj.get("files")
    sharded = index.name in recorded if isinstance(recorded, dict) else index.is_file()
    if not sharded:
        single = out / f"{name}.safetensors"
        if not single.is_file():
            raise ArtifactError(f"{single} does not exist; rerun the stage that writes it")
        return [single], None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{index} is not a readable shard index ({one_line(e, 120)}); rerun the stage") from None
    paths = []
    for shard in shards:
        if not isinstance(shard, str) or "/" in shard or not (out / shard).is_file():
            raise ArtifactError(f"{out / str(shard)} does not exist ({index.name} names it); rerun the stage")
        paths.append(out / shard)
    return paths, index


def _check_files(out: Path, files: list[Path], cfg_obj: Mapping[str, Any], verify: bool, sha: str | None) -> None:
    """Each file's size against config.json (and its sha256 with `verify`); `sha` for the first / the index."""
    recorded = cfg_obj.get("files") or {}
    for i, path in enumerate(files):
        rec = recorded.get(path.name) if isinstance(recorded, dict) else None
        want = sha if i == len(files) - 1 else None
        if isinstance(rec, dict):
            size = path.stat().st_size
            if size != rec.get("bytes"):
                raise ArtifactError(
                    f"{path} is {size} bytes but config.json records {rec.get('bytes')} "
                    f"(truncated or replaced); rerun the stage that writes it"
                )
            if verify and want is None:
                want = rec.get("sha256")
        if want is not None and (have := sha256_file(path)) != want:
            raise ArtifactError(
                f"{path} has sha256 {short_value(have)} but {short_value(want)} was recorded: "
                f"the file changed after it was written; rerun its stage (overwrite=true)"
            )


def _open(out_dir: PathLike, name: str, verify: bool, verify_sha256: str | None):
    """(config.json, weights files, header {meta, aliases}) of a model folder, every file checked."""
    out = Path(out_dir)
    cfg_obj = _model_manifest(out / "config.json")
    weights, index = _layout(out, name, cfg_obj)
    _check_files(out, [*weights, *([index] if index else [])], cfg_obj, verify, verify_sha256)
    source = index or weights[0]
    try:
        if index is not None:
            header = json.loads(index.read_text()).get("metadata") or {}
        else:
            with safe_open(str(weights[0]), framework="pt", device="cpu") as f:
                header = f.metadata() or {}
        own = json.loads(header.get("stackwise", "{}"))
        meta, aliases = own.get("meta", {}), own.get("aliases", {})
    except Exception as e:
        raise ArtifactError(
            f"{source} is not a readable safetensors file (truncated or corrupt: "
            f"{type(e).__name__}: {one_line(e, 120)}); rerun the stage that writes it"
        ) from None
    return cfg_obj, weights, meta, aliases, source


def _tensors(weights: list[Path]) -> Iterator[tuple[str, Tensor]]:
    """Every stored tensor, one at a time, file by file."""
    for path in weights:
        yield from _file_tensors(path)


def _file_tensors(path: Path) -> Iterator[tuple[str, Tensor]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                yield key, f.get_tensor(key)
    except Exception as e:
        raise ArtifactError(
            f"{path} is not a readable safetensors file (truncated or corrupt: "
            f"{type(e).__name__}: {one_line(e, 120)}); rerun the stage that writes it"
        ) from None


def read_model_meta(
    out_dir: PathLike,
    expect: Mapping[str, Any] | None = None,
    name: str = "model",
    verify_sha256: str | None = None,
    verify: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, meta) of a model folder, its files checked as `load_safetensors_model` checks them,
    without reading a tensor: whether a stage's model is there and made by these settings."""
    cfg_obj, _, meta, _, source = _open(out_dir, name, verify, verify_sha256)
    check_expected(source, meta, expect)
    return cfg_obj["config"], meta


def model_files(
    out_dir: PathLike, verify: bool = False
) -> tuple[dict[str, Any], dict[str, Any], list[Path], dict[str, str]]:
    """(config, meta, weights files, tied-weight aliases {name: stored name}) of a model folder, its
    files checked as `load_model` checks them, no tensor read: for a reader that streams the tensors
    itself, one at a time (stackwise-export)."""
    cfg_obj, weights, meta, aliases, _ = _open(out_dir, "model", verify, None)
    return cfg_obj["config"], meta, weights, aliases


def load_safetensors_model(
    out_dir: PathLike,
    expect: Mapping[str, Any] | None = None,
    name: str = "model",
    verify_sha256: str | None = None,
    verify: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """Read a model folder's weights (either layout) + config.json; return (state_dict, config, meta).

    `meta` is the weights' own (header, or index) metadata, which `expect` is checked against. The
    sizes recorded in config.json are always checked, the sha256s with `verify` (`verify_sha256`: of
    the one weights file, or of a sharded model's index); folders written before config.json recorded
    them are read without these checks. The whole state dict is in memory: `load_model` is not.
    """
    cfg_obj, weights, meta, aliases, source = _open(out_dir, name, verify, verify_sha256)
    state = dict(_tensors(weights))
    for dup, src in aliases.items():
        if src not in state:
            raise ArtifactError(f"{source} ties {dup!r} to missing tensor {src!r}; rerun the stage that writes it")
        state[dup] = state[src]
    check_expected(source, meta, expect)
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
    out_dir: PathLike,
    expect: Mapping[str, Any] | None = None,
    verify: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[Transformer, dict[str, Any]]:
    """The Transformer of a model folder (fused/, fused/finetuned/, e2e/; one file or sharded) and its
    weights' metadata: the one place a model folder becomes a model. The model is built on the meta
    device, given fp32 storage on `device` and filled one stored tensor at a time (the frozen tensors
    regenerated from the seed), so the host never holds more than one tensor of it beside what
    `device` holds. Raises ArtifactError (one line, naming the folder) when it is incomplete,
    corrupt, or its weights do not fit its own config."""
    cfg_obj, weights, meta, aliases, source = _open(out_dir, "model", verify, None)
    check_expected(source, meta, expect)
    config = cfg_obj["config"]
    where = Path(out_dir) / "config.json"
    if not isinstance(config, dict):
        raise ArtifactError(f"{where} holds no model config; rerun the stage that writes it")
    cfg = ModelConfig.from_dict(config, prefix=f"{where}: model")
    model = empty(lambda: Transformer(cfg), device)
    own = model.state_dict()
    loaded: set[str] = set()

    def misfit(what: str) -> ArtifactError:
        return ArtifactError(f"{out_dir}: the weights do not fit its config ({what})")

    with torch.no_grad():
        for key, t in _tensors(weights):
            if key not in own:
                raise misfit(f"unexpected tensor {key!r}")
            if tuple(t.shape) != tuple(own[key].shape):
                raise misfit(f"{key} has shape {tuple(t.shape)}, the config needs {tuple(own[key].shape)}")
            own[key].copy_(t)
            loaded.add(key)
        for dup, src in aliases.items():
            if dup in own and src in loaded:
                own[dup].copy_(own[src])
                loaded.add(dup)
    missing = sorted(set(own) - loaded)
    if missing:
        raise misfit(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    model.init_frozen()
    return model, meta
