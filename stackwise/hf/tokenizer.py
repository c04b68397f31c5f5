"""An experiment's tokenizer as transformers tokenizer files (`AutoTokenizer.from_pretrained(DIR)`).

A `hf` tokenizer is its own tokenizer.json, with the [MASK] and [PAD] the experiment added (or the
reserved special tokens it took for them: the exported tokenizer's mask and pad tokens are those). The byte
tokenizer has no file: it is written as a byte-level tokenizer.json whose ids are the bytes (a BPE
with the 256 byte symbols and no merges, GPT-2's byte-to-character table), then [MASK] = 256 and
[PAD] = 257, so it encodes every text to exactly the ids StackWise trained on. The dummy data has no
text: its ids are the symbols of a synthetic language, so no tokenizer is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from stackwise.data.config import data_tokenizer
from stackwise.data.tokenizers import MASK_TOKEN, PAD_TOKEN, ByteTokenizer
from stackwise.hf.adapter import require_transformers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table (what tokenizers' ByteLevel pre-tokenizer maps bytes to): printable bytes stand
    for themselves, the others for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer() -> Tokenizer:
    """A `tokenizers` Tokenizer whose ids are ByteTokenizer's: byte b -> b, [MASK] 256, [PAD] 257."""
    table = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([MASK_TOKEN, PAD_TOKEN])
    if (tok.token_to_id(MASK_TOKEN), tok.token_to_id(PAD_TOKEN)) != (ByteTokenizer.mask_id, ByteTokenizer.pad_id):
        raise AssertionError("the byte tokenizer's special ids moved")
    return tok


def write_tokenizer(run: Any, out_dir: Path) -> str | None:
    """Write the experiment's tokenizer into `out_dir` as transformers' tokenizer files; returns what
    was written ("hf" / "byte"), or None for the dummy data, which has no tokenizer."""
    tok = data_tokenizer(run.data)
    if tok is None:
        return None
    transformers = require_transformers()
    rust = byte_tokenizer() if isinstance(tok, ByteTokenizer) else tok.tok
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=rust,
        # the tokens at the ids StackWise uses: "[MASK]" / "[PAD]", or the reserved special tokens
        # they took (Llama-3's <|reserved_special_token_N|>), which naming "[MASK]" would duplicate at a new id
        mask_token=rust.id_to_token(tok.mask_id),
        pad_token=rust.id_to_token(tok.pad_id),
        model_max_length=int(run.data.seq_len),
    )
    fast.save_pretrained(str(out_dir))
    return "byte" if isinstance(tok, ByteTokenizer) else "hf"
