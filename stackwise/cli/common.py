"""What every StackWise CLI shares: one-line user errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from stackwise.errors import StackWiseError


@contextmanager
def user_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """Turn a StackWiseError into `prog: error: <one line>` and exit status 2, no traceback.

    HYDRA_FULL_ERROR=1 or debug=true re-raises it, for developers who want the traceback.
    """
    try:
        yield
    except StackWiseError as e:
        if debug or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = " ".join(str(e).split())  # one line, whatever the message held
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
