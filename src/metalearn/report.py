"""Results of a sweep as a paper table, learning curves and a list of failed jobs.

    python -m metalearn.report multirun/2026-01-31/12-00-00     # a sweep directory
    python -m metalearn.report multirun/                          # or any tree of runs

Every ``metrics.json`` under DIR is one run. The table follows the FF15 report's results
figure: one row per dataset / samples per class / algorithm, one column per N-way K-shot,
cells = meta-test accuracy ± 95 % confidence interval in %. Two kinds of interval, told apart in
the cell: a cell with one run shows that run's accuracy ± its interval over its test episodes;
a cell marked ``(n=K seeds)`` shows the mean of K runs ± the Student t interval of that mean
across runs (t_{0.975,K-1} * std / sqrt(K)). ``k failed`` in a cell counts its runs that failed
and are left out of the mean.
Overrides that differ between runs and are not table axes (say ``algo.inner_lr``) become part
of the row label, so an ablation never averages different settings into one cell.

Written into DIR (or ``--out``): ``results.md`` (table + failures), ``results.csv`` (one line
per cell), ``learning_curves.png`` (validation accuracy per epoch, one line per shots value,
one panel per dataset / algorithm / ways; the band is a single run's interval over validation
episodes, or the t interval across runs where a line averages several); the table and the
failures are also printed.

Failed jobs: a ``metrics.json`` with ``status: failed`` (or ``interrupted``: Ctrl-C) and its
``error``; a job directory (one with ``.hydra/``) without ``metrics.json`` (killed, out of
memory, still running) shows the last error line of its log.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hydra.experimental.callback import Callback

# overrides that are table axes (or the seed, averaged over), never part of a row's label
AXES = {"algo", "algo.name", "data", "data.name", "ways", "shots", "seed", "data.samples_per_class"}
# run bookkeeping that says nothing about the setting
IGNORED = (
    "hydra",
    "logger",
    "print_config",
    "output_dir",
    "ckpt_path",
    "trainer.enable_",
    "trainer.devices",
    "trainer.accelerator",
    "data.root",
    "data.num_workers",
)


@dataclass
class Run:
    """One job: its metrics.json (or what is known of a job that left none)."""

    dir: Path
    metrics: dict
    overrides: dict[str, str] = field(default_factory=dict)
    variant: str = ""

    @property
    def ok(self) -> bool:
        return self.metrics.get("status") == "ok"

    def get(self, key, default=None):
        return self.metrics.get(key, default)

    @property
    def row(self) -> tuple:
        samples = self.get("samples_per_class")
        return (
            str(self.get("dataset", "?")),
            "all" if samples is None else str(samples),
            str(self.get("algo", "?")),
            " ".join(v for v in (self.variant, self.evaluated()) if v),
        )

    def evaluated(self) -> str:
        """'evaluation of <dataset> <w>w<s>s' for a ``metalearn.evaluate`` result: a
        checkpoint scored on other episodes than its own run's test."""
        if self.get("kind") != "evaluation":
            return ""
        t = self.get("trained") or {}
        return f"evaluation of {t.get('dataset')} {t.get('ways')}w{t.get('shots')}s"

    @property
    def column(self) -> tuple[int, int]:
        return int(self.get("ways", 0)), int(self.get("shots", 0))


# ---- collecting runs -------------------------------------------------------------------
def read_overrides(job_dir: Path) -> dict[str, str]:
    """``key=value`` overrides of a Hydra job (``.hydra/overrides.yaml``), without +/~."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    from omegaconf import OmegaConf

    out = {}
    for item in OmegaConf.load(path) or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def last_error(job_dir: Path) -> str:
    """The last ERROR line (or traceback end) in a job's logs, for jobs without metrics."""
    lines = []
    for log in sorted(job_dir.glob("*.log")):
        lines += log.read_text(errors="replace").splitlines()
    errors = [ln for ln in lines if "[ERROR]" in ln or re.match(r"^\w+(Error|Exception)\b", ln)]
    if errors:
        return errors[-1].split("] ")[-1].strip()
    return "no metrics.json and no error in the job's log (killed, or still running?)"


def collect(root: Path) -> list[Run]:
    """Every run under ``root``: metrics.json files, and job dirs that left none."""
    root = Path(root)
    runs = []
    seen = set()
    for path in sorted(root.rglob("metrics.json")):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            metrics = {"status": "failed", "error": f"unreadable metrics.json: {err}"}
        runs.append(Run(path.parent, metrics, read_overrides(path.parent)))
        seen.add(path.parent.resolve())
    for hydra_dir in sorted(root.rglob(".hydra")):
        job = hydra_dir.parent
        if job.resolve() in seen or not (hydra_dir / "config.yaml").exists():
            continue
        runs.append(
            Run(
                job,
                {**info_from_config(job), "status": "missing", "error": last_error(job)},
                read_overrides(job),
            )
        )
    label_variants(runs)
    return runs


def info_from_config(job_dir: Path) -> dict:
    """algo/dataset/ways/shots of a job that wrote no metrics.json, from .hydra/config.yaml."""
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
        return {
            "algo": OmegaConf.select(cfg, "algo.name"),
            "dataset": OmegaConf.select(cfg, "data.name"),
            "ways": cfg.get("ways"),
            "shots": cfg.get("shots"),
            "seed": cfg.get("seed"),
            "samples_per_class": OmegaConf.select(cfg, "data.samples_per_class"),
        }
    except Exception:  # noqa: BLE001 - best effort for a broken job
        return {}


def label_variants(runs: list[Run]) -> None:
    """Row label suffix: the overrides (not axes) whose values differ between runs."""
    keys = {k for r in runs for k in r.overrides if k not in AXES and not k.startswith(IGNORED)}
    varying = sorted(k for k in keys if len({r.overrides.get(k) for r in runs}) > 1)
    for r in runs:
        r.variant = " ".join(f"{k}={r.overrides[k]}" for k in varying if k in r.overrides)


# ---- intervals ---------------------------------------------------------------------------
# Student t quantiles t_{0.975, df} for df = 1..30; the normal 1.96 beyond
T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_interval(values: list[float]) -> float | None:
    """Half-width of the 95 % CI of the mean of ``values`` (runs): t_{0.975,n-1} * std / sqrt(n).

    None for fewer than two values (no spread to estimate)."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96
    return t * std / math.sqrt(n)


def legend(metric: str) -> str:
    """What a cell says: the caption of the table (markdown and printed)."""
    name = "meta-test accuracy" if metric == "test/acc" else metric
    return (
        f"{name} (%) ± 95 % confidence interval; rows: dataset / samples per class / algorithm. "
        "A cell without (n=…) is one run ± its CI over the test episodes; "
        "a cell with (n=K seeds) is the mean of K runs ± the Student t CI of that mean across "
        "runs (t_0.975,K-1 · std / √K); k failed: runs of the cell that failed, left out."
    )


# ---- the table ---------------------------------------------------------------------------
@dataclass
class Cell:
    runs: list[Run]
    metric: str = "test/acc"

    @property
    def ok_runs(self) -> list[Run]:
        return [r for r in self.runs if r.ok and r.get(self.metric) is not None]

    @property
    def values(self) -> list[float]:
        return [float(r.get(self.metric)) for r in self.ok_runs]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return sum(self.values) / self.n if self.n else None

    @property
    def ci95(self) -> float | None:
        """One run: its own CI over test episodes; several: t interval of the mean across runs."""
        if self.n == 1:
            return self.ok_runs[0].get(f"{self.metric}_ci95")
        return t_interval(self.values)

    @property
    def failed(self) -> int:
        return sum(not r.ok for r in self.runs)

    def text(self) -> str:
        """``mean ± CI``: one run ± its CI over test episodes, or, marked ``(n=K seeds)``, the
        mean of K runs ± the t interval across them; ``k failed`` counts runs left out."""
        if self.n == 0:
            return "failed" if self.failed else "n/a"
        ci = self.ci95
        out = f"{100 * self.mean:.1f}" + ("" if ci is None else f" ± {100 * ci:.1f}")
        notes = [f"n={self.n} seeds"] if self.n > 1 else []
        notes += [f"{self.failed} failed"] if self.failed else []
        return out + (f" ({', '.join(notes)})" if notes else "")


def table(runs: list[Run], metric: str = "test/acc") -> tuple[list, list, dict]:
    """(rows, columns, cells): rows sorted by dataset/samples/algo, columns by ways, shots."""
    cells: dict[tuple, Cell] = defaultdict(lambda: Cell([], metric))
    for r in runs:
        cells[(r.row, r.column)].runs.append(r)
    rows = sorted({k[0] for k in cells}, key=_row_key)
    cols = sorted({k[1] for k in cells})
    return rows, cols, dict(cells)


def _row_key(row: tuple):
    dataset, samples, algo, variant = row
    return dataset, int(samples) if samples.isdigit() else -1, algo, variant


def row_label(row: tuple) -> str:
    dataset, samples, algo, variant = row
    label = f"{dataset} / {samples} / {algo}"
    return f"{label} [{variant}]" if variant else label


def col_label(col: tuple[int, int]) -> str:
    return f"{col[0]}-way {col[1]}-shot"


def markdown(rows, cols, cells, failures: list[Run], metric: str, root: Path) -> str:
    lines = [
        f"# Results: {root}",
        "",
        legend(metric),
        "",
        "| dataset / samples / algorithm | " + " | ".join(map(col_label, cols)) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for row in rows:
        texts = [cells[(row, c)].text() if (row, c) in cells else "" for c in cols]
        lines.append(f"| {row_label(row)} | " + " | ".join(texts) + " |")
    lines += ["", failure_markdown(failures, root)]
    return "\n".join(lines) + "\n"


def with_instance_table(text: str, runs: list[Run]) -> str:
    """``text`` plus the per-instance table of sequence learners (MANN), if any run has one."""
    from metalearn.report_instances import markdown as instance_markdown

    table = instance_markdown(runs)
    return f"{text}\n{table}" if table else text


def failure_markdown(failures: list[Run], root: Path) -> str:
    if not failures:
        return "No failed jobs."
    lines = [f"## Failed jobs ({len(failures)})", "", "| job | setting | error |", "|---|---|---|"]
    for r in failures:
        lines.append(
            f"| {_rel(r.dir, root)} | {_setting(r)} | "
            f"{str(r.get('error', '?')).replace('|', '/')} |"
        )
    return "\n".join(lines)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return str(path)


def _setting(r: Run) -> str:
    return (
        f"{r.get('algo')} {r.get('dataset')} {r.get('ways')}-way {r.get('shots')}-shot "
        f"seed {r.get('seed')}" + (f" [{r.variant}]" if r.variant else "")
    )


def write_csv(path: Path, rows, cols, cells, metric: str) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "dataset",
                "samples_per_class",
                "algo",
                "variant",
                "ways",
                "shots",
                "runs",
                "failed",
                metric,
                f"{metric}_ci95",
                "cell",
            ]
        )
        for row in rows:
            for col in cols:
                cell = cells.get((row, col))
                if cell is None:
                    continue
                w.writerow(
                    [
                        *row,
                        *col,
                        cell.n,
                        cell.failed,
                        "" if cell.mean is None else f"{cell.mean:.6f}",
                        "" if cell.ci95 is None else f"{cell.ci95:.6f}",
                        cell.text(),
                    ]
                )


# ---- learning curves ---------------------------------------------------------------------
def plot_curves(runs: list[Run], path: Path) -> bool:
    """Validation accuracy per epoch: one panel per dataset/algo/ways, one line per shots.

    The band: a single run's 95 % CI over validation episodes; for a line that averages
    several runs (``n=K seeds`` in its legend), the t interval across runs (``t_interval``)."""
    panels: dict[tuple, dict[int, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r.ok and r.get("curve"):
            panels[(*r.row, r.column[0])][r.column[1]].append(r)
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = sorted(panels, key=lambda k: (_row_key(k[:4]), k[4]))
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False, sharey=True
    )
    for ax, key in zip(axes.flat, keys, strict=False):
        for shots in sorted(panels[key]):
            epochs, mean, ci = mean_curve(panels[key][shots])
            tests = [r.get("test/acc") for r in panels[key][shots] if r.get("test/acc") is not None]
            n = len(panels[key][shots])
            label = f"{shots}-shot" + (f", n={n} seeds" if n > 1 else "")
            label += f" (test {100 * sum(tests) / len(tests):.1f} %)" if tests else ""
            (line,) = ax.plot(epochs, [100 * m for m in mean], marker="o", ms=3, label=label)
            ax.fill_between(
                epochs,
                [100 * (m - c) for m, c in zip(mean, ci, strict=True)],
                [100 * (m + c) for m, c in zip(mean, ci, strict=True)],
                color=line.get_color(),
                alpha=0.15,
                lw=0,
            )
        dataset, samples, algo, variant, ways = key
        title = f"{algo}, {ways}-way · {dataset}" + ("" if samples == "all" else f"/{samples}")
        ax.set_title(title + (f"\n{variant}" if variant else ""), fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    for ax in axes[:, 0]:
        ax.set_ylabel("validation accuracy (%)")
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    fig.suptitle(
        "band: 95 % CI over validation episodes (one run); t interval across runs (n=K seeds)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def mean_curve(runs: list[Run]) -> tuple[list[int], list[float], list[float]]:
    """Epochs (1 = after the first epoch), mean val acc over runs, and the band's half-width:
    at an epoch with one run its CI over validation episodes, with several the t interval
    of their mean across runs. A run's last validation in an epoch stands for the epoch."""
    by_epoch: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for r in runs:
        # a run stopped mid-epoch (Ctrl-C) and resumed validated that epoch twice: its end wins
        last = {int(point["epoch"]): point for point in r.get("curve")}
        for epoch, point in last.items():
            by_epoch[epoch + 1].append(
                (float(point["val/acc"]), float(point.get("val/acc_ci95") or 0.0))
            )
    epochs = sorted(by_epoch)
    mean = [sum(a for a, _ in by_epoch[e]) / len(by_epoch[e]) for e in epochs]
    ci = [
        by_epoch[e][0][1] if len(by_epoch[e]) == 1 else t_interval([a for a, _ in by_epoch[e]])
        for e in epochs
    ]
    return epochs, mean, ci


# ---- entry point -------------------------------------------------------------------------
def report(
    root: Path,
    out: Path | None = None,
    metric: str = "test/acc",
    plot: bool = True,
    echo: bool = True,
) -> dict:
    """Write results.md, results.csv and learning_curves.png for the runs under ``root``."""
    root, out = Path(root), Path(out or root)
    runs = collect(root)
    if not runs:
        raise SystemExit(f"no metrics.json (and no Hydra job directory) under {root}")
    out.mkdir(parents=True, exist_ok=True)
    rows, cols, cells = table(runs, metric)
    failures = [r for r in runs if not r.ok]
    files = {"markdown": out / "results.md", "csv": out / "results.csv"}
    text = markdown(rows, cols, cells, failures, metric, root)
    files["markdown"].write_text(with_instance_table(text, runs))
    write_csv(files["csv"], rows, cols, cells, metric)
    if plot and plot_curves(runs, out / "learning_curves.png"):
        files["curves"] = out / "learning_curves.png"
    if echo:
        print_report(rows, cols, cells, failures, metric, root, files, runs)
    return {
        "runs": runs,
        "rows": rows,
        "columns": cols,
        "cells": cells,
        "failures": failures,
        "files": files,
    }


def print_report(rows, cols, cells, failures, metric, root, files, runs=()) -> None:
    from rich.console import Console
    from rich.markup import escape  # labels hold [variant]s, which Rich would read as markup
    from rich.table import Table

    console = Console()
    t = Table(
        title=f"{metric} (%) ± 95 % CI — {root}", caption=legend(metric), caption_justify="left"
    )
    t.add_column("dataset / samples / algorithm")
    for c in cols:
        t.add_column(col_label(c), justify="right")
    for row in rows:
        t.add_row(
            escape(row_label(row)),
            *[cells[(row, c)].text() if (row, c) in cells else "" for c in cols],
        )
    console.print(t)
    from metalearn.report_instances import print_table as print_instance_table

    print_instance_table(runs, console)  # sequence learners (MANN) only
    if failures:
        f = Table(title=f"failed jobs ({len(failures)})", title_style="bold red")
        for name in ("job", "setting", "error"):
            f.add_column(name, overflow="fold")
        for r in failures:
            f.add_row(
                *(escape(str(v)) for v in (_rel(r.dir, root), _setting(r), r.get("error", "?")))
            )
        console.print(f)
    else:
        console.print("no failed jobs")
    for kind, path in files.items():
        console.print(f"{kind}: {path}")


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/train.yaml): after a sweep, one line on how
    its jobs ended and the command that turns it into the results table. A sweep whose jobs
    all failed exits with status 1 (as ``metalearn.report`` does), so scripts notice; one with
    some results exits 0."""

    def on_multirun_end(self, config, **kwargs) -> None:
        root = Path(config.hydra.sweep.dir)
        runs = collect(root)
        failed = sum(not r.ok for r in runs)
        print(
            f"\nSweep done: {len(runs)} jobs, {len(runs) - failed} ok, {failed} failed."
            f" Results table and curves: python -m metalearn.report {root}"
        )
        if runs and failed == len(runs):
            raise SystemExit(f"every job of the sweep failed: see {root}/*/metrics.json")


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m metalearn.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dir", type=Path, help="a multirun directory or any tree of runs")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: DIR)")
    parser.add_argument(
        "--metric",
        default="test/acc",
        help="metric of the cells: test/acc (default) or val/acc_best",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip learning_curves.png")
    args = parser.parse_args(None if argv is None else list(argv))
    result = report(args.dir, args.out, args.metric, plot=not args.no_plot)
    return 1 if result["failures"] and not any(r.ok for r in result["runs"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
