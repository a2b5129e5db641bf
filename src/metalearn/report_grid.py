"""The one table shape of ``metalearn.report`` (results, accuracy by episode shape,
per-instance, cross-domain): a label column, then right-aligned value columns; as markdown
lines or a Rich table, and a cell's CSV fields."""

from __future__ import annotations


def grid_rows(rows, cols, cells: dict, label) -> list[tuple[str, list[str]]]:
    """``(label(row), texts)`` per row: the text of each ``cells[(row, col)]``, '' where the
    grid has no such cell."""
    return [
        (label(row), [cells[(row, c)].text() if (row, c) in cells else "" for c in cols])
        for row in rows
    ]


def markdown_lines(corner: str, columns: list[str], rows) -> list[str]:
    """The markdown table of ``rows`` ([(label, texts)]) under the header ``corner | columns``."""
    lines = [f"| {corner} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    return lines + [f"| {label} | " + " | ".join(texts) + " |" for label, texts in rows]


def rich_table(title: str, corner: str, columns: list[str], rows, **options):
    """The table of ``markdown_lines`` as a Rich table (``options``: Table's own, e.g. a
    caption)."""
    from rich.markup import escape  # labels hold [variant]s, which Rich would read as markup
    from rich.table import Table

    table = Table(title=title, **options)
    table.add_column(corner)
    for column in columns:
        table.add_column(column, justify="right")
    for label, texts in rows:
        table.add_row(escape(label), *texts)
    return table


def cell_header(metric: str) -> list[str]:
    """The CSV columns of ``cell_fields``."""
    return ["runs", "failed", metric, f"{metric}_ci95", "cell"]


def cell_fields(cell) -> list:
    """A cell's CSV fields: runs, failed, mean, CI (6 decimals, '' if none), its text."""
    mean, ci = cell.mean, cell.ci95
    return [
        cell.n,
        cell.failed,
        "" if mean is None else f"{mean:.6f}",
        "" if ci is None else f"{ci:.6f}",
        cell.text(),
    ]
