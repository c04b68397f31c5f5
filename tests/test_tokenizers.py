"""Tokenizers: bytes, Hugging Face BPE files, and the `stackwise-tokenizer` CLI."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stackwise.data.tokenizers import MASK_TOKEN, ByteTokenizer, HFTokenizer, build_tokenizer, train_bpe
from stackwise.errors import ConfigError, StackWiseError

SAMPLES = [
    "",
    "hello world",
    "naïve café — “quotes” and ‘apostrophes’",
    "emoji 🎉👩‍👩‍👧‍👦 and flags 🇫🇷",
    "中文字符 日本語のテキスト 한국어",
    "combining: e\u0301 a\u0308 n\u0303 (not NFC-normalised)",
    "tabs\tand\r\nwindows newlines\n\n  leading spaces",
    "\u0000 is not here but \u200b zero width and \ufeff BOM are",
    "math ∑∫√ and RTL עברית العربية",
]

CORPUS = (
    "the quick brown fox jumps over the lazy dog.\n"
    "the lazy dog sleeps; the quick fox runs away.\n"
    "héllo wörld, 你好世界, emoji 🎉 time.\n"
) * 20


def _random_strings(n: int, seed: int = 0) -> list[str]:
    """Random valid strings: code points from several planes, surrogates excluded."""
    rnd = random.Random(seed)
    ranges = [(0x20, 0x7E), (0xA0, 0x2FF), (0x300, 0x36F), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rnd.randint(0, 40)):
            lo, hi = rnd.choice(ranges)
            cp = rnd.randint(lo, hi)
            if 0xD800 <= cp <= 0xDFFF:
                cp = 0x41
            chars.append(chr(cp))
        out.append("".join(chars))
    return out


# ------------------------------------------------------------------------------------------ bytes
def test_byte_tokenizer_special_ids_after_the_bytes():
    tok = ByteTokenizer()
    assert (tok.mask_id, tok.pad_id, tok.vocab_size) == (256, 257, 258)
    assert tok.vocab_size == max(tok.mask_id, tok.pad_id) + 1
    assert tok.encode("A") == [65]
    assert tok.encode("\x00\x7f\u00ff\U0010ffff") == [0, 127, 0xC3, 0xBF, 0xF4, 0x8F, 0xBF, 0xBF]
    assert tok.decode(range(256)) == bytes(range(256)).decode("utf-8", errors="replace")  # any byte id decodes
    assert build_tokenizer({"kind": "byte"}).identity == tok.identity == build_tokenizer(None).identity


@pytest.mark.parametrize("text", SAMPLES + _random_strings(50))
def test_byte_tokenizer_round_trips_utf8(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_byte_decode_drops_special_ids_or_shows_masks():
    tok = ByteTokenizer()
    ids = tok.encode("ab") + [tok.mask_id, tok.pad_id] + tok.encode("c")
    assert tok.decode(ids) == "abc"
    assert tok.decode(ids, mask_text="_") == "ab_c"
    # a mask splitting a multi-byte character: the halves are shown as U+FFFD, never an exception
    e = tok.encode("é")
    assert tok.decode([e[0], tok.mask_id, e[1]], mask_text="_") == "\ufffd_\ufffd"
    with pytest.raises(ValueError, match="258"):
        tok.decode([258])
    with pytest.raises(ValueError):
        tok.decode([-1])


# -------------------------------------------------------------------------------------------- BPE
@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    (d / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    tok = train_bpe([d / "corpus.txt"], 300, d / "tok" / "tokenizer.json", min_frequency=2)
    return tok, d


def test_train_bpe_writes_a_tokenizer_with_mask_and_pad(bpe):
    tok, d = bpe
    path = d / "tok" / "tokenizer.json"
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temporary left behind
    assert (tok.mask_id, tok.pad_id) == (0, 1)
    assert 258 < tok.vocab_size <= 300  # merges were learnt, and no more than asked
    # it reloads with the same ids and identity
    again = HFTokenizer(path)
    assert (again.vocab_size, again.mask_id, again.pad_id, again.identity) == (
        tok.vocab_size,
        tok.mask_id,
        tok.pad_id,
        tok.identity,
    )
    assert again.identity.startswith("hf:")
    # merges make the corpus shorter than its bytes
    assert len(tok.encode("the quick brown fox")) < len(b"the quick brown fox")
    assert build_tokenizer({"kind": "hf", "path": str(path)}).vocab_size == tok.vocab_size


@pytest.mark.parametrize("text", SAMPLES + _random_strings(30, seed=1))
def test_bpe_round_trips(bpe, text):
    tok, _ = bpe
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.mask_id not in ids and tok.pad_id not in ids
    assert tok.decode(ids) == text


def test_bpe_decode_masks_and_literal_special_text(bpe):
    tok, _ = bpe
    a, b = tok.encode("the dog"), tok.encode(" runs")
    assert tok.decode(a + [tok.mask_id] + b) == "the dog runs"
    assert tok.decode(a + [tok.mask_id, tok.pad_id] + b, mask_text="[MASK]") == "the dog[MASK] runs"


def test_hf_tokenizer_adds_mask_and_pad_when_missing(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"a": 0, "b": 1, "c": 2, "[UNK]": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "plain.json"
    raw.save(str(path))
    assert MASK_TOKEN not in json.loads(path.read_text())["model"]["vocab"]

    tok = HFTokenizer(path)
    assert tok.n_ids == 6 and tok.vocab_size == 128  # appended, then padded to a multiple of 128
    assert (tok.mask_id, tok.pad_id) == (4, 5)
    assert tok.encode("a c b") == [0, 2, 1]
    assert tok.decode([0, tok.mask_id, 1], mask_text="_").replace(" ", "") == "a_b"


def test_hf_tokenizer_bad_files(tmp_path):
    with pytest.raises(StackWiseError, match="nope.json does not exist"):
        HFTokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(StackWiseError, match="bad.json: not a valid Hugging Face tokenizer.json"):
        HFTokenizer(bad)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(StackWiseError, match="weights.bin: not a valid"):
        HFTokenizer(binary)
    with pytest.raises(ConfigError, match="data.tokenizer.path"):
        build_tokenizer({"kind": "hf"})
    with pytest.raises(ConfigError, match="data.tokenizer.kind"):
        build_tokenizer({"kind": "sentencepiece"})
    with pytest.raises(ConfigError, match="data.tokenizer.vocab"):
        build_tokenizer({"kind": "byte", "vocab": 3})


def test_train_bpe_bad_input(tmp_path):
    out = tmp_path / "out.json"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(StackWiseError, match="empty.txt: the corpus is empty"):
        train_bpe([empty], 300, out)
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"text\x00more")
    with pytest.raises(StackWiseError, match="nul.txt: not a text file"):
        train_bpe([nul], 300, out)
    with pytest.raises(StackWiseError, match="vocab size"):
        train_bpe([nul], 100, out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "nul.txt"]


# -------------------------------------------------------------------------------------------- CLI
def _tokenizer_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("stackwise-tokenizer")
    cmd = [exe] if exe else [sys.executable, "-m", "stackwise.cli.tokenizer"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(cmd + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_cli_writes_a_usable_tokenizer(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text(CORPUS[: len(CORPUS) // 2])
    (docs / "sub" / "b.txt").write_text(CORPUS[len(CORPUS) // 2 :])
    (docs / "ignored.md").write_bytes(b"\x00 not read: only .txt files count")
    r = _tokenizer_cli("docs", "--vocab-size", "290", "--out", "tok/tokenizer.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "tok" / "tokenizer.json"
    tok = HFTokenizer(out)
    assert (tok.mask_id, tok.pad_id) == (0, 1) and 258 < tok.vocab_size <= 290
    text = "the quick fox 🎉 héllo"
    assert tok.decode(tok.encode(text)) == text
    assert str(out.name) in r.stdout and f"vocab_size={tok.vocab_size}" in r.stdout
    assert "[MASK]=0" in r.stdout and "[PAD]=1" in r.stdout
    # the line to paste uses the real config keys, with absolute paths
    line = next(s.strip() for s in r.stdout.splitlines() if s.strip().startswith("stackwise-train"))
    assert line.split() == [
        "stackwise-train",
        "data=text",
        f"data.path={docs.resolve()}",
        "data.tokenizer.kind=hf",
        f"data.tokenizer.path={out.resolve()}",
    ]


def test_cli_jsonl_field_and_folder_out(tmp_path, monkeypatch, capsys):
    from stackwise.cli.tokenizer import main

    monkeypatch.chdir(tmp_path)
    lines = [json.dumps({"content": s, "id": i}) for i, s in enumerate(CORPUS.splitlines())]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "outdir").mkdir()
    main(["c.jsonl", "--field", "content", "--vocab-size", "270", "--out", "outdir", "--min-frequency", "1"])
    out = capsys.readouterr().out
    tok = HFTokenizer(tmp_path / "outdir" / "tokenizer.json")
    assert 258 < tok.vocab_size <= 270
    assert tok.decode(tok.encode("the lazy dog")) == "the lazy dog"
    assert f"data.path={(tmp_path / 'c.jsonl').resolve()} data.field=content " in out


BAD_CASES = {
    "missing": (["missing.txt", "--vocab-size", "300"], "missing.txt"),
    "empty": (["empty.txt", "--vocab-size", "300"], "empty.txt"),
    "small_vocab": (["good.txt", "--vocab-size", "100"], "100"),
    "nul": (["image.png", "--vocab-size", "300"], "image.png"),
    "not_utf8": (["latin1.txt", "--vocab-size", "300"], "latin1.txt"),
    "no_field": (["c.jsonl", "--vocab-size", "300"], "c.jsonl"),
    "bad_int": (["good.txt", "--vocab-size", "lots"], "lots"),
    "no_txt_in_folder": (["folder", "--vocab-size", "300"], "folder"),
    "out_is_corpus": (["good.txt", "--vocab-size", "300", "--out", "good.txt"], "good.txt"),
    "no_args": ([], "corpus"),
}


def _bad_inputs(d: Path) -> list[str]:
    (d / "good.txt").write_text(CORPUS)
    (d / "empty.txt").write_text("")
    (d / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (d / "latin1.txt").write_bytes("café".encode("latin-1"))
    (d / "c.jsonl").write_text('{"body": "text"}\n')
    (d / "folder").mkdir()
    (d / "folder" / "notes.md").write_text("x")
    return sorted(p.name for p in d.iterdir())


def _check_one_line_error(rc: int, stdout: str, stderr: str, name: str) -> None:
    assert rc == 2, (rc, stderr)
    err = stderr.strip().splitlines()
    assert len(err) == 1, stderr
    assert err[0].startswith("stackwise-tokenizer: error: ") and name in err[0], err[0]
    assert "Traceback" not in stderr + stdout


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_cli_bad_input_one_line_exit_2(tmp_path, monkeypatch, capsys, case):
    """In process (fast): the same main() the console script runs."""
    from stackwise.cli.tokenizer import main

    before = _bad_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    args, name = BAD_CASES[case]
    if args and "--out" not in args:
        args = args + ["--out", "tok.json"]
    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    _check_one_line_error(e.value.code, out.out, out.err, name)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary left


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_cli_bad_input_subprocess(tmp_path, case):
    """As a user runs it: the console script's exit status and stderr."""
    before = _bad_inputs(tmp_path)
    args, name = BAD_CASES[case]
    r = _tokenizer_cli(*args, "--out", "tok.json", cwd=tmp_path)
    _check_one_line_error(r.returncode, r.stdout, r.stderr, name)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
