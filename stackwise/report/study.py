"""The depth study's report (benchmarks/depth_study.py): layer-wise vs e2e at equal tokens and at equal wall time.

    write_study_report(root)  -> root/study.md, root/study_depth.png, root/study_gaps.png

A study folder holds `study.json` (the plan: one chain per depth L, budget, lever and seed) and, per
chain, two experiment folders: `runs/<id>/` (stage=all, then e2e at equal tokens, with the
`eval.json` of stackwise-eval) and `runs/<id>-wall/` (e2e at equal wall time, its `eval.json`). All
numbers come from those files: nothing is recomputed, and a chain not finished yet is left out (and
named). Every model of one seed is scored on the same validation masks (stackwise/evaluation), so
the gaps compare like with like.

- bound: the masked-diffusion upper bound on -log p(x), in bits/byte (bits/token on data without bytes);
- gap = (layer-wise - e2e) / e2e, the layer-wise model being the fine-tuned one (fused without a
  fine-tune), in the bound and in masked CE at each fixed rate; mean ± sample std over seeds;
- within noise: one seed, and the paired difference of the bound (same masks) within 2 standard errors.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib import colormaps
from matplotlib.lines import Line2D

from stackwise import artifacts as art
from stackwise.errors import StackWiseError
from stackwise.report.formats import fmt_seconds, fmt_tokens
from stackwise.report.markdown import md_table
from stackwise.report.plots import _new_figure, png_bytes

STUDY_JSON = "study.json"
STUDY_MD = "study.md"
STUDY_DEPTH_PNG = "study_depth.png"
STUDY_GAPS_PNG = "study_gaps.png"
SAMPLERS_JSON = "samplers.json"  # per chain, in runs/<id>/ (benchmarks/depth_study.py --samplers)


@dataclass
class Score:
    """One model's numbers from eval.json."""

    bound: float  # bits/byte (or bits/token)
    ce: dict[str, float]  # rate key ("0.15") -> masked CE, nats/token
    paired: tuple[float, float | None] | None = None  # (bound - reference's, its se), nats/token
    nats: float = math.nan  # the bound in nats/token


@dataclass
class ChainResult:
    id: str
    L: int
    budget: float
    lever: str
    seed: int
    unit: str = "bits/byte"
    curve: list[float] = field(default_factory=list)  # the bound of depth prefixes 1..L
    # each layer stage's own validation loss, k = 1..: what "every layer lowers" falls back on when the
    # bound by depth is not drawn (layerwise.top_layers > 0 keeps only the latest stage's top segment)
    stage_losses: list[float] = field(default_factory=list)
    fused: Score | None = None
    finetuned: Score | None = None
    e2e: Score | None = None  # equal tokens
    wall: Score | None = None  # equal wall time
    lw_seconds: float | None = None
    lw_tokens: int | None = None
    e2e_seconds: float | None = None
    wall_seconds: float | None = None
    wall_tokens: int | None = None
    wall_steps: int | None = None
    wall_uncapped: int | None = None  # the steps the measured times asked for, above --wall-cap
    extrapolated: bool = False  # a stage was resumed: its seconds before the kill are extrapolated
    samplers: dict | None = None  # benchmarks/samplers.py's report on the chain's models (depth_study --samplers)

    @property
    def layerwise(self) -> Score | None:
        return self.finetuned or self.fused

    def gap(self, ref: Score | None, rate: str | None = None) -> float | None:
        lw = self.layerwise
        if lw is None or ref is None:
            return None
        a, b = (lw.bound, ref.bound) if rate is None else (lw.ce.get(rate), ref.ce.get(rate))
        if a is None or b is None or b == 0:
            return None
        return (a - b) / b

    @property
    def lowers_from_stages(self) -> bool:
        """Whether `lowers` reads the stages' validation losses (no bound by depth was drawn)."""
        return len(self.curve) < 2 and len(self.stage_losses) >= 2

    def lowers(self) -> bool | None:
        seq = self.stage_losses if self.lowers_from_stages else self.curve
        if len(seq) < 2:
            return None
        return all(b < a for a, b in itertools.pairwise(seq))

    def within_noise(self) -> bool | None:
        lw = self.layerwise
        if lw is None or lw.paired is None or lw.paired[1] is None:
            return None
        return abs(lw.paired[0]) < 2 * lw.paired[1]

    @property
    def wall_ratio(self) -> float | None:
        if self.wall_seconds is None or not self.lw_seconds:
            return None
        return self.wall_seconds / self.lw_seconds


def _score(m: dict, key: str) -> Score:
    b = m["bound"]
    bound = b.get("bits_per_byte") if key == "bits/byte" else b.get("bits_per_token")
    paired = m.get("paired")
    return Score(
        bound=float(bound if bound is not None else b["bits_per_token"]),
        ce={r: float(v["ce"]) for r, v in m["rates"].items()},
        paired=(float(paired["delta_nats_per_token"]), paired.get("se")) if paired else None,
        nats=float(b["nats_per_token"]),
    )


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _records(folder: Path) -> dict[str, dict]:
    recs = art.read_results(art.ExperimentPaths(folder)) if (folder / "results.json").is_file() else []
    return {str(r.get("stage")): r for r in recs}


def full_seconds(rec: dict, steps: int | None) -> tuple[float, bool]:
    """(a stage's seconds, extrapolated?): a stage resumed from a checkpoint records the seconds of
    the process that finished it only; the steps run before the kill are counted at the same rate."""
    r, seconds = int(rec.get("resumed_from_step") or 0), float(rec["seconds"])
    if steps and 0 < r < steps:
        return seconds * steps / (steps - r), True
    return seconds, False


def layerwise_seconds(recs: dict[str, dict], steps: dict[str, int]) -> tuple[float | None, bool]:
    """(the layer-wise run's seconds: every stage's training, scoring and caching, fusion and the
    fine-tune, as its fine-tuned (or fused) record counts them, with resumed stages extrapolated
    (`full_seconds`), extrapolated?). `steps`: {"embed", "layer", "finetune"} steps a stage."""
    final = recs.get("finetuned") or recs.get("fused")
    if final is None:
        return None, False
    total, extra = float(final["seconds"]), False
    for rec in recs.values():
        if rec.get("kind") == "layer":
            full, ext = full_seconds(rec, steps.get("embed" if int(rec.get("k", 0)) == 1 else "layer"))
            total, extra = total + full - float(rec["seconds"]), extra or ext
    if "finetuned" in recs and "fused" in recs:
        own = {**recs["finetuned"], "seconds": float(recs["finetuned"]["seconds"]) - float(recs["fused"]["seconds"])}
        full, ext = full_seconds(own, steps.get("finetune"))
        total, extra = total + full - own["seconds"], extra or ext
    return total, extra


def load_chain(root: Path, chain: dict) -> ChainResult:
    res = ChainResult(chain["id"], int(chain["L"]), float(chain["budget"]), chain["lever"], int(chain["seed"]))
    lw_dir, wall_dir = root / "runs" / chain["id"], root / "runs" / f"{chain['id']}-wall"
    ev = _read_json(lw_dir / "eval.json")
    if ev:
        res.unit = ev.get("unit", "bits/byte")
        prefixes = sorted((m for m in ev["models"] if m["kind"] == "prefix"), key=lambda m: m["depth"])
        res.curve = [_score(m, res.unit).bound for m in prefixes]
        for m in ev["models"]:
            if m["name"] in ("fused", "finetuned", "e2e"):
                setattr(res, m["name"], _score(m, res.unit))
    wev = _read_json(wall_dir / "eval.json")
    if wev:
        res.wall = next((_score(m, res.unit) for m in wev["models"] if m["name"] == "e2e"), None)
    steps = chain.get("stage_steps") or {}
    recs = _records(lw_dir)
    layers = sorted(
        (r for r in recs.values() if r.get("kind") == "layer" and "val_loss" in r), key=lambda r: int(r.get("k", 0))
    )
    res.stage_losses = [float(r["val_loss"]) for r in layers]
    final = recs.get("finetuned") or recs.get("fused")
    if final:
        res.lw_seconds, ext = layerwise_seconds(recs, steps)
        res.lw_tokens, res.extrapolated = int(final["tokens"]), ext
    if "e2e" in recs:
        res.e2e_seconds, ext = full_seconds(recs["e2e"], chain.get("lw_steps"))
        res.extrapolated = res.extrapolated or ext
    wall = _read_json(wall_dir / "wall.json")
    if wall:
        res.wall_steps = int(wall["steps"])
        if int(wall.get("uncapped_steps", wall["steps"])) > res.wall_steps:
            res.wall_uncapped = int(wall["uncapped_steps"])
    samplers = _read_json(lw_dir / SAMPLERS_JSON)
    res.samplers = samplers if isinstance(samplers, dict) and "summary" in samplers else None
    wrecs = _records(wall_dir)
    if "e2e" in wrecs:
        res.wall_seconds, ext = full_seconds(wrecs["e2e"], res.wall_steps)
        res.wall_tokens, res.extrapolated = int(wrecs["e2e"]["tokens"]), res.extrapolated or ext
    return res


def load_study(root: str | Path) -> tuple[dict, list[ChainResult]]:
    """(the plan, a ChainResult per chain); StackWiseError (one line) without study.json."""
    root = Path(root)
    plan = _read_json(root / STUDY_JSON)
    if not isinstance(plan, dict) or "chains" not in plan:
        raise StackWiseError(f"{root / STUDY_JSON} is missing or not a depth study plan (benchmarks/depth_study.py)")
    return plan, [load_chain(root, c) for c in plan["chains"]]


# ---------------------------------------------------------------------------------------------- numbers
def mean_std(xs: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def fmt_ms(xs: Sequence[float | None], pct: bool = True, digits: int = 1) -> str:
    """mean ± std over seeds ('+4.4 ± 0.3 %'); the mean alone for one value; '–' for none."""
    m, s, _ = mean_std(xs)
    if m is None:
        return "–"
    k = 100.0 if pct else 1.0
    unit = " %" if pct else ""
    sign = "+" if pct else ""
    body = f"{k * m:{sign}.{digits}f}"
    return body + (f" ± {k * s:.{digits}f}" if s is not None else "") + unit


def _budget(b: float) -> str:
    return f"{b:g}×"


def groups(results: Sequence[ChainResult]) -> dict[tuple, list[ChainResult]]:
    """(L, budget, lever) -> its finished chains (one per seed), in plan order."""
    out: dict[tuple, list[ChainResult]] = {}
    for r in results:
        out.setdefault((r.L, r.budget, r.lever), [])
        if r.layerwise is not None and r.e2e is not None:
            out[(r.L, r.budget, r.lever)].append(r)
    return out


def study_markdown(plan: dict, results: Sequence[ChainResult], pngs: Sequence[str] = ()) -> str:
    rates = [f"{float(r):g}" for r in plan.get("rates", (0.15, 0.5, 0.9))]
    unit = next((r.unit for r in results if r.curve), "bits/byte")
    lines = ["# Depth study: layer-wise vs end-to-end", ""]
    s = plan.get("settings", {})
    if s:
        lines.append(
            f"d_model {s.get('d_model')}, T {s.get('seq_len')}, batch {s.get('batch_size')}, "
            f"{s.get('steps')} steps a layer stage and {s.get('finetune_steps')} fine-tune steps at budget 1×, "
            f"device {plan.get('device')}; eval: {plan.get('bound_samples')} bound draws per sequence, "
            f"{plan.get('eval_sequences') or 'all'} validation sequences."
            + (f" Machine: {s['machine']}." if s.get("machine") else "")
        )
        lines.append("")
    header = ["L", "budget", "lever", "seeds", f"fine-tuned ({unit})", f"e2e ({unit})", "gap, equal tokens"]
    header += ["gap, equal wall time", "wall ratio"]
    header += [f"CE@{r} gap (tokens / wall)" for r in rates] + ["every layer lowers"]
    rows = []
    noise = []
    for (L, budget, lever), rs in groups(results).items():
        if not rs:
            rows.append([str(L), _budget(budget), lever] + ["–"] * (len(header) - 3))  # no finished seed yet
            continue
        lowers = [r.lowers() for r in rs]
        flag = ""
        if len(rs) == 1 and rs[0].within_noise():
            flag = " †"
            noise.append(rs[0].id)
        row = [str(L), _budget(budget), lever, ",".join(str(r.seed) for r in rs)]
        row += [fmt_ms([r.layerwise.bound for r in rs], pct=False, digits=4)]
        row += [fmt_ms([r.e2e.bound for r in rs], pct=False, digits=4)]
        row += [fmt_ms([r.gap(r.e2e) for r in rs]) + flag, fmt_ms([r.gap(r.wall) for r in rs])]
        row += [fmt_ms([r.wall_ratio for r in rs], pct=False, digits=2)]
        for rate in rates:
            row.append(f"{fmt_ms([r.gap(r.e2e, rate) for r in rs])} / {fmt_ms([r.gap(r.wall, rate) for r in rs])}")
        row.append(
            f"{sum(1 for x in lowers if x)}/{len(lowers)}" + (" ‡" if any(r.lowers_from_stages for r in rs) else "")
        )
        rows.append(row)
    lines += md_table(header, "rrlr" + "r" * (len(header) - 4), rows)
    lines += [
        "",
        f"Bound: the masked-diffusion upper bound on −log p(x) in {unit}, on the validation split, the same masks "
        "for every model of a seed. gap = (layer-wise − e2e) / e2e, the layer-wise model being the fine-tuned one "
        "(fused without a fine-tune); negative = better than e2e. Equal tokens: e2e trained for the layer-wise "
        "total of steps (fine-tune included). Equal wall time: e2e trained for the steps its measured rate fits "
        "into the layer-wise run's seconds; wall ratio = that run's seconds / the layer-wise run's. CE@r: masked "
        "cross-entropy with a fraction r of the tokens masked. Every layer lowers: seeds whose bound falls at "
        "every depth k−1 → k (‡: the bound by depth is not drawn for a run with a top segment, "
        "layerwise.top_layers, so its stages' own validation losses are read instead). Mean ± sample std over seeds.",
    ]
    if noise:
        lines.append(
            f"† within noise (paired difference of the bound within 2 standard errors, one seed): "
            f"run these with `--seeds 0 1 2`: {', '.join(noise)}."
        )
    missing = [r.id for r in results if r.layerwise is None or r.e2e is None or r.wall is None]
    if missing:
        lines.append(f"Not finished (left out, or without the wall-time column): {', '.join(missing)}.")
    lines += ["", "## Per run", ""]
    header2 = ["run", f"bound by depth k = 1..L ({unit})", "fused", "fine-tuned", "e2e (tokens)", "e2e (wall)"]
    header2 += ["layer-wise time", "e2e time", "wall e2e: steps, time"]
    rows2 = []
    for r in results:
        if not r.curve and r.e2e is None:
            continue
        rows2.append(
            [
                r.id + (" ‡" if r.extrapolated else ""),
                " ".join(f"{b:.3f}" for b in r.curve) or "–",
                f"{r.fused.bound:.4f}" if r.fused else "–",
                f"{r.finetuned.bound:.4f}" if r.finetuned else "–",
                f"{r.e2e.bound:.4f}" if r.e2e else "–",
                f"{r.wall.bound:.4f}" if r.wall else "–",
                fmt_seconds(r.lw_seconds) + (f" ({fmt_tokens(r.lw_tokens)} tok)" if r.lw_tokens else ""),
                fmt_seconds(r.e2e_seconds),
                f"{r.wall_steps or '–'}"
                + (f" (capped; {r.wall_uncapped} asked)" if r.wall_uncapped else "")
                + f", {fmt_seconds(r.wall_seconds)}",
            ]
        )
    lines += md_table(header2, "lrrrrrrrr", rows2) if rows2 else ["(no finished run yet)"]
    if any(r.extrapolated for r in results):
        lines += [
            "",
            "‡ a stage of this chain was resumed from a checkpoint: the seconds of its steps before the kill "
            "are counted at the rate of the steps after it.",
        ]
    lines += samplers_markdown(results)
    for name in pngs:
        lines += ["", f"![{name}]({name})"]
    return "\n".join(lines) + "\n"


def samplers_markdown(results: Sequence[ChainResult]) -> list[str]:
    """The samplers scored on each chain's models (benchmarks/samplers.py's rule: a setting qualifies when,
    for every model, it loops no more than the corpus within 5 %; the lowest fluency CE among those wins)."""
    scored = [r for r in results if r.samplers]
    if not scored:
        return []
    lines = [
        "",
        "## Samplers on the study's models",
        "",
        "Per chain (benchmarks/samplers.py on its fused, fine-tuned and e2e models): each setting's worst "
        "shortfall against the corpus's repetition as samplers.py defines it (a setting qualifies when, for "
        "every model, it loops no more than the corpus within 5 %), its fluency (the masked CE of the samples "
        "under the chain's e2e model, mean over rates and models, nats/token), distinct-3 and the longest "
        "repeated n-gram (means over the models); **best** is the rule's pick.",
        "",
    ]
    header = ["run", "setting", "qualifies", "worst shortfall", "fluency CE", "distinct-3 (mean)", "longest repeat"]
    rows = []
    for r in scored:
        rep = r.samplers or {}
        corpus = rep.get("corpus", {})
        rows.append(
            [
                r.id,
                "(corpus)",
                "",
                "",
                f"{corpus.get('fluency_ce', math.nan):.3f}",
                f"{corpus.get('distinct_3', math.nan):.3f}",
                f"{corpus.get('longest_repeat', math.nan):.1f}",
            ]
        )
        by_setting: dict[str, list[dict]] = {}
        for row in rep.get("rows", []):
            by_setting.setdefault(row["setting"], []).append(row)
        for name, summ in rep["summary"].items():
            rs = by_setting.get(name, [])
            d3 = statistics.fmean(x["distinct_3"] for x in rs) if rs else math.nan
            rep_len = statistics.fmean(x["longest_repeat"] for x in rs) if rs else math.nan
            rows.append(
                [
                    "",
                    f"**{name}**" if name == rep.get("best") else name,
                    "yes" if summ.get("qualifies") else "no",
                    f"{summ.get('worst_shortfall', math.nan):.3f}",
                    f"{summ.get('mean_fluency_ce', math.nan):.3f}",
                    f"{d3:.3f}",
                    f"{rep_len:.1f}",
                ]
            )
    return lines + md_table(header, "lllrrrr", rows)


# ---------------------------------------------------------------------------------------------- plots
def _mean_curve(rs: Sequence[ChainResult]) -> list[float]:
    n = min(len(r.curve) for r in rs)
    return [statistics.fmean(r.curve[k] for r in rs) for k in range(n)]


def study_depth_figure(results: Sequence[ChainResult]):
    """One panel per budget: the bound of depth prefixes 1..L (mean over seeds), one curve per (L, lever),
    with the fine-tuned model (*), e2e at equal tokens (s) and at equal wall time (^) at x = L + ½."""
    g = {k: rs for k, rs in groups(results).items() if rs and all(r.curve for r in rs)}
    budgets = sorted({k[1] for k in g})
    fig = _new_figure(6.0 * max(1, len(budgets)), 4.8)
    if not g:
        ax = fig.add_subplot(111)
        ax.text(0.5, 0.5, "no finished run yet", ha="center", va="center")
        return fig
    keys = sorted({(k[0], k[2]) for k in g})
    cmap = colormaps["tab10" if len(keys) <= 10 else "tab20"]
    color = {k: cmap(i % cmap.N) for i, k in enumerate(keys)}
    unit = next(r.unit for rs in g.values() for r in rs)
    for j, budget in enumerate(budgets):
        ax = fig.add_subplot(1, len(budgets), j + 1)
        for (L, b, lever), rs in g.items():
            if b != budget:
                continue
            c = color[(L, lever)]
            curve = _mean_curve(rs)
            ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, color=c, label=f"L={L} {lever}")
            for attr, marker in (("layerwise", "*"), ("e2e", "s"), ("wall", "^")):
                vals = [getattr(r, attr).bound for r in rs if getattr(r, attr) is not None]
                if vals:
                    ax.plot([L + 0.5], [statistics.fmean(vals)], marker=marker, markersize=8, color=c, ls="none")
        Lmax = max(k[0] for k in g if k[1] == budget)
        ax.set_xticks(sorted({1, *(2**i for i in range(1, 8) if 2**i < Lmax), *(k[0] for k in g if k[1] == budget)}))
        ax.set_xlabel("depth k (layers 1..k after stage k)")
        ax.set_ylabel(f"bound ({unit})")
        ax.set_title(f"budget {_budget(budget)}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    key = [
        Line2D([], [], color="gray", marker="o", markersize=3, label="layer-wise, depth k"),
        Line2D([], [], color="gray", marker="*", markersize=8, ls="none", label="fine-tuned"),
        Line2D([], [], color="gray", marker="s", ls="none", label="e2e, equal tokens"),
        Line2D([], [], color="gray", marker="^", ls="none", label="e2e, equal wall time"),
    ]
    fig.legend(handles=key, fontsize=7, loc="upper center", ncol=4, bbox_to_anchor=(0.5, 0.0))
    return fig


def study_gaps_figure(results: Sequence[ChainResult]):
    """The gap in the bound against depth L: one line per (budget, lever), equal tokens solid, equal
    wall time dashed; error bars = std over seeds."""
    g = {k: rs for k, rs in groups(results).items() if rs}
    fig = _new_figure(7.0, 4.5)
    ax = fig.add_subplot(111)
    series = sorted({(k[1], k[2]) for k in g})
    cmap = colormaps["tab10" if len(series) <= 10 else "tab20"]
    for i, (budget, lever) in enumerate(series):
        c = cmap(i % cmap.N)
        Ls = sorted(k[0] for k in g if k[1] == budget and k[2] == lever)
        for attr, ls, what in (("e2e", "-", "tokens"), ("wall", "--", "wall time")):
            pts = []
            for L in Ls:
                m, s, _ = mean_std([r.gap(getattr(r, attr)) for r in g[(L, budget, lever)]])
                if m is not None:
                    pts.append((L, 100 * m, 100 * (s or 0.0)))
            if pts:
                ax.errorbar(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    yerr=[p[2] for p in pts],
                    color=c,
                    ls=ls,
                    marker="o",
                    markersize=4,
                    capsize=3,
                    label=f"{_budget(budget)} {lever}, equal {what}",
                )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    Ls = sorted({k[0] for k in g})
    if Ls:
        ax.set_xticks(Ls)
        ax.set_xticklabels([str(L) for L in Ls])
    ax.set_xlabel("depth L")
    ax.set_ylabel("gap in the bound vs e2e (%)")
    ax.set_title("fine-tuned layer-wise model vs e2e", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def write_study_report(root: str | Path, out_dir: str | Path | None = None) -> tuple[Path, list[Path]]:
    """Write study.md and its two plots into the study folder (or out_dir); return their paths."""
    root = Path(root)
    plan, results = load_study(root)
    out = Path(out_dir) if out_dir is not None else root
    out.mkdir(parents=True, exist_ok=True)
    pngs = [(out / STUDY_DEPTH_PNG, study_depth_figure(results)), (out / STUDY_GAPS_PNG, study_gaps_figure(results))]
    for path, fig in pngs:  # the plots first: study.md links to them
        art.atomic_write_bytes(png_bytes(fig), path)
    md = out / STUDY_MD
    art.atomic_write_bytes(study_markdown(plan, results, [p.name for p, _ in pngs]).encode("utf-8"), md)
    return md, [p for p, _ in pngs]
