"""One piece of work on a thread of its own while the pipeline goes on (fused/'s write beside the
joint fine-tune: stackwise/pipeline/graph.py).

The work's error is kept and raised in the pipeline's thread, the very exception object, so that it
reads as it would have had the work run there (a full disk: one ArtifactWriteError line). The
thread is not a daemon: an interpreter that exits while it runs waits for it, so a write is never
cut short by the exit of the thread that started it (only a kill does that, and the manifest, written
last, keeps such a folder untrusted).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Background(Generic[T]):
    """`job = Background(work, name)` runs `work()` at once on a thread; `job.result()` waits for it
    and returns its value or raises its error; `job.failed()` peeks without waiting."""

    def __init__(self, work: Callable[[], T], name: str):
        self._work: Callable[[], T] | None = work
        self._value: T | None = None
        self._error: BaseException | None = None
        self.seconds = 0.0  # how long the work took, once done
        self.waited = 0.0  # how long `result` waited for it
        self._thread = threading.Thread(target=self._run, name=name)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            assert self._work is not None
            self._value = self._work()
        except BaseException as e:  # raised in the pipeline's thread by result() (and failed())
            self._error = e
        finally:
            self.seconds = time.perf_counter() - t0
            self._work = None  # what the work held (fused/'s host copy) is freed as soon as it is done

    def done(self) -> bool:
        return not self._thread.is_alive()

    def failed(self) -> BaseException | None:
        """The work's error when it has already failed, else None (it may still be running)."""
        return self._error if self.done() else None

    def wait(self) -> None:
        """Wait for the work to end, whatever it ends with (its error is left to `result`)."""
        t0 = time.perf_counter()
        self._thread.join()
        self.waited += time.perf_counter() - t0

    def result(self) -> T:
        self.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]
