"""Token data: `(N, T)` integer arrays of training and validation sequences.

Three sources (`data.name`, stackwise/data/config.py):
  dummy        a synthetic, learnable language generated in memory from `seed` (stackwise/data/dummy.py)
  text         your corpus: one .txt file, a folder of .txt files (recursive, sorted by path) or a
               .jsonl file whose `data.field` holds the text (stackwise/data/corpus.py)
  shakespeare  Tiny Shakespeare, shipped gzipped in the package (stackwise/data/corpora): no download

Text is tokenized once into a flat token file under `cache_dir` and memory-mapped on later loads
(stackwise/data/token_file.py; `TokenSplits.built` says which happened). The stream is cut into
non-overlapping windows of `seq_len`; the LAST `val_fraction` of the windows (at least one) are
validation. A contiguous tail rather than a random choice of windows keeps validation text away
from training text (only one boundary between them), as nanoGPT does; the split needs no seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from stackwise.data.config import DATA_NAMES, DataConfig, TokenizerConfig, data_tokenizer, vocab_info
from stackwise.data.corpus import PathLike, corpus_files, file_source, iter_corpus_text, shakespeare_source
from stackwise.data.dummy import dummy_grammar, dummy_language
from stackwise.data.token_file import token_dtype, token_stream
from stackwise.data.tokenizers import Tokenizer
from stackwise.errors import ConfigError, StackWiseError

# Re-exported: what other modules import from here since before the split into config / corpus /
# token_file / dummy.
__all__ = [
    "DATA_NAMES",
    "DataConfig",
    "TokenDataset",
    "TokenSplits",
    "TokenizerConfig",
    "corpus_files",
    "data_tokenizer",
    "dummy_grammar",
    "dummy_splits",
    "iter_corpus_text",
    "load_token_splits",
    "token_dtype",
    "vocab_info",
]


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
        source = shakespeare_source()
    else:
        source = file_source(Path(cfg.path).expanduser(), cfg.field)
    stream, built, path = token_stream(source, tok, Path(where).expanduser())
    train, val = _split_windows(stream, cfg, source.name)
    return TokenSplits(train, val, tok.vocab_size, tok.mask_id, tok.pad_id, tok, built, path)


def dummy_splits(cfg: DataConfig, seed: int) -> TokenSplits:
    """The dummy language's splits (stackwise/data/dummy.py): symbols 0..S-1, [MASK] = S, [PAD] = S + 1."""
    train, val = dummy_language(cfg, seed)
    S = cfg.dummy_vocab
    return TokenSplits(train, val, S + 2, S, S + 1)


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


class TokenDataset(Dataset):
    """Rows of a token array: {"ids": LongTensor (T,), "index": int}; a memmap is read row by row."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> dict:
        return {"ids": torch.from_numpy(np.asarray(self.array[i], dtype=np.int64)), "index": int(i)}
