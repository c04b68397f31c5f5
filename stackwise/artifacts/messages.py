"""One-line messages about artifacts, and the check of an artifact's metadata against this run's."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from stackwise.artifacts.paths import PathLike
from stackwise.errors import ArtifactError


def one_line(text: str, limit: int = 200) -> str:
    """First line of an exception message, shortened: user errors are one line (errors.py)."""
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def short_value(value: Any) -> str:
    """Hashes are shown as their first 12 characters; everything else as its repr."""
    if isinstance(value, str) and len(value) > 16 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"
    return repr(value)


def json_normal(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists), so comparisons are like for like."""
    return json.loads(json.dumps(value))


def check_expected(
    source: PathLike,
    found: Mapping[str, Any],
    expect: Mapping[str, Any] | None,
    hint: str = "use overwrite=true or another experiment",
) -> None:
    """Raise ArtifactError naming `source` for the first key whose recorded value differs from `expect`.

    `found` is an artifact's metadata; `expect` is what this run would have written.
    """
    for key, want in (expect or {}).items():
        if key not in found:
            raise ArtifactError(
                f"{source} records no {key!r} (expected {short_value(want)}); "
                f"it was not written by this version of StackWise; {hint}"
            )
        have, want_n = json_normal(found[key]), json_normal(want)
        if have != want_n:
            if key == "config_hash":
                what = f"was made by config {short_value(have)} but this run's config is {short_value(want_n)}"
            else:
                what = f"has {key}={short_value(have)} but this run expects {key}={short_value(want_n)}"
            raise ArtifactError(f"{source} {what}; {hint}")
