"""Token data: `(N, T)` integer arrays of training and validation sequences.

Three sources (`data.name`):
  dummy        a synthetic, learnable language generated in memory from `seed` (see `dummy_splits`)
  text         your corpus: one .txt file, a folder of .txt files (recursive, sorted by path) or a
               .jsonl file whose `data.field` holds the text
  shakespeare  Tiny Shakespeare, shipped gzipped in the package (stackwise/data/corpora): no download

Text is tokenized once into a flat token file under `cache_dir` (`tokens-<key>.bin` + a JSON
sidecar written last), keyed by the corpus files (path, size, mtime) and the tokenizer's identity;
later loads memory-map it instead of tokenizing again (`TokenSplits.built` says which happened).
The file does not depend on `seq_len` or `val_fraction`: the split is a view of it. The stream is
cut into non-overlapping windows of `seq_len`; the LAST `val_fraction` of the windows (at least
one) are validation. A contiguous tail rather than a random choice of windows keeps validation text
away from training text (only one boundary between them), as nanoGPT does; the split needs no seed.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from stackwise.artifacts import atomic_open, atomic_write_json
from stackwise.data.tokenizers import TOKENIZER_KINDS, ByteTokenizer, Tokenizer, build_tokenizer
from stackwise.errors import ConfigError, StackWiseError
from stackwise.structured import Structured
from stackwise.utils import generator

log = logging.getLogger("stackwise")

DATA_NAMES = ("dummy", "text", "shakespeare")
SHAKESPEARE = ("stackwise.data.corpora", "tinyshakespeare.txt.gz")
CACHE_FORMAT = "stackwise.tokens.v1"
_BLOCK = 1 << 22  # bytes read at a time from a text file (4 MiB): memory stays flat on big corpora

# The dummy language: a first-order Markov chain over `dummy_vocab` symbols where every symbol has
# exactly two successors, taken with these probabilities. See `dummy_splits` for why.
DUMMY_SUCCESSOR_PROBS = (0.85, 0.15)

PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------------------------------- config
@dataclass
class TokenizerConfig(Structured):
    PATH = "data.tokenizer"

    kind: str = "byte"  # byte | hf (a Hugging Face tokenizer.json at `path`)
    path: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in TOKENIZER_KINDS:
            raise ConfigError(
                self.key("kind"), f"unknown tokenizer kind {self.kind!r}; allowed: {', '.join(TOKENIZER_KINDS)}"
            )


@dataclass
class DataConfig(Structured):
    """The `data` node (stackwise/structured.py). The defaults are data=shakespeare's; each
    stackwise/conf/data/*.yaml sets its `name` and what differs."""

    PATH = "data"

    name: str = "shakespeare"
    seq_len: int = 128
    batch_size: int = 32
    num_workers: int = 0
    val_fraction: float = 0.05  # text / shakespeare: the last fraction of the windows
    path: str | None = None  # text: a .txt file, a folder of .txt files, or a .jsonl file
    field: str = "text"  # text: the JSON key holding the text of each .jsonl line
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    cache_dir: str | None = None  # null: the caller's folder (the experiment's tokens/)
    # dummy only
    n_train: int = 4096
    n_val: int = 256
    dummy_vocab: int = 32  # symbols of the dummy language; + [MASK] + [PAD]

    def __post_init__(self) -> None:
        if isinstance(self.tokenizer, Mapping):  # built in code from a plain dict
            self.tokenizer = TokenizerConfig.from_dict(self.tokenizer)
        if self.name not in DATA_NAMES:
            raise ConfigError(self.key("name"), f"unknown data set {self.name!r}; allowed: {', '.join(DATA_NAMES)}")
        self._at_least("seq_len", 4 if self.name == "dummy" else 2)
        self._at_least("batch_size", 1)
        self._at_least("num_workers", 0)
        if self.name == "dummy":
            self._at_least("n_train", 1)
            self._at_least("n_val", 1)
            self._at_least("dummy_vocab", 2)
            if self.dummy_vocab > 65534:
                raise ConfigError(self.key("dummy_vocab"), f"must be <= 65534 (uint16 tokens), got {self.dummy_vocab}")
            return
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(self.key("val_fraction"), f"must be a number in (0, 1), got {self.val_fraction!r}")
        if self.name == "text":
            self._check_corpus()

    def _check_corpus(self) -> None:
        if not self.path:
            raise ConfigError(
                self.key("path"), "data=text needs data.path: a .txt file, a folder of .txt files or a .jsonl file"
            )
        path = Path(self.path).expanduser()
        if not path.exists():
            raise ConfigError(
                self.key("path"),
                f"{self.path} does not exist (expected a .txt file, a folder of .txt files or a .jsonl file)",
            )
        if path.is_file() and path.stat().st_size == 0:  # caught here, before any experiment folder is made
            raise ConfigError(self.key("path"), f"{self.path}: the corpus is empty (0 bytes)")
        if not self.field:
            raise ConfigError(self.key("field"), f"must be a non-empty string, got {self.field!r}")

    def _at_least(self, name: str, low: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(self.key(name), f"must be an integer >= {low}, got {value!r}")


def data_tokenizer(cfg: DataConfig) -> Tokenizer | None:
    """The tokenizer of a text data set; None for dummy (its symbols are ids already)."""
    return None if cfg.name == "dummy" else build_tokenizer(dataclasses.asdict(cfg.tokenizer))


def vocab_info(cfg: DataConfig) -> tuple[int, int, int]:
    """(vocab_size, mask_id, pad_id) of the data, without reading the corpus."""
    if cfg.name == "dummy":
        return cfg.dummy_vocab + 2, cfg.dummy_vocab, cfg.dummy_vocab + 1
    tok = data_tokenizer(cfg)
    return tok.vocab_size, tok.mask_id, tok.pad_id


# ------------------------------------------------------------------------------------ the splits
@dataclass
class TokenSplits:
    train: np.ndarray  # (N, T) uint16/uint32, a read-only memmap when it comes from the token cache
    val: np.ndarray  # (M, T)
    vocab_size: int
    mask_id: int
    pad_id: int
    tokenizer: Tokenizer | None = None  # None for dummy
    built: bool = False  # text: True when this call tokenized the corpus, False when it reused the cache
    cache_file: Path | None = None


def load_token_splits(cfg: DataConfig, seed: int, cache_dir: PathLike | None = None) -> TokenSplits:
    """The train/val token arrays of `cfg`. `cfg.cache_dir`, when set, wins over `cache_dir`."""
    if cfg.name == "dummy":
        return dummy_splits(cfg, seed)
    tok = data_tokenizer(cfg)
    where = cfg.cache_dir or cache_dir
    if where is None:
        raise ConfigError("data.cache_dir", "no folder to cache the tokenized corpus in; set data.cache_dir")
    if cfg.name == "shakespeare":
        source = _shakespeare_source()
    else:
        source = _file_source(Path(cfg.path).expanduser(), cfg.field)
    stream, built, path = _token_stream(source, tok, Path(where).expanduser())
    train, val = _split_windows(stream, cfg, source.name)
    return TokenSplits(train, val, tok.vocab_size, tok.mask_id, tok.pad_id, tok, built, path)


def _split_windows(stream: np.ndarray, cfg: DataConfig, name: str) -> tuple[np.ndarray, np.ndarray]:
    T = cfg.seq_len
    n = len(stream) // T  # non-overlapping windows; the ragged tail is dropped
    if n < 2:
        raise StackWiseError(
            f"{name}: the corpus has {len(stream)} tokens, {n} sequence(s) of data.seq_len={T}; it needs at least "
            f"one training and one validation sequence ({2 * T} tokens): use a longer corpus or a smaller data.seq_len"
        )
    n_val = min(n - 1, max(1, round(n * cfg.val_fraction)))
    windows = stream[: n * T].reshape(n, T)  # still a memmap view: nothing is read yet
    return windows[: n - n_val], windows[n - n_val :]


# ------------------------------------------------------------------------------------------ dummy
def dummy_splits(cfg: DataConfig, seed: int) -> TokenSplits:
    """A synthetic language where depth helps, generated from `seed` alone (no files).

    Sequences are walks of a sparse first-order Markov chain over S = dummy_vocab symbols: the
    "grammar" gives every symbol two successors (a random choice, from `(seed, "dummy", "grammar")`),
    taken with probability 0.85 / 0.15; the first symbol is uniform. Why it suits a layer-wise
    masked-diffusion model:
      - one layer learns it fast (the neighbours of a masked token pin it down), so a 1-layer model
        is far below the uniform guess log(S);
      - with t up to 0.9, masked tokens sit in long masked runs; the best guess then depends on the
        nearest visible tokens several positions away through powers of the transition matrix
        (a forward-backward computation), which one attention layer with few heads cannot do but a
        stack can approximate one hop per layer: each layer refines the masked positions' beliefs
        from their neighbours' beliefs, which is also what greedy layer-wise training builds.
    Validation rows never occur in the training rows (rows of val found in train are redrawn).
    """
    S, T = cfg.dummy_vocab, cfg.seq_len
    g = generator(seed, "dummy", "grammar", S)
    successors = dummy_grammar(S, g)  # (S, 2)
    train = _dummy_walks(successors, cfg.n_train, T, generator(seed, "dummy", "train", S, T))
    val = _dummy_val(successors, cfg.n_val, T, generator(seed, "dummy", "val", S, T), train)
    return TokenSplits(train, val, S + 2, S, S + 1)


def dummy_grammar(S: int, g: torch.Generator) -> torch.Tensor:
    """(S, 2): each symbol's likely and rare successor.

    The likely successors form ONE cycle through all S symbols (a random cyclic order), so a walk
    never gets stuck in a self-loop or a short cycle; the rare successor is any other symbol that
    is neither the symbol itself nor its likely successor.
    """
    order = torch.randperm(S, generator=g)
    likely = torch.empty(S, dtype=torch.long)
    likely[order] = order.roll(-1)  # order[i] -> order[i + 1]
    rare = torch.randint(0, max(S - 2, 1), (S,), generator=g)  # an index among the S - 2 others
    for s in range(S):  # skip s and likely[s] when counting (S is small: a Python loop is fine)
        for taken in sorted((s, int(likely[s]))):
            rare[s] += int(rare[s] >= taken)
    if S == 2:  # no third symbol: the rare move stays put
        rare = torch.arange(2)
    return torch.stack([likely, rare], 1)


def _dummy_walks(successors: torch.Tensor, n: int, T: int, g: torch.Generator) -> np.ndarray:
    S = successors.shape[0]
    x = torch.empty(n, T, dtype=torch.long)  # (n, T)
    x[:, 0] = torch.randint(0, S, (n,), generator=g)
    # branch 1 (the rarer successor) where u lands in the last 0.15 of [0, 1)
    branch = (torch.rand(n, T, generator=g) >= DUMMY_SUCCESSOR_PROBS[0]).long()  # (n, T)
    for i in range(1, T):
        x[:, i] = successors[x[:, i - 1], branch[:, i]]
    return x.numpy().astype(np.uint16)


def _dummy_val(successors: torch.Tensor, n: int, T: int, g: torch.Generator, train: np.ndarray) -> np.ndarray:
    seen = {row.tobytes() for row in train}
    rows: list[np.ndarray] = []
    for _ in range(16):  # a few rounds always suffice unless seq_len is tiny
        for row in _dummy_walks(successors, n, T, g):
            key = row.tobytes()
            if key not in seen:
                seen.add(key)
                rows.append(row)
        if len(rows) >= n:
            return np.stack(rows[:n])
    raise ConfigError(
        "data.seq_len",
        f"seq_len={T} is too short to draw {n} validation sequences that differ from "
        "the training ones; raise data.seq_len or lower data.n_val / data.n_train",
    )


# ------------------------------------------------------------------------------ reading a corpus
@dataclass
class _Source:
    """A corpus: a display name, an identity for the cache key, and (name, opener, is_jsonl) files."""

    name: str
    identity: list
    files: list  # [(display name, () -> binary file, is_jsonl)]
    field: str = "text"


def corpus_files(path: PathLike) -> list[Path]:
    """The files of a corpus path: the file itself, or the .txt files under a folder, sorted."""
    p = Path(path).expanduser()
    if not p.exists():
        raise StackWiseError(f"{p} does not exist (expected a .txt file, a folder of .txt files or a .jsonl file)")
    if p.is_dir():
        files = sorted((f for f in p.rglob("*.txt") if f.is_file()), key=lambda f: f.relative_to(p).as_posix())
        if not files:
            raise StackWiseError(f"{p}: the folder holds no .txt files")
        return files
    return [p]


def _file_source(path: Path, field_name: str) -> _Source:
    files = corpus_files(path)
    identity = []
    for f in files:
        st = f.stat()
        identity.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    opened = [(str(f), (lambda f=f: open(f, "rb")), f.suffix.lower() == ".jsonl") for f in files]  # noqa: SIM115 (opened later, by the reader, in a with)
    return _Source(str(path), identity, opened, field_name)


def _shakespeare_source() -> _Source:
    res = resources.files(SHAKESPEARE[0]).joinpath(SHAKESPEARE[1])
    blob = res.read_bytes()
    name = f"stackwise/data/corpora/{SHAKESPEARE[1]}"
    return _Source(
        name, [name, hashlib.sha256(blob).hexdigest()], [(name, lambda: gzip.GzipFile(fileobj=io.BytesIO(blob)), False)]
    )


def iter_corpus_text(path: PathLike, field: str = "text") -> Iterator[tuple[str, str]]:
    """(file name, text chunk) over every file of a corpus path, checked (see `_iter_source`)."""
    yield from _iter_source(_file_source(Path(path).expanduser(), field))


def _iter_source(source: _Source) -> Iterator[tuple[str, str]]:
    """Text chunks of every file; each file (or .jsonl record) ends with a newline.

    Raises StackWiseError naming the file for NUL bytes, invalid UTF-8, a bad .jsonl line.
    """
    for name, opener, is_jsonl in source.files:
        with opener() as f:
            chunks = _jsonl_texts(name, f, source.field) if is_jsonl else _text_chunks(name, f)
            last = ""
            for chunk in chunks:
                if chunk:
                    last = chunk
                    yield name, chunk
            if last and not last.endswith("\n"):
                yield name, "\n"  # documents never run into each other


def _text_chunks(name: str, f: IO[bytes]) -> Iterator[str]:
    """Decoded text in blocks cut after a newline (so a tokenizer never sees half a line)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset, carry = 0, ""
    while True:
        block = f.read(_BLOCK)
        nul = block.find(b"\0")
        if nul >= 0:
            raise StackWiseError(f"{name}: not a text file (NUL byte at byte offset {offset + nul})")
        try:
            text = decoder.decode(block, final=not block)
        except UnicodeDecodeError as e:
            raise StackWiseError(
                f"{name}: not valid UTF-8 text (near byte offset {max(0, offset + e.start)}: {e.reason})"
            ) from None
        offset += len(block)
        text = carry + text
        if not block:
            if text:
                yield text
            return
        cut = text.rfind("\n") + 1
        if cut == 0 and len(text) < 4 * _BLOCK:  # a very long line: keep reading, up to a bound
            carry = text
            continue
        cut = cut or len(text)
        yield text[:cut]
        carry = text[cut:]


def _jsonl_texts(name: str, f: IO[bytes], field_name: str) -> Iterator[str]:
    for lineno, raw in enumerate(f, start=1):
        if b"\0" in raw:
            raise StackWiseError(f"{name}:{lineno}: not a text file (NUL byte)")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise StackWiseError(f"{name}:{lineno}: not valid UTF-8 text ({e.reason})") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise StackWiseError(f"{name}:{lineno}: not a JSON line ({e.msg})") from None
        if not isinstance(record, dict) or field_name not in record:
            raise StackWiseError(
                f"{name}:{lineno}: no {field_name!r} field (set data.field / --field to the key holding the text)"
            )
        text = record[field_name]
        if not isinstance(text, str):
            raise StackWiseError(f"{name}:{lineno}: field {field_name!r} is {type(text).__name__}, not a string")
        if text:
            yield text if text.endswith("\n") else text + "\n"


# --------------------------------------------------------------------------------- the token file
def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _token_stream(source: _Source, tok: Tokenizer, cache_dir: Path) -> tuple[np.ndarray, bool, Path]:
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


def _encode(source: _Source, tok: Tokenizer) -> Iterator[Any]:
    chunks = _iter_source(source)
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


# ----------------------------------------------------------------------------------------- torch
class TokenDataset(Dataset):
    """Rows of a token array: {"ids": LongTensor (T,), "index": int}; a memmap is read row by row."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> dict:
        return {"ids": torch.from_numpy(np.asarray(self.array[i], dtype=np.int64)), "index": int(i)}
