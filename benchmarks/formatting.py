"""Number and table formatting of the reports: numbers, 'mean ± std' over seeds, GitHub
markdown tables (used by the suite's report and the step-cost report)."""

from __future__ import annotations

import math

import numpy as np


def finite(values) -> list[float]:
    """The finite values, as floats (None and nan left out)."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def fmt_num(x: float, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    ax = abs(x)
    if ax != 0 and (ax >= 1e5 or ax < 10.0 ** -digits):
        return f"{x:.2g}"  # two significant figures (scientific only below 1e-4)
    return f"{x:.{digits}f}"


def fmt_pm(values, digits: int = 3, scale: float = 1.0) -> str:
    """'mean ± std' of the finite values (sample std, ddof=1); one value alone; '–' for none."""
    v = [x * scale for x in finite(values)]
    if not v:
        return "–"
    if len(v) == 1:
        return fmt_num(v[0], digits)
    return f"{fmt_num(float(np.mean(v)), digits)} ± {fmt_num(float(np.std(v, ddof=1)), digits)}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table; numbers are right-aligned (every column but the first)."""
    align = ["---"] + ["---:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)
