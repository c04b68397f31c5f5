"""The ids sampling starts from (a prompt and masks, or a text with its masks marked), and their text."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from stackwise.generation.unmasking import GenerationError

# A mask in infill text: `[MASK]` is one token, each `_` of a run of underscores is one token.
INFILL_MARK = re.compile(r"\[MASK\]|_+")


def _encode_text(tokenizer: Any, text: str, vocab_size: int, specials: Sequence[int], what: str) -> list[int]:
    """Text -> ids; without a tokenizer (dummy data) the text is whitespace-separated ids."""
    if tokenizer is not None:
        return list(tokenizer.encode(text))
    ids = []
    for word in text.split():
        try:
            i = int(word)
        except ValueError:
            raise GenerationError(
                f"{what}: this experiment's data has no tokenizer (dummy data): give token ids "
                f"separated by spaces, got {word!r}"
            ) from None
        if not 0 <= i < vocab_size or i in specials:
            raise GenerationError(f"{what}: token id {i} is outside [0, {vocab_size}) or a special id {list(specials)}")
        ids.append(i)
    return ids


def build_ids(
    tokenizer: Any,
    *,
    mask_id: int,
    vocab_size: int,
    length: int | None = None,
    prompt: str = "",
    infill: str | None = None,
    pad_id: int | None = None,
) -> list[int]:
    """The ids to start from: `prompt` + masks up to `length`, or `infill` with its masks marked.

    infill: `[MASK]` is one masked token; a run of n underscores is n masked tokens. The text
      between the marks is encoded piece by piece (for a BPE tokenizer a piece's boundary is a token
      boundary, and `_` counts tokens, not characters: `___` asks for three tokens, roughly three
      words or word pieces). Without a tokenizer (dummy data) the pieces are ids separated by spaces.
    """
    specials = [mask_id] + ([pad_id] if pad_id is not None else [])
    if infill is not None:
        if prompt:
            raise GenerationError("give a prompt or an infill text, not both")
        ids: list[int] = []
        pos = 0
        for m in INFILL_MARK.finditer(infill):
            ids += _encode_text(tokenizer, infill[pos : m.start()], vocab_size, specials, "infill")
            ids += [mask_id] * (1 if m.group() == "[MASK]" else len(m.group()))
            pos = m.end()
        ids += _encode_text(tokenizer, infill[pos:], vocab_size, specials, "infill")
        if mask_id not in ids:
            raise GenerationError(
                f"the infill text has nothing to fill: mark the positions with [MASK] or _ "
                f"(one _ per token), got {infill!r}"
            )
        return ids
    if length is None or isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise GenerationError(f"length must be an integer >= 1, got {length!r}")
    head = _encode_text(tokenizer, prompt, vocab_size, specials, "prompt") if prompt else []
    if len(head) >= length:
        raise GenerationError(
            f"the prompt is {len(head)} tokens, which leaves nothing to generate in length={length}; "
            f"give a length > {len(head)}"
        )
    return head + [mask_id] * (length - len(head))


def decode(tokenizer: Any, ids: Sequence[int], mask_text: str | None = None) -> str:
    """Text of ids with the experiment's tokenizer; without one (dummy data), the ids themselves."""
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return " ".join(str(i) for i in ids)
    return tokenizer.decode(ids, mask_text=mask_text) if mask_text is not None else tokenizer.decode(ids)
