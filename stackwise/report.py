"""The depth report: validation loss against layer index k, with the fused, fine-tuned and e2e models beside it.

    write_report(exp_dir)                        -> exp_dir/report.md, exp_dir/depth.png
    write_sweep_report([exp_a, exp_b], out_dir)  -> out_dir/report.md, out_dir/depth.png (one row / curve each)

Everything comes from the experiment's `results.json` (one record per stage, appended by the
pipeline); nothing is recomputed, so the report is cheap and works on a finished run as well as on a
partial one (only `embed` and `layer_2` so far, say). Pure Python + matplotlib (Agg, through the
object-oriented `Figure` API so that importing this module never switches the caller's backend);
no Lightning.

Conventions, so that every number in a row means the same thing:
- A stage that was rerun appears once per run in results.json: the last record wins.
- The layer-wise row k describes the model "embeddings + layers 1..k + head" that stage k leaves
  behind. Its `tokens` and `time` are summed over stages 1..k: the same convention the pipeline
  uses for the fused and fine-tuned records (cumulative), so the column compares directly with the
  end-to-end baseline's own budget.
- gap to e2e = (loss - e2e loss) / e2e loss, in %: negative means better than the baseline.
- "Every added layer lowers the validation loss" is judged step by step, k-1 -> k; a missing stage
  in between makes that step (and the verdict) "no".
- "Within 5% of e2e" compares the best layer-wise final model (fused or fine-tuned, or the deepest
  layer-wise stage when fusion has not run) with e2e, and reports the two token budgets beside it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.lines import Line2D

from stackwise import artifacts as art
from stackwise.errors import ArtifactError, StackWiseError

PathLike = str | Path

REPORT_MD = "report.md"
DEPTH_PNG = "depth.png"
WITHIN = 0.05  # "within 5% of e2e"

_FINAL_STAGES = ("fused", "finetuned", "e2e")  # the records of the whole models, by their `stage`
_LABELS = {"fused": "fused", "finetuned": "fused + fine-tuned", "e2e": "end-to-end (e2e)"}
_REQUIRED = ("stage", "val_loss", "val_acc", "tokens", "seconds")


# ------------------------------------------------------------------------------------ records
@dataclass
class Row:
    """One model of the report: a layer-wise prefix 1..k, the fused, fine-tuned or e2e model."""

    stage: str  # "embed", "layer_k", "fused", "finetuned", "e2e"
    k: int
    val_loss: float
    val_acc: float
    tokens: int  # tokens seen by this model (cumulative for layer-wise rows, see module doc)
    seconds: float  # wall time that produced it (same convention)

    @property
    def label(self) -> str:
        return _LABELS.get(self.stage, self.stage)


@dataclass
class Step:
    """k-1 -> k: did adding layer k lower the validation loss?"""

    k: int
    delta: float | None  # loss(k) - loss(k-1); None when stage k-1 has no record

    @property
    def lowers(self) -> bool:
        return self.delta is not None and self.delta < 0  # NaN compares False: not lowered


@dataclass
class DepthResults:
    """The last record of every stage of one experiment, in depth order."""

    name: str
    exp_dir: Path
    layers: list[Row] = field(default_factory=list)  # k ascending
    fused: Row | None = None
    finetuned: Row | None = None
    e2e: Row | None = None

    # -- derived views
    def rows(self) -> list[Row]:
        """Every model, in table order: layer-wise by k, then fused, fine-tuned, e2e."""
        return self.layers + [r for r in (self.fused, self.finetuned, self.e2e) if r is not None]

    @property
    def n_layers(self) -> int | None:
        ks = [r.k for r in self.rows()]
        return max(ks) if ks else None

    def steps(self) -> list[Step]:
        """One step per layer-wise stage k >= 2 present (and per gap in between)."""
        by_k = {r.k: r for r in self.layers}
        if len(by_k) < 1:
            return []
        return [
            Step(k, by_k[k].val_loss - by_k[k - 1].val_loss if k - 1 in by_k and k in by_k else None)
            for k in range(min(by_k) + 1, max(by_k) + 1)
        ]

    def every_layer_lowers(self) -> bool | None:
        """True/False; None when fewer than two layer-wise stages exist (nothing to judge)."""
        steps = self.steps()
        if not steps:
            return None
        return all(s.lowers for s in steps) and min(r.k for r in self.layers) == 1

    def best_layerwise(self) -> Row | None:
        """The lowest-loss final layer-wise model: fused or fine-tuned; the deepest stage before fusion."""
        finals = [r for r in (self.fused, self.finetuned) if r is not None]
        if not finals:
            finals = self.layers[-1:]
        if not finals:
            return None
        return min(finals, key=lambda r: (_sortable(r.val_loss), r.tokens))

    def gap(self, row: Row | None) -> float | None:
        """(loss - e2e) / e2e as a fraction; None without an e2e record."""
        if row is None or self.e2e is None:
            return None
        if self.e2e.val_loss == 0:
            return math.nan
        return (row.val_loss - self.e2e.val_loss) / self.e2e.val_loss


def _sortable(x: float) -> float:
    return math.inf if math.isnan(x) else x


def _number(rec: dict, key: str, where: str, kind: type) -> Any:
    value = rec[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArtifactError(f"{where}: {key}={value!r} is not a number; the file is not a StackWise results.json")
    return kind(value)


def _last_records(paths: art.ExperimentPaths) -> dict[str, dict]:
    """{stage: its latest record}, in order of completion; StackWiseError when there is none."""
    records = art.read_results(paths)
    if not records:
        raise StackWiseError(
            f"{paths.root} has no results ({paths.results_json.name} is missing or empty): "
            f"run stackwise-train for this experiment first"
        )
    last: dict[str, dict] = {}
    for i, rec in enumerate(records):
        missing = [key for key in _REQUIRED if key not in rec]
        if missing:
            raise ArtifactError(
                f"{paths.results_json} record {i} has no {missing[0]!r}; the file is not a StackWise results.json"
            )
        last.pop(str(rec["stage"]), None)  # keep the latest run of a stage, in order of completion
        last[str(rec["stage"])] = rec
    return last


def load_depth_results(exp_dir: PathLike, name: str | None = None) -> DepthResults:
    """Read `<exp_dir>/results.json` into a DepthResults; StackWiseError (one line) when there is none."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        raise StackWiseError(f"experiment folder {exp_dir} does not exist")
    paths = art.ExperimentPaths(exp_dir)
    last = _last_records(paths)
    out = DepthResults(name=name or exp_dir.resolve().name, exp_dir=exp_dir)
    stage_rows: list[Row] = []
    for stage, rec in last.items():
        where = f"{paths.results_json} stage {stage}"
        layerwise = rec.get("kind") == "layer"  # the record says what it is (stackwise/pipeline/stage.py)
        if not layerwise and stage not in _FINAL_STAGES:
            continue  # a stage this report does not know (future kinds): leave it out rather than fail
        k = _number(rec, "k", where, int) if "k" in rec else 0
        if layerwise and k < 1:
            raise ArtifactError(f"{where}: a layer-wise record needs k >= 1; the file is not a StackWise results.json")
        row = Row(
            stage,
            k,
            _number(rec, "val_loss", where, float),
            _number(rec, "val_acc", where, float),
            _number(rec, "tokens", where, int),
            _number(rec, "seconds", where, float),
        )
        if layerwise:
            stage_rows.append(row)
        else:
            setattr(out, stage, row)
    # layer-wise records hold one stage's own tokens and time: sum them, so row k is the model 1..k
    tokens = seconds = 0
    for row in sorted(stage_rows, key=lambda r: r.k):
        tokens, seconds = tokens + row.tokens, seconds + row.seconds
        out.layers.append(Row(row.stage, row.k, row.val_loss, row.val_acc, tokens, seconds))
    for attr in _FINAL_STAGES:  # fused / fine-tuned / e2e records carry no k of their own: depth L
        row = getattr(out, attr)
        if row is not None and row.k <= 0:
            row.k = out.layers[-1].k if out.layers else 0
    return out


# ---------------------------------------------------------------------------------- formatting
def fmt_loss(x: float | None) -> str:
    return "–" if x is None else ("nan" if math.isnan(x) else f"{x:.4f}")


def fmt_delta(x: float | None) -> str:
    return "–" if x is None else ("nan" if math.isnan(x) else f"{x:+.4f}")


def fmt_pct(x: float | None, signed: bool = True) -> str:
    if x is None:
        return "–"
    if math.isnan(x) or math.isinf(x):
        return "nan"
    return f"{100 * x:+.1f}%" if signed else f"{100 * x:.1f}%"


def fmt_tokens(n: int | None) -> str:
    """1234 -> 1,234; 123456 -> 123k; 1234567 -> 1.23M; 12345678 -> 12.3M; 2e9 -> 2.00B."""
    if n is None:
        return "–"
    # below 100k the exact count is still short enough to read
    for scale, unit, start in ((1e12, "T", 1e12), (1e9, "B", 1e9), (1e6, "M", 1e6), (1e3, "k", 1e5)):
        if abs(n) >= start:
            v = n / scale
            return f"{v:.2f}{unit}" if abs(v) < 10 else (f"{v:.1f}{unit}" if abs(v) < 100 else f"{v:.0f}{unit}")
    return f"{n:,}"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    if math.isnan(s):
        return "nan"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} m {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} m"


def _md_table(header: Sequence[str], align: str, rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table whose columns are padded, so it reads in a terminal as well as rendered."""
    cells = [list(header)] + [list(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]

    def line(c: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(v.ljust(w) if a == "l" else v.rjust(w) for v, w, a in zip(c, widths, align, strict=True))
            + " |"
        )

    rule = (
        "|"
        + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, align, strict=True))
        + "|"
    )
    return [line(header), rule] + [line(r) for r in cells[1:]]


def _esc(text: str) -> str:
    return text.replace("|", "\\|")


def layers_verdict(res: DepthResults) -> str:
    """`yes`/`no` + the per-step deltas, e.g. `no (1→2 −0.41, 2→3 +0.02 ✗)`."""
    verdict = res.every_layer_lowers()
    if verdict is None:
        return "n/a (fewer than two layer-wise stages)"
    parts = []
    if min(r.k for r in res.layers) != 1:
        parts.append("embed (k=1) missing")
    for s in res.steps():
        parts.append(
            f"{s.k - 1}→{s.k} " + ("missing" if s.delta is None else fmt_delta(s.delta)) + ("" if s.lowers else " ✗")
        )
    return f"{'yes' if verdict else 'no'} ({', '.join(parts)})"


def tokens_note(a: Row, b: Row) -> str:
    """'both 1.23M tokens' or 'token budgets differ: fused 1.0M vs e2e 1.2M (0.83×)'."""
    if a.tokens == b.tokens:
        return f"equal token budgets ({fmt_tokens(a.tokens)} tokens each)"
    ratio = f" ({a.tokens / b.tokens:.2f}×)" if b.tokens else ""
    return f"token budgets differ: {a.label} {fmt_tokens(a.tokens)} vs e2e {fmt_tokens(b.tokens)}{ratio}"


def within_verdict(res: DepthResults) -> str:
    """Whether the best layer-wise(+fine-tune) model is within 5% of e2e, and at what token budgets."""
    best = res.best_layerwise()
    if best is None:
        return "n/a (no layer-wise result)"
    if res.e2e is None:
        return "n/a (no e2e record: run `stackwise-train stage=e2e` with the same overrides for the baseline)"
    gap = res.gap(best)
    ok = gap is not None and not math.isnan(gap) and gap <= WITHIN + 1e-9  # 4.2 vs 4.0 is 5%, not 5.0000001%
    return (
        f"{'yes' if ok else 'no'}: best layer-wise model = {best.label} {fmt_loss(best.val_loss)} vs e2e "
        f"{fmt_loss(res.e2e.val_loss)} ({fmt_pct(gap)}); {tokens_note(best, res.e2e)}"
    )


def depth_markdown(res: DepthResults, png_name: str | None = DEPTH_PNG) -> str:
    """The single-experiment report: the table, the two verdicts, the plot."""
    have_e2e = res.e2e is not None
    header = ["model", "k", "val loss", "Δ vs k-1", "val acc", "tokens", "time"] + (["gap to e2e"] if have_e2e else [])
    by_k = {r.k: r for r in res.layers}
    rows = []
    for r in res.rows():
        prev = by_k.get(r.k - 1) if r.stage not in _FINAL_STAGES else None
        cells = [
            r.label,
            str(r.k),
            fmt_loss(r.val_loss),
            fmt_delta(r.val_loss - prev.val_loss) if prev else "",
            fmt_pct(r.val_acc, signed=False),
            fmt_tokens(r.tokens),
            fmt_seconds(r.seconds),
        ]
        if have_e2e:
            cells.append("" if r is res.e2e else fmt_pct(res.gap(r)))
        rows.append(cells)
    lines = [f"# Depth report: {_esc(res.name)}", ""]
    lines += _md_table(header, "lrrrrrrr"[: len(header)], rows)
    lines += [
        "",
        "Layer-wise row k = embeddings + layers 1..k + head after stage k; its tokens and time are summed over "
        "stages 1..k (as for fused / fine-tuned). e2e: its own budget. "
        + ("gap to e2e = (loss − e2e) / e2e. " if have_e2e else "")
        + "Losses: mean masked cross-entropy on the same validation masks for every model.",
        "",
        f"- **Every added layer lowers the validation loss:** {layers_verdict(res)}",
        f"- **Best layer-wise (+ fine-tune) result within {WITHIN:.0%} of e2e:** {within_verdict(res)}",
    ]
    if png_name:
        lines += ["", f"![validation loss vs depth]({png_name})"]
    return "\n".join(lines) + "\n"


def sweep_markdown(results: Sequence[DepthResults], png_name: str | None = DEPTH_PNG) -> str:
    """One row per experiment: final layer-wise loss, fused, fine-tuned, e2e, gap, verdicts, tokens."""
    header = [
        "experiment",
        "L",
        "layer-wise (k=L)",
        "fused",
        "fine-tuned",
        "e2e",
        "gap to e2e",
        "every layer lowers",
        "tokens (best / e2e)",
    ]
    rows = []
    for res in results:
        best = res.best_layerwise()
        verdict = res.every_layer_lowers()
        tokens = fmt_tokens(best.tokens) if best else "–"
        if res.e2e is not None:
            tokens += f" / {fmt_tokens(res.e2e.tokens)}"
        rows.append(
            [
                _esc(res.name),
                str(res.n_layers or "–"),
                fmt_loss(res.layers[-1].val_loss) if res.layers else "–",
                fmt_loss(res.fused.val_loss) if res.fused else "–",
                fmt_loss(res.finetuned.val_loss) if res.finetuned else "–",
                fmt_loss(res.e2e.val_loss) if res.e2e else "–",
                fmt_pct(res.gap(best)),
                "n/a" if verdict is None else ("yes" if verdict else "no"),
                tokens,
            ]
        )
    lines = [f"# Depth report: {len(results)} experiments", ""]
    lines += _md_table(header, "lrrrrrrlr", rows)
    lines += [
        "",
        "gap to e2e: the better of fused / fine-tuned (the deepest layer-wise stage when fusion has not run) "
        "against the experiment's own e2e baseline, (loss − e2e) / e2e. tokens: that model's total budget / e2e's.",
    ]
    scored = [(res.best_layerwise(), res) for res in results]
    scored = [(b, r) for b, r in scored if b is not None and not math.isnan(b.val_loss)]
    if scored:
        b, r = min(scored, key=lambda br: br[0].val_loss)
        lines.append(f"Lowest layer-wise loss: **{_esc(r.name)}** ({b.label} {fmt_loss(b.val_loss)}).")
    if png_name:
        lines += ["", f"![validation loss vs depth]({png_name})"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------- plots
def _new_figure(width: float = 7.0, height: float = 4.5):
    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)  # Agg, whatever backend pyplot would pick: a server has no display
    return fig


def _png_bytes(fig) -> bytes:
    # every legend, the ones added with add_artist too, counts for the tight bounding box
    legends = [a for ax in fig.axes for a in ax.get_children() if isinstance(a, Legend)]
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", bbox_extra_artists=legends)
    return buf.getvalue()


def _finals(ax, res: DepthResults, color, x_at: float, annotate: bool) -> None:
    """fused / fine-tuned as markers just right of k = L, e2e as a dashed horizontal line."""
    for dx, row, marker in ((0.12, res.fused, "D"), (0.24, res.finetuned, "*")):
        if row is not None:
            ax.plot(
                [x_at + dx],
                [row.val_loss],
                marker=marker,
                markersize=9 if marker == "*" else 6,
                linestyle="none",
                color=color,
                label=row.label if annotate else None,
            )
            if annotate:
                ax.annotate(
                    f"{row.val_loss:.3f}",
                    (x_at + dx, row.val_loss),
                    textcoords="offset points",
                    xytext=(6, 0),
                    va="center",
                    fontsize=8,
                )
    if res.e2e is not None:
        ax.axhline(
            res.e2e.val_loss,
            color=color if not annotate else "black",
            linestyle="--",
            linewidth=1,
            label=(f"e2e baseline ({fmt_tokens(res.e2e.tokens)} tokens)" if annotate else None),
        )


def depth_figure(res: DepthResults):
    fig = _new_figure()
    ax = fig.add_subplot(111)
    color = "tab:blue"
    if res.layers:
        ks = [r.k for r in res.layers]
        ax.plot(
            ks, [r.val_loss for r in res.layers], marker="o", color=color, label="layer-wise: layers 1..k after stage k"
        )
        for r in res.layers:
            ax.annotate(
                f"{r.val_loss:.3f}",
                (r.k, r.val_loss),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
                fontsize=8,
            )
    L = res.n_layers or 1
    _finals(ax, res, "tab:red", L, annotate=True)
    ax.set_xticks(range(1, L + 1))
    ax.set_xlim(0.6, L + 0.6)
    ax.set_xlabel("layer index k (depth)")
    ax.set_ylabel("validation loss (masked CE)")
    ax.set_title(f"{res.name}: validation loss vs depth", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def sweep_figure(results: Sequence[DepthResults]):
    n = len(results)
    fig = _new_figure(8.0, 4.8 + 0.2 * max(0, n - 6))
    ax = fig.add_subplot(111)
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    L = max((r.n_layers or 1) for r in results)
    for i, res in enumerate(results):
        color = cmap(i % cmap.N)
        if res.layers:
            ax.plot(
                [r.k for r in res.layers],
                [r.val_loss for r in res.layers],
                marker="o",
                markersize=4,
                color=color,
                label=res.name,
            )
        else:
            ax.plot([], [], color=color, label=res.name)
        _finals(ax, res, color, res.n_layers or L, annotate=False)
    ax.set_xticks(range(1, L + 1))
    ax.set_xlim(0.6, L + 0.6)
    ax.set_xlabel("layer index k (depth)")
    ax.set_ylabel("validation loss (masked CE)")
    ax.set_title("validation loss vs depth", fontsize=10)
    ax.grid(True, alpha=0.3)
    legend = ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="experiment", title_fontsize=8)
    ax.add_artist(legend)
    key = [
        Line2D([], [], color="gray", marker="o", markersize=4, label="layer-wise, k"),
        Line2D([], [], color="gray", marker="D", linestyle="none", label="fused (at L)"),
        Line2D([], [], color="gray", marker="*", markersize=9, linestyle="none", label="fine-tuned (at L)"),
        Line2D([], [], color="gray", linestyle="--", label="e2e baseline"),
    ]
    ax.legend(handles=key, fontsize=7, loc="lower left", bbox_to_anchor=(1.01, 0.0))
    return fig


# -------------------------------------------------------------------------------------- writers
def _write(out_dir: Path, markdown: str, fig) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, png_path = out_dir / REPORT_MD, out_dir / DEPTH_PNG
    # the plot first: report.md links to it, so a reader of the table finds the picture
    art.atomic_write_bytes(_png_bytes(fig), png_path)
    art.atomic_write_bytes(markdown.encode("utf-8"), md_path)
    return md_path, png_path


def write_report(exp_dir: PathLike, out_dir: PathLike | None = None) -> tuple[Path, Path]:
    """Write report.md + depth.png for one experiment (into exp_dir unless out_dir); return their paths.

    Raises StackWiseError (one line) when the folder or its results are missing or unreadable.
    """
    res = load_depth_results(exp_dir)
    return _write(Path(out_dir) if out_dir is not None else Path(exp_dir), depth_markdown(res), depth_figure(res))


def experiment_names(exp_dirs: Sequence[PathLike]) -> list[str]:
    """Folder names, or the paths as given where two folders share a name."""
    names = [Path(d).resolve().name for d in exp_dirs]
    return [str(d) if names.count(n) > 1 else n for d, n in zip(exp_dirs, names, strict=True)]


_GENERIC_KEY_PARTS = {"stages", "trainer", "optim"}


def _split_overrides(name: str) -> list[str] | None:
    """`a.b=1,c=[x,y]` -> ["a.b=1", "c=[x,y]"] (commas inside brackets kept); None if not such a list."""
    parts, depth, cur = [], 0, ""
    for ch in name:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts if all("=" in p for p in parts) else None


def _short_key(key: str) -> str:
    """`+stages.embed.trainer.max_steps` -> `embed.max_steps`; `trainer.max_steps` -> `max_steps`."""
    kept = [p for p in key.lstrip("+~").split(".") if p not in _GENERIC_KEY_PARTS]
    return ".".join(kept[-2:]) or key


def sweep_labels(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(labels, common): experiment names made of overrides (Hydra's derived names) lose the
    overrides they all share (returned as `common`) and their keys are shortened, so a sweep's
    legend and table show what differs; other names are kept as they are."""
    split = [_split_overrides(n) for n in names]
    if len(names) < 2 or any(p is None for p in split):
        return list(names), []
    common = [p for p in split[0] if all(p in other for other in split[1:])]
    labels = []
    for parts, name in zip(split, names, strict=True):
        rest = [p for p in parts if p not in common]
        labels.append(",".join(f"{_short_key(p.split('=', 1)[0])}={p.split('=', 1)[1]}" for p in rest) or name)
    if len(set(labels)) < len(labels):  # shortening made two alike: keep the full names
        return list(names), []
    return labels, common


def write_sweep_report(exp_dirs: Sequence[PathLike], out_dir: PathLike) -> tuple[Path, Path]:
    """One combined table (a row per experiment) and one plot (a curve per experiment) in out_dir."""
    if not exp_dirs:
        raise StackWiseError("no experiment folders given")
    folders = experiment_names(exp_dirs)
    labels, common = sweep_labels(folders)
    results = [load_depth_results(d, label) for d, label in zip(exp_dirs, labels, strict=True)]
    markdown = sweep_markdown(results)
    if labels != folders:
        markdown += (
            "\nRows are labelled by the overrides that differ (keys shortened); the folders: "
            + ", ".join(f"`{f}`" for f in folders)
            + (f". Common to all: `{','.join(common)}`." if common else ".")
            + "\n"
        )
    return _write(Path(out_dir), markdown, sweep_figure(results))


def find_experiments(folder: PathLike) -> list[Path]:
    """The sub-folders of `folder` that hold a results.json (a sweep's output root), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith(".") and art.ExperimentPaths(p).results_json.is_file()
    )
