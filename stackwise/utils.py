"""Small shared helpers: seed derivation and hashing."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch


def derive_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed from `(seed, *keys)`, stable across processes, platforms and torch versions.

    Every reproducible draw (a layer's init, a frozen up-projection, one example's mask) gets its
    own generator seeded this way, so it never depends on what was drawn before it.
    """
    blob = json.dumps([int(seed), *[str(k) for k in keys]]).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *keys: Any) -> torch.Generator:
    """A CPU generator seeded with `derive_seed(seed, *keys)`."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, *keys))
    return g


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (contiguous, on CPU), for checksums of frozen weights."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return hashlib.sha256(t.numpy()).hexdigest()  # the array's buffer: no bytes copy (half the time)
