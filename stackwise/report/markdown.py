"""The depth report as Markdown: the tables and the two verdicts."""

from __future__ import annotations

import math
from collections.abc import Sequence

from stackwise.report.formats import fmt_delta, fmt_loss, fmt_pct, fmt_seconds, fmt_tokens
from stackwise.report.plots import DEPTH_PNG
from stackwise.report.records import FINAL_STAGES, DepthResults, Row

WITHIN = 0.05  # "within 5% of e2e"


def md_table(header: Sequence[str], align: str, rows: Sequence[Sequence[str]]) -> list[str]:
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


def md_escape(text: str) -> str:
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
        prev = by_k.get(r.k - 1) if r.stage not in FINAL_STAGES else None
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
    lines = [f"# Depth report: {md_escape(res.name)}", ""]
    lines += md_table(header, "lrrrrrrr"[: len(header)], rows)
    lines += [
        "",
        "Layer-wise row k = embeddings + layers 1..k + head after stage k; its tokens and time are summed over "
        "stages 1..k (time: their training and the caching passes that fed them; as for fused / fine-tuned). "
        "e2e: its own budget. "
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
                md_escape(res.name),
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
    lines += md_table(header, "lrrrrrrlr", rows)
    lines += [
        "",
        "gap to e2e: the better of fused / fine-tuned (the deepest layer-wise stage when fusion has not run) "
        "against the experiment's own e2e baseline, (loss − e2e) / e2e. tokens: that model's total budget / e2e's.",
    ]
    scored = [(res.best_layerwise(), res) for res in results]
    scored = [(b, r) for b, r in scored if b is not None and not math.isnan(b.val_loss)]
    if scored:
        b, r = min(scored, key=lambda br: br[0].val_loss)
        lines.append(f"Lowest layer-wise loss: **{md_escape(r.name)}** ({b.label} {fmt_loss(b.val_loss)}).")
    if png_name:
        lines += ["", f"![validation loss vs depth]({png_name})"]
    return "\n".join(lines) + "\n"
