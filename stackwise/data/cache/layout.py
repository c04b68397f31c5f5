"""What an activation cache is on disk: file names, dtypes, the fp8 codec, the manifest.

See stackwise/data/cache/__init__.py for the layout of a cache folder.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stackwise.artifacts import PathLike, atomic_write_json, manifest_path
from stackwise.errors import StackWiseError

MANIFEST_FORMAT = "stackwise.activations"
MANIFEST_VERSION = 1
FIELDS = ("hidden", "targets", "mask", "t", "index", "view")  # every cache; fp8 adds SCALE
SCALE = "scale"
SPLITS = ("train", "val")
FP8 = "float8_e4m3"
CACHE_DTYPES = ("float32", "bfloat16", "float16", FP8)
# e4m3 (torch.float8_e4m3fn: no infinities) holds magnitudes up to 448 with 3 mantissa bits
FP8_MAX = 448.0
# meta keys every manifest must carry: they tie the cache to the checkpoint and config that made it
REQUIRED_META = ("k", "config_hash", "producer_sha256", "views")


# ------------------------------------------------------------------------------ dtypes on disk
def check_dtype(dtype: str) -> str:
    if dtype not in CACHE_DTYPES:
        raise StackWiseError(f"cache.dtype: must be one of {', '.join(CACHE_DTYPES)}, got {dtype!r}")
    if dtype == FP8:
        float8()
    return dtype


def float8() -> torch.dtype:
    """torch.float8_e4m3fn (torch >= 2.1); a one-line error where this torch lacks it."""
    dt = getattr(torch, "float8_e4m3fn", None)
    if dt is None:
        raise StackWiseError(f"cache.dtype={FP8} needs torch >= 2.1 (torch.float8_e4m3fn); this is {torch.__version__}")
    return dt


def fields(dtype: str) -> tuple[str, ...]:
    """The fields a cache of `dtype` stores, in the order each shard's files are written."""
    return (*FIELDS, SCALE) if dtype == FP8 else FIELDS


def targets_storage(vocab_size: int) -> str:
    """Smallest numpy dtype that holds every token id of the vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


_HIDDEN_STORAGE = {"float32": "float32", "float16": "float16", "bfloat16": "uint16", FP8: "uint8"}
_HIDDEN_OF_STORAGE = {v: k for k, v in _HIDDEN_STORAGE.items()}


def storage_dtypes(hidden_dtype: str, vocab_size: int) -> dict[str, str]:
    """numpy dtype on disk per field (bf16 and fp8 hidden states are their bit patterns)."""
    out = {
        "hidden": _HIDDEN_STORAGE[hidden_dtype],
        "targets": targets_storage(vocab_size),
        "mask": "bool",
        "t": "float32",
        "index": "int64",
        "view": "int16",
    }
    if hidden_dtype == FP8:
        out[SCALE] = "float32"
    return out


def hidden_dtype_of(storage: str) -> str:
    """The cache dtype whose hidden states are stored as numpy `storage`."""
    return _HIDDEN_OF_STORAGE.get(storage, storage)


def read_dtype(hidden_dtype: str) -> str:
    """dtype of the hidden states a reader returns: the stored one; fp8 is dequantised to bfloat16."""
    return "bfloat16" if hidden_dtype == FP8 else hidden_dtype


def logical_dtypes(hidden_dtype: str) -> dict[str, str]:
    """dtype of the tensors a reader gets back per field."""
    out = {
        "hidden": read_dtype(hidden_dtype),
        "targets": "int64",
        "mask": "bool",
        "t": "float32",
        "index": "int64",
        "view": "int64",
    }
    if hidden_dtype == FP8:
        out[SCALE] = "float32"
    return out


# ------------------------------------------------------------------------------------- codec
def encode_hidden(h: Tensor, hidden_dtype: str) -> dict[str, Tensor]:
    """(B, T, D) hidden states -> their storage bits, on h's device (a GPU casts before the copy to
    the host moves half or a quarter of the bytes). {"hidden": (B, T, D)[, "scale": (B, T) float32]}.

    bf16 comes back as int16 (torch.uint16 arrived in 2.3; same bits as numpy's uint16). fp8: each
    token vector is scaled so its largest magnitude is e4m3's largest (448), rounded to nearest.
    """
    h = h.detach()
    if hidden_dtype == "bfloat16":
        return {"hidden": h.to(torch.bfloat16).contiguous().view(torch.int16)}
    if hidden_dtype != FP8:
        return {"hidden": h.to(getattr(torch, hidden_dtype)).contiguous()}
    hf = h.float()
    amax = hf.abs().amax(dim=-1)  # (B, T)
    scale = torch.where(amax > 0, amax / FP8_MAX, 1.0)  # an all-zero vector keeps scale 1
    # amax / (amax / 448) may round a hair above 448, which e4m3fn would turn into NaN: clamp
    q = (hf / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(float8())
    return {"hidden": q.view(torch.uint8), SCALE: scale}


def decode_fp8(bits: Tensor, scale: Tensor, out: Tensor | None = None, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """(..., D) uint8 e4m3 bits and (...) float32 scales -> bits' value * scale, computed in fp32
    and rounded once to `dtype` (or `out`'s dtype)."""
    values = bits.view(float8()).to(torch.float32)
    if out is None:
        out = torch.empty(bits.shape, dtype=dtype, device=bits.device)
    return torch.mul(values, scale.unsqueeze(-1), out=out)


def round_trip(h: Tensor, hidden_dtype: str) -> Tensor:
    """What a reader of a `hidden_dtype` cache returns for hidden states `h` written to it, computed
    on h's device without the files: h in the stored dtype (fp8: encoded, then decoded to bfloat16).
    `cache.store=recompute` rounds each recomputed layer's output with it, as a cache would have."""
    if hidden_dtype != FP8:
        return h.detach().to(getattr(torch, check_dtype(hidden_dtype)))
    enc = encode_hidden(h, FP8)
    return decode_fp8(enc["hidden"], enc[SCALE], dtype=getattr(torch, read_dtype(FP8)))


def tensor_to_numpy(t: Tensor) -> np.ndarray:
    """A host tensor of storage bits as a numpy array (int16 bits of bf16 are viewed as uint16)."""
    a = t.numpy()
    return a.view(np.uint16) if a.dtype == np.int16 and t.dtype == torch.int16 else a


def npy_header(dtype: str | np.dtype, shape: Sequence[int]) -> bytes:
    """The .npy header `np.save` writes for a C-ordered array of `dtype` and `shape` (format 1.0)."""
    dt = np.dtype(dtype)
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False, "shape": tuple(int(s) for s in shape)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def padded_npy_header(dtype: str | np.dtype, shape: Sequence[int], length: int) -> bytes:
    """`npy_header(dtype, shape)` padded with spaces to `length` bytes (a header rewritten in place
    for fewer rows keeps its length, so the data after it need not move)."""
    hdr = npy_header(dtype, shape)
    if len(hdr) == length:
        return hdr
    if len(hdr) > length:
        raise ValueError(f"a .npy header for shape {tuple(shape)} needs {len(hdr)} bytes, more than {length}")
    text = hdr[10:].rstrip(b"\n ")  # magic (6) + version (2) + little-endian length (2), then the dict
    body = text + b" " * (length - 10 - len(text) - 1) + b"\n"
    return hdr[:8] + len(body).to_bytes(2, "little") + body


# ------------------------------------------------------------------------------------ sizes
def estimate_cache_bytes(n_rows: int, seq_len: int, d_model: int, dtype: str, vocab_size: int | None = None) -> int:
    """Bytes the shards of `n_rows` rows take on disk (headers excluded: < 1 KiB per file).

    Without `vocab_size` targets are counted at 4 bytes, the larger of the two storages.
    """
    check_dtype(dtype)
    hidden = seq_len * d_model * np.dtype(_HIDDEN_STORAGE[dtype]).itemsize
    scale = seq_len * 4 if dtype == FP8 else 0
    targets = seq_len * (np.dtype(targets_storage(vocab_size)).itemsize if vocab_size else 4)
    per_row = hidden + scale + targets + seq_len + 4 + 8 + 2  # + mask, t, index, view
    return int(n_rows) * per_row


# shard_size=auto: a shard's hidden states fill at most this many bytes (and it holds at most
# AUTO_SHARD_MAX_ROWS rows), so that at large rows a caching batch spans several shards, whose files
# the sink hashes on several threads at once (sha256 of one file is sequential: one core)
AUTO_SHARD_BYTES = 256 * 2**20
AUTO_SHARD_MAX_ROWS = 1024


def shard_rows(setting: int | str, seq_len: int, d_model: int, dtype: str) -> int:
    """Rows per shard for `cache.shard_size` (an integer, or auto: see AUTO_SHARD_BYTES)."""
    if setting != "auto":
        return int(setting)
    row = seq_len * d_model * np.dtype(_HIDDEN_STORAGE[check_dtype(dtype)]).itemsize
    return max(1, min(AUTO_SHARD_MAX_ROWS, AUTO_SHARD_BYTES // max(1, row)))


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_free_space(path: PathLike, needed_bytes: int, caches: int = 1) -> None:
    """Stop before caching when the disk under `path` (which may not exist yet) cannot hold it, and
    the `caches` - 1 caches after it that the run keeps too (`needed_bytes` counts them all)."""
    free = shutil.disk_usage(_existing_ancestor(Path(path))).free
    if needed_bytes > free:
        kept = (
            f" for the {caches} caches the run still writes and keeps (cache.keep=last keeps fewer)"
            if caches > 1
            else ""
        )
        raise StackWiseError(
            f"not enough disk space for the activation cache at {path}: needs "
            f"{human_bytes(needed_bytes)}{kept}, {human_bytes(free)} free (lower cache.train_sequences "
            f"or cache.views, use cache.dtype=bfloat16 or {FP8}, or free some space)"
        )


def human_bytes(n: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


# ------------------------------------------------------------------------------------- names
def shard_stem(split: str, rank: int, shard: int) -> str:
    return f"{split}/r{rank}_s{shard:05d}"


def records_path(acts_dir: Path, rank: int) -> Path:
    return Path(acts_dir) / f"records_r{rank}.json"


# ----------------------------------------------------------------------------------- manifest
def gather_records(acts_dir: PathLike) -> list[dict[str, Any]]:
    """Shard records of all ranks, ordered by rank then write order (the dataset's row order)."""
    out: list[dict[str, Any]] = []
    files = sorted(Path(acts_dir).glob("records_r*.json"), key=lambda p: int(p.stem[len("records_r") :]))
    for p in files:
        out.extend(json.loads(p.read_text()))
    return out


def write_manifest(
    acts_dir: PathLike, records: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], splits: Sequence[str] = SPLITS
) -> Path:
    """Write manifest.json (atomically, and last): the cache is complete from this moment.

    `meta` must hold k, config_hash, producer_sha256 (of layer_k.pt) and views; it may add any
    JSON value (seed, vocab_size...). seq_len, d_model, dtypes and counts come from the shards.
    Schema (version 1):
        format, version, k, config_hash, producer_sha256, views, seq_len, d_model, hidden_dtype,
        fields: {name: {dtype (as read), storage (numpy, on disk), row_shape}},
        splits: {split: {rows, shards: [{stem, rank, rows, files: {field: {path, sha256, bytes}}}]}},
        total_bytes, meta: {every key of `meta`}
    An fp8 cache (hidden_dtype float8_e4m3) has one more field, `scale`.
    """
    acts = Path(acts_dir)
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"write_manifest needs meta keys {missing}")
    if not records:
        raise ValueError(f"write_manifest: no shards were written to {acts} (empty predict dataloaders?)")
    names, row_shapes, storage, by_split, total = _shard_table(records, splits)
    hidden_dtype = hidden_dtype_of(storage["hidden"])
    if names != list(fields(hidden_dtype)):
        raise ValueError(f"write_manifest: a {hidden_dtype} cache has fields {fields(hidden_dtype)}, got {names}")
    logical = logical_dtypes(hidden_dtype)
    seq_len, d_model = row_shapes["hidden"]
    for key, got in (("seq_len", seq_len), ("d_model", d_model), ("dtype", hidden_dtype)):
        if key in meta and meta[key] != got:
            raise ValueError(f"write_manifest: meta says {key}={meta[key]!r} but the shards hold {key}={got!r}")
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "k": meta["k"],
        "config_hash": meta["config_hash"],
        "producer_sha256": meta["producer_sha256"],
        "views": meta["views"],
        "seq_len": seq_len,
        "d_model": d_model,
        "hidden_dtype": hidden_dtype,
        "fields": {f: {"dtype": logical[f], "storage": storage[f], "row_shape": row_shapes[f]} for f in names},
        "splits": {s: {"rows": sum(sh["rows"] for sh in shs), "shards": shs} for s, shs in by_split.items()},
        "total_bytes": total,
        "meta": json.loads(json.dumps(dict(meta))),
    }
    path = manifest_path(acts)
    atomic_write_json(manifest, path)
    return path


def _shard_table(records: Sequence[Mapping[str, Any]], splits: Sequence[str]) -> tuple:
    """(field names, row shape and storage dtype per field, shard entries per split, total bytes)
    from the writers' shard records, every shard checked against the first."""
    names = list(records[0]["files"])
    row_shapes: dict[str, list[int]] = {}
    storage: dict[str, str] = {}
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in splits}
    total = 0
    for rec in records:
        if rec["split"] not in by_split:
            raise ValueError(f"shard {rec['stem']} is of split {rec['split']!r}, not one of {tuple(splits)}")
        if list(rec["files"]) != names:
            raise ValueError(f"shard {rec['stem']} has fields {list(rec['files'])}, the first shard {names}")
        for f in names:
            info = rec["files"][f]
            rs, dt = list(info["shape"][1:]), info["dtype"]
            if info["shape"][0] != rec["rows"] or row_shapes.setdefault(f, rs) != rs or storage.setdefault(f, dt) != dt:
                raise ValueError(
                    f"shard {rec['stem']}: field {f} is {info['shape']} {dt}, expected "
                    f"[{rec['rows']}, *{row_shapes[f]}] {storage[f]}"
                )
            total += int(info["bytes"])
        by_split[rec["split"]].append(
            {
                "stem": rec["stem"],
                "rank": rec["rank"],
                "rows": int(rec["rows"]),
                "files": {f: {k: rec["files"][f][k] for k in ("path", "sha256", "bytes")} for f in names},
            }
        )
    return names, row_shapes, storage, by_split, total


def discard_incomplete(acts_dir: PathLike) -> bool:
    """Remove a cache folder that has no readable manifest (an interrupted write); True if removed.

    A folder whose manifest reads is left alone: if its shards are damaged, `ActivationCache.open`
    says so, naming the file, rather than this silently deleting evidence.
    """
    acts = Path(acts_dir)
    if not acts.exists():
        return False
    mpath = manifest_path(acts)
    if mpath.is_file():
        try:
            m = json.loads(mpath.read_text())
            if isinstance(m, dict) and m.get("format") == MANIFEST_FORMAT:
                return False
        except (OSError, ValueError):
            pass
    discard_cache(acts)
    return True


def discard_cache(acts_dir: PathLike) -> None:
    """Remove a cache folder, manifest first, so an interrupted removal never leaves a trusted cache."""
    acts = Path(acts_dir)
    manifest_path(acts).unlink(missing_ok=True)
    shutil.rmtree(acts, ignore_errors=True)
