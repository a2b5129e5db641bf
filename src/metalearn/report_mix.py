"""The cross-domain table of ``metalearn.report`` (runs on several sources, ``data=mix``): one
row per training mix (its sources, and weights where not uniform) / algorithm / episode shape,
one column per test source; a cell is ``test/acc/<source>`` ± its 95 % CI (one run) or the mean
of several seeds ± their t interval, as in the main table. A single-source run
(``data=omniglot``) joins it as the row ``omniglot (data=omniglot)`` with its ``test/acc`` in
the column of its own source: the baseline next to the mixes. Shown only when some run is a mix.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

from metalearn.report_grid import cell_fields, cell_header, grid_rows, markdown_lines, rich_table

TITLE = "Cross-domain: test accuracy (%) per test source, one row per training mix"


def is_mix(run) -> bool:
    return bool(run.get("train_sources"))


def mix_label(metrics: dict) -> str:
    """``omniglot+miniimagenet`` (``(weights 1:3)`` where not uniform)."""
    label = "+".join(metrics.get("train_sources") or [])
    weights = metrics.get("source_weights")
    if weights and len(set(weights)) > 1:
        label += " (weights " + ":".join(f"{w:g}" for w in weights) + ")"
    return label


def dataset_label(metrics: dict) -> str:
    """The main table's dataset of a mixed run: ``mix omniglot+miniimagenet -> quickdraw``."""
    label = f"mix {mix_label(metrics)}"
    tests = metrics.get("test_sources") or []
    return label + (f" -> {','.join(tests)}" if tests != metrics.get("train_sources") else "")


def row_of(run) -> tuple[str, str, str, str]:
    """(training mix, algorithm, episode shape, variant)."""
    train = (
        mix_label(run.metrics)
        if is_mix(run)
        else f"{run.get('dataset')} (data={run.get('dataset')})"
    )
    _, _, algo, variant = run.row
    return train, algo, f"{run.get('ways')}-way {run.get('shots')}-shot", variant


def per_source(run, source: str):
    """``run`` seen through one test source: its ``test/acc`` and CI are that source's (a
    single-source run: its own test/acc, in its own column only); None if it has no such cell."""
    if not is_mix(run):
        return run if run.get("dataset") == source else None
    if source not in (run.get("test_sources") or []):
        return None
    m = run.task_metric
    values = {
        f"test/{m}": run.get(f"test/{m}/{source}"),
        f"test/{m}_ci95": run.get(f"test/{m}_ci95/{source}"),
    }
    return replace(run, metrics={**run.metrics, **values})


def table(runs) -> tuple[list, list[str], dict]:
    """(rows, test sources, cells) or ([], [], {}) when no run is a mix; fixed-shape runs only."""
    from metalearn.report import Cell

    runs = [r for r in runs if len(r.column) == 2 and r.get("dataset")]
    if not any(is_mix(r) for r in runs):
        return [], [], {}
    sources = list(dict.fromkeys(s for r in runs if is_mix(r) for s in r.get("test_sources") or []))
    cells: dict[tuple, Cell] = {}
    for r in runs:
        for source in sources:
            seen = per_source(r, source)
            if seen is not None:
                cells.setdefault((row_of(r), source), Cell([])).runs.append(seen)
    rows = sorted(
        {row for row, _ in cells},
        key=lambda row: (row[1], row[2], "(data=" not in row[0], row[0], row[3]),
    )
    return rows, sources, cells


def row_text(row: tuple) -> str:
    train, algo, shape, variant = row
    return f"{train} / {algo} / {shape}" + (f" [{variant}]" if variant else "")


CORNER = "trained on / algorithm / episodes"


def markdown(runs) -> str:
    rows, sources, cells = table(runs)
    if not rows:
        return ""
    lines = [
        f"## {TITLE}",
        "",
        "Rows: the sources trained on (`data.train_sources`) / algorithm / episodes; columns: the"
        " test source (`test/acc/<source>`); a `(data=<source>)` row is a single-source run. "
        "Cells as in the table above.",
        "",
        *markdown_lines(CORNER, sources, grid_rows(rows, sources, cells, row_text)),
    ]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, runs) -> bool:
    rows, sources, cells = table(runs)
    if not rows:
        return False
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        row_header = ["trained_on", "algo", "episodes", "variant", "test_source"]
        w.writerow([*row_header, *cell_header("acc")])
        for row in rows:
            for s in sources:
                cell = cells.get((row, s))
                if cell is not None:
                    w.writerow([*row, s, *cell_fields(cell)])
    return True


def print_table(runs, console) -> None:
    rows, sources, cells = table(runs)
    if rows:
        title = TITLE + " ± 95 % CI"
        console.print(rich_table(title, CORNER, sources, grid_rows(rows, sources, cells, row_text)))
