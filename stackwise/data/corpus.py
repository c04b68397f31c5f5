"""Reading a corpus as checked text: a .txt file, a folder of .txt files, a .jsonl file, or the
Tiny Shakespeare shipped gzipped in the package (stackwise/data/corpora: no download).

Text is read in blocks cut after a newline (memory stays flat on big corpora); a NUL byte, invalid
UTF-8 or a bad .jsonl line is a StackWiseError naming the file and where in it.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Union

from stackwise.errors import StackWiseError

SHAKESPEARE = ("stackwise.data.corpora", "tinyshakespeare.txt.gz")


_BLOCK = 1 << 22  # bytes read at a time from a text file (4 MiB): memory stays flat on big corpora


PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class Source:
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


def file_source(path: Path, field_name: str) -> Source:
    files = corpus_files(path)
    identity = []
    for f in files:
        st = f.stat()
        identity.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    opened = [(str(f), (lambda f=f: open(f, "rb")), f.suffix.lower() == ".jsonl") for f in files]  # noqa: SIM115 (opened later, by the reader, in a with)
    return Source(str(path), identity, opened, field_name)


def shakespeare_source() -> Source:
    res = resources.files(SHAKESPEARE[0]).joinpath(SHAKESPEARE[1])
    blob = res.read_bytes()
    name = f"stackwise/data/corpora/{SHAKESPEARE[1]}"
    return Source(
        name, [name, hashlib.sha256(blob).hexdigest()], [(name, lambda: gzip.GzipFile(fileobj=io.BytesIO(blob)), False)]
    )


def iter_corpus_text(path: PathLike, field: str = "text") -> Iterator[tuple[str, str]]:
    """(file name, text chunk) over every file of a corpus path, checked (see `_iter_source`)."""
    yield from iter_source(file_source(Path(path).expanduser(), field))


def iter_source(source: Source) -> Iterator[tuple[str, str]]:
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
