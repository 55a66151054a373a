"""Bar charts (PNG) of the results tables: one chart per table that has numeric columns, one panel per column.

The renderer (:mod:`recbole_perpeft.experiments.results_report`) writes them as ``<slug>-<n>.png`` beside the
pages and links each under its table. matplotlib's object API on an Agg canvas (no global backend switch),
a size and dpi fixed by the table's shape, and the PNG's ``Software`` text chunk dropped: the bytes are
the same for the same table on the same matplotlib, but may differ between matplotlib / FreeType versions, so
``--check`` compares a chart by its presence and pixel size (:func:`png_size`), not byte for byte.

A cell is charted when it is a number, a ``{"mean", "std"}`` (bar with an error bar), or a string that is
one plain number (``"0.40"``, ``"2,001"``); anything else (``"16.5 (0.25)"``, ``"-"``) is left out of its panel."""

from __future__ import annotations

import io
import math
import re
import struct

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_PLAIN_NUMBER = re.compile(r"^-?[0-9][0-9,]*(\.[0-9]+)?$")
_PANELS_A_ROW = 3


def cell_number(value) -> tuple[float, float | None] | None:
    """(value, std or None) for a chartable cell; None for anything else."""
    std = None
    if isinstance(value, dict):
        value, std = value.get("mean"), value.get("std")
        std = cell_number(std)[0] if cell_number(std) else None
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value), std
    if isinstance(value, str) and _PLAIN_NUMBER.match(value.strip().strip("*")):
        return float(value.strip().strip("*").replace(",", "")), std
    return None


def numeric_columns(table: dict) -> list[str]:
    """The columns of ``table`` where at least one row has a chartable cell."""
    rows = table.get("rows", [])
    return [c for c in table.get("columns", []) if any(cell_number(r.get("values", {}).get(c)) for r in rows)]


def _short(label: str, width: int = 32) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def bar_chart(table: dict) -> bytes | None:
    """The PNG bytes of ``table``'s chart, or None when it has no numeric column."""
    columns = numeric_columns(table)
    if not columns:
        return None
    labels = [_short(row["label"]) for row in table["rows"]]
    across = min(_PANELS_A_ROW, len(columns))
    down = math.ceil(len(columns) / across)
    fig = Figure(figsize=(4.2 * across, 0.6 + (0.9 + 0.28 * len(labels)) * down))
    FigureCanvasAgg(fig)
    for i, column in enumerate(columns):
        ax = fig.add_subplot(down, across, i + 1)
        cells = [cell_number(row.get("values", {}).get(column)) for row in table["rows"]]
        values = [c[0] if c else 0.0 for c in cells]
        errors = [c[1] if c and c[1] is not None else 0.0 for c in cells]
        positions = list(range(len(labels)))
        bars = ax.barh(positions, values, xerr=errors if any(errors) else None, color="#4c72b0")
        # each bar's number written beside it: a row in other units (MiB beside seconds) can dwarf the rest
        ax.bar_label(bars, labels=[f"{c[0]:g}" if c else "" for c in cells], fontsize=6, padding=2)
        ax.margins(x=0.18)
        ax.set_yticks(positions, labels if i % across == 0 else [""] * len(labels), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(_short(column, 40), fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72, metadata={"Software": None})
    return buffer.getvalue()


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's header, or None when ``data`` is not a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return struct.unpack(">II", data[16:24])
