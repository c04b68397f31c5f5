"""The typed model config: the single source of truth for every model hyper-parameter.

`ModelConfig` is the `model` node of Hydra's schema (see stackwise/structured.py): OmegaConf
rejects unknown keys and wrong types while composing, `__post_init__` checks ranges and
divisibility and raises `ConfigError` naming the field. Nothing else reads model sizes from YAML.

Defaults: the dataclass defaults ARE the `small` model that `make train` trains, so a
`ModelConfig()` built in code and `model=small` are the same model; stackwise/conf/model/*.yaml
list only what differs from them (small.yaml: nothing). In the composed config `vocab_size`,
`mask_id` and `pad_id` are null (stackwise/conf/config.yaml): `RunConfig` fills them from the data's
tokenizer; the defaults here are the byte tokenizer's, for models built in code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from stackwise.errors import ConfigError
from stackwise.structured import Structured

ATTENTION_KINDS = ("mha", "gqa", "mla")


@dataclass
class ModelConfig(Structured):
    PATH = "model"

    # --- sizes ---
    vocab_size: int | None = 258  # null in the composed config: the data's tokenizer's
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # used by `gqa` layers; `mha` layers always use n_heads
    d_ff: int = 352
    # --- attention: one kind for every layer, or a list with one kind per layer ---
    attention: Any = "gqa"  # a kind or a list of kinds: checked in __post_init__
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
    mask_id: int | None = 256
    pad_id: int | None = 257

    def __post_init__(self) -> None:
        if isinstance(self.attention, tuple):
            self.attention = list(self.attention)
        self.validate()

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
    def validate(self) -> None:
        """Raise ConfigError naming the first bad field (run by __post_init__; again after edits)."""
        for name in ("vocab_size", "mask_id", "pad_id"):
            if getattr(self, name) is None:
                raise ConfigError(
                    self.key(name), "is null; set it, or compose the config, which takes it from the data's tokenizer"
                )
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            self._positive(name)
        kinds = self._attention_kinds()
        if any(k in ("mha", "gqa") for k in kinds):
            if self.d_model % self.n_heads:
                raise ConfigError(
                    self.key("d_model"), f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}"
                )
            if self.head_dim % 2:
                raise ConfigError(
                    self.key("n_heads"), f"head_dim=d_model/n_heads={self.head_dim} must be even for RoPE"
                )
        if "gqa" in kinds:
            if self.n_kv_heads >= self.n_heads:
                raise ConfigError(
                    self.key("n_kv_heads"), f"gqa needs n_kv_heads < n_heads, got {self.n_kv_heads} >= {self.n_heads}"
                )
            if self.n_heads % self.n_kv_heads:
                raise ConfigError(
                    self.key("n_kv_heads"),
                    f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}",
                )
        if "mla" in kinds:
            for name in ("mla_rq", "mla_rkv", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
                self._positive(name)
            if self.qk_rope_head_dim % 2:
                raise ConfigError(self.key("qk_rope_head_dim"), f"must be even for RoPE, got {self.qk_rope_head_dim}")
        self._check_ranges()

    def _attention_kinds(self) -> list[str]:
        kinds = self.attention
        if isinstance(kinds, str):
            kinds = [kinds]
        elif isinstance(kinds, list):
            if len(kinds) != self.n_layers:
                raise ConfigError(
                    self.key("attention"),
                    f"per-layer list has {len(kinds)} entries but n_layers={self.n_layers}; give one kind per layer",
                )
        else:
            raise ConfigError(
                self.key("attention"), f"must be one of {ATTENTION_KINDS} or a list of them, got {kinds!r}"
            )
        for kind in kinds:
            if kind not in ATTENTION_KINDS:
                raise ConfigError(
                    self.key("attention"), f"unknown attention kind {kind!r}; allowed: {', '.join(ATTENTION_KINDS)}"
                )
        return kinds

    def _check_ranges(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(self.key("dropout"), f"must be in [0, 1), got {self.dropout}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ConfigError(self.key(name), f"must be > 0, got {getattr(self, name)}")
        for name in ("mask_id", "pad_id"):
            v = getattr(self, name)
            if not 0 <= v < self.vocab_size:
                raise ConfigError(self.key(name), f"{name}={v} must be inside the vocabulary [0, {self.vocab_size})")
        if self.mask_id == self.pad_id:
            raise ConfigError(self.key("mask_id"), f"mask_id and pad_id must differ, both are {self.mask_id}")

    def _positive(self, name: str) -> None:
        value = getattr(self, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(self.key(name), f"must be a positive integer, got {value!r}")
