"""The objective: masking schedules, masks drawn from (seed, example, view), the masked-position loss."""

from __future__ import annotations

import itertools
import math
from importlib import resources

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from stackwise.errors import ConfigError
from stackwise.objective.loss import masked_loss
from stackwise.objective.masking import (
    CURRICULUM_START,
    SCHEDULES,
    CurriculumSchedule,
    FixedSchedule,
    MaskingConfig,
    PerLayerSchedule,
    UniformSchedule,
    build_schedule,
    mask_batch,
)

MASK, PAD = 100, 101
UNIFORM = UniformSchedule(0.15, 0.90)


def _ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(seed))


def _mask(ids, index, view=None, *, seed=0, schedule=UNIFORM, k=1, progress=1.0, pad_id=PAD, u=None):
    index = torch.as_tensor(index)
    view = torch.zeros_like(index) if view is None else torch.as_tensor(view)
    return mask_batch(
        ids, index, view, seed=seed, schedule=schedule, k=k, progress=progress, mask_id=MASK, pad_id=pad_id, u=u
    )


# ---------------------------------------------------------------------------------- determinism
def test_masks_reproducible_and_independent_of_batch_composition():
    ids = _ids(4, 24)
    index = [11, 3, 250, 7]
    masked, mask, t = _mask(ids, index)
    again = _mask(ids.clone(), index)
    assert torch.equal(masked, again[0]) and torch.equal(mask, again[1]) and torch.equal(t, again[2])

    # each example alone, and the batch reversed (with other neighbours), gives the same row
    for b in range(4):
        m1, k1, t1 = _mask(ids[b : b + 1], [index[b]])
        assert torch.equal(k1[0], mask[b]) and torch.equal(m1[0], masked[b]) and t1[0] == t[b]
    perm = [3, 1, 0, 2]
    _, mask_p, t_p = _mask(torch.cat([ids[perm], _ids(2, 24, seed=9)]), [index[i] for i in perm] + [99, 98])
    assert torch.equal(mask_p[:4], mask[perm]) and torch.equal(t_p[:4], t[perm])

    # anything drawn from the global RNG before does not matter
    torch.manual_seed(12345)
    torch.rand(1000)
    assert torch.equal(_mask(ids, index)[1], mask)


def test_masks_depend_on_seed_index_and_view():
    ids = _ids(1, 64).expand(3, 64).clone()  # the same tokens three times
    _, base, _ = _mask(ids[:1], [5])
    _, by_index, _ = _mask(ids, [5, 6, 7])
    assert torch.equal(by_index[0], base[0])
    assert not torch.equal(by_index[1], base[0]) and not torch.equal(by_index[2], base[0])
    _, by_view, _ = _mask(ids, [5, 5, 5], [0, 1, -1])  # negative views are allowed (eval uses them)
    assert torch.equal(by_view[0], base[0]) and not torch.equal(by_view[1], base[0])
    assert not torch.equal(by_view[2], by_view[1])
    _, other_seed, _ = _mask(ids[:1], [5], seed=1)
    assert not torch.equal(other_seed[0], base[0])


def test_masked_ids_replace_exactly_the_mask():
    ids = _ids(3, 40)
    masked, mask, _ = _mask(ids, [0, 1, 2])
    assert masked.dtype == torch.long and mask.dtype == torch.bool and mask.shape == ids.shape
    assert torch.all(masked[mask] == MASK)
    assert torch.equal(masked[~mask], ids[~mask])
    assert not torch.equal(ids, masked)  # the input is not modified in place, the output is
    assert not torch.any(ids == MASK)


# --------------------------------------------------------------------------- padding / at least one
def test_never_masks_padding_and_at_least_one_masked():
    T = 16
    ids = _ids(5, T)
    n_valid = [16, 9, 1, 0, 3]
    for b, n in enumerate(n_valid):
        ids[b, n:] = PAD
    ids[4] = torch.tensor([PAD] * 13 + [1, 2, 3])  # left padding too
    valid = ids != PAD
    for schedule in (UNIFORM, FixedSchedule(1.0), FixedSchedule(0.01)):
        masked, mask, _t = _mask(ids, list(range(5)), schedule=schedule)
        assert not torch.any(mask & ~valid), schedule
        assert torch.all(masked[~valid] == PAD)
        counts = mask.sum(1)
        assert counts[3] == 0  # all padding: nothing to mask
        assert torch.all(counts[[0, 1, 2, 4]] >= 1), (schedule, counts)
        assert torch.all(counts <= valid.sum(1))
    # rate 1 masks every non-pad token, rate 0.01 masks exactly one
    _, mask, _ = _mask(ids, list(range(5)), schedule=FixedSchedule(1.0))
    assert torch.equal(mask, valid)
    _, mask, _ = _mask(ids, list(range(5)), schedule=FixedSchedule(0.01))
    assert mask.sum(1).tolist() == [1, 1, 1, 0, 1]


def test_pad_id_none_masks_any_position():
    ids = torch.full((2, 10), PAD)  # PAD is an ordinary token when pad_id is None
    _, mask, _ = _mask(ids, [0, 1], schedule=FixedSchedule(0.5), pad_id=None)
    assert mask.sum(1).tolist() == [5, 5]


# ------------------------------------------------------------------------------------- schedules
def test_uniform_t_within_bounds_and_spread():
    lo, hi = 0.2, 0.7
    B = 400
    _, _, t = _mask(torch.zeros(B, 8, dtype=torch.long), list(range(B)), schedule=UniformSchedule(lo, hi))
    assert t.dtype == torch.float32 and t.shape == (B,)
    assert torch.all(t >= lo) and torch.all(t <= hi)
    # spread over the whole range, not a constant
    assert t.min() < lo + 0.05 and t.max() > hi - 0.05
    assert abs(t.mean().item() - (lo + hi) / 2) < 0.05
    # u given: t = lo + (hi - lo) u exactly
    u = torch.tensor([0.0, 0.5, 1.0])
    _, _, t = _mask(torch.zeros(3, 8, dtype=torch.long), [0, 1, 2], schedule=UniformSchedule(lo, hi), u=u)
    assert torch.allclose(t, torch.tensor([lo, (lo + hi) / 2, hi]))


def test_fixed_rate():
    _, mask, t = _mask(torch.zeros(6, 40, dtype=torch.long), list(range(6)), schedule=FixedSchedule(0.15))
    assert torch.all(t == torch.tensor(0.15, dtype=torch.float32))
    assert mask.sum(1).tolist() == [round(0.15 * 40)] * 6  # exactly 6 of 40 in every row
    cfg = MaskingConfig.from_dict({"schedule": "fixed", "rate": 0.3})
    assert build_schedule(cfg, 4) == FixedSchedule(0.3)


def test_per_layer_rate_depends_on_stage_index():
    L = 4
    sched = build_schedule(MaskingConfig(schedule="per_layer", mask_fraction_min=0.15, mask_fraction_max=0.9), L)
    u = torch.rand(5)
    rates = [sched.rate(u, k, 0.3) for k in range(1, L + 1)]
    for r in rates:
        assert torch.all(r == r[0])  # one rate per stage, whatever u
    values = [r[0].item() for r in rates]
    assert values == pytest.approx([0.15, 0.4, 0.65, 0.9])  # linear from min (k=1) to max (k=L)
    # through mask_batch: stage 4 masks more of the same sequence than stage 1
    ids = _ids(2, 40)
    n1 = _mask(ids, [0, 1], schedule=sched, k=1)[1].sum().item()
    n4 = _mask(ids, [0, 1], schedule=sched, k=4)[1].sum().item()
    assert n1 == 2 * round(0.15 * 40) and n4 == 2 * round(0.9 * 40)

    explicit = build_schedule(MaskingConfig(schedule="per_layer", rates=[0.5, 0.25]), 2)
    assert explicit.rate(u, 1, 0.0)[0].item() == 0.5 and explicit.rate(u, 2, 0.0)[0].item() == 0.25
    with pytest.raises(ValueError, match="k=3"):
        explicit.rate(u, 3, 0.0)
    # one layer: its only stage trains at min
    assert build_schedule(MaskingConfig(schedule="per_layer"), 1) == PerLayerSchedule((0.15,))


def test_per_layer_descending_gives_later_stages_lower_rates():
    """Later stages at lower rates: masking.per_layer_order=descending (linear from max to min), or
    any list of rates (masking.rates=[0.6,0.45,0.3,0.2])."""
    cfg = MaskingConfig(
        schedule="per_layer", mask_fraction_min=0.15, mask_fraction_max=0.9, per_layer_order="descending"
    )
    u = torch.rand(3)
    values = [build_schedule(cfg, 4).rate(u, k, 0.0)[0].item() for k in range(1, 5)]
    assert values == pytest.approx([0.9, 0.65, 0.4, 0.15])
    assert build_schedule(cfg, 1) == PerLayerSchedule((0.9,))
    listed = build_schedule(MaskingConfig(schedule="per_layer", rates=[0.6, 0.45, 0.3, 0.2]), 4)
    assert [listed.rate(u, k, 0.0)[0].item() for k in range(1, 5)] == pytest.approx([0.6, 0.45, 0.3, 0.2])
    # the default order is unchanged: ascending
    assert MaskingConfig().per_layer_order == "ascending"


def test_per_layer_levers_compose_from_the_command_line(make_run):
    run = make_run("model.n_layers=4", "masking=per_layer", "cache.views=4", "masking.per_layer_order=descending")
    assert run.masking.per_layer_order == "descending"
    run = make_run("model.n_layers=4", "masking=per_layer", "cache.views=4", "masking.rates=[0.6,0.45,0.3,0.2]")
    assert run.masking.rates == [0.6, 0.45, 0.3, 0.2]
    with pytest.raises(ConfigError, match="masking.per_layer_order: unknown order 'down'; allowed: ascending"):
        make_run("masking.per_layer_order=down")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["fusion.mask_fraction_min=0"], "fusion.mask_fraction_min"),
        (["fusion.mask_fraction_max=1.5"], "fusion.mask_fraction_max"),
        (["fusion.mask_fraction_min=0.6", "fusion.mask_fraction_max=0.5"], "fusion.mask_fraction_min"),
        (["fusion.mask_fraction_max=0.1"], "fusion.mask_fraction_min"),  # below the masking node's min 0.15
    ],
)
def test_bad_fusion_rates_name_the_value(make_run, overrides, field):
    with pytest.raises(ConfigError) as e:
        make_run(*overrides)
    assert e.value.field == field and "\n" not in str(e.value)


def test_the_fine_tune_trains_at_its_own_rates_and_validates_at_the_masking_nodes(make_run):
    from stackwise.pipeline import Pipeline, Stage

    run = make_run("fusion.mask_fraction_min=0.05", "fusion.mask_fraction_max=0.1")
    assert run.finetune_rates() == (0.05, 0.1)
    # a null bound is the masking node's
    assert make_run("fusion.mask_fraction_max=0.5", name="c").finetune_rates() == (0.15, 0.5)
    inputs = Pipeline(run).inputs
    finetune = inputs.tokens(Stage.finetune(run.model.n_layers), 4)
    t = torch.cat([b["t"] for b in finetune.train_dataloader()])
    assert len(t) > 0 and bool(((t >= 0.05) & (t <= 0.1)).all())
    # validation (and the fusion check against the last stage) keep the masking node's rates
    val = torch.cat([b["t"] for b in finetune.val_dataloader()])
    assert float(val.max()) > 0.1 and float(val.min()) >= run.masking.mask_fraction_min
    # the layer stages and e2e are untouched by it
    for stage in (Stage.layer(1), Stage.e2e(run.model.n_layers)):
        t = torch.cat([b["t"] for b in inputs.tokens(stage, 4).train_dataloader()])
        assert float(t.max()) > 0.1
    # unset: the fine-tune trains as the masking node says
    default = make_run(name="b")
    assert default.finetune_rates() is None
    assert Pipeline(default).inputs.tokens(Stage.finetune(2), 4).train_schedule is None


def test_curriculum_grows_with_progress():
    lo, hi = 0.15, 0.9
    sched = build_schedule(MaskingConfig(schedule="curriculum", mask_fraction_min=lo, mask_fraction_max=hi), 2)
    assert isinstance(sched, CurriculumSchedule)
    u = torch.rand(2000, generator=torch.Generator().manual_seed(0))
    means, maxes = [], []
    for p in (0.0, 0.25, 0.5, 0.75, 1.0):
        t = sched.rate(u, 1, p)
        assert torch.all(t >= lo) and torch.all(t <= hi + 1e-6)
        means.append(t.mean().item())
        maxes.append(t.max().item())
    assert all(a < b for a, b in itertools.pairwise(means)), means
    assert all(a < b for a, b in itertools.pairwise(maxes)), maxes
    # at the start only the first CURRICULUM_START of the range is open; at the end it is the uniform one
    assert maxes[0] <= lo + CURRICULUM_START * (hi - lo) + 1e-6
    assert torch.allclose(sched.rate(u, 1, 1.0), UniformSchedule(lo, hi).rate(u, 1, 0.0))
    assert torch.allclose(sched.rate(u, 1, 7.0), sched.rate(u, 1, 1.0))  # progress past 1 is clamped
    # through mask_batch: more positions masked late in training, same seeds
    ids = _ids(64, 32)
    early = _mask(ids, list(range(64)), schedule=sched, progress=0.0)[1].sum()
    late = _mask(ids, list(range(64)), schedule=sched, progress=1.0)[1].sum()
    assert late > 2 * early


def test_masked_fraction_matches_t():
    T = 50
    ids = _ids(300, T)
    ids[::3, 40:] = PAD  # every third row has 40 valid tokens
    _, mask, t = _mask(ids, list(range(300)))
    n_valid = (ids != PAD).sum(1)
    expected = torch.clamp(torch.round(t.double() * n_valid).long(), min=1)
    assert torch.equal(mask.sum(1), expected)  # exactly round(t * n_valid) per row
    frac = mask.sum(1) / n_valid
    assert torch.all((frac - t).abs() <= 0.5 / n_valid + 1e-6)
    assert abs(frac.mean().item() - t.mean().item()) < 0.01


def test_u_override_nests_masks():
    """With u given only the count changes: a lower rate's mask is a subset of a higher one's."""
    ids = _ids(1, 40).expand(3, 40).clone()
    _, mask, t = _mask(ids, [4, 4, 4], u=torch.tensor([0.1, 0.5, 0.9]))
    assert torch.all(t[:-1] < t[1:])
    assert torch.all(mask[0] <= mask[1]) and torch.all(mask[1] <= mask[2])
    assert mask[0].sum() < mask[1].sum() < mask[2].sum()


# --------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "d, field",
    [
        ({"mask_fraction_min": 0.8, "mask_fraction_max": 0.5}, "masking.mask_fraction_min"),
        ({"schedule": "cosine"}, "masking.schedule"),
        ({"weighting": "sum"}, "masking.weighting"),
        ({"mask_fraction_min": 0.0}, "masking.mask_fraction_min"),
        ({"mask_fraction_max": 1.5}, "masking.mask_fraction_max"),
        ({"mask_fraction_min": "0.1"}, "masking.mask_fraction_min"),
        ({"rate": 0}, "masking.rate"),
        ({"rate": True}, "masking.rate"),
        ({"rates": [0.2, 1.2]}, "masking.rates[1]"),
        ({"rates": "0.2"}, "masking.rates"),
        ({"schedule": 3}, "masking.schedule"),
        ({"per_layer_order": "down"}, "masking.per_layer_order"),
        ({"mask_fracton_min": 0.1}, "masking.mask_fracton_min"),
    ],
)
def test_bad_config_raises_config_error_naming_field(d, field):
    with pytest.raises(ConfigError) as e:
        MaskingConfig.from_dict(d)
    assert e.value.field == field
    assert str(e.value).startswith(field + ":")


def test_rates_length_checked_against_n_layers():
    cfg = MaskingConfig.from_dict({"schedule": "per_layer", "rates": [0.2, 0.4, 0.6]})
    cfg.validate(3)
    with pytest.raises(ConfigError) as e:
        build_schedule(cfg, 4)
    assert e.value.field == "masking.rates" and "4 layer stages" in str(e.value)
    # build_schedule validates a hand-built config too
    with pytest.raises(ConfigError, match="masking.schedule"):
        build_schedule(MaskingConfig(schedule="linear"), 2)


def test_shipped_masking_groups_are_valid():
    names = []
    for f in resources.files("stackwise.conf").joinpath("masking").iterdir():
        if f.name.endswith(".yaml"):
            cfg = MaskingConfig.from_dict(OmegaConf.to_container(OmegaConf.create(f.read_text())))
            assert cfg.schedule in SCHEDULES
            build_schedule(cfg, 3)
            names.append(cfg.schedule)
    assert sorted(names) == sorted(SCHEDULES)


# ------------------------------------------------------------------------------------------ loss
class RecordingHead:
    """A linear head that records the shape of every input it is given."""

    def __init__(self, D: int, V: int, seed: int = 0):
        self.W = torch.randn(D, V, generator=torch.Generator().manual_seed(seed))
        self.shapes: list[tuple] = []

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(h.shape))
        return h @ self.W


def _loss_batch(B=3, T=6, D=4, V=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g)
    targets = torch.randint(0, V - 1, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.5
    mask[:, 0] = True  # every row has at least one
    t = torch.tensor([0.2, 0.5, 0.8])[:B]
    return hidden, targets, mask, t


def test_head_runs_only_on_masked_positions():
    hidden, targets, mask, t = _loss_batch()
    hidden.requires_grad_(True)
    head = RecordingHead(4, 7)
    out = masked_loss(hidden, targets, mask, t, head, "mean")
    n = int(mask.sum())
    assert head.shapes == [(n, 4)] and n < mask.numel()
    assert out.n_masked.item() == n
    out.loss.backward()
    # the unmasked hidden states get no gradient at all
    assert torch.all(hidden.grad[~mask] == 0)
    assert torch.all(hidden.grad[mask].abs().sum(-1) > 0)


def test_mean_and_elbo_weighting_match_hand_computation():
    hidden, targets, mask, t = _loss_batch()
    PADT = 6  # the last id is padding in this test
    targets[2, 4:] = PADT
    mask[2, 4:] = False
    head = RecordingHead(4, 7)
    logp = F.log_softmax(hidden @ head.W, -1)  # (B, T, V) computed by hand over the whole grid
    ce_sum, weighted, n_masked = 0.0, 0.0, 0
    for b in range(3):
        for i in range(6):
            if mask[b, i]:
                ce = -logp[b, i, targets[b, i]].item()
                ce_sum += ce
                weighted += ce / t[b].item()
                n_masked += 1
    n_tokens = 3 * 6 - 2

    mean = masked_loss(hidden, targets, mask, t, head, "mean", pad_id=PADT)
    elbo = masked_loss(hidden, targets, mask, t, head, "elbo", pad_id=PADT)
    assert mean.loss.item() == pytest.approx(ce_sum / n_masked, rel=1e-5)
    assert elbo.loss.item() == pytest.approx(weighted / n_tokens, rel=1e-5)
    assert mean.ce_sum.item() == pytest.approx(ce_sum, rel=1e-5) and elbo.ce_sum.item() == pytest.approx(
        ce_sum, rel=1e-5
    )
    assert mean.n_tokens.item() == n_tokens and mean.n_masked.item() == n_masked
    assert not mean.ce_sum.requires_grad
    # without pad_id every position counts in the elbo denominator
    elbo_nopad = masked_loss(hidden, targets, mask, t, head, "elbo")
    assert elbo_nopad.n_tokens.item() == 18
    assert elbo_nopad.loss.item() == pytest.approx(weighted / 18, rel=1e-5)
    # elbo weighs low-t rows more: not a rescaled mean
    assert elbo.loss.item() != pytest.approx(mean.loss.item() * n_masked / n_tokens, rel=1e-3)


def test_elbo_equals_mean_times_fraction_at_constant_t():
    """At one t for every row with exactly t*n masked, sum CE / t / n == mean CE (the bound's sanity)."""
    B, T, D, V = 2, 10, 4, 5
    hidden = torch.randn(B, T, D, generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, :4] = True
    t = torch.full((B,), 0.4)
    head = RecordingHead(D, V)
    mean = masked_loss(hidden, targets, mask, t, head, "mean").loss
    elbo = masked_loss(hidden, targets, mask, t, head, "elbo").loss
    assert elbo.item() == pytest.approx(mean.item(), rel=1e-5)


def test_masked_accuracy():
    B, _T, V = 2, 5, 4
    targets = torch.tensor([[0, 1, 2, 3, 0], [3, 2, 1, 0, 3]])
    # one-hot hidden states of a prediction, identity head: the argmax is the prediction
    pred = targets.clone()
    pred[0, 1] = 2  # wrong, masked
    pred[1, 0] = 0  # wrong, masked
    pred[1, 4] = 1  # wrong, NOT masked: must not count
    hidden = F.one_hot(pred, V).float()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    out = masked_loss(hidden, targets, mask, torch.full((B,), 0.5), lambda h: 10 * h, "mean")
    assert out.n_masked.item() == 5 and out.n_correct.item() == 3


def test_bf16_head_output_is_upcast_and_empty_mask_is_finite():
    hidden, targets, mask, t = _loss_batch()
    head = RecordingHead(4, 7)
    out = masked_loss(hidden, targets, mask, t, lambda h: head(h).bfloat16(), "elbo")
    assert out.ce_sum.dtype == torch.float32
    none = torch.zeros_like(mask)
    for w in ("mean", "elbo"):
        o = masked_loss(hidden, targets, none, t, head, w)
        assert o.n_masked.item() == 0 and o.loss.item() == 0.0 and math.isfinite(o.loss.item())
    with pytest.raises(ValueError, match="weighting"):
        masked_loss(hidden, targets, mask, t, head, "sum")


def test_mean_rate_of_each_schedule():
    assert MaskingConfig().mean_rate() == pytest.approx((0.15 + 0.90) / 2)
    assert MaskingConfig(schedule="fixed", rate=0.15).mean_rate() == 0.15
    assert MaskingConfig(schedule="per_layer", rates=[0.2, 0.4]).mean_rate() == pytest.approx(0.3)
