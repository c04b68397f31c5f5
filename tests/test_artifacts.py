"""The experiment folder: atomic writes, layer checkpoints, safetensors models, results."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
from pathlib import Path

import numpy as np
import pytest
import torch

from stackwise import artifacts as art
from stackwise.artifacts import (
    ExperimentPaths,
    atomic,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_stream,
    load_layer_checkpoint,
    load_model,
    load_safetensors_model,
    read_results,
    record_result,
    save_layer_checkpoint,
    save_safetensors_model,
    sha256_file,
)
from stackwise.errors import ArtifactError, ArtifactWriteError, ConfigError
from stackwise.model.config import ModelConfig
from stackwise.model.transformer import Transformer
from stackwise.model.weights import LayerWeights


def _state() -> LayerWeights:
    g = torch.Generator().manual_seed(0)
    return LayerWeights(
        block={"attn.wq": torch.randn(8, 8, generator=g), "bf": torch.randn(4, generator=g).to(torch.bfloat16)},
        frozen_sha256="ab" * 32,
        head={"norm.weight": torch.ones(8)},
    )


META = {"k": 2, "config_hash": "1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d", "dims": (8, 8)}


def _assert_one_line_naming(err: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


# ------------------------------------------------------------------------------------- paths
def test_paths_layout(tmp_path: Path) -> None:
    p = ExperimentPaths.from_root(tmp_path / "outputs", "exp")
    root = tmp_path / "outputs" / "exp"
    assert p.layer_ckpt(3) == root / "layers" / "layer_3.pt"
    assert p.acts_dir(2) == root / "acts" / "acts_layer2"
    assert p.acts_manifest(2) == root / "acts" / "acts_layer2" / "manifest.json"
    assert p.fused_weights == root / "fused" / "model.safetensors"
    assert p.fused_config == root / "fused" / "config.json"
    assert p.finetuned_dir == root / "fused" / "finetuned"
    assert p.e2e_weights == root / "e2e" / "model.safetensors"
    assert p.stage_ckpt_dir("layer_3") == root / "ckpt" / "layer_3"
    assert p.stage_last_ckpt("layer_3") == root / "ckpt" / "layer_3" / "last.ckpt"
    assert (p.tb_dir, p.tokens_dir, p.results_json, p.eval_json, p.hydra_dir) == (
        root / "tb",
        root / "tokens",
        root / "results.json",
        root / "eval.json",
        root / "hydra",
    )
    assert not root.exists()  # constructing paths creates nothing
    with pytest.raises(ConfigError):
        p.layer_ckpt(0)
    save_layer_checkpoint(p.layer_ckpt(2), _state(), META)
    save_layer_checkpoint(p.layer_ckpt(1), _state(), META)
    assert p.existing_layers() == [1, 2]


# ----------------------------------------------------------------------------- atomic writes
def test_atomic_write_leaves_no_temp_and_failure_keeps_old(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.json"
    atomic_write_json({"a": 1}, target)
    atomic_write_bytes(b"xyz", tmp_path / "b.bin")
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "t.pt")
    assert json.loads(target.read_text()) == {"a": 1}
    assert (tmp_path / "b.bin").read_bytes() == b"xyz"
    assert torch.load(tmp_path / "t.pt", weights_only=True)["w"].tolist() == [1.0, 1.0]

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom mid-write")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"w": torch.zeros(3), "x": Boom()}, tmp_path / "t.pt")
    with pytest.raises(TypeError):
        atomic_write_json({"a": object()}, target)
    assert json.loads(target.read_text()) == {"a": 1}
    assert torch.load(tmp_path / "t.pt", weights_only=True)["w"].tolist() == [1.0, 1.0]
    leftovers = [f.name for f in tmp_path.rglob("*") if f.is_file() and f.name.endswith(".tmp")]
    assert leftovers == []


def test_written_files_get_the_permissions_of_any_new_file(tmp_path: Path) -> None:
    """Artifacts are written under a temporary name and renamed: they keep the mode a new file gets
    under the user's umask (group-readable with 022), not a private temporary file's 0600."""
    old = os.umask(0o022)
    try:
        atomic_write_json({"a": 1}, tmp_path / "j.json")
        save_layer_checkpoint(tmp_path / "layer_1.pt", _state(), META)
        art.save_safetensors_model(tmp_path / "m", {"w": torch.ones(3)}, {"d": 1}, {"a": 1})
        os.umask(0o077)
        atomic_write_bytes(b"x", tmp_path / "private.bin")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert modes.pop("private.bin") == 0o600
    assert modes and set(modes.values()) == {0o644}, modes


# ------------------------------------------------------------------------- disk errors
@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """A real OS error from every writer, C++ and Rust ones too: past RLIMIT_FSIZE a write fails with
    EFBIG (Python ignores the SIGXFSZ that would otherwise kill the process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _save_model(path: Path, n: int) -> None:
    save_safetensors_model(path.parent, {"w": torch.ones(n)}, {"d": 1}, {"n": n})


# (name, writer(path, n floats), the file it writes at `path`)
WRITERS = [
    ("json", lambda p, n: atomic_write_json({"x": [1.0] * n}, p)),
    ("torch_save", lambda p, n: atomic_torch_save({"w": torch.ones(n)}, p)),
    ("layer_checkpoint", lambda p, n: save_layer_checkpoint(p, LayerWeights({"w": torch.ones(n)}, "", {}), {"k": 1})),
    ("npy_shard", lambda p, n: atomic_write_stream(p, lambda fh: np.save(fh, np.ones(n), allow_pickle=False))),
    ("safetensors", _save_model),
]


@pytest.mark.parametrize("name,write", WRITERS, ids=[w[0] for w in WRITERS])
def test_os_error_while_writing_is_one_line_naming_the_file(tmp_path: Path, name: str, write) -> None:
    path = tmp_path / "out" / ("model.safetensors" if name == "safetensors" else f"f.{name}")
    write(path, 10)
    before = path.read_bytes()
    with pytest.raises(ArtifactWriteError) as e, file_size_limit(32 * 1024):
        write(path, 100_000)
    msg = _assert_one_line_naming(e, path)
    assert "file too large" in msg and "(EFBIG)" in msg and e.value.errno == errno.EFBIG, msg
    assert path.read_bytes() == before  # the old file stays whole, no temporary is left
    assert [f.name for f in path.parent.iterdir() if f.name.endswith(".tmp")] == []
    write(path, 100_000)  # room again: the same write completes


class _FailingFile:
    """A file whose writes fail with `code` once `after` bytes went through (a disk filling up)."""

    def __init__(self, f, code: int, after: int):
        self._f, self._code, self._left = f, code, after

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n > self._left:
            raise OSError(self._code, os.strerror(self._code))
        self._left -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize(
    "code,words",
    [
        (errno.ENOSPC, ["no space left on device (ENOSPC)", "free space", "output_root=DIR"]),
        (errno.EDQUOT, ["disk quota exceeded (EDQUOT)", "quota"]),
        (errno.EROFS, ["read-only file system, not writable (EROFS)", "output_root=DIR"]),
        (errno.EACCES, ["permission denied, not writable (EACCES)", "writable"]),
        (errno.EPERM, ["not writable (EPERM)", "writable"]),
        (errno.EIO, ["Input/output error (EIO)", "check that disk"]),
    ],
)
def test_disk_error_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, words: list) -> None:
    real_open = open
    monkeypatch.setattr(
        atomic, "open", lambda f, mode="r", **k: _FailingFile(real_open(f, mode, **k), code, 100), raising=False
    )
    path = tmp_path / "acts" / "r0_s00003.hidden.npy"
    with pytest.raises(ArtifactWriteError) as e:
        atomic_write_stream(path, lambda fh: np.save(fh, np.ones(1000), allow_pickle=False))
    msg = _assert_one_line_naming(e, path)
    assert msg.startswith(f"cannot write {path}: ") and all(w in msg for w in words), msg
    assert list(path.parent.iterdir()) == []


def test_unwritable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
    else:  # root writes through any mode bits: refuse the way the OS does for everyone else

        def refuse(final: Path) -> Path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(final.parent / ".f.json.x.tmp"))

        monkeypatch.setattr(art.atomic, "_new_temporary", refuse)
    try:
        with pytest.raises(ArtifactWriteError) as e:
            atomic_write_json({"a": 1}, folder / "f.json")
    finally:
        folder.chmod(0o755)
    msg = _assert_one_line_naming(e, folder / "f.json")
    assert "permission denied, not writable (EACCES)" in msg, msg


def test_os_error_about_another_file_is_not_a_write_error(tmp_path: Path) -> None:
    """A writer that fails reading something else (its input) keeps its own error."""
    with pytest.raises(FileNotFoundError), art.atomic_path(tmp_path / "f.bin"):
        open(tmp_path / "elsewhere" / "input.txt")  # noqa: SIM115
    with pytest.raises(ValueError), art.atomic_path(tmp_path / "f.bin"):
        raise ValueError("not an OS error")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- layer checkpoints
def test_layer_checkpoint_roundtrip_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "layers" / "layer_2.pt"
    state = _state()
    sha = save_layer_checkpoint(path, state, META)
    assert sha == sha256_file(path)

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    got, meta = load_layer_checkpoint(path, expect={"k": 2, "config_hash": META["config_hash"]}, verify_sha256=sha)
    assert calls == [True]
    # one state dict per module, named as the module names them: nothing to strip
    assert got.sections().keys() == {"block", "head"} and got.embed is None
    for module, want in state.sections().items():
        have = got.sections()[module]
        assert have.keys() == want.keys()
        assert all(have[n].dtype == want[n].dtype and torch.equal(have[n], want[n]) for n in want)
    assert got.frozen_sha256 == state.frozen_sha256
    assert meta["dims"] == [8, 8] and meta["k"] == 2
    # a plain weights_only load (what a user does to inspect it) works too
    raw = real_load(path, weights_only=True)
    assert raw["meta"]["config_hash"] == META["config_hash"] and set(raw["modules"]) == {"block", "head"}


def test_layer_checkpoint_missing(tmp_path: Path) -> None:
    path = tmp_path / "layers" / "layer_5.pt"
    with pytest.raises(ArtifactError) as e:
        load_layer_checkpoint(path)
    assert "does not exist" in _assert_one_line_naming(e, path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip_head", "flip_data"])
def test_layer_checkpoint_corrupt(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "layer_1.pt"
    save_layer_checkpoint(path, _state(), META)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    elif damage == "flip_head":
        path.write_bytes(b"XXXX" + data[4:])
    else:  # one bit inside a tensor's bytes: the zip archive itself still reads
        raw = bytearray(data)
        at = raw.find(_state().block["attn.wq"].numpy().tobytes()[:16])
        assert at > 0
        raw[at + 3] ^= 0x10
        path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError) as e:
        load_layer_checkpoint(path)
    msg = _assert_one_line_naming(e, path)
    assert ("checksum" if damage == "flip_data" else "not a readable checkpoint") in msg


def test_layer_checkpoint_sha_detects_silent_change(tmp_path: Path) -> None:
    path = tmp_path / "layer_1.pt"
    sha = save_layer_checkpoint(path, _state(), META)
    save_layer_checkpoint(path, LayerWeights({"other": torch.zeros(1)}, "", {}), META)
    with pytest.raises(ArtifactError) as e:
        load_layer_checkpoint(path, verify_sha256=sha)
    assert "sha256" in _assert_one_line_naming(e, path)


def test_layer_checkpoint_config_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "layer_2.pt"
    save_layer_checkpoint(path, _state(), META)
    with pytest.raises(ArtifactError) as e:
        load_layer_checkpoint(path, expect={"config_hash": "3c4d" + "0" * 28})
    msg = _assert_one_line_naming(e, path)
    assert "was made by config 1a2b3c4d5e6f" in msg and "this run's config is 3c4d" in msg
    assert "overwrite=true" in msg
    with pytest.raises(ArtifactError, match="k=2 but this run expects k=3"):
        load_layer_checkpoint(path, expect={"k": 3})


def test_layer_checkpoint_foreign_structure(tmp_path: Path) -> None:
    path = tmp_path / "layer_1.pt"
    torch.save({"w": torch.ones(1)}, path)
    with pytest.raises(ArtifactError) as e:
        load_layer_checkpoint(path)
    assert "not a StackWise layer checkpoint" in _assert_one_line_naming(e, path)


# --------------------------------------------------------------------------------- safetensors
def test_safetensors_roundtrip_with_tied_weights(tmp_path: Path) -> None:
    emb = torch.randn(10, 4)
    sd = {
        "embed.weight": emb,
        "head.weight": emb,
        "norm.weight": torch.ones(4),
        "bf": torch.randn(3).to(torch.bfloat16),
    }
    out = tmp_path / "fused"
    cfg = {"d_model": 4, "n_layers": 2, "attention": ["gqa", "mla"]}
    sha = save_safetensors_model(out, sd, cfg, {"config_hash": "abc", "layers": [1, 2]})
    assert sha == sha256_file(out / "model.safetensors")
    state, config, meta = load_safetensors_model(out, expect={"config_hash": "abc"}, verify_sha256=sha)
    assert config == cfg and meta == {"config_hash": "abc", "layers": [1, 2]}
    for k in sd:
        assert torch.equal(state[k], sd[k]) and state[k].dtype == sd[k].dtype
    assert state["head.weight"].data_ptr() == state["embed.weight"].data_ptr()  # still tied

    save_safetensors_model(
        out, {"w": torch.zeros(2)}, cfg, {"config_hash": "abc", "finetune_steps": 5}, name="finetuned"
    )
    ft, _, ft_meta = load_safetensors_model(out, name="finetuned")
    assert ft_meta["finetune_steps"] == 5 and torch.equal(ft["w"], torch.zeros(2))

    with pytest.raises(ArtifactError) as e:
        load_safetensors_model(out, expect={"config_hash": "zzz"})
    _assert_one_line_naming(e, out / "model.safetensors")
    (out / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:40])
    with pytest.raises(ArtifactError) as e:
        load_safetensors_model(out)
    _assert_one_line_naming(e, out / "model.safetensors")
    (out / "config.json").unlink()
    with pytest.raises(ArtifactError) as e:
        load_safetensors_model(out)
    _assert_one_line_naming(e, out / "config.json")


def test_load_model_is_the_one_way_a_model_folder_becomes_a_model(tmp_path: Path) -> None:
    cfg = ModelConfig(vocab_size=20, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32, mask_id=18, pad_id=19)
    model = Transformer(cfg)
    save_safetensors_model(tmp_path / "fused", model.state_dict(), cfg.to_dict(), {"val_loss": 1.5})
    got, meta = load_model(tmp_path / "fused")
    assert got.cfg == cfg and meta == {"val_loss": 1.5}
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in got.state_dict().items())
    # weights that do not fit the recorded config: one line naming the folder
    save_safetensors_model(tmp_path / "bad", model.state_dict(), {**cfg.to_dict(), "d_ff": 48}, {})
    with pytest.raises(ArtifactError) as e:
        load_model(tmp_path / "bad")
    assert "do not fit" in _assert_one_line_naming(e, tmp_path / "bad")


def test_old_flat_layer_checkpoint_names_its_version(tmp_path: Path) -> None:
    path = tmp_path / "layer_1.pt"
    torch.save({"format": "stackwise.layer", "version": 1, "state": {"block.w": torch.ones(1)}, "meta": {}}, path)
    with pytest.raises(ArtifactError) as e:
        load_layer_checkpoint(path)
    assert "version 1" in _assert_one_line_naming(e, path)


# ------------------------------------------------------------------------------------ results
def test_results_one_record_per_stage(tmp_path: Path) -> None:
    paths = ExperimentPaths(tmp_path / "exp")
    assert read_results(paths) == []
    record_result(paths, {"stage": "embed", "val_loss": 3.5, "tokens": 1024, "seconds": 1.5})
    record_result(paths, {"stage": "layer_2", "val_loss": 3.1, "tokens": 2048, "seconds": 1.0})
    record_result(paths, {"stage": "embed", "val_loss": 3.4, "tokens": 1024, "seconds": 2.0})  # retrained
    on_disk = json.loads(paths.results_json.read_text())
    assert [(r["stage"], r["val_loss"]) for r in on_disk] == [("embed", 3.4), ("layer_2", 3.1)]
    # a file from before records were replaced: its last record per stage counts, in first-run order
    atomic_write_json(
        on_disk + [{"stage": "layer_2", "val_loss": 3.0}, {"stage": "fused", "val_loss": 3.0}], paths.results_json
    )
    assert [(r["stage"], r["val_loss"]) for r in read_results(paths)] == [
        ("embed", 3.4),
        ("layer_2", 3.0),
        ("fused", 3.0),
    ]
    paths.results_json.write_text("{not json")
    with pytest.raises(ArtifactError) as e:
        read_results(paths)
    _assert_one_line_naming(e, paths.results_json)
    assert not any(n.endswith(".tmp") for n in os.listdir(paths.root))
