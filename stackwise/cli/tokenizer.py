"""`stackwise-tokenizer`: train a byte-level BPE tokenizer.json on your corpus for `data=text`.

    stackwise-tokenizer corpus.txt --vocab-size 8192 --out tok/tokenizer.json
    stackwise-tokenizer books/ --vocab-size 4096 --out tok.json          # every .txt under books/
    stackwise-tokenizer data.jsonl --field content --vocab-size 8192 --out tok.json

The corpus is read exactly as `data=text` reads it (UTF-8, no NUL bytes; a folder means its .txt
files, a .jsonl file the `--field` of each line). [MASK] and [PAD] are the tokenizer's first two
ids; the vocabulary size printed includes them. The file is written under a temporary name and
renamed, so an interrupted run never leaves a half-written tokenizer.json. Exit status 2 with one
line for a missing, empty or non-text corpus or a bad argument.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path
from typing import NoReturn

from stackwise.cli.common import user_errors
from stackwise.data.corpus import corpus_files
from stackwise.errors import StackWiseError

PROG = "stackwise-tokenizer"
MIN_VOCAB = 256 + 2  # the byte alphabet + [MASK] + [PAD]
DEFAULT_OUT = "tokenizer.json"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too, like the errors of the corpus."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def _override_value(path: Path) -> str:
    """A path as a Hydra override value: quoted when it holds characters Hydra's grammar parses."""
    s = str(path)
    if re.fullmatch(r"[\w./~+-]+", s):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _override_line(corpus: list[Path], field: str, out: Path) -> str:
    data_path = _override_value(corpus[0].resolve()) if len(corpus) == 1 else "<your corpus>"
    args = ["stackwise-train", "data=text", f"data.path={data_path}"]
    if field != "text" and any(p.suffix.lower() == ".jsonl" for p in corpus):
        args.append(f"data.field={_override_value(Path(field))}")
    args += ["data.tokenizer.kind=hf", f"data.tokenizer.path={_override_value(out.resolve())}"]
    return " ".join(
        a if a.startswith("stackwise-") or re.fullmatch(r"[\w.=/~+-]+", a) else shlex.quote(a) for a in args
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument(
        "corpus",
        type=Path,
        nargs="+",
        help="a .txt file, a folder of .txt files (recursive) or a .jsonl file; several allowed",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        required=True,
        help=f"target vocabulary size, [MASK] and [PAD] included (>= {MIN_VOCAB}); a small "
        "corpus may end with fewer merges",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(DEFAULT_OUT),
        help=f"where to write the tokenizer.json (a folder gets {DEFAULT_OUT} inside it; default: ./{DEFAULT_OUT})",
    )
    parser.add_argument(
        "--field", default="text", help="the JSON key holding the text of each .jsonl line (default: text)"
    )
    parser.add_argument(
        "--min-frequency",
        type=int,
        default=2,
        help="a pair is merged only if it occurs at least this often (default: 2)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return parser


def _corpus_and_out(args: argparse.Namespace) -> tuple[list[Path], Path]:
    """The corpus paths and the output file, checked before any work (each problem one line)."""
    if args.vocab_size < MIN_VOCAB:
        raise StackWiseError(f"--vocab-size must be >= {MIN_VOCAB} (256 bytes + [MASK] + [PAD]), got {args.vocab_size}")
    if args.min_frequency < 1:
        raise StackWiseError(f"--min-frequency must be >= 1, got {args.min_frequency}")
    if not args.field:
        raise StackWiseError("--field must be a non-empty JSON key")
    corpus = [p.expanduser() for p in args.corpus]
    for p in corpus:
        corpus_files(p)  # a missing path or a folder without .txt files fails before any work
    out = args.out.expanduser()
    if out.is_dir():
        out = out / DEFAULT_OUT
    if out.resolve() in {f.resolve() for p in corpus for f in corpus_files(p)}:
        raise StackWiseError(f"--out {out} is one of the corpus files; choose another path")
    return corpus, out


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    with user_errors(PROG, debug=args.debug):
        corpus, out = _corpus_and_out(args)
        # tokenizers.py imports torch (through stackwise.artifacts): seconds, so only once the arguments are good
        from stackwise.data.tokenizers import MASK_TOKEN, PAD_TOKEN, train_bpe

        try:
            tok = train_bpe(corpus, args.vocab_size, out, field=args.field, min_frequency=args.min_frequency)
        except OSError as e:  # a corpus file that cannot be read, an output folder that cannot be written
            raise StackWiseError(f"{e.filename or out}: {e.strerror or e}") from None

    note = (
        ""
        if tok.vocab_size >= args.vocab_size
        else f" (asked for {args.vocab_size}: the corpus has too few distinct pairs for more merges)"
    )
    print(
        f"wrote {out} (vocab_size={tok.vocab_size} incl. {MASK_TOKEN}={tok.mask_id} and "
        f"{PAD_TOKEN}={tok.pad_id}){note}",
        flush=True,
    )
    print("use it with:", flush=True)
    print(f"  {_override_line(corpus, args.field, out)}", flush=True)


if __name__ == "__main__":
    main()
