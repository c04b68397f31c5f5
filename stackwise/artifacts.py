"""The experiment folder: every file name, every atomic write, every checkpoint read.

Only this module knows where things live under `exp_dir = <output_root>/<experiment>/`:

    layers/layer_{k}.pt                    stage k's LayerWeights + metadata (torch.save, weights_only-loadable)
    acts/acts_layer{k}/{train,val}/...     activation shards; acts/acts_layer{k}/manifest.json (written last)
    fused/model.safetensors, fused/config.json (+ fused/finetuned/{model.safetensors,config.json})
    e2e/model.safetensors, e2e/config.json
    ckpt/<stage>/                          Lightning ModelCheckpoint folder (mid-stage resume)
    tb/                                    TensorBoard root (one run per stage)
    tokens/                                token cache
    results.json                           one summary record per stage
    eval.json                              stackwise-eval's report
    run.lock                               held (OS file lock) by the run writing here; see stackwise/lock.py
    hydra/                                 Hydra's run logs

Why atomic writes everywhere: a run killed mid-write must never leave a file that a later run
would trust. Every file is written under a temporary name in the same folder, fsync'ed, then
`os.replace`d over the final name, so a reader sees the old file or the new one, never half of
one. An OS error while writing (a full disk, a read-only file system) is an ArtifactWriteError
naming the file: the temporary is removed and the old file, if any, stays. Why no pickle: opening
a checkpoint must never run code, so `torch.load` is always called with `weights_only=True` and
models ship as safetensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from stackwise.errors import ArtifactError, ArtifactWriteError, ConfigError
from stackwise.model.config import ModelConfig
from stackwise.model.transformer import Transformer
from stackwise.model.weights import LayerWeights

PathLike = Union[str, "os.PathLike[str]"]

LAYER_FORMAT = "stackwise.layer"
MODEL_FORMAT = "stackwise.model"
# 2: layer_k.pt holds one state dict per module ("block", "head", "embed") instead of one prefixed dict
LAYER_FORMAT_VERSION = 2
MODEL_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------- paths
class ExperimentPaths:
    """Every path of one experiment, derived from its folder; nothing is created on construction."""

    def __init__(self, exp_dir: PathLike):
        self.root = Path(exp_dir)

    @classmethod
    def from_root(cls, output_root: PathLike, experiment: str) -> ExperimentPaths:
        """`<output_root>/<experiment>/`: a stable folder, so stage k finds what stage k-1 wrote."""
        if not experiment or "/" in experiment or experiment in (".", ".."):
            raise ConfigError("experiment", f"must be a plain folder name, got {experiment!r}")
        return cls(Path(output_root) / experiment)

    def __repr__(self) -> str:
        return f"ExperimentPaths({str(self.root)!r})"

    # -- layer-wise checkpoints
    @property
    def layers_dir(self) -> Path:
        return self.root / "layers"

    def layer_ckpt(self, k: int) -> Path:
        """`layers/layer_{k}.pt`, k 1-based."""
        return self.layers_dir / f"layer_{_check_k(k)}.pt"

    def existing_layers(self) -> list[int]:
        """The k of every `layers/layer_{k}.pt` present, sorted (presence only: not validated)."""
        if not self.layers_dir.is_dir():
            return []
        ks = []
        for p in self.layers_dir.glob("layer_*.pt"):
            stem = p.stem[len("layer_") :]
            if stem.isdigit() and int(stem) >= 1:
                ks.append(int(stem))
        return sorted(ks)

    # -- activation caches
    @property
    def acts_root(self) -> Path:
        return self.root / "acts"

    def acts_dir(self, k: int) -> Path:
        """`acts/acts_layer{k}/`: the hidden states after layer k, per cached example."""
        return self.acts_root / f"acts_layer{_check_k(k)}"

    def acts_manifest(self, k: int) -> Path:
        """`acts/acts_layer{k}/manifest.json`: written last; its presence marks the cache complete."""
        return manifest_path(self.acts_dir(k))

    # -- fused and end-to-end models
    @property
    def fused_dir(self) -> Path:
        return self.root / "fused"

    @property
    def fused_weights(self) -> Path:
        return self.fused_dir / "model.safetensors"

    @property
    def finetuned_dir(self) -> Path:
        """`fused/finetuned/` (model.safetensors + config.json): the jointly fine-tuned fused model.

        A folder of its own rather than `fused/finetuned.safetensors`, so it is complete or not
        by the same rule as every model folder (config.json written last).
        """
        return self.fused_dir / "finetuned"

    @property
    def fused_config(self) -> Path:
        return self.fused_dir / "config.json"

    @property
    def e2e_dir(self) -> Path:
        return self.root / "e2e"

    @property
    def e2e_weights(self) -> Path:
        return self.e2e_dir / "model.safetensors"

    @property
    def e2e_config(self) -> Path:
        return self.e2e_dir / "config.json"

    # -- Lightning, logging, data, summaries
    @property
    def ckpt_root(self) -> Path:
        return self.root / "ckpt"

    def stage_ckpt_dir(self, stage_name: str) -> Path:
        """`ckpt/<stage_name>/` for Lightning's ModelCheckpoint (e.g. `ckpt/layer_3/`)."""
        if not stage_name or "/" in stage_name or stage_name in (".", ".."):
            raise ValueError(f"stage name must be a plain folder name, got {stage_name!r}")
        return self.ckpt_root / stage_name

    def stage_last_ckpt(self, stage_name: str) -> Path:
        """`ckpt/<stage_name>/last.ckpt`: what a mid-stage resume starts from."""
        return self.stage_ckpt_dir(stage_name) / "last.ckpt"

    @property
    def tb_dir(self) -> Path:
        return self.root / "tb"

    @property
    def tokens_dir(self) -> Path:
        return self.root / "tokens"

    @property
    def run_config(self) -> Path:
        """The resolved config of the latest run (what eval / generate / report rebuild it from)."""
        return self.root / "run_config.json"

    @property
    def results_json(self) -> Path:
        return self.root / "results.json"

    @property
    def eval_json(self) -> Path:
        """stackwise-eval's report (the default of its --json)."""
        return self.root / "eval.json"

    @property
    def hydra_dir(self) -> Path:
        return self.root / "hydra"

    @property
    def lock_file(self) -> Path:
        """`run.lock`: the run that writes here holds an OS lock on it (the file itself stays)."""
        return self.root / "run.lock"


def manifest_path(acts_dir: PathLike) -> Path:
    """The manifest of one activation cache folder."""
    return Path(acts_dir) / "manifest.json"


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError("k", f"layer index must be an integer >= 1 (1-based), got {k!r}")
    return k


# ------------------------------------------------------------------------------- atomic writes
def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; not every platform can open a folder, which is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def os_error_in(exc: BaseException) -> OSError | None:
    """The OS error behind `exc`: itself, the one it was raised from or while handling (torch.save
    reports a failed write as a RuntimeError raised while handling the OSError), or the `(os error N)`
    that Rust libraries (safetensors) put in their message. None when there is none."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    m = re.search(r"\(os error (\d+)\)", str(exc))
    return OSError(int(m.group(1)), os.strerror(int(m.group(1)))) if m else None


@contextlib.contextmanager
def write_errors(path: PathLike) -> Iterator[None]:
    """Turn an OS error while writing `path` (no space, quota, read-only, permission, file too large)
    into an ArtifactWriteError naming `path`: a full disk is the user's to fix, not a traceback.

    An OS error about another file (one the writer was reading, say) passes unchanged, as does
    every other exception.
    """
    try:
        yield
    except ArtifactWriteError:
        raise
    except Exception as e:
        err = os_error_in(e)
        if err is None or not _is_about(err, Path(path)):
            raise
        raise ArtifactWriteError(path, err.errno, one_line(err.strerror or err)) from e


def _is_about(err: OSError, path: Path) -> bool:
    """Whether `err` names no file, or `path`, one of its folders, or a file beside it (its temporary)."""
    if err.filename is None:
        return True
    named = Path(os.fsdecode(err.filename)).absolute()
    target = path.absolute()
    return named == target or named in target.parents or named.parent == target.parent


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    For writers that want a file name (safetensors' `save_file`). On any exception the temporary
    file is removed and `path` is left exactly as it was; an OS error (a full disk...) is raised as
    an ArtifactWriteError naming `path`.
    """
    final = Path(path)
    tmp: Path | None = None
    try:
        with write_errors(final):
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
            os.close(fd)
            tmp = Path(tmp_name)
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_open(path: PathLike) -> Iterator[IO[bytes]]:
    """Yield a binary file object whose bytes replace `path` atomically when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(data: bytes, path: PathLike) -> None:
    """Replace `path` with `data` atomically."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_json(obj: Any, path: PathLike) -> None:
    """Replace `path` with `obj` as indented JSON atomically (serialised first: a bad value writes nothing)."""
    atomic_write_bytes((json.dumps(obj, indent=2) + "\n").encode(), path)


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """`torch.save(obj, path)`, atomically."""
    with atomic_open(path) as f:
        torch.save(obj, f)


class HashingWriter:
    """A write-only file wrapper that hashes what passes through, so a shard is hashed while it
    is written instead of being read back."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self._h = hashlib.sha256()
        self.nbytes = 0

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        self._h.update(mv)
        self._f.write(mv)
        self.nbytes += mv.nbytes
        return mv.nbytes

    def flush(self) -> None:
        self._f.flush()

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def atomic_write_stream(path: PathLike, write: Callable[[IO[bytes]], None]) -> tuple[str, int]:
    """Atomically write `path` through `write(fileobj)`; return (sha256, size in bytes)."""
    with atomic_open(path) as f:
        hw = HashingWriter(f)
        write(hw)  # type: ignore[arg-type]
    return hw.hexdigest(), hw.nbytes


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (files can be many GiB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- error messages
def one_line(text: str, limit: int = 200) -> str:
    """First line of an exception message, shortened: user errors are one line (errors.py)."""
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _short(value: Any) -> str:
    """Hashes are shown as their first 12 characters; everything else as its repr."""
    if isinstance(value, str) and len(value) > 16 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"
    return repr(value)


def _json_normal(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists), so comparisons are like for like."""
    return json.loads(json.dumps(value))


def check_expected(
    source: PathLike,
    found: Mapping[str, Any],
    expect: Mapping[str, Any] | None,
    hint: str = "use overwrite=true or another experiment",
) -> None:
    """Raise ArtifactError naming `source` for the first key whose recorded value differs from `expect`.

    `found` is an artifact's metadata; `expect` is what this run would have written.
    """
    for key, want in (expect or {}).items():
        if key not in found:
            raise ArtifactError(
                f"{source} records no {key!r} (expected {_short(want)}); "
                f"it was not written by this version of StackWise; {hint}"
            )
        have, want_n = _json_normal(found[key]), _json_normal(want)
        if have != want_n:
            if key == "config_hash":
                what = f"was made by config {_short(have)} but this run's config is {_short(want_n)}"
            else:
                what = f"has {key}={_short(have)} but this run expects {key}={_short(want_n)}"
            raise ArtifactError(f"{source} {what}; {hint}")


# ------------------------------------------------------------------------- layer checkpoints
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
        meta_n = _json_normal(dict(meta))
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
                f"{p} has sha256 {_short(have)} but {_short(verify_sha256)} was recorded: "
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


# -------------------------------------------------------------------------- safetensors models
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
    meta_n, config_n = _json_normal(dict(meta)), _json_normal(dict(config))
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
            f"{weights} has sha256 {_short(have)} but {_short(verify_sha256)} was recorded: "
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


# ----------------------------------------------------------------------------------- results
def read_results(paths: ExperimentPaths) -> list[dict[str, Any]]:
    """The summary records of the experiment, one per stage, in the order the stages first ran ([]
    when none was written yet). Files written before records were replaced may hold a stage twice:
    its last record counts."""
    p = paths.results_json
    if not p.is_file():
        return []
    try:
        records = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{p} is not valid JSON ({one_line(e, 120)}); delete it to start a new one") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ArtifactError(f"{p} is not a list of result records; delete it to start a new one")
    by_stage: dict[Any, dict[str, Any]] = {}
    for r in records:
        by_stage[r.get("stage")] = r  # a dict keeps the first position of a key and takes its last value
    return list(by_stage.values())


def record_result(paths: ExperimentPaths, record: Mapping[str, Any]) -> None:
    """Write one stage's record (val loss, acc, tokens, seconds, ...) to results.json, atomically: a
    stage run again replaces its record, in place.

    Call it from one process only (global rank 0) and under the experiment's lock (stackwise/lock.py):
    it is a read-modify-write.
    """
    rec = _json_normal(dict(record))
    records = read_results(paths)
    for i, r in enumerate(records):
        if r.get("stage") == rec.get("stage"):
            records[i] = rec
            break
    else:
        records.append(rec)
    atomic_write_json(records, paths.results_json)
