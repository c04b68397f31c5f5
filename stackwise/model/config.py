"""The typed model config: the single source of truth for every model hyper-parameter.

Hydra's `model` (+ `attention`) nodes are turned into a `ModelConfig` with `ModelConfig.from_dict`,
which rejects unknown keys and wrong types; `validate()` checks ranges and divisibility and
raises `ConfigError` naming the field. Nothing else in the project reads model sizes from YAML.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stackwise.errors import ConfigError

ATTENTION_KINDS = ("mha", "gqa", "mla")


@dataclass
class ModelConfig:
    # --- sizes (the SRD's names) ---
    vocab_size: int = 258
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # used by `gqa` layers; `mha` layers always use n_heads
    d_ff: int = 344
    # --- attention: one kind for every layer, or a list with one kind per layer ---
    attention: str | list = "gqa"
    # MLA (DeepSeek-V2/V3): q_lora_rank, kv_lora_rank and the per-head dims
    mla_rq: int = 64
    mla_rkv: int = 32
    qk_rope_head_dim: int = 16
    qk_nope_head_dim: int = 32
    v_head_dim: int = 32
    mla_freeze_up: bool = False  # freeze MLA's latent up-projections (q_b, kv_b) like the SwiGLU up
    # --- the rest ---
    dropout: float = 0.0
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    causal: bool = False  # masked diffusion is bidirectional; True gives a GPT-style mask
    norm_eps: float = 1e-5
    init_std: float = 0.02
    seed: int = 0
    # special token ids, inside the vocabulary
    mask_id: int = 256
    pad_id: int = 257

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prefix: str = "model") -> ModelConfig:
        """Build from a plain mapping (e.g. an OmegaConf node turned into a dict).

        Unknown keys and wrong types raise `ConfigError` naming `prefix.key`.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key not in fields:
                raise ConfigError(f"{prefix}.{key}", f"unknown model field; allowed: {', '.join(fields)}")
            kwargs[key] = _coerce(f"{prefix}.{key}", value, fields[key].default)
        cfg = cls(**kwargs)
        cfg.validate(prefix)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """A stable short hash of every field (what a checkpoint is made for)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # ------------------------------------------------------------------ derived
    def layer_kinds(self) -> list[str]:
        """The attention kind of each layer, index 0 = layer 1."""
        if isinstance(self.attention, str):
            return [self.attention] * self.n_layers
        return list(self.attention)

    def kind(self, k: int) -> str:
        """Attention kind of layer k (1-based)."""
        return self.layer_kinds()[k - 1]

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    # ------------------------------------------------------------------ validation
    def validate(self, prefix: str = "model") -> None:
        p = prefix + "."
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            _positive(p + name, getattr(self, name))
        kinds = self.attention
        if isinstance(kinds, str):
            kinds = [kinds]
        elif isinstance(kinds, (list, tuple)):
            if len(kinds) != self.n_layers:
                raise ConfigError(
                    p + "attention",
                    f"per-layer list has {len(kinds)} entries but n_layers={self.n_layers}; give one kind per layer",
                )
        else:
            raise ConfigError(p + "attention", f"must be one of {ATTENTION_KINDS} or a list of them, got {kinds!r}")
        for kind in kinds:
            if kind not in ATTENTION_KINDS:
                raise ConfigError(
                    p + "attention", f"unknown attention kind {kind!r}; allowed: {', '.join(ATTENTION_KINDS)}"
                )
        if any(k in ("mha", "gqa") for k in kinds):
            if self.d_model % self.n_heads:
                raise ConfigError(p + "d_model", f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
            if self.head_dim % 2:
                raise ConfigError(p + "n_heads", f"head_dim=d_model/n_heads={self.head_dim} must be even for RoPE")
        if "gqa" in kinds:
            if self.n_kv_heads >= self.n_heads:
                raise ConfigError(
                    p + "n_kv_heads", f"gqa needs n_kv_heads < n_heads, got {self.n_kv_heads} >= {self.n_heads}"
                )
            if self.n_heads % self.n_kv_heads:
                raise ConfigError(
                    p + "n_kv_heads", f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}"
                )
        if "mla" in kinds:
            for name in ("mla_rq", "mla_rkv", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
                _positive(p + name, getattr(self, name))
            if self.qk_rope_head_dim % 2:
                raise ConfigError(p + "qk_rope_head_dim", f"must be even for RoPE, got {self.qk_rope_head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(p + "dropout", f"must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0:
            raise ConfigError(p + "rope_theta", f"must be > 0, got {self.rope_theta}")
        if self.norm_eps <= 0:
            raise ConfigError(p + "norm_eps", f"must be > 0, got {self.norm_eps}")
        if self.init_std <= 0:
            raise ConfigError(p + "init_std", f"must be > 0, got {self.init_std}")
        for name in ("mask_id", "pad_id"):
            v = getattr(self, name)
            if not 0 <= v < self.vocab_size:
                raise ConfigError(p + name, f"{name}={v} must be inside the vocabulary [0, {self.vocab_size})")
        if self.mask_id == self.pad_id:
            raise ConfigError(p + "mask_id", f"mask_id and pad_id must differ, both are {self.mask_id}")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(name, f"must be a positive integer, got {value!r}")


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Check `value` against the type of the field's default (bool/int/float/str)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"must be a number, got {value!r}")
        return float(value)
    if isinstance(value, tuple):
        return list(value)
    return value
