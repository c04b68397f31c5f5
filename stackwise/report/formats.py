"""How the report writes numbers: losses, deltas, percentages, token counts, durations ("–" for none)."""

from __future__ import annotations

import math


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
