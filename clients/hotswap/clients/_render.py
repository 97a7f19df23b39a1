"""Plain-text and HTML tables for ``__repr__`` / ``_repr_html_`` and the CLI."""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

Cell = Any


def format_ms(ms: int) -> str:
    """A control plane timestamp (ms since the epoch) as ``2024-05-01 12:00:03 UTC``."""
    if ms <= 0:
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_cell(value: Cell, *, max_items: int = 6) -> str:
    """One cell as text: lists are shortened, floats keep their shortest repr."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, list | tuple):
        items = [format_cell(v) for v in value[:max_items]]
        more = f", … ({len(value)} items)" if len(value) > max_items else ""
        return "[" + ", ".join(items) + more + "]"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    return str(value)


def grid_text(headers: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    """A table with a header row, columns padded to their widest cell."""
    cells = [[format_cell(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def grid_html(headers: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    """The same table as ``grid_text`` for Jupyter."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_cell(c))}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def kv_text(pairs: Sequence[tuple[str, Cell]]) -> str:
    """A two-column key/value table, as the tutorial shows one pipeline or model."""
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.ljust(width)}  {format_cell(v)}".rstrip() for k, v in pairs)


def kv_html(pairs: Sequence[tuple[str, Cell]]) -> str:
    """The same table as ``kv_text`` for Jupyter."""
    body = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(format_cell(v))}</td></tr>"
        for k, v in pairs
    )
    return f"<table>{body}</table>"
