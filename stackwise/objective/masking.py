"""Masking schedules and masks: which token ids of a sequence become `[MASK]`.

Masked diffusion over token positions (MDLM / LLaDA): per sequence draw a rate `t`, replace
`round(t * n_valid)` of its non-pad token ids with `[MASK]` and train the model to recover them.

Every mask is a pure function of `(seed, example index, view)`: each example gets its own CPU
generator `stackwise.utils.generator(seed, "mask", index, view)`, which draws first the uniform
`u` that the schedule turns into `t`, then one score per position; the `n` valid positions with
the lowest scores are masked. So the mask of an example does not depend on the batch it sits in,
on the device, or on anything drawn before it, and a stage reading the activation cache sees the
very masks stage 1 drew (tests/test_masking.py, and tests/test_pipeline.py for the cache).

Schedules (`masking.schedule`), each `rate(u (B,), k, progress) -> t (B,)`:
    uniform     t = min + (max - min) * u                        (MDLM / LLaDA)
    fixed       t = rate                                         (0.15 = BERT-style MLM)
    per_layer   t = t_k, stage k's own rate: rates[k-1], or linear between min and max over the
                layer stages k = 1..K (K = n_layers - layerwise.top_layers): `per_layer_order`
                ascending from min (k=1) to max (k=K), or descending from max to min (later
                stages at lower rates)
    curriculum  t = min + (max - min) * u * max(progress, 0.1)   the upper bound grows with training
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from stackwise.errors import ConfigError
from stackwise.structured import Structured
from stackwise.utils import generator

SCHEDULES = ("uniform", "fixed", "per_layer", "curriculum")
WEIGHTINGS = ("mean", "elbo")
ORDERS = ("ascending", "descending")

# curriculum: the fraction of the [min, max] range open at progress 0, so the first steps do not
# all train at exactly t = min (a degenerate, nearly unmasked task)
CURRICULUM_START = 0.1


# ---------------------------------------------------------------------------------------- config
@dataclass
class MaskingConfig(Structured):
    """The `masking` node (stackwise/structured.py); `validate(n_stages)` adds the per-layer length check."""

    PATH = "masking"

    schedule: str = "uniform"
    mask_fraction_min: float = 0.15
    mask_fraction_max: float = 0.90
    rate: float = 0.15  # the `fixed` schedule's rate
    rates: list[float] | None = None  # `per_layer`: one rate per layer stage (None = linear, see per_layer_order)
    per_layer_order: str = "ascending"  # `per_layer` without rates: min -> max over the stages, or max -> min
    weighting: str = "mean"  # mean over masked tokens | elbo (1/t weights, the MDLM/LLaDA bound)

    def __post_init__(self) -> None:
        if self.rates is not None:
            self.rates = list(self.rates)
        self.validate()

    def mean_rate(self) -> float:
        """The average fraction of masked positions over training (for FLOP counts, not for masking):
        the schedule's mean rate; `curriculum` is counted at its final range."""
        if self.schedule == "fixed":
            return self.rate
        if self.schedule == "per_layer" and self.rates:
            return sum(self.rates) / len(self.rates)
        return (self.mask_fraction_min + self.mask_fraction_max) / 2

    def validate(self, n_layers: int | None = None) -> None:
        """Raise ConfigError naming the bad value. `n_layers` (the layer stages: n_layers -
        layerwise.top_layers) = None skips the per-layer length check."""
        if self.per_layer_order not in ORDERS:
            raise ConfigError(
                self.key("per_layer_order"),
                f"unknown order {self.per_layer_order!r}; allowed: {', '.join(ORDERS)}",
            )
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                self.key("schedule"), f"unknown schedule {self.schedule!r}; allowed: {', '.join(SCHEDULES)}"
            )
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(
                self.key("weighting"), f"unknown weighting {self.weighting!r}; allowed: {', '.join(WEIGHTINGS)}"
            )
        lo, hi = self.mask_fraction_min, self.mask_fraction_max
        if not 0.0 < lo <= 1.0:
            raise ConfigError(self.key("mask_fraction_min"), f"must be in (0, 1], got {lo}")
        if not 0.0 < hi <= 1.0:
            raise ConfigError(self.key("mask_fraction_max"), f"must be in (0, 1], got {hi}")
        if lo > hi:
            raise ConfigError(
                self.key("mask_fraction_min"),
                f"must be <= mask_fraction_max={hi}, got {lo} (need 0 < min <= max <= 1)",
            )
        if not 0.0 < self.rate <= 1.0:
            raise ConfigError(self.key("rate"), f"must be in (0, 1], got {self.rate}")
        if self.rates is not None:
            for i, r in enumerate(self.rates):
                if not 0.0 < r <= 1.0:
                    raise ConfigError(f"{self.key('rates')}[{i}]", f"must be in (0, 1], got {r}")
            if n_layers is not None and len(self.rates) != n_layers:
                raise ConfigError(
                    self.key("rates"),
                    f"has {len(self.rates)} entries for {n_layers} layer stages (n_layers - layerwise.top_layers); "
                    "give one rate per stage, or null for linear from min to max",
                )


# ------------------------------------------------------------------------------------- schedules
@dataclass(frozen=True)
class UniformSchedule:
    lo: float
    hi: float

    def rate(self, u: Tensor, k: int, progress: float) -> Tensor:
        return self.lo + (self.hi - self.lo) * u  # (B,)


@dataclass(frozen=True)
class FixedSchedule:
    value: float

    def rate(self, u: Tensor, k: int, progress: float) -> Tensor:
        return torch.full_like(u, self.value)


@dataclass(frozen=True)
class PerLayerSchedule:
    rates: tuple  # rates[k-1] is stage k's rate

    def rate(self, u: Tensor, k: int, progress: float) -> Tensor:
        if not 1 <= k <= len(self.rates):
            raise ValueError(f"per_layer schedule: stage index k={k} outside 1..{len(self.rates)}")
        return torch.full_like(u, self.rates[k - 1])


@dataclass(frozen=True)
class CurriculumSchedule:
    """t ~ U[lo, lo + (hi - lo) * p'], p' = max(progress, 0.1): harder (more masked) as training goes.

    At progress 1 (validation, caching, the end of training) it is the uniform schedule.
    """

    lo: float
    hi: float

    def rate(self, u: Tensor, k: int, progress: float) -> Tensor:
        p = min(1.0, max(float(progress), CURRICULUM_START))
        return self.lo + (self.hi - self.lo) * u * p


Schedule = UniformSchedule | FixedSchedule | PerLayerSchedule | CurriculumSchedule


def build_schedule(cfg: MaskingConfig, n_layers: int) -> Schedule:
    """`n_layers`: the layer stages (n_layers - layerwise.top_layers), over which per_layer spreads its rates."""
    cfg.validate(n_layers)
    lo, hi = cfg.mask_fraction_min, cfg.mask_fraction_max
    if cfg.schedule == "uniform":
        return UniformSchedule(lo, hi)
    if cfg.schedule == "fixed":
        return FixedSchedule(cfg.rate)
    if cfg.schedule == "curriculum":
        return CurriculumSchedule(lo, hi)
    if cfg.rates is not None:
        return PerLayerSchedule(tuple(float(r) for r in cfg.rates))
    # one layer: its only stage trains at `min` (ascending) or `max` (descending)
    step = (hi - lo) / (n_layers - 1) if n_layers > 1 else 0.0
    rates = tuple(lo + step * i for i in range(n_layers))
    return PerLayerSchedule(
        rates if cfg.per_layer_order == "ascending" else tuple(hi - step * i for i in range(n_layers))
    )


# ----------------------------------------------------------------------------------------- masks
def mask_batch(
    ids: Tensor,
    index: Tensor,
    view: Tensor,
    *,
    seed: int,
    schedule: Schedule,
    k: int,
    progress: float,
    mask_id: int,
    pad_id: int | None,
    u: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Mask a batch of token ids.

    ids (B, T) long; index (B,) example indices; view (B,) view numbers (any ints, negative ones too).
    u: optional (B,) uniforms in [0, 1) replacing the drawn ones (stratified / antithetic evaluation);
       the per-position scores are drawn all the same, so only the number of masked positions changes.
    Returns masked_ids (B, T) long, mask (B, T) bool (True = replaced by [MASK]), t (B,) float32,
    all on ids.device. Padding (ids == pad_id) is never masked; a sequence with any non-pad token
    gets at least one masked position.
    """
    device = ids.device
    ids_cpu = ids.detach().to("cpu", torch.long)
    B, T = ids_cpu.shape
    index_l, view_l = _as_list(index, B, "index"), _as_list(view, B, "view")

    # The only per-example work: one generator each, so an example's draw is independent of the batch.
    u_drawn = torch.empty(B)
    scores = torch.empty(B, T)
    for b in range(B):
        g = generator(seed, "mask", index_l[b], view_l[b])
        u_drawn[b] = torch.rand((), generator=g)
        scores[b] = torch.rand(T, generator=g)
    if u is not None:
        u_drawn = u.detach().to("cpu", torch.float32).reshape(B)

    t = schedule.rate(u_drawn, k, progress).to(torch.float32)  # (B,)
    valid = torch.ones_like(ids_cpu, dtype=torch.bool) if pad_id is None else ids_cpu != pad_id  # (B, T)
    n_valid = valid.sum(1)  # (B,)
    # round to nearest, then at least one and at most all valid positions
    n = torch.minimum(torch.clamp(torch.round(t.double() * n_valid).long(), min=1), n_valid)  # (B,)

    # rank of each position among its row's scores (padding last); mask the n lowest ranks
    scores = scores.masked_fill(~valid, float("inf"))
    order = scores.argsort(dim=1)  # (B, T)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(T).expand(B, T))
    mask = (ranks < n[:, None]) & valid  # (B, T)
    masked = ids_cpu.masked_fill(mask, mask_id)
    return masked.to(device), mask.to(device), t.to(device)


def _as_list(x: Any, B: int, name: str) -> list[int]:
    values = x.reshape(-1).tolist() if isinstance(x, Tensor) else [int(v) for v in x]
    if len(values) != B:
        raise ValueError(f"mask_batch: {name} has {len(values)} entries for a batch of {B}")
    return [int(v) for v in values]
