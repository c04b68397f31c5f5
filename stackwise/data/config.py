"""The `data` node of the config: which token data, in what shape, and its tokenizer."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from stackwise.data.tokenizers import TOKENIZER_KINDS, Tokenizer, build_tokenizer
from stackwise.errors import ConfigError
from stackwise.structured import Structured

DATA_NAMES = ("dummy", "text", "shakespeare")


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


class VocabSpec(NamedTuple):
    vocab_size: int  # the model's vocabulary by default (a tokenizer's padded size)
    mask_id: int
    pad_id: int
    n_ids: int  # the ids the data really uses: the least vocab_size a model may have


def vocab_spec(cfg: DataConfig) -> VocabSpec:
    """The data's vocabulary, without reading the corpus."""
    if cfg.name == "dummy":
        n = cfg.dummy_vocab + 2
        return VocabSpec(n, cfg.dummy_vocab, cfg.dummy_vocab + 1, n)
    tok = data_tokenizer(cfg)
    return VocabSpec(tok.vocab_size, tok.mask_id, tok.pad_id, tok.n_ids)


def vocab_info(cfg: DataConfig) -> tuple[int, int, int]:
    """(vocab_size, mask_id, pad_id) of the data, without reading the corpus."""
    return tuple(vocab_spec(cfg)[:3])
