"""The frozen tensors' generator (stackwise/model/portable_rng.py): the same bits on every platform.

A frozen tensor is regenerated from (seed, k) instead of being stored, and checked against the
checksum its checkpoint recorded, so its bits must not depend on the CPU's instruction set, the
numpy SIMD kernels, the thread count or the chunking: checked here in fresh processes with those
switched off, against golden checksums, and against a plain-Python evaluation of the definition.
The torch implementation that draws on a GPU is checked bit for bit against the numpy one, on the
CPU always and on CUDA where there is one.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from stackwise.model import layers as model_layers
from stackwise.model.config import ModelConfig
from stackwise.model.portable_rng import _field_sums, _torch_field_sums, _torch_normal, _torch_steps, portable_normal
from stackwise.model.transformer import Block, Head, Transformer, empty
from stackwise.model.weights import LayerModules, LayerWeights, fused_tensors
from stackwise.utils import derive_seed, tensor_sha256

CFG = dict(
    vocab_size=64,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    d_ff=1100,  # 70,400 values: more than one chunk of the generator
    attention="mla",
    mla_rq=16,
    mla_rkv=8,
    qk_rope_head_dim=4,
    qk_nope_head_dim=8,
    v_head_dim=8,
    mla_freeze_up=True,
    mask_id=62,
    pad_id=63,
    seed=7,
)

# Golden values, computed once (2026-11-30) and valid on every platform and torch/numpy version.
GOLDEN_DRAW = "284d937ed4cadfd28bfc5dbbb9230d3cc1b1a0c8ee6d036dd8548487f5c13154"  # (3, 70001), std 1, key 2**64-1
GOLDEN_TINY_BLOCK = {  # layer 2 of tiny mla config below: its frozen_up_checksum and each tensor's sha256
    "checksum": "715f4b415f43b60774cc6c6f66cafdbadaf93fb172bb297e0fe777c085a15a6e",
    "attn.q_b.weight": "c708b23197c0d08162861943752b60dae3b351508a490a207a6239f056465f97",
    "attn.kv_b.weight": "9484ed467f21ce135ab93180eab3c8ff7efc686da62115b3009c6439a533b7b8",
    "mlp.up": "c4fa9b9baf866e40f92bc8914342620985dc135b623139cb051c246a1ce4ff87",
}


def tiny_mla() -> ModelConfig:
    return ModelConfig(**{**CFG, "d_model": 32, "d_ff": 64})


def _numpy_dispatch_features() -> list[str]:
    """numpy's runtime-dispatched SIMD features (NPY_DISABLE_CPU_FEATURES takes these names)."""
    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:  # numpy < 2
        from numpy.core import _multiarray_umath as umath
    return list(umath.__cpu_dispatch__)


# ---------------------------------------------------------------------------- the same bits everywhere
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:  # numpy < 2
        from numpy.core import _multiarray_umath as umath
    from stackwise.model.config import ModelConfig
    from stackwise.model.transformer import Block
    from stackwise.utils import tensor_sha256
    block = Block(ModelConfig(**json.loads(sys.argv[1])), 2)
    out = {name: tensor_sha256(t) for name, t in block.frozen_tensors().items()}
    out["checksum"] = block.frozen_up_checksum()
    out["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    out["threads"] = torch.get_num_threads()
    out["numpy_simd"] = [f for f in umath.__cpu_dispatch__ if umath.__cpu_features__.get(f)]
    print(json.dumps(out))
    """
)


def test_frozen_tensors_are_bit_identical_without_simd_and_with_the_best_simd():
    """torch's generic kernels (ATEN_CPU_CAPABILITY=default), numpy's baseline kernels and one thread,
    against the machine's best kernels and every thread: the frozen tensors must have the same bytes.
    (torch.randn, the generator before, gives other bits under ATEN_CPU_CAPABILITY=default.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "NPY_DISABLE_CPU_FEATURES")}
    plain = {
        **env,
        "ATEN_CPU_CAPABILITY": "default",
        "NPY_DISABLE_CPU_FEATURES": " ".join(_numpy_dispatch_features()),
        "OMP_NUM_THREADS": "1",
    }
    runs = []
    for e in (plain, env):
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT, json.dumps(CFG)], env=e, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    generic, best = runs
    assert generic.pop("torch_capability") == "DEFAULT" and generic.pop("threads") == 1
    assert generic.pop("numpy_simd") == []  # numpy's baseline kernels only
    best.pop("torch_capability"), best.pop("threads"), best.pop("numpy_simd")
    assert set(generic) == {"attn.q_b.weight", "attn.kv_b.weight", "mlp.up", "checksum"}
    assert generic == best


def test_golden_checksums():
    assert tensor_sha256(portable_normal((3, 70001), 1.0, 2**64 - 1)) == GOLDEN_DRAW
    block = Block(tiny_mla(), 2)
    got = {name: tensor_sha256(t) for name, t in block.frozen_tensors().items()}
    assert {"checksum": block.frozen_up_checksum(), **got} == GOLDEN_TINY_BLOCK


def _reference(key: int, j: int, std: float) -> float:
    """Value j of portable_normal, straight from the definition in portable_rng.py, in Python ints."""
    mask = 2**64 - 1
    total = 0
    for c in range(3):
        z = (key + (c * 2**40 + j + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        total += sum((z >> (16 * f)) & 0xFFFF for f in range(4))
    return float(np.float32(total - 393210) * np.float32(std / 65536))


def test_values_follow_the_documented_definition():
    key = derive_seed(7, "up", 2)
    draw = portable_normal((5, 30000), 0.02, key).flatten()
    for j in (0, 1, 2, 65535, 65536, 65537, 149999):
        assert draw[j].item() == _reference(key, j, 0.02), j
    assert draw.dtype == torch.float32 and draw.device.type == "cpu"


def test_independent_of_threads_and_shape():
    key = derive_seed(0, "up", 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = portable_normal((7, 40000), 0.02, key)
        torch.set_num_threads(max(2, threads))
        many = portable_normal((7, 40000), 0.02, key)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    # counter-based: value j is a function of (key, j) only, so a smaller draw is a prefix of a larger one
    assert torch.equal(portable_normal((1000,), 0.02, key), one.flatten()[:1000])
    assert not torch.equal(portable_normal((1000,), 0.02, key + 1), one.flatten()[:1000])


# ---------------------------------------------------------------------------- distribution and scale
def test_distribution_mean_std_and_tails():
    std, n = 0.02, 2_000_000
    x = portable_normal((n,), std, derive_seed(3, "up", 5)).double()
    assert abs(x.mean().item()) < 4 * std / math.sqrt(n)
    assert abs(x.std().item() / std - 1) < 3e-3  # the std of the std estimate is ~5e-4
    z = x / std
    assert abs((z**4).mean().item() - 2.9) < 0.03  # Irwin-Hall(12): excess kurtosis -1.2 / 12
    assert abs((z.abs() > 2).double().mean().item() - 0.0455) < 0.002  # as a normal's 2-sigma tails
    assert z.abs().max().item() <= 6.0
    assert torch.equal(portable_normal((64,), 0.5, 11), portable_normal((64,), 1.0, 11) * 0.5)  # std scales exactly


def test_frozen_tensors_scaled_like_the_init():
    cfg = ModelConfig(**{**CFG, "init_std": 0.05})
    block = Block(cfg, 1)
    for name, t in block.frozen_tensors().items():
        assert abs(t.std().item() / 0.05 - 1) < 0.03, name
    assert not torch.equal(block.mlp.up, Block(cfg, 2).mlp.up)  # each layer has its own stream
    assert not torch.equal(block.attn.q_b.weight.flatten()[:64], block.attn.kv_b.weight.flatten()[:64])


# ---------------------------------------------------------------------------- the torch implementation
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
# keys >= 2**63 are negative int64s in the torch implementation; 2**64 - 1 is -1 there
KEYS = (0, 1, derive_seed(7, "up", 2), 2**63 - 1, 2**63, 2**63 + 1, 0x9E3779B97F4A7C15, 2**64 - 1)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_field_sums_equal_numpys(device):
    """The integer sums S(j), before any float: int64 wraparound and masked shifts give uint64's bits."""
    for key in KEYS:
        for start, n in ((0, 1), (0, 5000), (65537, 4099), (2**40 - 3000, 3000)):  # the last: the stream's end
            want = torch.from_numpy(_field_sums(key, start, n))
            got = _torch_field_sums(key, start, n, _torch_steps(n, torch.device(device)))
            assert got.dtype == torch.int64 and torch.equal(got.cpu(), want), (key, start)
            assert want.min().item() >= 0 and want.max().item() <= 12 * 0xFFFF


@pytest.mark.parametrize("device", DEVICES)
def test_torch_draw_equals_numpys_bit_for_bit(device):
    """Every shape and chunking, the empty and one-element draws too, against the numpy (CPU) path."""
    dev = torch.device(device)
    cases = [  # (shape, chunk): chunks that divide nothing, one value, more than the draw
        ((7, 1001), 1000),
        ((37,), 1),
        ((4099,), 1 << 22),
        ((1,), 3),
        ((), 3),
        ((0,), 3),
        ((2, 0, 5), 3),
    ]
    for key in KEYS:
        for shape, chunk in cases:
            want = portable_normal(shape, 0.02, key)
            got = _torch_normal(shape, 0.02, key, dev, chunk)
            assert got.device.type == dev.type and got.dtype == torch.float32 and got.shape == want.shape
            assert torch.equal(got.cpu(), want), (key, shape, chunk)
    for key in (0, 2**63 + 1):  # past the numpy path's chunks of 2**14 (and its threads' pieces)
        assert torch.equal(
            _torch_normal((3, 70001), 0.02, key, dev, 4099).cpu(), portable_normal((3, 70001), 0.02, key)
        )
    assert tensor_sha256(_torch_normal((3, 70001), 1.0, 2**64 - 1, dev)) == GOLDEN_DRAW
    # the public entry point takes the torch path for any device but the CPU, and no meta one
    if dev.type != "cpu":
        assert torch.equal(portable_normal((5, 3001), 0.5, 3, dev).cpu(), portable_normal((5, 3001), 0.5, 3))
    with pytest.raises(ValueError, match="meta"):
        portable_normal((4,), 0.02, 1, "meta")


class DeviceDraws:
    """`portable_normal` as the modules call it, the devices they ask for recorded: a draw for a
    device other than the CPU is made by the torch implementation on the CPU, so the routing runs
    without a GPU (`fail=True`: that draw runs out of memory instead)."""

    def __init__(self, monkeypatch, fail: bool = False):
        self.devices: list[str] = []
        self.fail = fail
        monkeypatch.setattr(model_layers, "portable_normal", self)
        model_layers._frozen_normal.cache_clear()

    def __call__(self, shape, std, key, device=None):
        device = torch.device("cpu" if device is None else device)
        self.devices.append(device.type)
        if device.type == "cpu":
            return portable_normal(shape, std, key)
        if self.fail:
            raise torch.cuda.OutOfMemoryError("out of memory")
        return _torch_normal(shape, std, key, torch.device("cpu"), chunk=1000)


def test_frozen_tensors_drawn_where_they_are_asked_for(monkeypatch):
    """Modules draw on their buffers' device (the CPU for meta ones); checksums, layer files and the
    fused model's checks draw where they are told; the bits, and so every checksum, are the same."""
    cfg = tiny_mla()
    want = Block(cfg, 2)  # numpy draws: the reference
    checksum = want.frozen_up_checksum()
    assert checksum == GOLDEN_TINY_BLOCK["checksum"]
    draws = DeviceDraws(monkeypatch)
    assert want.frozen_up_checksum("cuda") == checksum and draws.devices == ["cuda"] * 3
    values = want.frozen_values("cuda")
    assert all(torch.equal(v, want.get_buffer(n)) for n, v in values.items())

    draws.devices.clear()
    with torch.device("meta"):
        shapes = Block(cfg, 2)
    assert shapes.frozen_values().keys() == values.keys() and draws.devices == ["cpu"] * 3
    sd = want.trainable_state_dict()
    assert shapes.check_trainable_state_dict(sd, checksum, "cuda").keys() == values.keys()
    assert draws.devices[3:] == ["cuda"] * 3

    draws.devices.clear()
    weights = LayerWeights.of(LayerModules(want, Head(cfg)), draw_on="cuda")
    assert weights.frozen_sha256 == checksum and draws.devices == ["cuda"] * 3
    block = empty(lambda: Block(cfg, 2), "cpu")
    model_layers._frozen_normal.cache_clear()  # drawn on the CPU above: kept
    block.load_trainable_state_dict(sd, checksum)  # a CPU block: CPU draws
    assert draws.devices[3:] == ["cpu"] * 3 and torch.equal(block.mlp.up, want.mlp.up)


def test_fused_tensors_check_frozen_tensors_on_the_given_device(monkeypatch):
    cfg = ModelConfig(**{**CFG, "d_model": 32, "d_ff": 64, "n_layers": 2})
    model = Transformer(cfg)
    layers = [
        LayerWeights.of(LayerModules(b, model.head, model.embed if k == 1 else None))
        for k, b in enumerate(model.blocks, 1)
    ]
    draws = DeviceDraws(monkeypatch)
    on_cuda = dict(fused_tensors(cfg, layers, device="cuda"))
    assert draws.devices == ["cuda"] * 6
    assert on_cuda.keys() == model.state_dict().keys()


def test_a_device_draw_that_runs_out_of_memory_is_made_on_the_cpu(monkeypatch):
    draws = DeviceDraws(monkeypatch, fail=True)
    got = model_layers.frozen_normal((64, 32), 0.02, 7, "up", 2, device="cuda")
    assert draws.devices == ["cuda", "cpu"] and got.device.type == "cpu"
    assert torch.equal(got, portable_normal((64, 32), 0.02, derive_seed(7, "up", 2)))


def test_only_cpu_draws_are_kept(monkeypatch):
    """A CPU draw takes seconds at real sizes and is kept (the last 4); a device draw takes
    milliseconds and is not, so no GPU memory is held outside the stage's memory plan."""
    draws = DeviceDraws(monkeypatch)
    a = model_layers.frozen_normal((64, 32), 0.02, 7, "up", 2)
    b = model_layers.frozen_normal((64, 32), 0.02, 7, "up", 2, device="cpu")
    c = model_layers.frozen_normal((64, 32), 0.02, 7, "up", 2, device="cuda")
    d = model_layers.frozen_normal((64, 32), 0.02, 7, "up", 2, device="cuda")
    assert a is b and c is not d and draws.devices == ["cpu", "cuda", "cuda"]
    assert torch.equal(a, c) and torch.equal(c, d)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_block_built_on_cuda_holds_the_cpu_blocks_frozen_tensors():
    cfg = tiny_mla()
    cpu = Block(cfg, 2)
    gpu = empty(lambda: Block(cfg, 2), "cuda")
    gpu.init_weights()
    for name, t in gpu.frozen_tensors().items():
        assert t.device.type == "cuda" and torch.equal(t.cpu(), cpu.get_buffer(name)), name
    assert gpu.frozen_up_checksum() == cpu.frozen_up_checksum() == GOLDEN_TINY_BLOCK["checksum"]


# ---------------------------------------------------------------------------- buffers under DDP
def test_ddp_never_broadcasts_the_frozen_buffers(tmp_path):
    """DDP broadcasts every buffer from rank 0 before each forward unless told otherwise: the frozen
    tensors (and a later stage's tied embedding) are the same on every rank by construction."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from stackwise.config import OptimConfig
    from stackwise.model.transformer import Block, Head
    from stackwise.model.weights import LayerModules
    from stackwise.stages.layerwise import LayerwiseStage

    cfg = tiny_mla()
    layer = LayerModules(Block(cfg, 2), Head(cfg))
    tied = torch.zeros(cfg.vocab_size, cfg.d_model)
    module = LayerwiseStage(cfg, layer, OptimConfig(), "mean", 5, "layer_2", embed_weight=tied)
    frozen = {"block.attn.q_b.weight", "block.attn.kv_b.weight", "block.mlp.up", "embed_weight"}
    assert {n for n, _ in module.named_buffers()} == frozen
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(module)
        assert ddp.parameters_to_ignore == frozen and not ddp.will_sync_module_buffers()
    finally:
        dist.destroy_process_group()
