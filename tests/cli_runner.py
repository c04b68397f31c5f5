"""Run `stackwise-train ARGS` the way a user does, without paying Lightning's import each time.

Importing lightning + torch + hydra costs ~7 s of CPU per process, and the CLI tests start dozens
of processes: on a 2-core CI machine that alone is minutes. So the tests use the standard library's
`forkserver`: one clean process imports those libraries once (and does nothing else: no threads,
no tensors), and every CLI run is a fresh `fork()` of it that sets its own working directory,
environment, argv and stdout/stderr files, then calls the console script's `main()`. The child is a
real process: its exit status (`-9` after SIGKILL), its stderr and the files it writes are what a
user's `stackwise-train` would give. StackWise's own modules are imported in the child, after its
environment is set, exactly as in a fresh interpreter. `tests/test_cli.py` still runs the installed
console script as a plain subprocess once, so the entry point itself stays covered.

`kill_at=POINT` installs tests/kill_points.py's observer in the child before `main()`, through the
pipeline's public observer hooks: the run SIGKILLs itself at that exact place (tests/test_resume.py).
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
import traceback
import types
from pathlib import Path

# imported once in the fork server; nothing of stackwise, whose import-time state must come fresh
PRELOAD = [
    "torch",
    "lightning",
    "lightning.pytorch",
    "hydra",
    "omegaconf",
    "torchmetrics",
    "tensorboard",
    "safetensors",
    "numpy",
]

_context: multiprocessing.context.BaseContext | None = None


def _ctx() -> multiprocessing.context.BaseContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _console_script() -> str:
    """The installed `stackwise-train` beside this interpreter (what its argv[0] is), or the bare name."""
    script = Path(sys.executable).parent / "stackwise-train"
    return str(script) if script.is_file() else "stackwise-train"


def _child(
    args: list[str], cwd: str, env: dict, out_path: str, err_path: str, kill_at: str | None, code: str | None
) -> None:
    """In the forked child: become `stackwise-train ARGS` (or `python -c CODE ARGS`) run from `cwd` with `env`."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    # argv[0] and __main__ as the installed console script has them (its path; a module without a
    # spec, not the test runner's that multiprocessing set up): Lightning's DDP launcher re-executes
    # them for the other ranks, so `hardware=ddp` runs from here as from the console script
    script = _console_script() if code is None else "-c"
    sys.argv = [script, *args]
    main_module = types.ModuleType("__main__")
    main_module.__spec__ = None
    if code is None:
        main_module.__file__ = script
    sys.modules["__main__"] = main_module
    status = 0
    try:
        if code is not None:  # `python -c CODE`: the code runs as __main__
            exec(compile(code, "<string>", "exec"), main_module.__dict__)
            raise SystemExit(0)
        # imported here, not at the top: StackWise's modules must load after the child's environment is set
        from stackwise.cli.train import main

        if kill_at is not None:
            from stackwise.pipeline import observe
            from tests.kill_points import KillAt

            observe(KillAt(kill_at))
        main()
    except SystemExit as e:  # what the console script's exit status would be
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # an uncaught error: traceback on stderr, status 1, like the interpreter
        traceback.print_exc()
        status = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)


class CliRun:
    """A started run; `.wait()` returns a `subprocess.CompletedProcess`. With `code`, the run is
    `python -c CODE ARGS` instead of `stackwise-train ARGS` (for a test's own script that needs a
    process of its own: one it kills, or whose warnings and logging start fresh)."""

    def __init__(
        self,
        args: list[str],
        cwd: Path,
        env: dict,
        timeout: float,
        kill_at: str | None = None,
        code: str | None = None,
    ):
        self.args, self.timeout = (
            (["stackwise-train"] if code is None else ["python", "-c", code]) + list(args),
            timeout,
        )
        self._dir = tempfile.TemporaryDirectory(prefix="sw_cli_")
        self._out, self._err = (str(Path(self._dir.name) / n) for n in ("stdout", "stderr"))
        self.proc = _ctx().Process(target=_child, args=(list(args), str(cwd), env, self._out, self._err, kill_at, code))
        self.proc.start()

    def wait(self) -> subprocess.CompletedProcess:
        self.proc.join(self.timeout)
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join()
            raise subprocess.TimeoutExpired(
                self.args, self.timeout, output=self._read(self._out), stderr=self._read(self._err)
            )
        done = subprocess.CompletedProcess(self.args, self.proc.exitcode, self._read(self._out), self._read(self._err))
        self.proc.close()
        self._dir.cleanup()
        return done

    @staticmethod
    def _read(path: str) -> str:
        return Path(path).read_text(encoding="utf-8", errors="replace") if Path(path).exists() else ""
