"""The token file: a corpus tokenized once into `<cache_dir>/tokens-<key>.bin`, memory-mapped after.

The key covers the corpus files (path, size, mtime), the .jsonl field, the tokenizer's identity and
the token dtype; a JSON sidecar written last marks the file complete, so a killed run leaves nothing
a later run would trust. The file does not depend on `seq_len` or `val_fraction`: the split is a view of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stackwise.artifacts import atomic_open, atomic_write_json
from stackwise.data.corpus import Source, iter_source
from stackwise.data.tokenizers import ByteTokenizer, Tokenizer
from stackwise.errors import StackWiseError

log = logging.getLogger("stackwise")


CACHE_FORMAT = "stackwise.tokens.v1"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def token_stream(source: Source, tok: Tokenizer, cache_dir: Path) -> tuple[np.ndarray, bool, Path]:
    """The corpus as one flat token memmap; (array, built now?, file)."""
    dtype = token_dtype(tok.vocab_size)
    key_obj = {
        "format": CACHE_FORMAT,
        "corpus": source.identity,
        "field": source.field,
        "tokenizer": tok.identity,
        "dtype": dtype.name,
    }
    key = hashlib.sha256(json.dumps(key_obj, sort_keys=True).encode()).hexdigest()[:20]
    bin_path, meta_path = cache_dir / f"tokens-{key}.bin", cache_dir / f"tokens-{key}.json"

    stream = _open_cached(bin_path, meta_path, key, dtype)
    if stream is not None:
        log.info("tokens: reusing %s (%d tokens)", bin_path, len(stream))
        return stream, False, bin_path

    n_tokens = 0
    with atomic_open(bin_path) as f:  # a killed run leaves no .bin; the sidecar comes last anyway
        for ids in _encode(source, tok):
            f.write(np.asarray(ids, dtype=dtype).tobytes())
            n_tokens += len(ids)
        if n_tokens == 0:
            raise StackWiseError(f"{source.name}: the corpus is empty (no text to tokenize)")
    atomic_write_json(
        {
            "format": CACHE_FORMAT,
            "key": key,
            "n_tokens": n_tokens,
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "source": source.name,
            "identity": key_obj,
        },
        meta_path,
    )
    log.info("tokens: tokenized %s into %s (%d tokens)", source.name, bin_path, n_tokens)
    stream = _open_cached(bin_path, meta_path, key, dtype)
    assert stream is not None, "the token file just written does not read back"
    return stream, True, bin_path


def _open_cached(bin_path: Path, meta_path: Path, key: str, dtype: np.dtype) -> np.ndarray | None:
    """The memmap when a complete cache exists (sidecar matches the file), else None."""
    try:
        meta = json.loads(meta_path.read_text())
        n = int(meta["n_tokens"])
        ok = (
            meta.get("format") == CACHE_FORMAT
            and meta.get("key") == key
            and meta.get("dtype") == dtype.name
            and n > 0
            and bin_path.stat().st_size == n * dtype.itemsize
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,)) if ok else None


def _encode(source: Source, tok: Tokenizer) -> Iterator[Any]:
    chunks = iter_source(source)
    if isinstance(tok, ByteTokenizer):  # bytes are their own ids: no Python list per byte
        for _, text in chunks:
            yield np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return
    batch: list[str] = []
    for _, text in chunks:
        batch.append(text)
        if len(batch) >= 64:  # encode_batch runs the chunks in parallel on the Rust side
            yield [i for ids in tok.encode_batch(batch) for i in ids]
            batch = []
    if batch:
        yield [i for ids in tok.encode_batch(batch) for i in ids]


@dataclass(frozen=True)
class MappedTokens:
    """A C-contiguous view of a token file as where it lies in the file, not its bytes: how a token
    memmap reaches a loader worker that gets its dataset pickled (stackwise/data/workers.py)."""

    path: str
    dtype: str
    offset: int
    shape: tuple[int, ...]

    def open(self) -> np.ndarray:
        return np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r", offset=self.offset, shape=self.shape)


def by_file(tokens: np.ndarray) -> np.ndarray | MappedTokens:
    """MappedTokens for a C-contiguous view of a file's memmap (the token file's splits), else `tokens` itself."""
    root = tokens
    while isinstance(root.base, np.ndarray):  # a slice or reshape of the file's memmap: down to the memmap
        root = root.base
    if not isinstance(root, np.memmap) or root.filename is None or not tokens.flags.c_contiguous:
        return tokens
    offset = root.offset + (tokens.ctypes.data - root.ctypes.data)
    return MappedTokens(str(root.filename), tokens.dtype.str, int(offset), tuple(tokens.shape))
