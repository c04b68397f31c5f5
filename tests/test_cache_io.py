"""The activation cache's I/O (stackwise/data/cache/): the threaded writer stores exactly the bytes
`np.save` of the rows gives (what the single-threaded writer before it stored), the fp8 codec's
error bound, batched reads, block shuffle, loader workers, and errors raised in the writer threads."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from stackwise.data.cache import sink as sink_mod
from stackwise.data.cache.datamodule import ActivationDataModule, DeviceLoader, one_ahead
from stackwise.data.cache.layout import FP8, decode_fp8, encode_hidden, npy_header, padded_npy_header, round_trip
from stackwise.data.cache.reader import ActivationCache, ActivationDataset, decode_batch, ready_batch
from stackwise.data.cache.sink import MAX_IN_FLIGHT, ShardSink
from stackwise.data.cache.writer import CacheWriter
from stackwise.data.sampling import RankStepSampler, StepSampler
from stackwise.errors import ArtifactWriteError, StackWiseError
from stackwise.utils import generator
from tests.test_activations import META, Passthrough, RowSource, V, _build, _trainer

STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, FP8: np.uint8}


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _expected_rows(n: int, split: str, dtype: str, vocab: int = V) -> dict[str, np.ndarray]:
    """The rows of RowSource in their storage dtypes, computed directly (no writer involved)."""
    rows = [RowSource(n, split, vocab)[i] for i in range(n)]
    enc = encode_hidden(torch.stack([r["hidden"] for r in rows]), dtype)
    out = {"hidden": enc["hidden"].numpy().view(STORAGE[dtype])}
    if dtype == FP8:
        out["scale"] = enc["scale"].numpy()
    out["targets"] = torch.stack([r["targets"] for r in rows]).numpy().astype(np.uint16 if vocab <= 65536 else np.int32)
    out["mask"] = torch.stack([r["mask"] for r in rows]).numpy()
    out["t"] = torch.stack([r["t"] for r in rows]).numpy().astype(np.float32)
    out["index"] = torch.stack([r["index"] for r in rows]).numpy().astype(np.int64)
    out["view"] = torch.stack([r["view"] for r in rows]).numpy().astype(np.int16)
    return out


# ------------------------------------------------------------------------ the writer's bytes
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", FP8])
def test_writer_stores_np_save_of_the_rows_byte_for_byte(tmp_path: Path, dtype: str) -> None:
    """Every shard file is `np.save` of its rows in the storage dtype (what the writer before the
    threaded one wrote: same header, same bytes, same sha256), for every field and both splits."""
    acts = tmp_path / "acts"
    _build(acts, dtype, n_train=23, n_val=9, shard_size=5)  # batches of 4 straddle the shards of 5
    m = json.loads((acts / "manifest.json").read_text())
    fields = ["hidden", "targets", "mask", "t", "index", "view"] + (["scale"] if dtype == FP8 else [])
    assert list(m["fields"]) == fields and m["hidden_dtype"] == dtype
    for split, n in (("train", 23), ("val", 9)):
        want = _expected_rows(n, split, dtype)
        shards = m["splits"][split]["shards"]
        assert [s["rows"] for s in shards] == [5] * (n // 5) + [n % 5]
        lo = 0
        for s in shards:
            for f in fields:
                info, path = s["files"][f], acts / s["files"][f]["path"]
                expected = _npy(np.ascontiguousarray(want[f][lo : lo + s["rows"]]))
                raw = path.read_bytes()
                assert raw == expected, (split, s["stem"], f)
                assert info["sha256"] == hashlib.sha256(raw).hexdigest() and info["bytes"] == len(raw)
            lo += s["rows"]
    assert not list(acts.rglob("*.tmp"))
    # fp8: the hidden states take a quarter of fp32's bytes, half of bf16's
    if dtype == FP8:
        assert (acts / "train/r0_s00000.hidden.npy").stat().st_size - len(npy_header("uint8", (5, 6, 4))) == 5 * 6 * 4


def test_sink_shrinks_a_shard_when_fewer_rows_come_than_announced(tmp_path: Path) -> None:
    """A split announced with more rows than it gets (or an unknown count): its last shard is
    shrunk in place at finish and hashed from its file; the bytes are still np.save's."""
    rows = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    for announced in ({"train": 100}, {}):
        out = tmp_path / f"a{len(announced)}"
        (out / "train").mkdir(parents=True)
        sink = ShardSink(out, storage={"hidden": "float32"}, shard_size=4, rank=0, convert=dict, rows=announced)
        for lo in (0, 3, 5):
            sink.put("train", {"hidden": rows[lo : {0: 3, 3: 5, 5: 7}[lo]]})
        recs = sink.finish()
        assert [r["rows"] for r in recs] == [4, 3]
        for r, part in zip(recs, (rows[:4], rows[4:]), strict=True):
            raw = (out / r["files"]["hidden"]["path"]).read_bytes()
            assert raw == _npy(part) and r["files"]["hidden"]["sha256"] == hashlib.sha256(raw).hexdigest()


def test_several_hash_threads_give_the_same_files_and_records(tmp_path: Path, monkeypatch) -> None:
    """Shards hashed by several threads at once give the bytes and records of one thread; the
    hashing really is spread over the threads."""
    hashed_by: set[str] = set()
    real = sink_mod.sha256_file

    def recording(path, *args):
        hashed_by.add(threading.current_thread().name)
        time.sleep(0.002)  # a slow hash: while one thread holds a shard, the others take the next ones
        return real(path, *args)

    monkeypatch.setattr(sink_mod, "sha256_file", recording)
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((45, 6, 4)).astype(np.float32)
    index = np.arange(45, dtype=np.int64)
    out = {}
    for threads in (1, 3):
        acts = tmp_path / f"t{threads}"
        sink = ShardSink(
            acts,
            storage={"hidden": "float32", "index": "int64"},
            shard_size=3,  # a batch of 8 rows completes two or three shards: they hash at once
            rank=0,
            convert=dict,
            rows={"train": 45},
            hash_threads=threads,
        )
        for lo in range(0, 45, 8):
            sink.put("train", {"hidden": hidden[lo : lo + 8], "index": index[lo : lo + 8]})
        records = sink.finish()
        files = {p.relative_to(acts): p.read_bytes() for p in sorted(acts.rglob("*.npy"))}
        out[threads] = (records, files)
        for r in records:
            for info in r["files"].values():
                assert info["sha256"] == hashlib.sha256((acts / info["path"]).read_bytes()).hexdigest()
    assert out[1] == out[3] and len(out[1][0]) == 15
    assert {t for t in hashed_by if t.startswith("stackwise-cache-hash")} >= {
        "stackwise-cache-hash0",
        "stackwise-cache-hash1",
    }


def test_no_batch_waits_for_a_hash(tmp_path: Path, monkeypatch) -> None:
    """The caller's batches go back to it once written, whatever the hashers are doing: with every
    hash held up, many more batches than MAX_IN_FLIGHT are put (a cache whose batches fill one shard
    after the other was once held to one core's sha256 rate); the records come once they are hashed."""
    gate = threading.Event()
    real_sha256 = hashlib.sha256

    class Held:  # every sha256 anywhere takes no byte before the gate opens
        def __init__(self, data: bytes = b""):
            self.h = real_sha256(data)

        def update(self, data) -> None:
            gate.wait(timeout=30)
            self.h.update(data)

        def hexdigest(self) -> str:
            return self.h.hexdigest()

    monkeypatch.setattr(hashlib, "sha256", Held)
    released = []
    sink = ShardSink(
        tmp_path / "acts",
        storage={"hidden": "float32"},
        shard_size=2,  # each batch of 2 rows completes a shard
        rank=0,
        convert=dict,
        rows={"train": 20},
        hash_threads=2,
    )
    rows = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
    done = threading.Event()

    def put_all() -> None:
        for lo in range(0, 20, 2):
            sink.put("train", {"hidden": rows[lo : lo + 2]}, release=lambda lo=lo: released.append(lo))
        done.set()

    putter = threading.Thread(target=put_all, daemon=True)
    putter.start()
    assert done.wait(timeout=10), f"put blocked with every hash held up ({len(released)} batches back)"
    assert MAX_IN_FLIGHT < 10
    gate.set()
    records = sink.finish()
    assert sorted(released) == list(range(0, 20, 2)) and [r["rows"] for r in records] == [2] * 10
    for r in records:
        raw = (tmp_path / "acts" / r["files"]["hidden"]["path"]).read_bytes()
        assert r["files"]["hidden"]["sha256"] == real_sha256(raw).hexdigest()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", FP8])
def test_round_trip_is_what_a_reader_gets_back(tmp_path: Path, dtype: str) -> None:
    """`round_trip` (what cache.store=recompute rounds each layer's output with) equals writing the
    hidden states to a cache and reading them back, bit for bit, in the dtype the reader returns."""
    acts = tmp_path / "acts"
    _build(acts, dtype, n_train=7, n_val=3, shard_size=5)
    got = ActivationDataset(ActivationCache.open(acts), "train").__getitems__(list(range(7)))["hidden"]
    want = round_trip(torch.stack([RowSource(7, "train")[i]["hidden"] for i in range(7)]), dtype)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_padded_header_reads_back() -> None:
    hdr = padded_npy_header("uint16", (3, 2048, 4096), len(npy_header("uint16", (1024, 2048, 4096))) + 64)
    assert len(hdr) % 64 == 0
    buf = io.BytesIO(hdr + np.zeros((3, 2048, 4096), np.uint16).tobytes())
    assert np.load(buf).shape == (3, 2048, 4096)


# ------------------------------------------------------------------------ errors in the threads
def _fail_in_threads(monkeypatch: pytest.MonkeyPatch, after: int, err: int = errno.ENOSPC) -> list:
    """Make the io thread's data writes fail (with `err`) from the `after`-th one on."""
    real, calls = sink_mod.write_at, []

    def write_at(fd, data, offset):
        if threading.current_thread() is not threading.main_thread():
            calls.append(offset)
            if len(calls) > after:
                raise OSError(err, os.strerror(err))
        return real(fd, data, offset)

    monkeypatch.setattr(sink_mod, "write_at", write_at)
    return calls


def _no_cache_threads() -> bool:
    return not [t for t in threading.enumerate() if t.name.startswith("stackwise-cache")]


def test_an_error_in_the_writer_thread_reaches_the_caller_as_one_line(tmp_path, monkeypatch) -> None:
    calls = _fail_in_threads(monkeypatch, after=15)
    acts = tmp_path / "acts_layer1"
    with pytest.raises(ArtifactWriteError) as e:
        _build(acts, "bfloat16", n_train=40, n_val=9, shard_size=5)
    msg = str(e.value)
    assert len(calls) > 15 and "\n" not in msg
    assert msg.startswith(f"cannot write {acts / 'train'}/r0_s0") and "no space left on device (ENOSPC)" in msg
    assert not list(acts.rglob("*.npy")) and not list(acts.glob("records_r*.json")), "a cache that cannot complete"
    assert _no_cache_threads()


def test_a_bad_batch_found_by_the_writer_thread_is_raised(tmp_path: Path) -> None:
    """The token-id check runs on the io thread (reading values would wait for the GPU here)."""
    acts = tmp_path / "acts"
    writer = CacheWriter(acts, shard_size=5, vocab_size=10)  # the rows hold ids up to 300
    with pytest.raises(ValueError, match=r"'targets' outside \[0, 10\)"):
        _trainer(writer).predict(
            Passthrough(), dataloaders=[DataLoader(RowSource(6, "train"), batch_size=4)], return_predictions=False
        )
    assert not list(acts.rglob("*.npy")) and _no_cache_threads()


class Exploding(Passthrough):
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        if batch_idx == 3:
            raise RuntimeError("a bug in the model")
        return super().predict_step(batch, batch_idx, dataloader_idx)


def test_an_error_elsewhere_stops_the_threads_and_removes_the_shards(tmp_path: Path) -> None:
    acts = tmp_path / "acts"
    writer = CacheWriter(acts, shard_size=5, vocab_size=V)
    with pytest.raises(RuntimeError, match="a bug in the model"):
        _trainer(writer).predict(
            Exploding(), dataloaders=[DataLoader(RowSource(23, "train"), batch_size=4)], return_predictions=False
        )
    assert not list(acts.rglob("*.npy")) and _no_cache_threads()


# ------------------------------------------------------------------------------------ fp8
def test_fp8_round_trip_error_bound() -> None:
    """e4m3 keeps 3 mantissa bits, so rounding to nearest errs by at most half a step: 2^-4 of the
    value where the scaled value is normal (|x/s| >= 2^-6), and half the subnormal step 2^-9, i.e.
    2^-10 (times the scale s), below that. With s = amax/448 per token vector, for every element:

        |decode(encode(x)) - x| <= 2^-4 |x| + 2^-10 s          (fp32 out, + a few fp32 roundings)

    and one more rounding to bfloat16 (2^-9 relative) when decoded to bfloat16. The bound is tight:
    a truncating encoder (errors up to 2^-3) fails it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 96, generator=g) * torch.logspace(-6, 4, 64).reshape(1, 64, 1)
    x[0, 0] = 0.0  # an all-zero token vector
    x[1, :, 5] *= 1e4  # an outlier per vector: the rest lands in e4m3's subnormals
    x[2, 3, :10] = torch.tensor([448.0, -448.0, 1e-30, -1e-30, 3.0, 2.0**-9, 0.0, -0.0, 1e30, -1e30])
    enc = encode_hidden(x, FP8)
    assert enc["hidden"].dtype == torch.uint8 and enc["scale"].shape == (4, 64) and enc["scale"].dtype == torch.float32
    s = enc["scale"].unsqueeze(-1)
    assert torch.all(enc["scale"][0, 0] == 1.0)
    for dtype, rel in ((torch.float32, 2.0**-4 + 2.0**-20), (torch.bfloat16, (2.0**-4) * (1 + 2.0**-8) + 2.0**-9)):
        y = decode_fp8(enc["hidden"], enc["scale"], dtype=dtype)
        assert y.dtype == dtype and y.shape == x.shape
        err = (y.double() - x.double()).abs()
        bound = rel * x.double().abs() + (2.0**-10) * (1 + 2.0**-8) * s.double()
        assert torch.all(err <= bound), float((err / bound).max())
        assert float((err / bound).max()) > 0.9  # the bound is reached: rounding, not truncation
    assert torch.equal(decode_fp8(enc["hidden"], enc["scale"])[0, 0], torch.zeros(96, dtype=torch.bfloat16))
    amax = x.abs().amax(-1)
    y = decode_fp8(enc["hidden"], enc["scale"], dtype=torch.float32)
    assert torch.allclose(y.abs().amax(-1), amax, rtol=2.0**-20)  # the largest element of each vector is exact


def test_fp8_cache_reads_back_as_decoded_bf16(tmp_path: Path) -> None:
    acts = tmp_path / "acts"
    _build(acts, FP8, n_train=11, n_val=3)
    cache = ActivationCache.open(acts, verify=True)
    assert cache.hidden_dtype == FP8 and "scale" in cache.fields
    ds = ActivationDataset(cache, "train")
    want = _expected_rows(11, "train", FP8)
    batch = ds.__getitems__(list(range(11)))
    assert set(batch) == {"hidden", "targets", "mask", "t", "index", "view"}
    assert batch["hidden"].dtype == torch.bfloat16
    decoded = decode_fp8(torch.from_numpy(want["hidden"]), torch.from_numpy(want["scale"]))
    assert torch.equal(batch["hidden"].view(torch.int16), decoded.view(torch.int16))
    x = torch.stack([RowSource(11, "train")[i]["hidden"] for i in range(11)])
    assert float((batch["hidden"].float() - x).abs().max()) <= 2.0**-3 * float(x.abs().max())


@pytest.mark.parametrize("workers", [0, 2])
def test_a_gpu_loader_copies_fp8_bits_and_decodes_them_after_the_copy(tmp_path: Path, workers: int) -> None:
    """A loader that puts batches on the GPU reads the undecoded rows (uint8 bits and scales: half of
    bf16's bytes to copy, no CPU pass over them) and decodes each batch after its copy (`on_device`)
    to the very bits a host-decoding loader gives. Built here without CUDA: the rows it hands to the
    copy are those of the plain DataLoader underneath."""
    acts = tmp_path / "acts"
    _build(acts, FP8, n_train=11, n_val=5, shard_size=4)
    dm = ActivationDataModule(ActivationCache.open(acts), batch_size=3, seed=1, max_steps=4, num_workers=workers)
    host = dm._loader(dm.train_set, 3)
    gpu = dm._loader(dm.train_set, 3, to_device=torch.device("cuda"))
    assert gpu.on_device is decode_batch and host.on_device is None
    raw = _batches(DataLoader.__iter__(gpu))  # what the loader copies to the GPU
    assert raw and all(b["hidden"].dtype == torch.uint8 and b["scale"].dtype == torch.float32 for b in raw)
    decoded = [decode_batch(b) for b in raw]
    assert _same(decoded, _batches(host)) and decoded[0]["hidden"].dtype == torch.bfloat16
    assert dm.train_set.decode  # the stage's own dataset still decodes (validation reads it)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp8_batches_are_decoded_on_the_gpu_to_the_host_bits(tmp_path: Path) -> None:
    acts = tmp_path / "acts"
    _build(acts, FP8, n_train=11, n_val=5, shard_size=4)
    dm = ActivationDataModule(ActivationCache.open(acts), batch_size=3, seed=1, max_steps=4, pin_memory=True)
    on_gpu = _batches(dm._loader(dm.train_set, 3, to_device=torch.device("cuda")))
    host = _batches(dm._loader(dm.train_set, 3))
    assert all(b["hidden"].is_cuda for b in on_gpu)
    assert _same([{k: v.cpu() for k, v in b.items()} for b in on_gpu], host)


# ------------------------------------------------------------------------------- batched reads
def test_batched_reads_equal_row_reads_and_use_few_slices(tmp_path: Path) -> None:
    acts = tmp_path / "acts"
    _build(acts, "bfloat16", n_train=23, n_val=9, shard_size=5)
    cache = ActivationCache.open(acts)
    for views in (None, [1]):
        ds = ActivationDataset(cache, "train", views)
        n = len(ds)
        src = [RowSource(23, "train")[i] for i in range(23)]
        rows = [src[int(g)] for g in ds.rows_of(list(range(n)))]
        for items in ([0], list(range(n)), [3, 4, 5, 9, 8, 2, 2, -1], list(range(n - 1, -1, -1))):
            batch = ds.__getitems__(items)
            for f in ("targets", "mask", "t", "index", "view"):
                want = torch.stack([rows[i][f] for i in items]).to(batch[f].dtype)
                assert torch.equal(batch[f], want), (views, items, f)
            want = torch.stack([rows[i]["hidden"] for i in items]).to(torch.bfloat16)
            assert torch.equal(batch["hidden"].view(torch.int16), want.view(torch.int16))
    ds = ActivationDataset(cache, "train")
    assert ds.runs(np.arange(3, 12)) == [(0, 3, 0, 2), (1, 0, 2, 5), (2, 0, 7, 2)]  # one slice per shard
    assert len(ds.runs(np.array([7, 8, 9, 2, 3]))) == 2
    with pytest.raises(IndexError, match="row 23 out of range for 23 rows of train"):
        ds.__getitems__([0, 23])


# ------------------------------------------------------------------------------- block shuffle
@pytest.mark.parametrize("block", [1, 4, 7, 30])
def test_block_shuffle_is_a_permutation_of_blocks_every_epoch(block: int) -> None:
    n, bs = 23, 4
    s = StepSampler(n, bs, seed=5, total_steps=3 * n, block=block)
    stream = list(s)
    for e in range(3):
        epoch = stream[e * n : (e + 1) * n]
        assert sorted(epoch) == list(range(n)), e  # every row once per epoch
        assert epoch == s.epoch(e)
        at, blocks = 0, []
        while at < n:  # the epoch is whole blocks, each in order: [b*block, (b+1)*block) (the last one short)
            first = epoch[at]
            assert first % block == 0, (e, at)
            size = min(block, n - first)
            assert epoch[at : at + size] == list(range(first, first + size)), (e, at)
            blocks.append(first // block)
            at += size
        assert sorted(blocks) == list(range(-(-n // block)))
    if block == 1:  # the plain shuffle of before, row for row: the CPU default's order is unchanged
        assert stream[:n] == torch.randperm(n, generator=generator(5, "order", 0)).tolist()
    elif block < n:
        assert s.epoch(0) != s.epoch(1)
    # a resumed stream continues where it stopped, with blocks too
    assert list(StepSampler(n, bs, seed=5, start_step=7, total_steps=3 * n, block=block)) == stream[7 * bs :]
    halves = [list(RankStepSampler(range(n), 2, 5, 0, 10, rank=r, world_size=2, block=block)) for r in (0, 1)]
    whole = list(StepSampler(n, 4, 5, 0, 10, block=block))
    assert [x for i in range(10) for h in halves for x in h[2 * i : 2 * i + 2]] == whole


# ------------------------------------------------------------------------------- loader workers
def _batches(loader) -> list[dict[str, torch.Tensor]]:
    return [dict(b) for b in loader]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


def test_loaders_give_the_same_batches_with_and_without_workers(tmp_path: Path) -> None:
    acts = tmp_path / "acts"
    _build(acts, "float16", n_train=23, n_val=9, shard_size=5)
    cache = ActivationCache.open(acts)
    out = {}
    for workers in (0, 2):
        dm = ActivationDataModule(cache, batch_size=4, seed=2, max_steps=9, num_workers=workers, shuffle_block=3)
        loaders = [dm.train_dataloader(), dm.val_dataloader(), *dm.predict_dataloader()]
        assert all(dl.collate_fn is ready_batch for dl in loaders)
        assert all(dl.persistent_workers == (workers > 0) for dl in loaders)
        out[workers] = [_batches(dl) for dl in loaders]
    assert len(out[0][0]) == 9 and out[0][0][0]["hidden"].shape == (4, 6, 4)
    assert all(_same(a, b) for a, b in zip(out[0], out[2], strict=True))


class _Rows(Dataset):
    def __len__(self) -> int:
        return 23

    def __getitem__(self, i: int) -> dict:
        return RowSource(23, "train")[i]


def test_the_caching_pass_reads_batches_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """act_{k+1}'s caching pass reads act_k a batch at a time (one __getitems__ per batch)."""
    acts = tmp_path / "acts"
    _build(acts, n_train=23, n_val=9)
    dm = ActivationDataModule(ActivationCache.open(acts), batch_size=4, seed=0, predict_batch_size=8)
    calls = []
    real = ActivationDataset.__getitems__
    monkeypatch.setattr(
        ActivationDataset, "__getitems__", lambda self, items: calls.append(len(items)) or real(self, items)
    )
    nxt = tmp_path / "next"
    writer = CacheWriter(nxt, shard_size=7, vocab_size=V)
    _trainer(writer).predict(Passthrough(shift=1.0), datamodule=dm, return_predictions=False)
    assert calls == [8, 8, 7, 8, 1]
    assert [r["rows"] for r in writer.local_records] == [7, 7, 7, 2, 7, 2]


def test_hardware_gpu_asks_for_pinned_memory_and_workers(tmp_path: Path) -> None:
    from stackwise import artifacts as art
    from stackwise.config import RunConfig
    from stackwise.pipeline.inputs import StageInputs
    from stackwise.pipeline.stage import Stage
    from tests.conftest import compose_cfg

    acts = tmp_path / "acts"
    _build(acts, n_train=8, n_val=4)
    for hw, pinned, workers in (("cpu", False, 0), ("gpu", True, 4), ("ddp", True, 4), ("fsdp", True, 4)):
        run = RunConfig.from_hydra(compose_cfg([f"hardware={hw}", "cache.shuffle_block=8", f"output_root={tmp_path}"]))
        dm = StageInputs(run, art.ExperimentPaths(tmp_path)).activations(Stage.layer(2), ActivationCache.open(acts))
        got = (dm.pin_memory, dm.num_workers, dm.shuffle_block, dm.prefetch_factor, dm.to_device)
        assert got == (pinned, workers, 8, 2, True), hw
        # a later stage's caching pass reads cache.batch_size rows a batch, not its training batch
        assert (dm.predict_batch_size, dm.batch_size) == (64 if hw == "cpu" else 16, run.data.batch_size), hw
        assert run.cache.store == ("auto" if hw == "gpu" else "disk"), hw  # one GPU: the cheapest store
        loader = dm.val_dataloader()
        assert (loader.pin_memory, loader.persistent_workers) == (pinned, workers > 0)


def test_writer_sizes_shards_from_the_loaders(tmp_path: Path) -> None:
    """Shards are created at their final size (a split's last one too), from the predict loaders' lengths."""
    acts = tmp_path / "acts"
    writer = CacheWriter(acts, shard_size=10, vocab_size=V)
    loaders = [DataLoader(_Rows(), batch_size=4), DataLoader(RowSource(9, "val"), batch_size=4)]
    _trainer(writer).predict(Passthrough(), dataloaders=loaders, return_predictions=False)
    assert [(r["split"], r["rows"]) for r in writer.local_records] == [
        ("train", 10),
        ("train", 10),
        ("train", 3),
        ("val", 9),
    ]
    write_ok = json.loads((acts / "records_r0.json").read_text())
    assert write_ok == writer.local_records
    from stackwise.data.cache.layout import write_manifest

    write_manifest(acts, writer.records(), META)
    assert ActivationCache.open(acts, verify=True).rows("train") == 23


# ------------------------------------------------------------------------------- GPU prefetch
def test_one_ahead_starts_the_next_batch_before_handing_out_one() -> None:
    """The order DeviceLoader relies on: batch k+1's copy is issued before batch k is returned (and
    its wait enqueued), so on a GPU it runs while the consumer computes on batch k."""
    log: list[tuple[str, int]] = []

    def start(b: int) -> int:
        log.append(("start", b))
        return b

    def finish(b: int) -> int:
        log.append(("finish", b))
        return b

    for b in one_ahead(range(3), start, finish):
        log.append(("use", b))
    assert log == [
        ("start", 0), ("start", 1), ("finish", 0), ("use", 0),
        ("start", 2), ("finish", 1), ("use", 1), ("finish", 2), ("use", 2),
    ]  # fmt: skip
    assert list(one_ahead([], start, finish)) == []


def test_device_loader_is_a_plain_loader_off_cuda_and_survives_lightning_rebuilding_it(tmp_path: Path) -> None:
    acts = tmp_path / "acts"
    _build(acts, n_train=9, n_val=3)
    dm = ActivationDataModule(ActivationCache.open(acts), batch_size=4, seed=0, to_device=True)
    assert dm._device() is None  # no trainer, or not CUDA: Lightning moves the batches as usual
    loader = DeviceLoader(ActivationDataset(dm.cache, "train"), batch_size=4, collate_fn=ready_batch)
    loader.to_device = torch.device("cpu")
    assert _same(_batches(loader), _batches(dm.predict_dataloader()[0]))
    # Lightning rebuilds every predict loader (to record batch indices): the device must survive it
    trainer = _trainer()
    trainer.predict(Passthrough(), dataloaders=[loader], return_predictions=False)
    rebuilt = trainer.predict_dataloaders
    rebuilt = rebuilt[0] if isinstance(rebuilt, list) else rebuilt
    assert rebuilt is not loader and isinstance(rebuilt, DeviceLoader) and rebuilt.to_device == torch.device("cpu")


def test_an_fp8_cache_runs_the_pipeline_end_to_end(make_run) -> None:
    from stackwise.pipeline import Pipeline
    from stackwise.pipeline.stage import Stage

    pipe = Pipeline(make_run("stage=all", "cache.dtype=float8_e4m3", "cache.shuffle_block=16"))
    pipe.execute()
    cache = pipe.state.open_cache(Stage.layer(1))
    assert cache.hidden_dtype == FP8 and cache.manifest["fields"]["hidden"]["storage"] == "uint8"
    row = ActivationDataset(cache, "val")[0]
    assert row["hidden"].dtype == torch.bfloat16 and row["hidden"].shape == (32, cache.d_model)
    records = {r["stage"]: r for r in json.loads(pipe.paths.results_json.read_text())}
    assert set(records) == {"embed", "layer_2", "fused"}  # the fusion check passed (2e-2 with a non-fp32 cache)


class HalfPrecision(Passthrough):
    """What a bf16-true stage hands the writer: every float of the batch in bf16, ids in int32."""

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        out = super().predict_step(batch, batch_idx, dataloader_idx)
        return {
            **out,
            "hidden": out["hidden"].bfloat16(),
            "t": out["t"].bfloat16(),
            "targets": out["targets"].int(),
            "index": out["index"].int(),
        }


def test_writer_takes_bf16_and_int32_fields(tmp_path: Path) -> None:
    acts = tmp_path / "acts"
    writer = CacheWriter(acts, shard_size=5, vocab_size=V, dtype="bfloat16")
    loader = DataLoader(RowSource(7, "train"), batch_size=4)
    _trainer(writer).predict(HalfPrecision(), dataloaders=[loader], return_predictions=False)
    from stackwise.data.cache.layout import write_manifest

    write_manifest(acts, writer.records(), META, splits=("train", "val"))
    batch = ActivationDataset(ActivationCache.open(acts), "train").__getitems__(list(range(7)))
    rows = [RowSource(7, "train")[i] for i in range(7)]
    assert torch.equal(batch["t"], torch.stack([r["t"] for r in rows]).bfloat16().float())
    assert torch.equal(batch["index"], torch.stack([r["index"] for r in rows]))


def test_a_memory_store_keeps_the_caches_out_of_the_experiment_folder(make_run, tmp_path: Path) -> None:
    """cache.store=memory: the same run (the same fused weights) with acts_layer{k}/ in a folder of
    cache.memory_dir (here a plain folder standing in for /dev/shm), none under the experiment."""
    from safetensors.torch import load_file

    from stackwise.pipeline import Pipeline

    ram = tmp_path / "ram"
    ram.mkdir()
    disk = Pipeline(make_run("stage=all", "fusion.finetune_steps=0", name="disk"))
    disk.execute()
    memory = Pipeline(
        make_run("stage=all", "fusion.finetune_steps=0", "cache.store=memory", f"cache.memory_dir={ram}", name="mem")
    )
    memory.execute()
    assert memory.paths.acts_root.parent == ram / "stackwise" and memory.paths.acts_root.name.startswith("mem-")
    assert (memory.paths.acts_root / "acts_layer1" / "manifest.json").is_file()
    assert not (memory.paths.root / "acts").exists()
    fused = [load_file(p.paths.fused_dir / "model.safetensors") for p in (disk, memory)]
    assert fused[0].keys() == fused[1].keys() and all(torch.equal(fused[0][n], fused[1][n]) for n in fused[0])
    with pytest.raises(StackWiseError, match=r"cache.memory_dir: .* is not a folder"):
        Pipeline(make_run("cache.store=memory", f"cache.memory_dir={tmp_path / 'absent'}", name="bad"))


def test_a_file_system_that_cannot_map_files_still_gets_its_hashes(tmp_path: Path, monkeypatch) -> None:
    """The hashers map each shard file (artifacts.sha256_file); where mapping fails (some FUSE file
    systems) they read it."""

    def no_mmap(*args, **kwargs):
        raise OSError(19, "No such device")

    from stackwise.artifacts import atomic

    monkeypatch.setattr(atomic.mmap, "mmap", no_mmap)
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    sink = ShardSink(tmp_path / "acts", storage={"hidden": "float32"}, shard_size=2, rank=0, convert=dict)
    sink.put("train", {"hidden": rows})
    records = sink.finish()
    assert [r["rows"] for r in records] == [2, 2]
    for r in records:
        raw = (tmp_path / "acts" / r["files"]["hidden"]["path"]).read_bytes()
        assert r["files"]["hidden"]["sha256"] == hashlib.sha256(raw).hexdigest()
