"""One run at a time per experiment folder (stackwise/lock.py), and one results.json record per stage."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from stackwise import artifacts as art
from stackwise.errors import ExperimentBusyError
from stackwise.lock import experiment_lock
from stackwise.pipeline import Pipeline
from tests.conftest import TINY, cli, cli_start

BASE = TINY + ["callbacks=none", "logger=none", "trainer.max_steps=4", "trainer.val_check_interval=2"]


def one_error_line(out) -> str:
    """The one `stackwise-train: error:` line, the last thing printed, no traceback."""
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("stackwise-train: error:")]
    assert len(lines) == 1 and out.stderr.strip().splitlines()[-1] == lines[0], out.stderr[-3000:]
    return lines[0]


def wait_for_holder(lock_file: Path, pid: int, run, timeout: float = 180) -> dict:
    """Poll until process `pid` has taken the lock (its line is in the lock file)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.proc.exitcode is None, "the first run ended before it was seen holding the lock"
        try:
            holder = json.loads(lock_file.read_text())
            if holder.get("pid") == pid:
                return holder
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} never took {lock_file}")


# ------------------------------------------------------------------------------ in-process
def test_lock_is_exclusive_and_released(tmp_path):
    paths = art.ExperimentPaths(tmp_path / "exp")
    paths.root.mkdir()
    with experiment_lock(paths):
        holder = json.loads(paths.lock_file.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(ExperimentBusyError) as e, experiment_lock(paths):  # a second open file: refused
            pass
        msg = str(e.value)
        assert "\n" not in msg and str(paths.root) in msg
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in msg and "name=NAME" in msg
    with pytest.raises(RuntimeError), experiment_lock(paths):  # released after a failure too
        raise RuntimeError("stage failed")
    with experiment_lock(paths):
        pass
    assert paths.lock_file.read_text() == ""  # no holder line left behind


@pytest.mark.parametrize("var", ["LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"])
def test_other_ranks_of_a_distributed_run_take_no_lock(tmp_path, monkeypatch, var):
    """Lightning's DDP launcher re-executes the script for rank > 0 with LOCAL_RANK set: those processes
    belong to the run holding the lock and must pass (or every DDP run would stop its own ranks)."""
    paths = art.ExperimentPaths(tmp_path / "exp")
    paths.root.mkdir()
    with experiment_lock(paths):
        monkeypatch.setenv(var, "1")
        with experiment_lock(paths):
            pass
        monkeypatch.setenv(var, "0")  # rank 0 of a launcher is the run itself: refused while another holds it
        with pytest.raises(ExperimentBusyError), experiment_lock(paths):
            pass


def test_a_retrained_stage_replaces_its_record(make_run):
    """results.json holds one record per stage: retraining layer 2 (and so fusion) with overwrite=true
    replaces their records instead of adding a second one."""
    pipe = Pipeline(make_run("stage=all", *BASE[len(TINY) :]))
    pipe.execute()
    first = json.loads(pipe.paths.results_json.read_text())
    assert [r["stage"] for r in first] == ["embed", "layer_2", "fused"]
    data = pipe.paths.layer_ckpt(2).read_bytes()
    pipe.paths.layer_ckpt(2).write_bytes(data[: len(data) // 2])  # damaged: retrained with overwrite=true
    Pipeline(make_run("stage=all", "overwrite=true", *BASE[len(TINY) :])).execute()
    records = json.loads(pipe.paths.results_json.read_text())
    assert [r["stage"] for r in records] == ["embed", "layer_2", "fused"]
    assert records[0] == first[0]  # embed was not retrained: its record is untouched
    assert records[1]["seconds"] != first[1]["seconds"]  # layer_2's record is the new run's


# ------------------------------------------------------------------------------ two CLI runs
def test_second_run_on_the_same_experiment_stops_with_the_holders_pid(tmp_path):
    args = ["stage=embed", "name=exp", *BASE]
    lock_file = tmp_path / "outputs" / "exp" / "run.lock"
    first = cli_start(*args, cwd=tmp_path)
    pid = first.proc.pid
    try:
        wait_for_holder(lock_file, pid, first)
        # hold the first run still while the second starts, so the overlap does not depend on timing
        os.kill(pid, signal.SIGSTOP)
        second = cli(*args, cwd=tmp_path, timeout=180)
    finally:
        os.kill(pid, signal.SIGCONT)
    line = one_error_line(second)
    assert f"pid {pid} on host {socket.gethostname()}" in line and "outputs/exp is in use" in line, line
    done = first.wait()
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads((tmp_path / "outputs" / "exp" / "results.json").read_text())
    assert [r["stage"] for r in records] == ["embed"]  # the first run's, once


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    args = ["stage=embed", "name=exp", *BASE]
    lock_file = tmp_path / "outputs" / "exp" / "run.lock"
    first = cli_start(*args, cwd=tmp_path)
    pid = first.proc.pid
    wait_for_holder(lock_file, pid, first)
    os.kill(pid, signal.SIGKILL)
    assert first.wait().returncode == -signal.SIGKILL
    assert json.loads(lock_file.read_text())["pid"] == pid  # its line is still there, its lock is not
    out = cli(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "outputs" / "exp" / "layers" / "layer_1.pt").is_file()
