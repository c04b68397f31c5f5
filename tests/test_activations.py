"""The activation cache: sharded writer under trainer.predict, manifest, memmapped reader, data module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from stackwise.data.cache import layout, reader
from stackwise.data.cache.datamodule import ActivationDataModule
from stackwise.data.cache.layout import check_free_space, discard_incomplete, estimate_cache_bytes, write_manifest
from stackwise.data.cache.reader import ActivationCache, ActivationDataset
from stackwise.data.cache.writer import CacheWriter
from stackwise.data.sampling import StepSampler
from stackwise.errors import ArtifactError, StackWiseError

T, D, V = 6, 4, 300
META = {"k": 1, "config_hash": "c0ffee" * 6, "producer_sha256": "ab" * 32, "views": 2}


class RowSource(Dataset):
    """Deterministic rows shaped like a stage's predict output, one per index."""

    def __init__(self, n: int, split: str, vocab: int = V):
        self.n, self.split, self.vocab = n, split, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i * 7 + (0 if self.split == "train" else 1000))
        return {
            "hidden": torch.randn(T, D, generator=g),
            "targets": torch.randint(0, self.vocab, (T,), generator=g),
            "mask": torch.rand(T, generator=g) < 0.5,
            "t": torch.rand((), generator=g),
            "index": torch.tensor(i // 2),
            "view": torch.tensor(i % 2),
        }


class Passthrough(L.LightningModule):
    """predict_step returns the batch, optionally shifted: stands in for 'apply layer k'."""

    def __init__(self, shift: float = 0.0):
        super().__init__()
        self.shift = shift
        self.w = nn.Parameter(torch.zeros(1))

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return {**batch, "hidden": batch["hidden"].float() + self.shift}


def _trainer(*callbacks) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )


def _build(
    acts_dir: Path, dtype: str = "float32", n_train: int = 23, n_val: int = 9, shard_size: int = 5, vocab: int = V
) -> CacheWriter:
    writer = CacheWriter(acts_dir, shard_size=shard_size, vocab_size=vocab, dtype=dtype)
    loaders = [
        DataLoader(RowSource(n_train, "train", vocab), batch_size=4),
        DataLoader(RowSource(n_val, "val", vocab), batch_size=4),
    ]
    _trainer(writer).predict(Passthrough(), dataloaders=loaders, return_predictions=False)
    write_manifest(acts_dir, writer.records(), META)
    return writer


def _expected_hidden(h: torch.Tensor, dtype: str) -> torch.Tensor:
    return h.to(getattr(torch, dtype))


def _bits(h: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor: equality here is bit-identity (NaN and -0.0 included)."""
    return h.view(torch.int16 if h.element_size() == 2 else torch.int32)


@pytest.fixture(scope="module")
def f32_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("f32") / "acts_layer1"
    _build(d)
    return d


# ----------------------------------------------------------------------------- writer + reader
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_predict_writes_shards_and_rows_read_back_bit_identical(
    tmp_path: Path, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    acts = tmp_path / "acts_layer1"
    _build(acts, dtype)
    m = json.loads((acts / "manifest.json").read_text())
    assert m["hidden_dtype"] == dtype and (m["seq_len"], m["d_model"]) == (T, D)
    assert m["fields"]["hidden"]["storage"] == ("uint16" if dtype == "bfloat16" else dtype)
    assert m["fields"]["targets"]["storage"] == "uint16"
    assert [s["rows"] for s in m["splits"]["train"]["shards"]] == [5, 5, 5, 5, 3]
    assert [s["rows"] for s in m["splits"]["val"]["shards"]] == [5, 4]
    assert (m["splits"]["train"]["rows"], m["splits"]["val"]["rows"]) == (23, 9)
    assert m["splits"]["train"]["shards"][1]["files"]["hidden"]["path"] == "train/r0_s00001.hidden.npy"
    assert m["producer_sha256"] == META["producer_sha256"] and m["k"] == 1 and m["views"] == 2
    assert not [p for p in acts.rglob("*") if p.name.endswith(".tmp")]

    loads: list[str | None] = []
    real_load = np.load
    monkeypatch.setattr(reader.np, "load", lambda *a, **kw: loads.append(kw.get("mmap_mode")) or real_load(*a, **kw))
    cache = ActivationCache.open(
        acts, expect={"config_hash": META["config_hash"], "d_model": D, "seq_len": T}, verify=True
    )
    for split, n in (("train", 23), ("val", 9)):
        ds, src = ActivationDataset(cache, split), RowSource(n, split)
        assert len(ds) == n
        for i in range(n):
            got, want = ds[i], src[i]
            assert got["hidden"].dtype == getattr(torch, dtype) and got["hidden"].shape == (T, D)
            assert torch.equal(_bits(got["hidden"]), _bits(_expected_hidden(want["hidden"], dtype)))
            assert torch.equal(got["targets"], want["targets"]) and got["targets"].dtype == torch.int64
            assert torch.equal(got["mask"], want["mask"])
            assert torch.equal(got["t"], want["t"].float())
            assert int(got["index"]) == int(want["index"]) and int(got["view"]) == int(want["view"])
    assert loads and all(mode == "r" for mode in loads)  # every shard is memory-mapped, never read whole


def test_targets_use_int32_beyond_uint16(tmp_path: Path) -> None:
    acts = tmp_path / "acts"
    _build(acts, n_train=6, n_val=3, vocab=70_000)
    cache = ActivationCache.open(acts)
    assert cache.manifest["fields"]["targets"]["storage"] == "int32"
    assert torch.equal(ActivationDataset(cache, "train")[5]["targets"], RowSource(6, "train", 70_000)[5]["targets"])


def test_view_filter(f32_cache: Path) -> None:
    cache = ActivationCache.open(f32_cache)
    ds = ActivationDataset(cache, "train", views=[1])
    assert len(ds) == 11  # odd rows of 23
    assert [int(ds[i]["view"]) for i in range(len(ds))] == [1] * 11
    assert torch.equal(ds[3]["hidden"], RowSource(23, "train")[7]["hidden"])


def test_incremental_caching_through_predict_dataloader(f32_cache: Path, tmp_path: Path) -> None:
    """act_{k+1} is made from act_k's predict loaders: every row, both splits, in order."""
    dm = ActivationDataModule(ActivationCache.open(f32_cache), batch_size=4, seed=0, train_views=[0])
    nxt = tmp_path / "acts_layer2"
    writer = CacheWriter(nxt, shard_size=7, vocab_size=V)
    _trainer(writer).predict(Passthrough(shift=1.0), datamodule=dm, return_predictions=False)
    write_manifest(nxt, writer.records(), {**META, "k": 2})
    c1, c2 = ActivationCache.open(f32_cache), ActivationCache.open(nxt, expect={"k": 2})
    for split in ("train", "val"):
        a, b = ActivationDataset(c1, split), ActivationDataset(c2, split)
        assert len(a) == len(b)
        for i in range(len(a)):
            assert torch.equal(b[i]["hidden"], a[i]["hidden"] + 1.0) and torch.equal(b[i]["index"], a[i]["index"])


# --------------------------------------------------------------------------------- data module
def _stream(dm: ActivationDataModule) -> list[list[tuple[int, int]]]:
    """Batches of the train loader as (index, view) pairs, which identify a row."""
    return [list(zip(b["index"].tolist(), b["view"].tolist(), strict=True)) for b in dm.train_dataloader()]


def test_train_loader_shuffles_across_shards_covers_all_and_resumes(f32_cache: Path) -> None:
    cache = ActivationCache.open(f32_cache)
    bs, steps = 4, 12
    dm = ActivationDataModule(cache, batch_size=bs, seed=3, max_steps=steps)
    full = _stream(dm)
    assert len(full) == steps and all(len(b) == bs for b in full)
    flat = [r for b in full for r in b]
    all_rows = {(i // 2, i % 2) for i in range(23)}
    assert set(flat[:23]) == all_rows  # the first pass is a permutation of every row
    assert flat[:23] != sorted(flat[:23])  # shuffled, across shard boundaries
    order = StepSampler(23, bs, seed=3, total_steps=steps)
    assert flat == [((i // 2), i % 2) for i in order]

    resumed = ActivationDataModule(cache, batch_size=bs, seed=3, max_steps=steps)
    resumed.trainer = SimpleNamespace(
        global_step=5, accumulate_grad_batches=1, global_rank=0, world_size=1, max_steps=steps
    )  # what a mid-stage resume sees
    assert _stream(resumed) == full[5:]

    # two ranks split every global batch: together they see the one-process stream of batch 2*bs
    halves = []
    for rank in (0, 1):
        d = ActivationDataModule(cache, batch_size=2 * bs, seed=3, max_steps=steps)  # the global batch
        d.trainer = SimpleNamespace(
            global_step=0, accumulate_grad_batches=1, global_rank=rank, world_size=2, max_steps=steps
        )
        halves.append(_stream(d))
    single = ActivationDataModule(cache, batch_size=2 * bs, seed=3, max_steps=steps)
    assert [a + b for a, b in zip(*halves, strict=True)] == _stream(single)


class TinyTrain(L.LightningModule):
    """Records the rows of each training batch; one parameter so there is an optimizer step."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(D))
        self.seen: list[list[int]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append((batch["index"] * 2 + batch["view"]).tolist())
        return (batch["hidden"].float() * self.w).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_resume_mid_stage_continues_the_stream(f32_cache: Path, tmp_path: Path) -> None:
    cache = ActivationCache.open(f32_cache)

    def fit(max_steps: int, ckpt_dir: str, ckpt: str | None = None) -> TinyTrain:
        m = TinyTrain()
        cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / ckpt_dir, save_last=True, every_n_train_steps=1)
        tr = L.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            max_steps=max_steps,
            limit_val_batches=0,
            callbacks=[cb],
        )
        tr.fit(m, datamodule=ActivationDataModule(cache, batch_size=4, seed=1, max_steps=7), ckpt_path=ckpt)
        return m

    whole = fit(7, "a").seen
    assert len(whole) == 7
    fit(3, "b")  # interrupted after 3 optimizer steps
    tail = fit(7, "c", ckpt=str(tmp_path / "b" / "last.ckpt")).seen
    assert tail == whole[3:]  # no batch repeated or skipped across the resume


# -------------------------------------------------------------------------- failures detected
def test_truncated_shard_detected(f32_cache: Path, tmp_path: Path) -> None:
    acts = tmp_path / "copy"
    shutil.copytree(f32_cache, acts)
    shard = acts / "train" / "r0_s00002.hidden.npy"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ArtifactError) as e:
        ActivationCache.open(acts)
    assert str(shard) in str(e.value) and "\n" not in str(e.value)


def test_flipped_byte_detected_only_with_verify(f32_cache: Path, tmp_path: Path) -> None:
    acts = tmp_path / "copy"
    shutil.copytree(f32_cache, acts)
    shard = acts / "val" / "r0_s00001.targets.npy"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0x01
    shard.write_bytes(bytes(raw))
    ActivationCache.open(acts)  # same size: only the hash can tell
    with pytest.raises(ArtifactError, match="sha256") as e:
        ActivationCache.open(acts, verify=True)
    assert str(shard) in str(e.value)


def test_missing_manifest_and_discard_incomplete(f32_cache: Path, tmp_path: Path) -> None:
    acts = tmp_path / "copy"
    shutil.copytree(f32_cache, acts)
    (acts / "manifest.json").unlink()  # what an interrupted stage leaves
    with pytest.raises(ArtifactError) as e:
        ActivationCache.open(acts)
    msg = str(e.value)
    assert "has no manifest.json: the cache is incomplete" in msg and str(acts) in msg
    assert discard_incomplete(f32_cache) is False and f32_cache.exists()  # a complete cache is kept
    assert discard_incomplete(acts) is True and not acts.exists()


def test_manifest_expect_mismatch(f32_cache: Path) -> None:
    with pytest.raises(ArtifactError) as e:
        ActivationCache.open(f32_cache, expect={"producer_sha256": "cd" * 32})
    msg = str(e.value)
    assert str(f32_cache / "manifest.json") in msg and "producer_sha256" in msg and "\n" not in msg
    with pytest.raises(ArtifactError, match="was made by config"):
        ActivationCache.open(f32_cache, expect={"config_hash": "0" * 32})
    with pytest.raises(ArtifactError, match="d_model=4 but this run expects d_model=8"):
        ActivationCache.open(f32_cache, expect={"d_model": 8})


def test_writer_refuses_complete_cache_and_clears_leftovers(f32_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="already holds a complete activation cache"):
        _build(f32_cache)
    acts = tmp_path / "acts"
    (acts / "train").mkdir(parents=True)
    stale = acts / "train" / "r0_s00099.hidden.npy"
    stale.write_bytes(b"left by a crashed run")
    _build(acts, n_train=4, n_val=2)
    assert not stale.exists()
    assert ActivationCache.open(acts, verify=True).rows("train") == 4


# ------------------------------------------------------------------------------------ disk space
def test_estimate_and_check_free_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    per_row = T * D * 2 + T * 2 + T + 4 + 8 + 2
    assert estimate_cache_bytes(10, T, D, "bfloat16", vocab_size=V) == 10 * per_row
    assert estimate_cache_bytes(10, T, D, "float32", vocab_size=V) == 10 * (per_row + T * D * 2)
    with pytest.raises(StackWiseError):
        estimate_cache_bytes(1, T, D, "int8")

    monkeypatch.setattr(
        layout.shutil, "disk_usage", lambda p: SimpleNamespace(total=8 << 30, used=7 << 30, free=1 << 30)
    )
    target = tmp_path / "not" / "yet" / "acts_layer1"
    check_free_space(target, 1 << 29)
    with pytest.raises(StackWiseError) as e:
        check_free_space(target, 3 << 30)
    assert str(e.value).startswith(
        f"not enough disk space for the activation cache at {target}: needs 3.00 GiB, 1.00 GiB free"
    )
