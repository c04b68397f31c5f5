"""Token data: text corpora (.txt, folder, .jsonl), the token cache, shakespeare, dummy, vocab checks, bad input."""

from __future__ import annotations

import json
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

import stackwise.data.token_file as token_file
import stackwise.data.tokens as tokens
from stackwise.config import RunConfig
from stackwise.data.config import DataConfig, vocab_info
from stackwise.data.stage_data import MaskedTokenDataset
from stackwise.data.token_file import token_dtype
from stackwise.data.tokenizers import ByteTokenizer, train_bpe
from stackwise.data.tokens import TokenDataset, dummy_splits, load_token_splits
from stackwise.errors import ConfigError, StackWiseError
from stackwise.objective.masking import UniformSchedule
from tests.conftest import cli, compose_cfg

LINE = "It is a truth universally acknowledged, that a single man in possession of a good fortune.\n"


def text_cfg(path, **kw) -> DataConfig:
    d = {"name": "text", "path": str(path), "seq_len": 16, "val_fraction": 0.25}
    d.update(kw)
    return DataConfig.from_dict(d)


def _stream(splits) -> np.ndarray:
    return np.concatenate([np.asarray(splits.train).reshape(-1), np.asarray(splits.val).reshape(-1)])


# ----------------------------------------------------------------------------------- the sources
def test_text_from_one_txt_file(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(LINE * 4)  # 364 bytes: 22 windows of 16
    s = load_token_splits(text_cfg(corpus), seed=0, cache_dir=tmp_path / "cache")
    n = len((LINE * 4).encode()) // 16
    assert s.train.shape == (n - round(n * 0.25), 16) and s.val.shape == (round(n * 0.25), 16)
    assert s.train.dtype == np.uint16 and s.val.dtype == np.uint16
    assert (s.vocab_size, s.mask_id, s.pad_id) == (258, 256, 257)
    assert isinstance(s.tokenizer, ByteTokenizer) and s.built
    # the windows are the corpus bytes in order; the ragged tail is dropped
    assert _stream(s).tobytes() == np.frombuffer((LINE * 4).encode()[: n * 16], np.uint8).astype(np.uint16).tobytes()
    assert s.tokenizer.decode(s.train[0]) == LINE[:16]
    item = TokenDataset(s.val)[1]
    assert item["ids"].dtype == torch.long and item["ids"].shape == (16,) and item["index"] == 1


def test_text_from_a_folder_recursive_and_sorted(tmp_path):
    docs = tmp_path / "docs"
    (docs / "b").mkdir(parents=True)
    (docs / "b" / "2.txt").write_text("second " * 10)  # no final newline: one is added between documents
    (docs / "a.txt").write_text("first " * 10 + "\n")
    (docs / "c.txt").write_text("third " * 10 + "\n")
    (docs / "skip.md").write_text("not read " * 10)
    (docs / "data.bin").write_bytes(b"\0\0")  # not .txt: ignored, never an error
    s = load_token_splits(text_cfg(docs, seq_len=8), seed=0, cache_dir=tmp_path / "cache")
    text = "first " * 10 + "\n" + "second " * 10 + "\n" + "third " * 10 + "\n"  # a.txt, b/2.txt, c.txt
    n = len(text) // 8
    assert s.tokenizer.decode(_stream(s)) == text[: n * 8]
    assert "not read" not in s.tokenizer.decode(_stream(s))


def test_text_from_jsonl_with_a_named_field(tmp_path):
    rows = [{"id": i, "body": f"record {i}: " + "words " * 5, "text": "WRONG FIELD"} for i in range(6)]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[3:]))
    s = load_token_splits(text_cfg(path, field="body", seq_len=8), seed=0, cache_dir=tmp_path / "cache")
    decoded = s.tokenizer.decode(_stream(s))
    expected = "".join(r["body"] + "\n" for r in rows)
    assert decoded == expected[: len(decoded)] and len(expected) - len(decoded) < 8
    assert "WRONG" not in decoded and "{" not in decoded
    # the field is part of the cache key: the default field reads other text into another file
    other = load_token_splits(text_cfg(path, seq_len=8), seed=0, cache_dir=tmp_path / "cache")
    assert other.cache_file != s.cache_file and "WRONG FIELD" in other.tokenizer.decode(_stream(other))


def test_split_is_deterministic_and_a_contiguous_tail(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(LINE * 10)
    a = load_token_splits(text_cfg(corpus, val_fraction=0.1), seed=0, cache_dir=tmp_path / "c1")
    b = load_token_splits(text_cfg(corpus, val_fraction=0.1), seed=123, cache_dir=tmp_path / "c2")  # seed unused
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    n = len(a.train) + len(a.val)
    assert len(a.val) == round(n * 0.1)
    # validation is the last windows of the stream, training everything before
    assert np.array_equal(_stream(a), np.frombuffer((LINE * 10).encode()[: n * 16], np.uint8))
    # the same token file serves another seq_len / val_fraction (a view, not a new tokenization)
    c = load_token_splits(text_cfg(corpus, seq_len=32, val_fraction=0.5), seed=0, cache_dir=tmp_path / "c1")
    assert not c.built and c.cache_file == a.cache_file and c.train.shape[1] == 32
    n32 = len(LINE * 10) // 32
    assert len(c.train) + len(c.val) == n32 and len(c.val) == round(n32 * 0.5)
    # a two-window corpus still gets one training and one validation sequence
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("x" * 33)
    t = load_token_splits(text_cfg(tiny, val_fraction=0.01), seed=0, cache_dir=tmp_path / "c1")
    assert t.train.shape == (1, 16) and t.val.shape == (1, 16)


# ----------------------------------------------------------------------------------- token file
def test_token_dtype_by_vocab_size():
    assert token_dtype(258) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32
    assert token_dtype(128256) == np.uint32


class WideTokenizer:
    """A stand-in for a large-vocabulary HF tokenizer: ids above 65535."""

    vocab_size, mask_id, pad_id, identity = 70_000, 69_998, 69_999, "wide-test"

    def encode(self, text):
        return [65_536 + (ord(c) % 4000) for c in text]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


def test_large_vocab_uses_uint32_memmap(tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text(LINE * 2)
    monkeypatch.setattr(tokens, "data_tokenizer", lambda cfg: WideTokenizer())
    s = load_token_splits(text_cfg(corpus), seed=0, cache_dir=tmp_path / "cache")
    assert s.train.dtype == np.uint32 and s.vocab_size == 70_000
    assert isinstance(s.train.base, np.memmap) or isinstance(s.train, np.memmap)
    assert int(_stream(s).max()) > 65_535  # not truncated to 16 bits
    assert _stream(s).tolist() == WideTokenizer().encode(LINE * 2)[: len(_stream(s))]
    assert s.cache_file.stat().st_size == len(WideTokenizer().encode(LINE * 2)) * 4
    meta = json.loads(s.cache_file.with_suffix(".json").read_text())
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000


def test_small_vocab_cache_file_is_uint16_memmap(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(LINE * 2)
    s = load_token_splits(text_cfg(corpus), seed=0, cache_dir=tmp_path / "cache")
    assert s.cache_file.stat().st_size == len((LINE * 2).encode()) * 2  # 2 bytes a token
    again = load_token_splits(text_cfg(corpus), seed=0, cache_dir=tmp_path / "cache")
    assert isinstance(again.train, np.memmap) or isinstance(again.train.base, np.memmap)
    assert not again.train.flags.writeable  # read-only: training cannot corrupt the cache


def test_a_token_split_pickles_by_file_not_by_bytes(tmp_path):
    """A loader worker started by the fork server (stackwise/data/workers.py) gets its dataset
    pickled: rows of the token file go as (file, offset, shape) and read back the same there."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(LINE * 50)  # 4,550 tokens: 285 windows of 16
    load_token_splits(text_cfg(corpus), seed=0, cache_dir=tmp_path / "cache")
    s = load_token_splits(text_cfg(corpus), seed=0, cache_dir=tmp_path / "cache")  # the memmap of the file
    for split in (s.train, s.val):  # the head of the file, and rows from its middle on
        ds = MaskedTokenDataset(
            split, seed=3, schedule=UniformSchedule(0.2, 0.8), mask_id=256, pad_id=257, k=1, views=2
        )
        blob = pickle.dumps(ds)
        assert len(blob) - ds.rows.nbytes < 1000 < split.nbytes  # its row numbers, not its tokens
        again = pickle.loads(blob)
        assert isinstance(again.tokens, np.memmap) and not again.tokens.flags.writeable
        np.testing.assert_array_equal(again.tokens, split)
        for i in (0, len(ds) - 1):
            for key, value in ds[i].items():
                torch.testing.assert_close(again[i][key], value)
    in_memory = np.arange(64, dtype=np.uint16).reshape(4, 16)  # not a file: pickled as it is
    again = pickle.loads(pickle.dumps(MaskedTokenDataset(in_memory, seed=0, schedule=None, mask_id=0, pad_id=1, k=1)))
    np.testing.assert_array_equal(again.tokens, in_memory)


def test_cache_is_reused_not_rebuilt(tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text(LINE * 4)
    cache = tmp_path / "cache"
    first = load_token_splits(text_cfg(corpus), seed=0, cache_dir=cache)
    assert first.built
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and all(f.startswith("tokens-") for f in files)  # .bin + sidecar, no temporaries
    mtime = first.cache_file.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("the corpus was tokenized again")

    monkeypatch.setattr(token_file, "_encode", boom)
    second = load_token_splits(text_cfg(corpus), seed=0, cache_dir=cache)
    assert not second.built and second.cache_file == first.cache_file
    assert first.cache_file.stat().st_mtime_ns == mtime
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)
    # a cache whose sidecar was never written (a killed run) is not trusted: it is rebuilt
    monkeypatch.undo()
    first.cache_file.with_suffix(".json").unlink()
    third = load_token_splits(text_cfg(corpus), seed=0, cache_dir=cache)
    assert third.built and np.array_equal(third.train, first.train)
    # a truncated token file does not match its sidecar: rebuilt too
    with open(first.cache_file, "r+b") as f:
        f.truncate(10)
    fourth = load_token_splits(text_cfg(corpus), seed=0, cache_dir=cache)
    assert fourth.built and np.array_equal(fourth.val, first.val)


def test_other_corpus_or_tokenizer_gets_another_cache(tmp_path):
    cache = tmp_path / "cache"
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(LINE * 4)
    b.write_text(LINE * 4)  # same text, another file
    sa = load_token_splits(text_cfg(a), seed=0, cache_dir=cache)
    sb = load_token_splits(text_cfg(b), seed=0, cache_dir=cache)
    assert sb.built and sb.cache_file != sa.cache_file
    # the corpus changed in place: a new key, the new text
    a.write_text(LINE.upper() * 4)
    os.utime(a, ns=(1, 1))
    sa2 = load_token_splits(text_cfg(a), seed=0, cache_dir=cache)
    assert sa2.built and sa2.cache_file != sa.cache_file
    assert sa2.tokenizer.decode(sa2.train[0]) == LINE.upper()[:16]
    # another tokenizer on the same corpus
    tok_path = tmp_path / "tok.json"
    train_bpe([b], 270, tok_path, min_frequency=1)
    sh = load_token_splits(text_cfg(b, tokenizer={"kind": "hf", "path": str(tok_path)}), seed=0, cache_dir=cache)
    assert sh.built and sh.cache_file not in (sa.cache_file, sb.cache_file, sa2.cache_file)
    assert (
        sh.vocab_size == 270 and sh.tokenizer.decode(_stream(sh)) == (LINE * 4)[: len(sh.tokenizer.decode(_stream(sh)))]
    )
    assert _stream(sh).size < _stream(sb).size  # BPE merges: fewer tokens than bytes


def test_shakespeare_loads_without_network(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("network access")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    cfg = DataConfig.from_dict({"name": "shakespeare", "seq_len": 256})
    s = load_token_splits(cfg, seed=0, cache_dir=tmp_path)
    n = 1_115_394 // 256
    assert len(s.train) + len(s.val) == n and len(s.val) == round(n * 0.05)
    assert s.tokenizer.decode(s.train[0]).startswith("First Citizen:\nBefore we proceed")
    assert not load_token_splits(cfg, seed=0, cache_dir=tmp_path).built


# ------------------------------------------------------------------------------------------ dummy
def test_dummy_is_deterministic_from_the_seed():
    cfg = DataConfig.from_dict({"name": "dummy", "seq_len": 16, "n_train": 64, "n_val": 8, "dummy_vocab": 10})
    a, b, c = dummy_splits(cfg, 0), dummy_splits(cfg, 0), dummy_splits(cfg, 1)
    assert a.train.shape == (64, 16) and a.val.shape == (8, 16)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert not np.array_equal(a.train, c.train)
    assert (a.vocab_size, a.mask_id, a.pad_id) == (12, 10, 11) == vocab_info(cfg)
    assert a.train.max() < 10 and a.val.max() < 10  # never the special ids
    assert not {r.tobytes() for r in a.val} & {r.tobytes() for r in a.train}  # val rows are not train rows
    assert load_token_splits(cfg, seed=0).train.tobytes() == a.train.tobytes()  # no cache folder needed
    # the global RNG does not matter
    torch.manual_seed(999)
    assert np.array_equal(dummy_splits(cfg, 0).train, a.train)


# ------------------------------------------------------------------------------------ vocab check
def test_model_vocab_must_cover_the_tokenizer(tmp_path):
    base = ["model=tiny", "data=dummy", f"output_root={tmp_path}"]  # 32 symbols + [MASK] + [PAD]
    run = RunConfig.from_hydra(compose_cfg(base))
    assert (run.model.vocab_size, run.model.mask_id, run.model.pad_id) == (34, 32, 33)
    padded = RunConfig.from_hydra(compose_cfg(base + ["model.vocab_size=64"]))
    assert padded.model.vocab_size == 64 and padded.model.mask_id == 32
    for override, field in (
        ("model.vocab_size=33", "model.vocab_size"),
        ("model.mask_id=0", "model.mask_id"),
        ("model.pad_id=32", "model.pad_id"),
    ):
        with pytest.raises(ConfigError) as e:
            RunConfig.from_hydra(compose_cfg(base + [override]))
        assert e.value.field == field


def test_text_vocab_follows_an_hf_tokenizer(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(LINE * 8)
    tok = train_bpe([corpus], 280, tmp_path / "tok.json", min_frequency=1)
    base = [
        "model=tiny",
        "data=text",
        f"data.path={corpus}",
        "data.tokenizer.kind=hf",
        f"data.tokenizer.path={tmp_path / 'tok.json'}",
        f"output_root={tmp_path}",
    ]
    run = RunConfig.from_hydra(compose_cfg(base))
    assert (run.model.vocab_size, run.model.mask_id, run.model.pad_id) == (tok.vocab_size, 0, 1)
    with pytest.raises(ConfigError, match="model.vocab_size"):
        RunConfig.from_hydra(compose_cfg(base + ["model.vocab_size=258"]))  # the byte tokenizer's size
    with pytest.raises(ConfigError, match="model.mask_id"):
        RunConfig.from_hydra(compose_cfg(base + ["model.mask_id=256"]))


# -------------------------------------------------------------------------------------- bad input
def _bad_corpora(d: Path) -> dict:
    (d / "blank.jsonl").write_text("\n\n")
    (d / "short.txt").write_text("too short")
    (d / "nul.txt").write_bytes(b"some text" * 10 + b"\x00" + b"more text" * 10)
    (d / "latin1.txt").write_bytes(("café " * 20).encode("latin-1"))
    (d / "badjson.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    (d / "emptydir").mkdir()
    return {
        "blank.jsonl": "the corpus is empty",
        "short.txt": "sequence(s) of data.seq_len=16",
        "nul.txt": "not a text file (NUL byte at byte offset 90)",
        "latin1.txt": "not valid UTF-8 text (near byte offset 3",
        "badjson.jsonl": "badjson.jsonl:2: not a JSON line",
        "emptydir": "holds no .txt files",
    }


def test_bad_corpora_raise_one_clear_error_naming_the_file(tmp_path):
    corpora = tmp_path / "corpora"
    corpora.mkdir()
    cache = tmp_path / "cache"
    for name, message in _bad_corpora(corpora).items():
        with pytest.raises(StackWiseError) as e:
            load_token_splits(text_cfg(corpora / name), seed=0, cache_dir=cache)
        text = str(e.value)
        assert name in text and message in text, (name, text)
        assert "\n" not in text
    # nothing half-written: only the one complete (but too short) token file is cached
    leftovers = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    assert len(leftovers) == 2 and not any(p.startswith(".") or p.endswith(".tmp") for p in leftovers), leftovers


def test_bad_file_inside_a_folder_is_named(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.txt").write_text(LINE * 4)
    (docs / "broken.txt").write_bytes(b"\xff\xfe text")
    with pytest.raises(StackWiseError, match=r"broken\.txt: not valid UTF-8"):
        load_token_splits(text_cfg(docs), seed=0, cache_dir=tmp_path / "cache")


def test_missing_or_zero_byte_corpus_is_a_config_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConfigError) as e:
        text_cfg(tmp_path / "empty.txt")
    assert e.value.field == "data.path" and "empty.txt: the corpus is empty" in str(e.value)
    with pytest.raises(ConfigError) as e:
        text_cfg(tmp_path / "nope.txt")
    assert e.value.field == "data.path" and "nope.txt does not exist" in str(e.value)
    with pytest.raises(ConfigError, match="data.path"):
        DataConfig.from_dict({"name": "text"})
    # a path that vanished or emptied after validation still fails clearly
    corpus = tmp_path / "emptied.txt"
    corpus.write_text(LINE * 4)
    cfg = text_cfg(corpus)
    corpus.write_text("")
    with pytest.raises(StackWiseError, match="emptied.txt: the corpus is empty"):
        load_token_splits(cfg, seed=0, cache_dir=tmp_path / "cache")
    corpus = tmp_path / "gone.txt"
    corpus.write_text(LINE * 4)
    cfg = text_cfg(corpus)
    corpus.unlink()
    with pytest.raises(StackWiseError, match="gone.txt does not exist"):
        load_token_splits(cfg, seed=0, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_train_cli_bad_corpus_one_line(tmp_path, case):
    corpus = tmp_path / f"{case}.txt"
    if case == "empty":
        corpus.write_text("")
    r = cli(
        "data=text",
        f"data.path={corpus}",
        "model=tiny",
        "data.seq_len=32",
        "trainer.max_steps=2",
        "logger=none",
        "callbacks=none",
        f"output_root={tmp_path / 'out'}",
        "trainer.enable_progress_bar=false",
        cwd=tmp_path,
    )
    assert r.returncode != 0
    err = [line for line in r.stderr.splitlines() if line.strip()]
    errors = [line for line in err if "error" in line.lower() and "[INFO]" not in line]
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith("stackwise-train: error:") and str(corpus) in errors[0], errors[0]
    assert "Traceback" not in r.stderr + r.stdout
    # it stopped at validation: no experiment folder, nothing trained
    assert not list((tmp_path / "out").rglob("run_config.json")) and not list((tmp_path / "out").rglob("*.pt"))
