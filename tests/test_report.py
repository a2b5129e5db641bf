"""metalearn.report on hand-written runs: table layout and arithmetic, failures, CSV, plot.

(The report on a real sweep is tested in test_sweeps.py.)"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from metalearn.report import collect, main, mean_curve, report, t_interval


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
    # two seeds of one cell: mean and the t interval of the mean across seeds
    write_run(root, "0", seed=0, **{"test/acc": 0.90, "test/acc_ci95": 0.02})
    write_run(root, "1", seed=1, **{"test/acc": 0.92, "test/acc_ci95": 0.03})
    # one run: its own CI over test episodes
    write_run(root, "2", shots=5, **{"test/acc": 0.95, "test/acc_ci95": 0.012})
    write_run(root, "3", algo="fomaml", ways=20, **{"test/acc": 0.70, "test/acc_ci95": 0.004})
    write_run(root, "4", dataset="quickdraw", samples_per_class=20, **{"test/acc": 0.6})
    write_run(root, "5", dataset="quickdraw", samples_per_class=100, **{"test/acc": 0.7})
    # a failed job (metrics.json says why) and a job that died without metrics.json (seed 3 of
    # the two-seed cell above: counted there as failed)
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
    std = math.sqrt(((0.90 - 0.91) ** 2 + (0.92 - 0.91) ** 2) / 1)
    assert two_seeds.mean == pytest.approx(0.91)
    # Student t with 1 degree of freedom, not 1.96 (which gave "± 2.0")
    assert two_seeds.ci95 == pytest.approx(12.706 * std / math.sqrt(2))
    assert two_seeds.text() == "91.0 ± 12.7 (n=2 seeds, 1 failed)"
    assert cells[("maml", (5, 5))].text() == "95.0 ± 1.2"
    assert cells[("fomaml", (20, 1))].text() == "70.0 ± 0.4"
    assert cells[("fomaml", (5, 5))].text() == "failed"
    assert cells[("qd20", (5, 1))].text() == "60.0 ± 1.0"


def test_markdown_csv_and_failures(tree):
    report(tree, echo=False)
    md = (tree / "results.md").read_text()
    assert "| dataset / samples / algorithm | 5-way 1-shot | 5-way 5-shot | 20-way 1-shot |" in md
    assert "| omniglot / all / maml | 91.0 ± 12.7 (n=2 seeds, 1 failed) | 95.0 ± 1.2 |  |" in md
    # the caption says which interval is which
    assert "one run ± its CI over the test episodes" in md
    assert "(n=K seeds) is the mean of K runs ± the Student t CI" in md
    assert "## Failed jobs (2)" in md
    assert "shots+queries" in md and "CUDA out of memory" in md
    assert "| 7 | maml omniglot 5-way 1-shot seed 3 |" in md
    with (tree / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    cell = next(
        r for r in rows if r["algo"] == "maml" and r["dataset"] == "omniglot" and r["shots"] == "1"
    )
    assert cell["runs"] == "2" and cell["failed"] == "1"
    assert float(cell["test/acc"]) == pytest.approx(0.91)
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


def test_terminal_table_keeps_the_bracketed_variant(tmp_path, capsys, monkeypatch):
    """Rich reads '[...]' as markup: row labels are escaped, so ablation rows stay distinct."""
    for name, lr in (("0", "0.1"), ("1", "0.4")):
        write_run(tmp_path, name, ["algo=maml", f"algo.inner_lr={lr}"], **{"test/acc": 0.7})
    monkeypatch.setenv("COLUMNS", "200")
    assert main([str(tmp_path), "--no-plot"]) == 0
    printed = capsys.readouterr().out
    assert "maml [algo.inner_lr=0.1]" in printed and "maml [algo.inner_lr=0.4]" in printed


def test_cli_prints_table_and_failures(tree, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps long cells at the default 80
    assert main([str(tree), "--out", str(tree / "out"), "--no-plot"]) == 0
    printed = capsys.readouterr().out
    assert "91.0 ± 12.7 (n=2 seeds, 1 failed)" in printed and "failed jobs (2)" in printed
    assert (tree / "out" / "results.md").exists()
    assert not (tree / "out" / "learning_curves.png").exists()


def test_a_metric_no_run_has_is_one_message_naming_the_ones_they_have(tree, tmp_path):
    # a typo would otherwise write a table of n/a cells, as if the runs had no results
    with pytest.raises(SystemExit, match="--metric test/accuracy: no successful run") as err:
        main([str(tree), "--metric", "test/accuracy", "--out", str(tmp_path / "out")])
    assert "use one of: --metric test/acc, --metric val/acc_best" in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing written
    # runs trained with test=false have no test/acc: the message names val/acc_best
    untested = tmp_path / "untested"
    write_run(untested, "0", **{"test/acc": None, "test/acc_ci95": None})
    with pytest.raises(SystemExit, match=r"test/acc: .* use one of: --metric val/acc_best$"):
        report(untested, echo=False, plot=False)
    assert report(untested, metric="val/acc_best", echo=False, plot=False)["rows"]


def test_t_interval_uses_student_t_quantiles():
    def expect(values, t):
        n, mean = len(values), sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        return pytest.approx(t * std / math.sqrt(n))

    assert t_interval([]) is None and t_interval([0.5]) is None
    assert t_interval([0.90, 0.92]) == pytest.approx(0.12706, abs=1e-4)
    assert t_interval([0.90, 0.92]) == expect([0.90, 0.92], 12.706)
    assert t_interval([0.1, 0.2, 0.4]) == expect([0.1, 0.2, 0.4], 4.303)
    thirty_one = [i / 100 for i in range(31)]
    assert t_interval(thirty_one) == expect(thirty_one, 2.042)  # df = 30, the last tabled
    forty = [i / 100 for i in range(40)]
    assert t_interval(forty) == expect(forty, 1.96)  # the normal quantile beyond


def test_cell_counts_failed_seeds(tmp_path):
    write_run(tmp_path, "0", seed=0, **{"test/acc": 0.90})
    write_run(tmp_path, "1", seed=1, **{"test/acc": 0.92})
    for seed in (2, 3):
        write_run(tmp_path, f"{seed}", seed=seed, status="failed", error="loss is nan")
    # one run left of two: its own CI, and the failure
    write_run(tmp_path, "4", shots=5, **{"test/acc": 0.95, "test/acc_ci95": 0.012})
    write_run(tmp_path, "5", shots=5, seed=1, status="failed", error="loss is nan")
    out = report(tmp_path, echo=False, plot=False)
    texts = {col: cell.text() for (_, col), cell in out["cells"].items()}
    assert texts == {
        (5, 1): "91.0 ± 12.7 (n=2 seeds, 2 failed)",
        (5, 5): "95.0 ± 1.2 (1 failed)",
    }


def test_a_cell_whose_runs_repeat_a_seed_is_not_called_n_seeds(tmp_path):
    # the same sweep reported twice (or run twice): two runs, one seed, no spread across seeds
    write_run(tmp_path / "a", "0", seed=42, **{"test/acc": 0.90})
    write_run(tmp_path / "b", "0", seed=42, **{"test/acc": 0.90})
    write_run(tmp_path / "b", "1", shots=5, seed=1, **{"test/acc": 0.90})
    write_run(tmp_path / "b", "2", shots=5, seed=2, **{"test/acc": 0.92})
    out = report(tmp_path, echo=False, plot=False)
    texts = {col: cell.text() for (_, col), cell in out["cells"].items()}
    assert texts == {(5, 1): "90.0 ± 0.0 (n=2 runs, 1 seed)", (5, 5): "91.0 ± 12.7 (n=2 seeds)"}
    assert "(n=K runs, S seeds): some runs repeat a seed" in (tmp_path / "results.md").read_text()


def test_curve_band_is_t_interval_across_runs(tmp_path):
    def run(name, seed, accs, ci):
        curve = [{"epoch": e, "val/acc": a, "val/acc_ci95": ci} for e, a in enumerate(accs)]
        return write_run(tmp_path, name, seed=seed, curve=curve)

    run("0", 0, [0.40, 0.50], 0.02)
    run("1", 1, [0.44, 0.50], 0.03)
    runs = sorted(collect(tmp_path), key=lambda r: r.get("seed"))
    epochs, mean, ci = mean_curve(runs)
    assert epochs == [1, 2] and mean == pytest.approx([0.42, 0.50])
    # across the two runs (not the mean 0.025 of their per-episode CIs); zero spread at epoch 2
    assert ci == pytest.approx([t_interval([0.40, 0.44]), 0.0])
    assert ci[0] == pytest.approx(12.706 * math.sqrt(0.0008) / math.sqrt(2))
    # one run: its own CI over validation episodes
    assert mean_curve(runs[1:])[2] == pytest.approx([0.03, 0.03])


def test_curve_takes_the_end_of_an_epoch_validated_twice(tmp_path):
    # stopped mid-epoch 1 (Ctrl-C: validated at step 15), resumed, validated again at its end
    curve = [
        {"epoch": 0, "step": 10, "val/acc": 0.40, "val/acc_ci95": 0.02},
        {"epoch": 1, "step": 15, "val/acc": 0.45, "val/acc_ci95": 0.02},
        {"epoch": 1, "step": 20, "val/acc": 0.50, "val/acc_ci95": 0.02},
    ]
    write_run(tmp_path, "0", curve=curve)
    epochs, mean, ci = mean_curve(collect(tmp_path))
    assert epochs == [1, 2] and mean == pytest.approx([0.40, 0.50])
    assert ci == pytest.approx([0.02, 0.02])  # one run: its own CI, not a spread of two points


def test_long_variant_titles_are_wrapped_and_never_overlap(tmp_path):
    """Three panels side by side, each labelled by a long ablation: every title stays within
    its own panel's width and clear of the other titles and panels."""
    import matplotlib.pyplot as plt

    from metalearn.report import curves_figure

    for k, algo in enumerate(("maml", "fomaml", "reptile")):
        for lr in (0.1, 0.4):
            overrides = [
                f"algo.inner_lr={lr}",
                f"algo.inner_steps={k + 10 * lr:.0f}",
                f"algo.first_order={lr > 0.2}",
                f"data.augment=rotate90_{k}",
                f"model.channels={32 + k}",
                f"algo.outer_lr=0.00{k}{10 * lr:.0f}",
            ]
            write_run(tmp_path, f"{algo}{lr}", overrides, algo=algo)
    fig = curves_figure(collect(tmp_path))
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 6  # one panel per algo and variant: two rows of three
    titles = [ax.title.get_window_extent(renderer) for ax in axes]
    assert all("\n" in ax.get_title() for ax in axes)  # wrapped onto a second line
    boxes = [ax.get_window_extent(renderer) for ax in axes]
    margin = 0.5 * (boxes[1].x0 - boxes[0].x1)  # half the gap between two panels of a row
    for i, title in enumerate(titles):
        assert boxes[i].x0 - margin <= title.x0 and title.x1 <= boxes[i].x1 + margin
        for j, other in enumerate(titles):
            assert j == i or not title.overlaps(other), (axes[i].get_title(), axes[j].get_title())
        for j, ax in enumerate(axes):  # another panel with its tick labels and axis label
            if j != i:
                assert not title.overlaps(ax.get_tightbbox(renderer, bbox_extra_artists=[])), j
    plt.close(fig)


def test_frame_has_one_row_per_run_with_the_keys_that_vary(tmp_path):
    pd = pytest.importorskip("pandas")
    from metalearn.report import frame

    config = (
        "ways: 5\nshots: {shots}\noutput_dir: ${{hydra:runtime.output_dir}}\n"
        "algo:\n  name: maml\n  inner_lr: {lr}\n  first_order: false\n  steps: ${{shots}}\n"
        "data:\n  name: omniglot\n  root: /data/{name}\n"
    )
    for name, shots, lr in (("a", 1, 0.4), ("b", 5, 0.4), ("c", 1, 0.1)):
        job = write_run(tmp_path, name, shots=shots, **{"test/acc": 0.5 + lr})
        (job / ".hydra" / "config.yaml").write_text(config.format(shots=shots, lr=lr, name=name))
    failed = write_run(tmp_path, "d", status="failed", error="ConfigError: bad", curve=None)
    (failed / ".hydra" / "config.yaml").write_text(config.format(shots=1, lr=0.2, name="d"))
    df = frame(tmp_path)
    assert isinstance(df, pd.DataFrame)
    assert list(df.run) == ["a", "b", "c", "d"]
    assert list(df.columns[:7]) == ["run", "status", "algo", "dataset", "ways", "shots", "seed"]
    assert list(df.status) == ["ok", "ok", "ok", "failed"]
    assert list(df["algo.inner_lr"]) == [0.4, 0.4, 0.1, 0.2]
    assert list(df["algo.steps"]) == [1, 5, 1, 1]  # ${shots}, resolved per run
    assert df["test/acc"].tolist()[:3] == pytest.approx([0.9, 0.9, 0.6])
    assert df.error.tolist()[3] == "ConfigError: bad"
    # the same everywhere, bookkeeping, or not a scalar: not a column
    for key in ("algo.first_order", "algo.name", "output_dir", "data.root", "curve"):
        assert key not in df.columns
    assert df[df.status == "ok"].groupby("shots")["test/acc"].mean().to_dict() == pytest.approx(
        {1: 0.75, 5: 0.9}
    )


def regression_run(root: Path, name: str, algo: str, shots: int, mse: float, ci: float, seed=0):
    """A sinusoid run's metrics.json, as train.run writes it (metric: mse)."""
    curve = [
        {"epoch": 0, "step": 100, "val/mse": 3.0, "val/mse_ci95": 0.3},
        {"epoch": 1, "step": 200, "val/mse": mse, "val/mse_ci95": ci},
    ]
    return write_run(
        root, name, algo=algo, dataset="sinusoid", ways=1, shots=shots, seed=seed,
        metric="mse", curve=curve, **{"test/mse": mse, "test/mse_ci95": ci, "val/mse_best": mse},
        **{"test/acc": None, "test/acc_ci95": None, "val/acc_best": None},
    )  # fmt: skip


def test_a_classification_only_table_does_not_explain_mse_columns(tmp_path):
    write_run(tmp_path, "0", **{"test/acc": 0.90, "test/acc_ci95": 0.02})
    report(tmp_path, echo=False, plot=False)
    assert "MSE" not in (tmp_path / "results.md").read_text()


def test_regression_runs_get_mse_columns_beside_accuracy_columns(tmp_path):
    root = tmp_path / "sweep"
    write_run(root, "0", **{"test/acc": 0.90, "test/acc_ci95": 0.02})
    regression_run(root, "1", "maml", 5, 0.6817, 0.0673)
    regression_run(root, "2", "finetune", 5, 3.71, 0.41)
    regression_run(root, "3", "maml", 10, 0.40, 0.05, seed=0)
    regression_run(root, "4", "maml", 10, 0.50, 0.05, seed=1)
    out = report(root, echo=False)
    text = (root / "results.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| dataset"))
    assert header.endswith("| 5-shot MSE | 10-shot MSE | 5-way 1-shot |")
    cells = {(r[0], r[2], c): cell for (r, c), cell in out["cells"].items()}
    assert cells[("sinusoid", "maml", (1, 5))].text() == "0.682 ± 0.067"  # raw, not in %
    assert cells[("sinusoid", "finetune", (1, 5))].text() == "3.710 ± 0.410"
    assert cells[("sinusoid", "maml", (1, 10))].text().startswith("0.450 ± ")  # two seeds
    assert cells[("omniglot", "maml", (5, 1))].text() == "90.0 ± 2.0"
    assert "| sinusoid / all / maml | 0.682 ± 0.067 | 0.450 ± " in text
    assert "K-shot MSE: regression runs' mean-squared error" in text  # the caption says so
    csv_text = (root / "results.csv").read_text()
    assert "sinusoid,all,maml,,1,5,1,0,0.681700,0.067300,0.682 ± 0.067" in csv_text
    # validation curves of MSE (lower is better), beside the accuracy panel
    assert mean_curve([r for r in out["runs"] if r.get("algo") == "finetune"])[1] == [3.0, 3.71]
    assert (root / "learning_curves.png").stat().st_size > 10_000
