"""metalearn.report on hand-written runs: table layout and arithmetic, failures, CSV, plot.

(The report on a real sweep is tested in test_sweeps.py.)"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from metalearn.report import collect, main, report


def write_run(root: Path, name: str, overrides: list[str] = (), **metrics) -> Path:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text("ways: 5\n")
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    base = {
        "algo": "maml",
        "dataset": "omniglot",
        "ways": 5,
        "shots": 1,
        "queries": 15,
        "seed": 0,
        "samples_per_class": None,
        "status": "ok",
        "test/acc": 0.5,
        "test/acc_ci95": 0.01,
        "val/acc_best": 0.5,
        "curve": [
            {"epoch": 0, "step": 10, "val/acc": 0.4, "val/acc_ci95": 0.02},
            {"epoch": 1, "step": 20, "val/acc": 0.5, "val/acc_ci95": 0.02},
        ],
    }
    (job / "metrics.json").write_text(json.dumps({**base, **metrics}))
    return job


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "sweep"
    # two seeds of one cell: mean and the CI of the mean across seeds
    write_run(root, "0", seed=0, **{"test/acc": 0.90, "test/acc_ci95": 0.02})
    write_run(root, "1", seed=1, **{"test/acc": 0.80, "test/acc_ci95": 0.03})
    # one run: its own CI over test episodes
    write_run(root, "2", shots=5, **{"test/acc": 0.95, "test/acc_ci95": 0.012})
    write_run(root, "3", algo="fomaml", ways=20, **{"test/acc": 0.70, "test/acc_ci95": 0.004})
    write_run(root, "4", dataset="quickdraw", samples_per_class=20, **{"test/acc": 0.6})
    write_run(root, "5", dataset="quickdraw", samples_per_class=100, **{"test/acc": 0.7})
    # a failed job (metrics.json says why) and a job that died without metrics.json
    write_run(
        root,
        "6",
        algo="fomaml",
        shots=5,
        status="failed",
        error="ConfigError: data=omniglot has 20 images per class but shots+queries",
    )
    dead = root / "7"
    (dead / ".hydra").mkdir(parents=True)
    (dead / ".hydra" / "config.yaml").write_text(
        "ways: 5\nshots: 1\nseed: 3\nalgo: {name: maml}\ndata: {name: omniglot}\n"
    )
    (dead / "train.log").write_text(
        "[2026-01-01 10:00:00][metalearn.train][ERROR] job failed, "
        "sweep continues: CUDA out of memory\n"
    )
    return root


def test_cells_rows_and_columns(tree):
    out = report(tree, echo=False)
    rows = [" / ".join(r[:3]) for r in out["rows"]]
    assert rows == [
        "omniglot / all / fomaml",
        "omniglot / all / maml",
        "quickdraw / 20 / maml",
        "quickdraw / 100 / maml",
    ]
    assert out["columns"] == [(5, 1), (5, 5), (20, 1)]
    cells = {
        (r[2] if r[0] == "omniglot" else f"qd{r[1]}", c): cell
        for (r, c), cell in out["cells"].items()
    }
    two_seeds = cells[("maml", (5, 1))]
    std = math.sqrt(((0.9 - 0.85) ** 2 + (0.8 - 0.85) ** 2) / 1)
    assert two_seeds.mean == pytest.approx(0.85)
    assert two_seeds.ci95 == pytest.approx(1.96 * std / math.sqrt(2))
    assert two_seeds.text() == "85.0 ± 9.8 (n=2)"
    assert cells[("maml", (5, 5))].text() == "95.0 ± 1.2"
    assert cells[("fomaml", (20, 1))].text() == "70.0 ± 0.4"
    assert cells[("fomaml", (5, 5))].text() == "failed"
    assert cells[("qd20", (5, 1))].text() == "60.0 ± 1.0"


def test_markdown_csv_and_failures(tree):
    report(tree, echo=False)
    md = (tree / "results.md").read_text()
    assert "| dataset / samples / algorithm | 5-way 1-shot | 5-way 5-shot | 20-way 1-shot |" in md
    assert "| omniglot / all / maml | 85.0 ± 9.8 (n=2) | 95.0 ± 1.2 |  |" in md
    assert "## Failed jobs (2)" in md
    assert "shots+queries" in md and "CUDA out of memory" in md
    assert "| 7 | maml omniglot 5-way 1-shot seed 3 |" in md
    with (tree / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    cell = next(
        r for r in rows if r["algo"] == "maml" and r["dataset"] == "omniglot" and r["shots"] == "1"
    )
    assert cell["runs"] == "2" and float(cell["test/acc"]) == pytest.approx(0.85)
    assert (tree / "learning_curves.png").stat().st_size > 10_000


def test_differing_overrides_split_rows(tmp_path):
    write_run(
        tmp_path,
        "0",
        ["algo=maml", "algo.inner_lr=0.1", "trainer.max_steps=5"],
        **{"test/acc": 0.6},
    )
    write_run(
        tmp_path,
        "1",
        ["algo=maml", "algo.inner_lr=0.4", "trainer.max_steps=5"],
        **{"test/acc": 0.8},
    )
    runs = collect(tmp_path)
    assert sorted(r.variant for r in runs) == ["algo.inner_lr=0.1", "algo.inner_lr=0.4"]
    out = report(tmp_path, echo=False, plot=False)
    assert len(out["rows"]) == 2  # never averaged into one cell
    assert (
        "omniglot / all / maml [algo.inner_lr=0.4] | 80.0 ± 1.0"
        in (tmp_path / "results.md").read_text()
    )


def test_cli_prints_table_and_failures(tree, capsys):
    assert main([str(tree), "--out", str(tree / "out"), "--no-plot"]) == 0
    printed = capsys.readouterr().out
    assert "85.0 ± 9.8 (n=2)" in printed and "failed jobs (2)" in printed
    assert (tree / "out" / "results.md").exists()
    assert not (tree / "out" / "learning_curves.png").exists()
