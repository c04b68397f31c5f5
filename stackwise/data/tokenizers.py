"""Tokenizers: bytes, or a Hugging Face `tokenizers` tokenizer.json; both carry [MASK] and [PAD].

Every tokenizer has `vocab_size` (the rows of a model's embedding it implies: every id below it may
be decoded), `n_ids` (the ids it really uses: the least vocab_size a model may have), `mask_id`,
`pad_id`, `encode(str) -> list[int]`, `decode(ids, mask_text=None) -> str` and `identity` (a string
that changes whenever the ids of a text would, used to key the token cache).

Where [MASK] and [PAD] come from in a tokenizer.json, first that applies:
  1. tokens named `[MASK]` / `[PAD]` (a `stackwise-tokenizer` file has them as ids 0 and 1);
  2. unused reserved special tokens, Llama-3's `<|reserved_special_token_N|>`, lowest N first (one
     named by the file's padding or post-processor is in use and skipped): Meta's Llama-3
     tokenizer.json keeps its 128256 ids and [MASK] = 128002, [PAD] = 128003, so
     `model=llama3_70b` (vocab_size 128256) fits;
  3. appended after the last id, and then `vocab_size` is padded up to a multiple of 128
     (VOCAB_MULTIPLE): two extra ids would otherwise leave the embedding and head at an odd size
     (a 32000-id vocabulary becomes 32128, not 32002), which matmul kernels run slower on.
The byte tokenizer keeps its 258 ids (the CPU default model's vocabulary).

decode drops the special ids by default (like Hugging Face's `skip_special_tokens=True`); pass
`mask_text="_"` (or "[MASK]") to see where a partly denoised sample still has masks.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from stackwise.artifacts import atomic_path
from stackwise.data.corpus import iter_corpus_text  # read and checked exactly as data=text reads it
from stackwise.errors import ConfigError, StackWiseError

MASK_TOKEN = "[MASK]"
PAD_TOKEN = "[PAD]"
TOKENIZER_KINDS = ("byte", "hf")
RESERVED_TOKEN = re.compile(r"<\|reserved_special_token_(\d+)\|>")  # Llama-3's unused special tokens
VOCAB_MULTIPLE = 128  # a vocabulary that had [MASK]/[PAD] appended is padded to a multiple of this

PathLike = Union[str, "os.PathLike[str]"]


class _Base(abc.ABC):
    vocab_size: int
    n_ids: int
    mask_id: int
    pad_id: int
    identity: str

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""

    @abc.abstractmethod
    def _decode_plain(self, ids: list[int]) -> str:
        """Text of ids that contain no special id."""

    def decode(self, ids: Iterable[int], mask_text: str | None = None) -> str:
        """Text of `ids`. Special ids are dropped, except [MASK] rendered as `mask_text` when given."""
        pieces: list[str] = []
        run: list[int] = []
        for i in (int(x) for x in ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside the vocabulary [0, {self.vocab_size})")
            if i == self.mask_id and mask_text is not None:
                pieces.append(self._decode_plain(run))
                pieces.append(mask_text)
                run = []
            elif i not in (self.mask_id, self.pad_id):
                run.append(i)
        pieces.append(self._decode_plain(run))
        return "".join(pieces)


class ByteTokenizer(_Base):
    """UTF-8 bytes are ids 0..255; [MASK] = 256, [PAD] = 257. Lossless for any text, no file needed."""

    vocab_size = n_ids = 258
    mask_id = 256
    pad_id = 257
    identity = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _decode_plain(self, ids: list[int]) -> str:
        # a model may emit a byte sequence that is not UTF-8: show U+FFFD rather than fail
        return bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer(_Base):
    """A Hugging Face `tokenizers` tokenizer.json; [MASK] and [PAD] as the module docstring says."""

    def __init__(self, path: PathLike):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise StackWiseError(f"tokenizer file {self.path} does not exist (expected a Hugging Face tokenizer.json)")
        try:
            blob = self.path.read_bytes()
            text = blob.decode("utf-8")
            self.tok = RustTokenizer.from_str(text)
        except Exception as e:  # a JSON or schema error from the Rust side
            msg = " ".join(str(e).split())[:200]
            raise StackWiseError(f"{self.path}: not a valid Hugging Face tokenizer.json ({msg})") from None
        vocab = self.tok.get_vocab(with_added_tokens=True)
        reserved = _unused_reserved(vocab, json.loads(text))
        ids: dict[str, int] = {}
        taken = []  # the reserved tokens that became [MASK] / [PAD]
        for name in (MASK_TOKEN, PAD_TOKEN):
            if name in vocab:
                ids[name] = vocab[name]
            elif reserved:
                taken.append(reserved.pop(0))
                ids[name] = vocab[taken[-1]]
        appended = [name for name in (MASK_TOKEN, PAD_TOKEN) if name not in ids]
        if appended:
            self.tok.add_special_tokens(appended)
            ids.update((name, self.tok.token_to_id(name)) for name in appended)
        self.mask_id, self.pad_id = ids[MASK_TOKEN], ids[PAD_TOKEN]
        # the largest id + 1, not the count: a file may leave ids unused (added tokens above a gap)
        self.n_ids = max(max(vocab.values(), default=-1), self.mask_id, self.pad_id) + 1
        self.vocab_size = -(-self.n_ids // VOCAB_MULTIPLE) * VOCAB_MULTIPLE if appended else self.n_ids
        self.identity = "hf:" + hashlib.sha256(blob).hexdigest()
        if taken:  # a literal "[MASK]" in a text is plain text here, not a special token: other ids
            self.identity += ":reserved:" + ",".join(taken)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts at once (the Rust side runs them in parallel)."""
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def _decode_plain(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True) if ids else ""

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _unused_reserved(vocab: Mapping[str, int], spec: Mapping[str, Any]) -> list[str]:
    """The reserved special tokens of a tokenizer.json that nothing in it uses, lowest N first.
    One the file itself inserts or pads with (its post-processor, its padding) is in use."""
    used = json.dumps([spec.get("post_processor"), spec.get("padding")])
    found = [(int(m.group(1)), name) for name in vocab if (m := RESERVED_TOKEN.fullmatch(name))]
    return [name for _, name in sorted(found) if json.dumps(name) not in used]


Tokenizer = ByteTokenizer | HFTokenizer


def build_tokenizer(cfg: Mapping[str, Any] | None, prefix: str = "data.tokenizer") -> Tokenizer:
    """{kind: byte} or {kind: hf, path: tokenizer.json}."""
    cfg = dict(cfg or {})
    for key in cfg:
        if key not in ("kind", "path"):
            raise ConfigError(f"{prefix}.{key}", "unknown key; allowed: kind, path")
    kind = cfg.get("kind", "byte")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        if not cfg.get("path"):
            raise ConfigError(
                f"{prefix}.path",
                "kind=hf needs the path of a Hugging Face tokenizer.json (make one with stackwise-tokenizer)",
            )
        return HFTokenizer(cfg["path"])
    raise ConfigError(f"{prefix}.kind", f"unknown tokenizer kind {kind!r}; allowed: {', '.join(TOKENIZER_KINDS)}")


def train_bpe(
    files: Sequence[PathLike], vocab_size: int, out_path: PathLike, *, field: str = "text", min_frequency: int = 2
) -> HFTokenizer:
    """Train a byte-level BPE on corpus files (.txt, or .jsonl with `field`) and write tokenizer.json.

    [MASK] and [PAD] are its first two ids. The file is written under a temporary name and renamed,
    so an interrupted run never leaves a half-written tokenizer.json.
    """
    min_size = 256 + 2  # the byte alphabet and the two special tokens
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < min_size:
        raise StackWiseError(
            f"vocab size must be an integer >= {min_size} (256 bytes + [MASK] + [PAD]), got {vocab_size!r}"
        )
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[MASK_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    n_chars = 0

    def texts() -> Iterable[str]:
        nonlocal n_chars
        for path in files:
            for _, chunk in iter_corpus_text(path, field=field):
                n_chars += len(chunk)
                yield chunk

    tok.train_from_iterator(texts(), trainer)
    if n_chars == 0:
        raise StackWiseError(f"{', '.join(str(f) for f in files)}: the corpus is empty (no text to train on)")
    with atomic_path(out_path) as tmp:
        tok.save(str(tmp))
    return HFTokenizer(out_path)
