"""[MASK] and [PAD] in a Hugging Face tokenizer.json: the file's own tokens, Llama-3's reserved
special tokens, or appended with the vocabulary padded to a multiple of 128."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from stackwise.config import RunConfig
from stackwise.data.tokenizers import VOCAB_MULTIPLE, HFTokenizer
from stackwise.errors import ConfigError
from tests.conftest import compose_cfg

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "."]
LLAMA3_BASE = 128000  # Llama-3's regular (BPE) ids; its 256 special tokens follow


def llama3_specials() -> list[str]:
    """The 256 added tokens of Meta's Llama-3 tokenizer.json, in id order (128000..128255)."""
    named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>"}
    named[9] = "<|eot_id|>"
    out, n = [], 0
    for i in range(256):
        if i in named:
            out.append(named[i])
        else:
            out.append(f"<|reserved_special_token_{n}|>")
            n += 1
    return out


def write_llama3_like(path, padding_token: str | None = None) -> None:
    """A tokenizer.json with Llama-3's id layout: 128000 regular ids (a few real words, the rest
    fillers), then its 256 special tokens at 128000..128255 (reserved_special_token_0..250)."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab.update({f"<w{i}>": i for i in range(len(WORDS), LLAMA3_BASE)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<w9>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(llama3_specials())
    if padding_token is not None:
        tok.enable_padding(pad_id=tok.token_to_id(padding_token), pad_token=padding_token)
    tok.save(str(path))


@pytest.fixture(scope="module")
def llama3_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3") / "tokenizer.json"
    write_llama3_like(path)
    return path


def test_llama3_layout_is_the_real_one(llama3_file):
    spec = json.loads(llama3_file.read_text())
    added = {t["content"]: t["id"] for t in spec["added_tokens"]}
    assert len(added) == 256 and min(added.values()) == 128000 and max(added.values()) == 128255
    assert added["<|begin_of_text|>"] == 128000 and added["<|eot_id|>"] == 128009
    assert added["<|reserved_special_token_0|>"] == 128002 and added["<|reserved_special_token_250|>"] == 128255


def test_mask_and_pad_take_llama3_reserved_tokens(llama3_file):
    tok = HFTokenizer(llama3_file)
    assert (tok.vocab_size, tok.n_ids) == (128256, 128256)  # nothing appended, nothing padded
    assert (tok.mask_id, tok.pad_id) == (128002, 128003)  # reserved_special_token_0 and _1
    ids = tok.encode("the quick fox")
    assert ids == [0, 1, 3]
    assert tok.decode(ids[:1] + [tok.mask_id] + ids[2:], mask_text="_") == "the_fox"
    assert tok.decode(ids + [tok.pad_id, 128000]) == "the quick fox"  # special ids are dropped
    # the token cache's key says the special ids came from reserved tokens
    assert tok.identity.endswith(":reserved:<|reserved_special_token_0|>,<|reserved_special_token_1|>")


def test_a_reserved_token_the_file_pads_with_is_in_use(tmp_path):
    path = tmp_path / "tokenizer.json"
    write_llama3_like(path, padding_token="<|reserved_special_token_0|>")
    tok = HFTokenizer(path)
    assert (tok.mask_id, tok.pad_id) == (128003, 128004)  # reserved _1 and _2
    assert tok.vocab_size == 128256


def test_llama3_tokenizer_composes_with_the_llama3_70b_preset(llama3_file, tmp_path):
    """The issue's report: with Meta's tokenizer.json, model=llama3_70b stopped with a vocab_size
    error (128258 ids for 128256 rows). The reserved tokens keep it at 128256."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog .\n" * 50)
    run = RunConfig.from_hydra(
        compose_cfg(
            [
                "model=llama3_70b",
                "data=text",
                f"data.path={corpus}",
                "data.tokenizer.kind=hf",
                f"data.tokenizer.path={llama3_file}",
                f"output_root={tmp_path}",
            ]
        )
    )
    assert (run.model.vocab_size, run.model.mask_id, run.model.pad_id) == (128256, 128002, 128003)


def _plain(tmp_path, n_words: int):
    vocab = {f"w{i}": i for i in range(n_words)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "plain.json"
    raw.save(str(path))
    return path


def test_without_reserved_tokens_the_vocabulary_is_padded(tmp_path):
    path = _plain(tmp_path, 300)
    tok = HFTokenizer(path)
    assert (tok.mask_id, tok.pad_id, tok.n_ids) == (300, 301, 302)
    assert tok.vocab_size == 384 and tok.vocab_size % VOCAB_MULTIPLE == 0
    assert tok.decode([0, 350, 383, 1]) == "w0 w1"  # an id of the padding decodes to nothing
    assert not tok.identity.count(":reserved")  # appended as before: the token cache keeps its key

    corpus = tmp_path / "c.txt"
    corpus.write_text("w1 w2 w3 w4 w5\n" * 100)
    base = [
        "model=tiny",
        "data=text",
        f"data.path={corpus}",
        "data.tokenizer.kind=hf",
        f"data.tokenizer.path={path}",
        f"output_root={tmp_path}",
    ]
    run = RunConfig.from_hydra(compose_cfg(base))
    assert (run.model.vocab_size, run.model.mask_id, run.model.pad_id) == (384, 300, 301)
    # the padding is a default: a model may have as few rows as the tokenizer has ids
    assert RunConfig.from_hydra(compose_cfg(base + ["model.vocab_size=302"])).model.vocab_size == 302
    with pytest.raises(ConfigError, match=r"model.vocab_size.*301.*302 ids.*>= 302"):
        RunConfig.from_hydra(compose_cfg(base + ["model.vocab_size=301"]))


def test_a_vocabulary_already_a_multiple_stays(tmp_path):
    tok = HFTokenizer(_plain(tmp_path, 254))
    assert (tok.n_ids, tok.vocab_size) == (256, 256)
