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
the draw is split into independent chunks, vectorised with numpy's uint64 arithmetic (wraparound
modulo 2**64 is defined for unsigned integers) and run on several threads, and the result does not
depend on the chunk size or the number of threads.

Why a sum of twelve uniforms (Irwin-Hall) and not an exact normal: the frozen tensors only need to
be a fixed random matrix with the right mean and variance, and every exact method (Box-Muller, the
polar method, ziggurat) needs `log`, `sin` or `exp`. Twelve uniforms on {0, ..., 65535} sum to mean
393210 and variance 2**32 - 1, so the value has mean 0 and standard deviation std * (1 - 2**-33),
an excess kurtosis of -0.1 and tails cut at 6 std (a normal exceeds 6 std once in 5e8 draws;
truncated-normal inits, cut at 2 std, are common practice). Values lie on a grid of std / 65536.

Speed: a 70B-sized frozen up-projection (d_ff 28672 x d_model 8192, 235M values, 940 MB in fp32)
took 2.9 s with one thread (12 ns a value; best of three, 6-7 s typical) on a 2-core AMD EPYC that
other jobs kept busy (load average 8); the pieces run on `torch.get_num_threads()` threads.
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


def portable_normal(shape, std: float, key: int) -> torch.Tensor:
    """A CPU fp32 tensor of `shape` ~ N(0, std^2) (Irwin-Hall, see above), the same bits on every platform.

    `key` is a 64-bit stream key, e.g. `stackwise.utils.derive_seed(seed, "up", k)`.
    """
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if numel > _STREAM_STRIDE:
        raise ValueError(f"portable_normal draws at most 2**40 values, not {numel}")
    out = np.empty(numel, dtype=np.float32)
    key, scale = int(key) & _MASK64, np.float32(std / 65536)
    workers = min(-(-numel // _CHUNK), max(1, torch.get_num_threads()))
    if workers <= 1:
        _fill(out, key, 0, scale)
    else:  # numpy releases the GIL inside each operation, so the pieces run in parallel
        step = -(-numel // (4 * workers))  # a few pieces per thread evens out a slow one
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda s: _fill(out[s : s + step], key, s, scale), range(0, numel, step)))
    return torch.from_numpy(out).view(shape)
