"""Normal draws whose bits are the same on every machine: the generator of the frozen tensors.

`torch.randn` is not fit for tensors that are regenerated instead of stored: its CPU kernel is
vectorised per instruction set, and `ATEN_CPU_CAPABILITY=default` and `avx2` give different bits for
one seed (an ARM host, or a torch built without AVX2, differs again). A frozen weight drawn on one
machine would then fail its checksum on another. So the frozen tensors come from this generator,
defined bit for bit below with only integer arithmetic and IEEE 754 operations that are correctly
rounded everywhere (an int-to-float conversion that is exact, one multiplication); no libm `log`,
`sin` or `exp`, whose last bit differs between platforms.

Definition of `portable_normal(shape, std, key)`, for the flat (row-major) index j of each value:

    word(c, j) = splitmix64 output number c * 2**40 + j + 1 of the stream seeded with `key`, i.e.
                 mix(key + (c * 2**40 + j + 1) * 0x9E3779B97F4A7C15 mod 2**64),  c = 0, 1, 2
    S(j)       = the sum of the twelve 16-bit fields of word(0, j), word(1, j), word(2, j)
    value(j)   = float32(S(j) - 393210) * float32(std / 65536)

where mix is SplitMix64's finaliser (Steele, Lea and Flood 2014; the stream passes BigCrush).
SplitMix64 is counter-based, so any slice of the stream is computed without the values before it:
the draw is split into independent chunks, and the result depends on neither the chunk size, the
number of threads nor the device. On the CPU the chunks are vectorised with numpy's uint64
arithmetic (wraparound modulo 2**64 is defined for unsigned integers) and run on several threads.
On any other torch device (`device="cuda"`: a tensor is drawn where it is used) the same steps run
as torch int64 operations, since torch >= 2.1 must run them and its uint64 tensors have little
arithmetic (none before 2.3): int64 addition and multiplication wrap modulo 2**64 in two's
complement, the same bits as uint64's (constants >= 2**63 are written as their negative int64
values), and the logical right shift is the arithmetic one masked to the bits it brings in. The
last step is one on every device: S - 393210 is converted to float32 exactly (|S - 393210| < 2**20)
and multiplied by float32(std / 65536). That product of a 20-bit and a 24-bit significand is exact
in double, so no kernel that evaluates it in double or as a fused multiply-add rounds it otherwise.

Why a sum of twelve uniforms (Irwin-Hall) and not an exact normal: the frozen tensors only need to
be a fixed random matrix with the right mean and variance, and every exact method (Box-Muller, the
polar method, ziggurat) needs `log`, `sin` or `exp`. Twelve uniforms on {0, ..., 65535} sum to mean
393210 and variance 2**32 - 1, so the value has mean 0 and standard deviation std * (1 - 2**-33),
an excess kurtosis of -0.1 and tails cut at 6 std (a normal exceeds 6 std once in 5e8 draws;
truncated-normal inits, cut at 2 std, are common practice). Values lie on a grid of std / 65536.

Speed: a 70B-sized frozen up-projection (d_ff 28672 x d_model 8192, 235M values, 940 MB in fp32)
took 2.9 s with one thread (12 ns a value; best of three, 6-7 s typical) on a 2-core AMD EPYC that
other jobs kept busy (load average 8); the pieces run on `torch.get_num_threads()` threads. The
seed's up-projection (d_ff 14336 x d_model 4096) takes 2.1 s on an H200 host's 16 cores. The torch
implementation serves the other devices only: on the CPU it was slower than numpy (7.3M values,
best of five on that busy EPYC: 0.11-0.12 s at its best chunk size against numpy's 0.07-0.11 s on
one thread, 0.21-0.27 s against 0.08-0.11 s on two). On a device it runs `_DEVICE_CHUNK` (4M)
values at a time, so its work tensors take 128 MB whatever the size of the draw. On one H200
(`benchmarks/init_cost.py --device cuda --draw-only`, benchmarks/RESULTS.md) the seed's
up-projection took 0.015 s on the GPU against 1.89 s for numpy on the host's 16 cores, bit-identical
(0.19 s with the copy to the host that a checksum reads).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["VERSION", "portable_normal"]

# Part of every artifact's settings hash (stackwise/config.py): change it with the definition above.
VERSION = "splitmix64-irwin-hall-12"

_U = np.uint64
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (odd, so every counter gives another state)
_MIX1, _MIX2 = _U(0xBF58476D1CE4E5B9), _U(0x94D049BB133111EB)
_LANES = _U(0x0000FFFF0000FFFF)  # fields 0 and 2 of a word, one in each 32-bit half
_LOW32 = _U(0xFFFFFFFF)
_WORDS = 3  # 64-bit words per value: 12 fields of 16 bits
_MEAN = _WORDS * 4 * 0xFFFF // 2  # 393210, the mean of the sum of the twelve fields
_STREAM_STRIDE = 1 << 40  # word c of value j is stream output c * 2**40 + j + 1: values up to 2**40
_CHUNK = 1 << 14  # values per chunk: its three work arrays (384 KB) stay in a core's L2 cache
_MASK64 = (1 << 64) - 1
_STEPS = np.arange(_CHUNK, dtype=np.uint64) * _U(_GAMMA)  # (CHUNK,) i * GAMMA, shared by every chunk


def _field_sums(key: int, start: int, n: int) -> np.ndarray:
    """(n,) int64: S(j) for j = start .. start + n - 1."""
    acc = np.zeros(n, dtype=np.uint64)
    z, t = np.empty(n, dtype=np.uint64), np.empty(n, dtype=np.uint64)
    for c in range(_WORDS):
        first = (key + (c * _STREAM_STRIDE + start + 1) * _GAMMA) & _MASK64  # state of value `start` in Python ints
        np.add(_STEPS[:n], _U(first), out=z)
        np.right_shift(z, _U(30), out=t)  # SplitMix64's mix, in place
        z ^= t
        z *= _MIX1
        np.right_shift(z, _U(27), out=t)
        z ^= t
        z *= _MIX2
        np.right_shift(z, _U(31), out=t)
        z ^= t
        # Four 16-bit fields: fields 0 + 1 and 2 + 3 land in the two 32-bit halves (< 2**19 after
        # three words, so a half never carries into the other).
        np.right_shift(z, _U(16), out=t)
        t &= _LANES
        z &= _LANES
        acc += z
        acc += t
    return ((acc & _LOW32) + (acc >> _U(32))).view(np.int64)


def _fill(out: np.ndarray, key: int, start: int, scale: np.float32) -> None:
    """out[:] = values start .. start + out.size - 1, one cache-sized chunk at a time."""
    for i in range(0, out.size, _CHUNK):
        part = out[i : i + _CHUNK]
        z = (_field_sums(key, start + i, part.size) - _MEAN).astype(np.float32)  # exact: |z| < 2**20
        np.multiply(z, scale, out=part)  # one IEEE multiplication, correctly rounded on every platform


def portable_normal(shape, std: float, key: int, device: str | torch.device | None = None) -> torch.Tensor:
    """An fp32 tensor of `shape` ~ N(0, std^2) (Irwin-Hall, see above) on `device` (default: the CPU),
    the same bits on every platform and every device.

    `key` is a 64-bit stream key, e.g. `stackwise.utils.derive_seed(seed, "up", k)`.
    """
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if numel > _STREAM_STRIDE:
        raise ValueError(f"portable_normal draws at most 2**40 values, not {numel}")
    key = int(key) & _MASK64
    device = torch.device("cpu" if device is None else device)
    if device.type == "meta":
        raise ValueError("portable_normal draws values: a meta tensor holds none")
    if device.type != "cpu":
        return _torch_normal(shape, std, key, device)
    out = np.empty(numel, dtype=np.float32)
    scale = np.float32(std / 65536)
    workers = min(-(-numel // _CHUNK), max(1, torch.get_num_threads()))
    if workers <= 1:
        _fill(out, key, 0, scale)
    else:  # numpy releases the GIL inside each operation, so the pieces run in parallel
        step = -(-numel // (4 * workers))  # a few pieces per thread evens out a slow one
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda s: _fill(out[s : s + step], key, s, scale), range(0, numel, step)))
    return torch.from_numpy(out).view(shape)


# ---------------------------------------------------------------------------- the torch implementation
# The same steps in int64 (see the module docstring): a uint64 constant c >= 2**63 is the int64 c - 2**64.
def _signed(u: int) -> int:
    u &= _MASK64
    return u - (1 << 64) if u >= 1 << 63 else u


_GAMMA_I, _MIX1_I, _MIX2_I = _signed(_GAMMA), _signed(int(_MIX1)), _signed(int(_MIX2))
# values per chunk on a device: a chunk's four int64 work tensors (steps, z, t, acc) take 128 MB
_DEVICE_CHUNK = 1 << 22


def _torch_steps(n: int, device: torch.device) -> torch.Tensor:
    """(n,) int64 on `device`: i * GAMMA mod 2**64, shared by every chunk (as `_STEPS`)."""
    return torch.arange(n, dtype=torch.int64, device=device).mul_(_GAMMA_I)


def _torch_field_sums(key: int, start: int, n: int, steps: torch.Tensor) -> torch.Tensor:
    """(n,) int64 on `steps`' device: S(j) for j = start .. start + n - 1 (`_field_sums` in torch)."""
    z = torch.empty(n, dtype=torch.int64, device=steps.device)
    t, acc = torch.empty_like(z), torch.zeros_like(z)
    for c in range(_WORDS):
        torch.add(steps[:n], _signed(key + (c * _STREAM_STRIDE + start + 1) * _GAMMA), out=z)
        for shift, mul in ((30, _MIX1_I), (27, _MIX2_I), (31, None)):  # SplitMix64's mix, in place
            # z >> shift on int64 copies the sign bit in: masked, it is uint64's logical shift
            torch.bitwise_right_shift(z, shift, out=t)
            t.bitwise_and_((1 << (64 - shift)) - 1)
            z.bitwise_xor_(t)
            if mul is not None:
                z.mul_(mul)
        # the four 16-bit fields as in `_field_sums`; the sign bits shifted in fall outside _LANES
        torch.bitwise_right_shift(z, 16, out=t)
        t.bitwise_and_(int(_LANES))
        z.bitwise_and_(int(_LANES))
        acc.add_(z)
        acc.add_(t)
    torch.bitwise_right_shift(acc, 32, out=t)  # acc < 2**51: no sign to mask
    return acc.bitwise_and_(int(_LOW32)).add_(t)


def _torch_normal(shape: tuple[int, ...], std: float, key: int, device: torch.device, chunk: int = _DEVICE_CHUNK):
    """`portable_normal` on `device` with torch operations, `chunk` values at a time."""
    numel = math.prod(shape)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    steps = _torch_steps(min(chunk, numel), device)
    scale = float(np.float32(std / 65536))  # a float32 value: the multiplication below is float32's
    for i in range(0, numel, chunk):
        part = out[i : i + chunk]
        part.copy_(_torch_field_sums(key, i, part.numel(), steps).sub_(_MEAN))  # exact: |S - MEAN| < 2**20
        part.mul_(scale)  # one correctly rounded multiplication (see the module docstring)
    return out.view(shape)
