"""Invalid input through the real `stackwise-train` CLI: it stops before any training.

Every case: non-zero exit, exactly one line `stackwise-train: error: ...` on stderr naming the bad
value (Hydra's own message for an unknown override key or group option), no traceback, and no
artifact left that a later run would trust. Config errors fail before Lightning is imported, so
they are cheap; they are started all at once (a few at a time) and each case waits for its own.
Artifact cases copy one tiny finished experiment and damage the copy.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stackwise import artifacts as art
from stackwise.cli.train import disk_errors
from stackwise.data.cache import layout, sink
from stackwise.data.cache.reader import ActivationCache
from stackwise.errors import ArtifactWriteError, StackWiseError
from stackwise.pipeline import Pipeline
from stackwise.stages.base import NonFiniteLossError
from tests.conftest import TINY, cli, cli_start

BASE = TINY + ["callbacks=none", "logger=none", "trainer.max_steps=4", "trainer.val_check_interval=2"]


# ------------------------------------------------------------------------------ config values
# (id, overrides, text the error line must contain: the bad value's name)
CONFIG_CASES = [
    ("wrong_type", ["model.d_model=abc"], "model.d_model"),
    ("indivisible_heads", ["model.n_heads=3"], "n_heads"),
    ("indivisible_kv_heads", ["model.n_kv_heads=3"], "n_kv_heads"),
    ("unknown_attention_kind", ["model.attention=bogus"], "model.attention"),
    ("k_out_of_range", ["stage=layer", "k=5"], "k:"),
    ("k_one_for_layer", ["stage=layer", "k=1"], "k:"),
    ("mask_min_above_max", ["masking.mask_fraction_min=0.9", "masking.mask_fraction_max=0.2"], "mask_fraction_min"),
    ("mask_max_above_one", ["masking.mask_fraction_max=1.5"], "mask_fraction_max"),
    ("negative_lr", ["optim.lr=-1"], "optim.lr"),
    ("lr_not_a_number", ["optim.lr=abc"], "optim.lr"),
    ("stage_lr_zero", ["+stages.layer.optim.lr=0"], "stages.layer.optim.lr"),
    ("unknown_stage", ["stage=bogus"], "stage:"),
    ("zero_max_steps", ["trainer.max_steps=0"], "trainer.max_steps"),
    ("zero_grad_accumulation", ["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches"),
    ("unknown_cache_dtype", ["cache.dtype=int8"], "cache.dtype"),
    ("dropout_out_of_range", ["model.dropout=1.5"], "model.dropout"),
    ("negative_seed", ["seed=-1"], "seed"),
    ("zero_seq_len", ["data.seq_len=0"], "data.seq_len"),
    ("flag_not_bool", ["overwrite=maybe"], "overwrite"),
    ("vocab_too_small", ["model.vocab_size=10"], "model.vocab_size"),
    ("unknown_layer_init", ["layerwise.init=bogus"], "layerwise.init"),
    ("name_with_slash", ["name=a/b"], "name"),
    ("negative_finetune_steps", ["fusion.finetune_steps=-1"], "fusion.finetune_steps"),
    ("unknown_optim_key", ["+optim.momentum=0.9"], "optim.momentum"),
]
# Hydra's own messages: an unknown key, an unknown option of a config group
HYDRA_CASES = [
    ("unknown_key", ["model.foo=1"], "Could not override 'model.foo'"),
    ("unknown_group_option", ["attention=bogus"], "Could not find 'attention/bogus'"),
]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return cli(*args, cwd=cwd, timeout=120)


DEBUG_CASE = ("debug_shows_traceback", ["model.d_model=abc", "debug=true"], "model.d_model")


@pytest.fixture(scope="module")
def config_results(tmp_path_factory):
    """Start every cheap case at once (3 at a time on a small CPU); each test reads its own result."""
    root = tmp_path_factory.mktemp("config_cases")
    cases = {}
    for cid, overrides, _ in CONFIG_CASES + HYDRA_CASES + [DEBUG_CASE]:
        cwd = root / cid
        cwd.mkdir()
        cases[cid] = (cwd, BASE + overrides)
    # path cases: an empty corpus, a missing one, an output folder that cannot be created
    (root / "empty.txt").write_text("")
    (root / "a_file").write_text("not a folder")
    paths = {
        "empty_corpus": (["data=text", f"data.path={root / 'empty.txt'}"], "data.path"),
        "missing_corpus": (["data=text", f"data.path={root / 'nope.txt'}"], "data.path"),
        "output_under_a_file": ([f"output_root={root / 'a_file' / 'out'}"], "output_root"),
    }
    text = ["model=tiny", "data.seq_len=32", "callbacks=none", "logger=none"]  # TINY's data keys are dummy's
    for cid, (overrides, _) in paths.items():
        cwd = root / cid
        cwd.mkdir()
        cases[cid] = (cwd, (text if "data=text" in overrides else BASE) + overrides)
    with ThreadPoolExecutor(max_workers=2) as pool:  # 2 CPU cores
        futures = {cid: pool.submit(run_cli, args, cwd) for cid, (cwd, args) in cases.items()}
        return {cid: (cases[cid][0], f.result()) for cid, f in futures.items()}, {k: v[1] for k, v in paths.items()}


def error_line(out: subprocess.CompletedProcess) -> str:
    """The one `stackwise-train: error:` line (asserting there is exactly one, and no traceback)."""
    assert out.returncode != 0, out.stdout[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("stackwise-train: error:")]
    assert len(lines) == 1, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == lines[0], "the error is the last thing printed"
    return lines[0]


def assert_nothing_trusted(folder: Path) -> None:
    """No layer checkpoint, cache manifest or model a later run would pick up."""
    for pattern in ("layer_*.pt", "manifest.json", "*.safetensors", "last.ckpt"):
        assert not list(folder.rglob(pattern)), (pattern, list(folder.rglob(pattern)))


@pytest.mark.parametrize("cid,needle", [(c, n) for c, _, n in CONFIG_CASES])
def test_bad_config_value(config_results, cid, needle):
    results, _ = config_results
    cwd, out = results[cid]
    line = error_line(out)
    assert needle in line, line
    assert_nothing_trusted(cwd)


@pytest.mark.parametrize("cid", ["empty_corpus", "missing_corpus", "output_under_a_file"])
def test_bad_path(config_results, cid):
    results, needles = config_results
    cwd, out = results[cid]
    line = error_line(out)
    assert needles[cid] in line, line
    assert_nothing_trusted(cwd)


@pytest.mark.parametrize("cid,needle", [(c, n) for c, _, n in HYDRA_CASES])
def test_unknown_override_keeps_hydras_message(config_results, cid, needle):
    results, _ = config_results
    cwd, out = results[cid]
    assert out.returncode != 0
    assert needle in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert_nothing_trusted(cwd)


def test_debug_shows_the_traceback(config_results):
    results, _ = config_results
    _, out = results[DEBUG_CASE[0]]
    assert out.returncode != 0 and "Traceback" in out.stderr and DEBUG_CASE[2] in out.stderr, out.stderr[-3000:]


# ------------------------------------------------------------------------------ artifacts
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny finished `all` run (2 layers, acts_layer1 cached) to copy and damage."""
    root = tmp_path_factory.mktemp("finished")
    out = run_cli(["stage=all", "name=exp", *BASE], root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "outputs" / "exp"


def copy_of(finished: Path, tmp_path: Path) -> Path:
    exp = tmp_path / "outputs" / "exp"
    shutil.copytree(finished, exp)
    return exp


def stamps(folder: Path) -> dict:
    return {
        p: (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file() and "hydra" not in p.parts and p.name not in ("run_config.json", "run.lock")
    }


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip(path: Path, where: float = 0.6) -> None:
    """Change one byte in the data part of a file, keeping its size."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * where)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


SHARD = "acts/acts_layer1/train/r0_s00000.hidden.npy"


def retrain_layer_1(exp: Path) -> None:
    """A valid layer_1.pt of the same settings, but not the one layer 2 was trained on."""
    weights, meta = art.load_layer_checkpoint(exp / "layers/layer_1.pt")
    weights.head["norm.weight"] = weights.head["norm.weight"] + 1e-3
    art.save_layer_checkpoint(exp / "layers/layer_1.pt", weights, meta)


ALL = ["stage=all"]
# (id, damage(exp), overrides, text the error line must contain)
ARTIFACT_CASES = [
    ("truncated_shard", lambda e: truncate(e / SHARD), ALL, "r0_s00000.hidden.npy"),
    ("missing_shard", lambda e: (e / SHARD).unlink(), ALL, "r0_s00000.hidden.npy"),
    ("shard_bytes_changed_verify", lambda e: flip(e / SHARD), ALL + ["verify=true"], "sha256"),
    (
        "corrupt_manifest",
        lambda e: (e / "acts/acts_layer1/manifest.json").write_text("{not json"),
        ALL,
        "manifest.json",
    ),
    ("corrupt_checkpoint_bytes", lambda e: flip(e / "layers/layer_1.pt", 0.5), ALL, "layer_1.pt"),
    ("truncated_checkpoint", lambda e: truncate(e / "layers/layer_2.pt"), ALL, "layer_2.pt"),
    ("checkpoint_from_another_config", lambda e: None, ALL + ["optim.lr=0.01"], "layer_1.pt"),
    ("layer_from_another_predecessor", retrain_layer_1, ["stage=layer", "k=2"], "layer_2.pt"),
    (
        "truncated_cache_read_by_next_layer",
        lambda e: ((e / "layers/layer_2.pt").unlink(), truncate(e / SHARD)),
        ["stage=layer", "k=2"],
        "r0_s00000.hidden.npy",
    ),
]


@pytest.mark.parametrize("cid,damage,args,needle", ARTIFACT_CASES, ids=[c[0] for c in ARTIFACT_CASES])
def test_bad_artifact(finished, tmp_path, cid, damage, args, needle):
    exp = copy_of(finished, tmp_path)
    damage(exp)
    before = stamps(exp)
    out = run_cli([*args, "name=exp", *BASE], tmp_path)
    line = error_line(out)
    assert needle in line, line
    # stopped before touching anything: no stage retrained, no cache rebuilt, no model rewritten
    assert stamps(exp) == before


def test_missing_previous_layer(tmp_path):
    out = run_cli(["stage=layer", "k=2", "name=exp", *BASE], tmp_path)
    assert "layer_1.pt" in error_line(out)
    assert_nothing_trusted(tmp_path)


def test_mid_stage_checkpoint_from_another_config(finished, tmp_path, make_run):
    """A ckpt/<stage>/last.ckpt left by a killed run with other settings is not resumed from."""
    exp = tmp_path / "outputs" / "exp"
    (exp / "ckpt" / "embed").mkdir(parents=True)
    shutil.copy(finished / "layers" / "layer_1.pt", exp / "ckpt" / "embed" / "last.ckpt")  # any zip will do
    other = make_run(*BASE[len(TINY) :], "optim.lr=0.01").hashes()["layer"]
    (exp / "ckpt" / "embed" / "stackwise.json").write_text(json.dumps({"stage": "embed", "config_hash": other}))
    out = run_cli(["stage=embed", "name=exp", *BASE], tmp_path)
    line = error_line(out)
    assert "last.ckpt" in line and other[:12] in line, line
    assert not (exp / "layers").exists()


# ------------------------------------------------------------------------------ in-process guards
def test_non_finite_loss_stops_the_stage_and_keeps_nothing(make_run):
    run = make_run("stage=all", "optim.lr=1e30", "optim.warmup_steps=0", *BASE[len(TINY) :])
    pipe = Pipeline(run)
    with pytest.raises(NonFiniteLossError, match=r"stage embed: non-finite training loss .* at step \d+"):
        pipe.execute()
    assert not pipe.paths.layer_ckpt(1).exists()
    assert not pipe.paths.acts_manifest(1).exists() and not list(pipe.paths.root.rglob("*.npy"))
    assert not pipe.paths.fused_dir.exists()


def _no_space(monkeypatch, free: int = 1000) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(layout.shutil, "disk_usage", lambda p: real(p)._replace(free=free))


def test_cache_that_does_not_fit_stops_before_training(make_run, monkeypatch):
    _no_space(monkeypatch)
    pipe = Pipeline(make_run("stage=all", *BASE[len(TINY) :]))
    with pytest.raises(StackWiseError, match=r"not enough disk space .*acts_layer1: needs \d"):
        pipe.execute()
    assert not pipe.paths.layer_ckpt(1).exists() and not pipe.paths.acts_root.exists()


def test_cache_that_does_not_fit_stops_before_writing(finished, tmp_path, make_run, monkeypatch):
    """Killed after layer_1.pt, before its cache: the rerun that rebuilds only the cache checks too."""
    shutil.copytree(finished, tmp_path / "exp")
    # what a run killed there had not written yet (with layer 2 complete, no cache of layer 1 would be needed)
    shutil.rmtree(tmp_path / "exp" / "acts")
    shutil.rmtree(tmp_path / "exp" / "fused")
    (tmp_path / "exp" / "layers" / "layer_2.pt").unlink()
    pipe = Pipeline(make_run("stage=all", *BASE[len(TINY) :], name="exp"))
    _no_space(monkeypatch)
    with pytest.raises(StackWiseError, match=r"not enough disk space .*acts_layer1: needs \d"):
        pipe.execute()
    assert not pipe.paths.acts_manifest(1).exists() and not list(pipe.paths.root.rglob("*.npy"))


# ------------------------------------------------------------------------------ a full disk
def test_disk_full_while_caching_stops_cleanly_and_a_rerun_completes(make_run, monkeypatch):
    """The disk fills up midway through a cache (another process took the space after the free-space
    check): one line naming the file and what to do, nothing half-written kept, and the same command
    completes once there is room, without retraining the finished stage."""
    overrides = ["stage=all", "cache.shard_size=16", *BASE[len(TINY) :]]
    real, files = sink.create_file, []

    def filling(path, header, nbytes):
        files.append(path)
        if len(files) < 14:  # two whole shards (6 files each), the third one's hidden states
            return real(path, header, nbytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # no room to preallocate its targets

    monkeypatch.setattr(sink, "create_file", filling)
    pipe = Pipeline(make_run(*overrides))
    with pytest.raises(ArtifactWriteError) as e:
        pipe.execute()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot write {files[-1]}: no space left on device (ENOSPC)"), msg
    assert files[-1].name == "r0_s00002.targets.npy" and "output_root=" in msg
    root = pipe.paths.root
    assert pipe.paths.layer_ckpt(1).is_file() and not pipe.paths.acts_manifest(1).exists()
    assert not list(root.rglob("*.npy")) and not list(root.rglob("*.tmp")), "shards of a cache that cannot complete"
    layer_1 = pipe.paths.layer_ckpt(1).read_bytes()

    monkeypatch.undo()  # space freed
    Pipeline(make_run(*overrides)).execute()
    assert pipe.paths.layer_ckpt(1).read_bytes() == layer_1  # not retrained: only its cache was rebuilt
    assert ActivationCache.open(pipe.paths.acts_dir(1), verify=True).rows("train") > 32
    assert [r["stage"] for r in art.read_results(pipe.paths)] == ["embed", "layer_2", "fused"]


def test_write_error_inside_lightning_is_one_line_from_the_cli(tmp_path):
    """A real OS error from the shard writer inside Lightning's predict loop, through the CLI: the file
    size limit (ulimit -f) is set on the running process, so writes past it fail with EFBIG."""
    args = ["stage=all", "name=exp", *BASE]
    run = cli_start(*args, cwd=tmp_path, timeout=300)
    # above every checkpoint of the tiny model (last.ckpt ~120 KiB), below a shard of hidden states (~260 KiB)
    resource.prlimit(run.proc.pid, resource.RLIMIT_FSIZE, (192 * 1024, resource.RLIM_INFINITY))
    line = error_line(run.wait())
    exp = tmp_path / "outputs" / "exp"
    assert "cannot write outputs/exp/acts/acts_layer1/train/r0_s00000.hidden.npy: file too large" in line, line
    assert not list(exp.rglob("*.npy")) and not list(exp.rglob("*.tmp")) and not list(exp.rglob("manifest.json"))
    out = run_cli(args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["stage"] for r in art.read_results(art.ExperimentPaths(exp))] == ["embed", "layer_2", "fused"]


def test_disk_errors_met_outside_our_writers_are_one_line(tmp_path):
    """stackwise/cli/train.py's net: a full disk met by another writer (TensorBoard's) names its file;
    when Lightning's failure hooks fail on the same full disk after our error, ours is reported."""
    folder = tmp_path / "exp"
    with pytest.raises(ArtifactWriteError) as e, disk_errors(folder):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "tb" / "events.out"))
    assert str(e.value).startswith(f"cannot write {folder / 'tb' / 'events.out'}: no space left on device")
    with pytest.raises(ArtifactWriteError) as e, disk_errors(folder):
        raise RuntimeError("flush failed") from OSError(errno.EDQUOT, "Disk quota exceeded")
    assert str(e.value).startswith(f"cannot write a file under {folder}: disk quota exceeded")
    shard = folder / "acts" / "r0_s00001.hidden.npy"
    with pytest.raises(ArtifactWriteError) as e, disk_errors(folder):
        try:
            raise ArtifactWriteError(shard, errno.ENOSPC)
        except ArtifactWriteError:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None  # a logger's final flush
    assert str(e.value).startswith(f"cannot write {shard}: no space left on device")
    for other in (OSError(errno.ENOENT, "No such file or directory", "x"), RuntimeError("a bug")):
        with pytest.raises(type(other)), disk_errors(folder):
            raise other
