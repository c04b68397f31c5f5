"""The depth plots: matplotlib through the object-oriented `Figure` API on Agg, so that importing
this module never switches the caller's backend."""

from __future__ import annotations

import io
from collections.abc import Sequence

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.lines import Line2D

from stackwise.report.formats import fmt_tokens
from stackwise.report.records import DepthResults

DEPTH_PNG = "depth.png"


def _new_figure(width: float = 7.0, height: float = 4.5):
    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)  # Agg, whatever backend pyplot would pick: a server has no display
    return fig


def png_bytes(fig) -> bytes:
    # every legend, the ones added with add_artist too, counts for the tight bounding box
    legends = [a for ax in fig.axes for a in ax.get_children() if isinstance(a, Legend)] + list(fig.legends)
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
