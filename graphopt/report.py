"""Plain-text tables and human-readable numbers for the CLI's reports.

Generic on purpose: commands hand rows of already-chosen cells and get aligned text back, so every
report in graphopt looks the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], *,
                 align: str | None = None) -> str:
    """Align `rows` under `headers`. Numbers are right-aligned, text left-aligned, unless `align`
    gives one character per column ("l" or "r"). None prints as "-"."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    if align is None:
        align = "".join(
            "r" if rows and all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
            else "l" for i in range(len(headers)))

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if a == "r" else v.ljust(w)
                 for v, w, a in zip(values, widths, align)]
        return "  ".join(parts).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def human_count(n: float, unit: str = "") -> str:
    """1234567 -> '1.23 M' (decimal prefixes)."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}".rstrip()


def human_bytes(n: float) -> str:
    """Binary prefixes: 1536 -> '1.5 KiB'."""
    for factor, prefix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if abs(n) >= factor:
            return f"{n / factor:.3g} {prefix}"
    return f"{int(n)} B"
