"""The per-instance table of sequence learners (MANN, Santoro et al. 2016, Table 1) for
``metalearn.report``: accuracy at the 1st, 2nd, 3rd, 4th, 5th and 10th presentation of a class
in an episode's sequence, one row per run with ``test/acc_instance_<k>`` in its metrics.json."""

from __future__ import annotations

import re

from metalearn.report_grid import markdown_lines, rich_table

TITLE = "Accuracy (%) per presentation of a class (sequence learners; Santoro et al. 2016, Table 1)"


def instances_of(runs) -> list[int]:
    found = {
        int(m.group(1))
        for r in runs
        for key in r.metrics
        if (m := re.fullmatch(r"test/acc_instance_(\d+)", key))
    }
    return sorted(found)


def rows(runs) -> tuple[list[int], list[tuple[str, list[str]]]]:
    """(instances, [(label, cells)]): cells are 'mean ± ci' in %, '' where a run has none."""
    from metalearn.report import col_label, row_label

    instances = instances_of(runs)
    out = []
    for r in sorted((r for r in runs if r.ok), key=lambda r: (r.row, r.column, str(r.dir))):
        if not any(r.get(f"test/acc_instance_{k}") is not None for k in instances):
            continue
        cells = []
        for k in instances:
            acc, ci = r.get(f"test/acc_instance_{k}"), r.get(f"test/acc_instance_{k}_ci95")
            text = "" if acc is None else f"{100 * acc:.1f}"
            cells.append(text + (f" ± {100 * ci:.1f}" if acc is not None and ci else ""))
        seed = f" seed {r.get('seed')}"
        out.append((f"{row_label(r.row)} {col_label(r.column)}{seed}", cells))
    return instances, out


def markdown(runs) -> str:
    """The table as markdown, or '' when no run has per-instance accuracies."""
    instances, table = rows(runs)
    if not table:
        return ""
    lines = [
        f"## {TITLE}",
        "",
        *markdown_lines("run", [f"instance {k}" for k in instances], table),
    ]
    return "\n".join(lines) + "\n"


def print_table(runs, console) -> None:
    instances, table = rows(runs)
    if table:
        columns = [f"instance {k}" for k in instances]
        console.print(rich_table(TITLE + " ± 95 % CI over test episodes", "run", columns, table))
