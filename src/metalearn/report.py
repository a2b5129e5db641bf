"""Results of a sweep as a paper table, learning curves and a list of failed jobs.

    python -m metalearn.report multirun/2026-01-31/12-00-00     # a sweep directory
    python -m metalearn.report multirun/                          # or any tree of runs

Every ``metrics.json`` under DIR is one run. The table follows the FF15 report's results
figure: one row per dataset / samples per class / algorithm, one column per N-way K-shot,
cells = meta-test accuracy ± 95 % confidence interval in % (regression runs, such as
data=sinusoid: the mean-squared error ± its interval, lower is better, in columns "K-shot
MSE"). Two kinds of interval, told apart in
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

For one's own analysis, ``frame(DIR)`` returns the runs as a pandas DataFrame (one row per run).

Runs on episodes of varying shape (``data.episodes=range|metadataset``) get a column of their
own (``metadataset episodes``) and a second table: their test accuracy binned by the episodes'
number of classes and by their support images per class (``BY_WAYS`` / ``BY_SHOTS``), each
bin's mean ± 95 % CI over its episodes, with the count of episodes; also ``by_shape.csv``.

Failed jobs: a ``metrics.json`` with ``status: failed`` (or ``interrupted``: Ctrl-C) and its
``error``; a training job's directory (one with ``.hydra/``) without ``metrics.json`` (killed,
out of memory, still running) shows the last error line of its log. Directories of other
commands (``show_episode``, which writes no metrics) are not jobs. An unfinished run that a run
in another directory resumed (``resumed_from`` in that one's metrics.json) is left out: the
resumed run stands for it; one line says so.

Debugging runs (``debug=fdr|limit|...`` or a hand-set ``trainer.fast_dev_run``: ``debug`` in
their metrics.json) are left out of the table, the curves and the failures; one line says so.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import textwrap
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hydra.experimental.callback import Callback

from metalearn.report_grid import cell_fields, cell_header, grid_rows, markdown_lines, rich_table
from metalearn.report_mix import dataset_label as mix_dataset_label
from metalearn.report_mix import markdown as cross_domain_markdown
from metalearn.report_mix import print_table as print_cross_domain
from metalearn.report_mix import write_csv as write_cross_domain_csv

# overrides that are table axes (or the seed, averaged over), never part of a row's label
AXES = {"algo", "algo.name", "data", "data.name", "ways", "shots", "seed", "data.samples_per_class"}
AXES |= {"data.train_sources", "data.test_sources", "data.weights"}  # data=mix: in its label
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

    @property
    def debug(self) -> str | None:
        """The debug mode of a debugging run (``debug=fdr``, ...): its accuracy is no result."""
        return self.metrics.get("debug")

    def get(self, key, default=None):
        return self.metrics.get(key, default)

    @property
    def row(self) -> tuple:
        samples = self.get("samples_per_class")
        dataset = mix_dataset_label(self.metrics) if self.get("train_sources") else None
        return (
            dataset or str(self.get("dataset", "?")),
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
    def column(self) -> tuple:
        """(ways, shots); (0, 0, mode) for episodes of varying shape (``data.episodes``)."""
        mode = self.get("episodes", "fixed")
        if mode != "fixed":
            return 0, 0, str(mode)
        return int(self.get("ways", 0)), int(self.get("shots", 0))

    @property
    def task_metric(self) -> str:
        """The run's task metric: acc (classes) or mse (regression); old runs: acc."""
        return str(self.get("metric") or "acc")

    def key(self, metric: str) -> str:
        """``metric`` (say test/acc, val/acc_best) under this run's task metric (test/mse)."""
        return metric.replace("/acc", f"/{self.task_metric}", 1)


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
        if not training_job(job):
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


# Commands that share the training config but write no metrics.json (their task_name)
NOT_JOBS = {"show_episode"}


def training_job(job_dir: Path) -> bool:
    """Whether a Hydra run directory is a training job's, not one of ``show_episode`` (by its
    ``task_name``, or for directories written before there was one, by Hydra's job name)."""
    from omegaconf import OmegaConf

    hydra_file = job_dir / ".hydra" / "hydra.yaml"
    try:
        task = OmegaConf.load(job_dir / ".hydra" / "config.yaml").get("task_name")
        name = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.job.name", default=None)
    except FileNotFoundError:  # hydra.yaml is written with config.yaml; a copied job may lack it
        name = None
    except Exception:  # noqa: BLE001 - a broken job directory is still listed
        return True
    return task not in NOT_JOBS and name not in NOT_JOBS


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
            **({"debug": cfg.debug} if cfg.get("debug") else {}),
        }
    except Exception:  # noqa: BLE001 - best effort for a broken job
        return {}


def label_variants(runs: list[Run]) -> None:
    """Row label suffix: the overrides (not axes) whose values differ between runs."""
    keys = {k for r in runs for k in r.overrides if k not in AXES and not k.startswith(IGNORED)}
    varying = sorted(k for k in keys if len({r.overrides.get(k) for r in runs}) > 1)
    for r in runs:
        r.variant = " ".join(f"{k}={r.overrides[k]}" for k in varying if k in r.overrides)


# ---- a DataFrame for one's own analysis ----------------------------------------------------
# run_info's keys: a frame's first columns, after the run's folder and status
FRAME_FIRST = ("run", "status", "algo", "dataset", "ways", "shots", "seed", "samples_per_class")


def run_config(job_dir: Path) -> dict:
    """A run's composed config, flat (``algo.inner_lr``): ``.hydra/config.yaml`` of a training
    job, ``config.yaml`` of an evaluation. Each interpolation resolved where it can be
    (``${hydra:...}`` cannot, outside the run: it stays as written)."""
    from omegaconf import OmegaConf

    path = job_dir / ".hydra" / "config.yaml"
    path = path if path.exists() else job_dir / "config.yaml"
    try:
        cfg = OmegaConf.load(path)
    except Exception:  # noqa: BLE001 - no config, or a broken one: the metrics still count
        return {}
    flat = {}

    def walk(node, prefix: str) -> None:
        for key in node.keys() if OmegaConf.is_dict(node) else []:
            name = f"{prefix}{key}"
            child = node._get_node(key)
            if OmegaConf.is_dict(child):
                walk(child, name + ".")
                continue
            try:
                value = node[key]
            except Exception:  # noqa: BLE001 - an interpolation that needs the live run
                value = child._value()
            flat[name] = OmegaConf.to_container(value) if OmegaConf.is_list(value) else value

    walk(cfg, "")
    return flat


def frame(root: Path | str):
    """Runs under ``root`` (a sweep, or any tree of runs) as a pandas DataFrame, one row per
    run: its folder (relative to ``root``), status (ok, failed, interrupted, missing), what it
    ran (algo, dataset, ways, shots, seed), the config keys whose values differ between the
    runs (``algo.inner_lr``; bookkeeping such as paths and loggers left out) and every scalar
    metric of its metrics.json (``test/acc``, ``test/acc_ci95``, ``val/acc_best``, ``steps``,
    ``wall_s``, ``error``, ...). Learning curves stay in metrics.json (``curve``).

        from metalearn.report import frame
        df = frame("multirun/2026-01-31/12-00-00")
        df[df.status == "ok"].groupby(["algo", "shots"])["test/acc"].agg(["mean", "std"])
    """
    import pandas as pd

    root = Path(root)
    runs = collect(root)
    configs = [run_config(r.dir) for r in runs]
    keys = sorted({k for c in configs for k in c if not k.startswith(IGNORED)})
    varying = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
    scalars = (str, int, float, bool, type(None))
    nested = {k for r in runs for k, v in r.metrics.items() if not isinstance(v, scalars)}
    rows = []
    for r, config in zip(runs, configs, strict=True):
        row = {"run": _rel(r.dir, root), "status": r.get("status")}
        row |= {k: v for k, v in r.metrics.items() if k in FRAME_FIRST}
        row |= {k: config.get(k) for k in varying if k not in row}
        row |= {k: v for k, v in r.metrics.items() if k not in row and k not in nested}
        rows.append(row)
    columns = [c for c in FRAME_FIRST if any(c in row for row in rows)]
    columns += [c for row in rows for c in row if c not in columns]
    return pd.DataFrame(rows, columns=list(dict.fromkeys(columns)))


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


def legend(metric: str, regression: bool = False) -> str:
    """What a cell says: the caption of the table (markdown and printed); the MSE sentence
    only where the table has regression columns."""
    name = "meta-test accuracy" if metric == "test/acc" else metric
    mse = "columns K-shot MSE: regression runs' mean-squared error (lower is better). "
    return (
        f"{name} (%) ± 95 % confidence interval; rows: dataset / samples per class / algorithm; "
        f"{mse if regression else ''}"
        "A cell without (n=…) is one run ± its CI over the test episodes; "
        "a cell with (n=K seeds) is the mean of K runs ± the Student t CI of that mean across "
        "runs (t_0.975,K-1 · std / √K); (n=K runs, S seeds): some runs repeat a seed; "
        "k failed: runs of the cell that failed, left out."
    )


# ---- the table ---------------------------------------------------------------------------
@dataclass
class Cell:
    runs: list[Run]
    metric: str = "test/acc"

    @property
    def ok_runs(self) -> list[Run]:
        return [r for r in self.runs if r.ok and r.get(r.key(self.metric)) is not None]

    @property
    def values(self) -> list[float]:
        return [float(r.get(r.key(self.metric))) for r in self.ok_runs]

    @property
    def percent(self) -> bool:
        """Accuracies print in %; an MSE as it is."""
        return all(r.task_metric == "acc" for r in self.runs)

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
            run = self.ok_runs[0]
            return run.get(f"{run.key(self.metric)}_ci95")
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
        scale, digits = (100, 1) if self.percent else (1, 3)
        out = f"{scale * self.mean:.{digits}f}" + (
            "" if ci is None else f" ± {scale * ci:.{digits}f}"
        )
        notes = [runs_note(self.ok_runs)] if self.n > 1 else []
        notes += [f"{self.failed} failed"] if self.failed else []
        return out + (f" ({', '.join(notes)})" if notes else "")


def runs_note(runs: list[Run]) -> str:
    """``n=K seeds``; ``n=K runs, S seeds`` where runs repeat a seed (the same sweep run twice):
    their spread is then not the spread across seeds."""
    seeds = len({str(r.get("seed")) for r in runs})
    if seeds == len(runs):
        return f"n={len(runs)} seeds"
    return f"n={len(runs)} runs, {seeds} seed{'s' * (seeds != 1)}"


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


def col_label(col: tuple, cells: dict | None = None) -> str:
    """``5-way 1-shot``; a column of varying episodes: ``metadataset episodes``; a column of
    regression runs (one function per task, no ways): ``5-shot MSE``."""
    if len(col) == 3:
        return f"{col[2]} episodes"
    runs = [r for (_, c), cell in (cells or {}).items() if c == col for r in cell.runs]
    if runs and all(r.task_metric != "acc" for r in runs):
        return f"{col[1]}-shot {runs[0].task_metric.upper()}"
    return f"{col[0]}-way {col[1]}-shot"


# ---- accuracy by the episodes' shape (varying ways and shots) ------------------------------
BY_WAYS = ((2, 4), (5, 9), (10, 19), (20, 29), (30, 39), (40, 10**6))
BY_SHOTS = ((1, 2), (2, 4), (4, 7), (7, 10), (10, 10**6))  # [low, high) support per class


def bin_label(low, high, half_open: bool) -> str:
    last = high - 1 if half_open else high
    if high >= 10**6:
        return f"{low}+"
    return f"{low}" if last == low else f"{low}-{last}"


def shape_bins(run: Run) -> dict[str, tuple[float, float, int]]:
    """``"ways 5-9"`` / ``"shots 2-3"`` -> (mean accuracy, 95 % CI, episodes) of a run's test
    episodes (``test/by_episode``); shots are an episode's support images per class (a mean
    where its classes differ)."""
    table = run.get("test/by_episode") or {}
    accs, ways, shots = (table.get(k, []) for k in ("acc", "ways", "shots"))
    out = {}
    for name, values, bins, half_open in (
        ("ways", ways, BY_WAYS, False),
        ("shots", shots, BY_SHOTS, True),
    ):
        for low, high in bins:
            inside = [
                a
                for a, v in zip(accs, values, strict=True)
                if low <= v < high or (not half_open and v == high)
            ]
            if inside:
                n = len(inside)
                mean = sum(inside) / n
                std = math.sqrt(sum((a - mean) ** 2 for a in inside) / (n - 1)) if n > 1 else 0.0
                out[f"{name} {bin_label(low, high, half_open)}"] = (mean, 1.96 * std / n**0.5, n)
    return out


def shape_table(runs: list[Run]) -> tuple[list[str], list[tuple[str, dict]]]:
    """(bin names, [(run label, bins)]) for the runs with per-episode test results."""
    rows = [
        (f"{row_label(r.row)} ({col_label(r.column)})", shape_bins(r))
        for r in runs
        if r.ok and r.get("test/by_episode")
    ]
    names = [n for n in (f"ways {bin_label(*b, False)}" for b in BY_WAYS)] + [
        f"shots {bin_label(*b, True)}" for b in BY_SHOTS
    ]
    names = [n for n in names if any(n in bins for _, bins in rows)]
    return names, rows


def shape_text(value: tuple[float, float, int] | None) -> str:
    if value is None:
        return ""
    mean, ci, n = value
    return f"{100 * mean:.1f} ± {100 * ci:.1f} ({n})"


def shape_markdown(runs: list[Run]) -> str:
    names, rows = shape_table(runs)
    if not rows:
        return ""
    lines = [
        "## Accuracy by the episodes' ways and shots",
        "",
        "Runs on episodes of varying shape: test accuracy (%) ± 95 % CI over the test episodes"
        " of each bin (their count in brackets); shots = support images per class.",
        "",
        *markdown_lines("run", names, shape_rows(names, rows)),
    ]
    return "\n".join(lines) + "\n"


def shape_rows(names: list[str], rows) -> list[tuple[str, list[str]]]:
    return [(label, [shape_text(bins.get(n)) for n in names]) for label, bins in rows]


def write_shape_csv(path: Path, runs: list[Run]) -> bool:
    names, rows = shape_table(runs)
    if not rows:
        return False
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "bin", "acc", "acc_ci95", "episodes"])
        for label, bins in rows:
            for name in names:
                if name in bins:
                    mean, ci, n = bins[name]
                    w.writerow([label, name, f"{mean:.6f}", f"{ci:.6f}", n])
    return True


def has_regression(cols, cells) -> bool:
    return any("MSE" in col_label(c, cells) for c in cols)


CORNER = "dataset / samples / algorithm"


def markdown(rows, cols, cells, failures: list[Run], metric: str, root: Path) -> str:
    lines = [
        f"# Results: {root}",
        "",
        legend(metric, has_regression(cols, cells)),
        "",
        *markdown_lines(
            CORNER, [col_label(c, cells) for c in cols], grid_rows(rows, cols, cells, row_label)
        ),
    ]
    by_shape = shape_markdown(
        [r for row in rows for c in cols for r in cells.get((row, c), Cell([])).runs]
    )
    lines += ["", *([by_shape] if by_shape else []), failure_markdown(failures, root)]
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
                *cell_header(metric),
                "episodes",
            ]
        )
        for row in rows:
            for col in cols:
                cell = cells.get((row, col))
                if cell is None:
                    continue
                varying = len(col) == 3
                w.writerow(
                    [
                        *row,
                        *(("", "") if varying else col),
                        *cell_fields(cell),
                        col[2] if varying else "fixed",
                    ]
                )


# ---- learning curves ---------------------------------------------------------------------
PANEL_WIDTH_IN = 4.6
TITLE_PT, VARIANT_PT = 10, 8


def panel_title(key: tuple, width_in: float = PANEL_WIDTH_IN) -> str:
    """``algo, N-way · dataset`` and, below, the variant wrapped to the panel's width (a long
    ablation label on one line ran into the neighbouring panels' titles)."""
    dataset, samples, algo, variant, ways = key
    title = f"{algo}, {ways}-way · {dataset}" + ("" if samples == "all" else f"/{samples}")
    if not variant:
        return title
    # characters per line: the panel's width over an average glyph (~0.6 em) of the small font
    chars = max(20, int(width_in * 72 / (0.6 * VARIANT_PT)))
    return title + "\n" + textwrap.fill(variant, chars, break_on_hyphens=False)


def curves_figure(runs: list[Run]):
    """Validation accuracy per epoch: one panel per dataset/algo/ways, one line per shots
    (a matplotlib Figure; None when no run has a curve).

    The band: a single run's 95 % CI over validation episodes; for a line that averages
    several runs (``n=K seeds`` in its legend), the t interval across runs (``t_interval``)."""
    panels: dict[tuple, dict[int, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r.ok and r.get("curve"):
            panels[(*r.row, r.column[0])][r.column[1]].append(r)
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = sorted(panels, key=lambda k: (_row_key(k[:4]), k[4]))
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    kinds = {r.task_metric for k in keys for g in panels[k].values() for r in g}
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(PANEL_WIDTH_IN * ncols, 3.4 * nrows),
        squeeze=False,
        sharey=len(kinds) == 1,
    )
    for ax, key in zip(axes.flat, keys, strict=False):
        for shots in sorted(panels[key]):
            epochs, mean, ci = mean_curve(panels[key][shots])
            group = panels[key][shots]
            m_name = group[0].task_metric
            scale = 100 if m_name == "acc" else 1
            tests = [r.get(f"test/{m_name}") for r in group if r.get(f"test/{m_name}") is not None]
            n = len(group)
            label = f"{shots}-shot" + (f", {runs_note(group)}" if n > 1 else "")
            if tests:
                mean_test = sum(tests) / len(tests)
                shown = f"{100 * mean_test:.1f} %" if scale == 100 else f"{mean_test:.3f}"
                label += f" (test {shown})"
            (line,) = ax.plot(epochs, [scale * m for m in mean], marker="o", ms=3, label=label)
            ax.fill_between(
                epochs,
                [scale * (m - c) for m, c in zip(mean, ci, strict=True)],
                [scale * (m + c) for m, c in zip(mean, ci, strict=True)],
                color=line.get_color(),
                alpha=0.15,
                lw=0,
            )
        title = panel_title(key)
        ax.set_title(title, fontsize=TITLE_PT if "\n" not in title else VARIANT_PT)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        regression = next(iter(panels[key].values()))[0].task_metric != "acc"
        if regression or ax in axes[:, 0]:
            ax.set_ylabel("validation MSE" if regression else "validation accuracy (%)")
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    caption = "band: 95 % CI over validation episodes (one run); t interval across runs (n=K seeds)"
    # about 13 characters of 9 pt text per inch: one panel is narrower than the caption
    fig.suptitle(textwrap.fill(caption, int(13 * PANEL_WIDTH_IN * ncols)), fontsize=9)
    fig.tight_layout()  # makes room for the titles' lines between the rows
    return fig


def plot_curves(runs: list[Run], path: Path) -> bool:
    """``curves_figure`` saved as ``path``; False when no run has a curve."""
    fig = curves_figure(runs)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

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
        m = r.task_metric
        for epoch, point in last.items():
            by_epoch[epoch + 1].append(
                (float(point[f"val/{m}"]), float(point.get(f"val/{m}_ci95") or 0.0))
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
    debug = [r for r in runs if r.debug]
    continued = continued_elsewhere(runs)
    runs = [r for r in runs if not r.debug and r.dir not in continued]
    check_metric(runs, metric, root)
    out.mkdir(parents=True, exist_ok=True)
    rows, cols, cells = table(runs, metric)
    failures = [r for r in runs if not r.ok]
    files = {"markdown": out / "results.md", "csv": out / "results.csv"}
    text = markdown(rows, cols, cells, failures, metric, root)
    cross = cross_domain_markdown(runs)  # data=mix runs: one row per mix, a column per source
    files["markdown"].write_text(
        with_instance_table(text, runs)
        + (f"\n{cross}" if cross else "")
        + (f"\n{left_out(debug)}\n" if debug else "")
        + (f"\n{left_out_continued(continued, root)}\n" if continued else "")
    )
    write_csv(files["csv"], rows, cols, cells, metric)
    if write_cross_domain_csv(out / "cross_domain.csv", runs):
        files["cross_domain"] = out / "cross_domain.csv"
    if write_shape_csv(out / "by_shape.csv", runs):
        files["by_shape"] = out / "by_shape.csv"
    if plot and plot_curves(runs, out / "learning_curves.png"):
        files["curves"] = out / "learning_curves.png"
    if echo:
        print_report(rows, cols, cells, failures, metric, root, files, runs)
        if debug:
            print(left_out(debug))
        if continued:
            print(left_out_continued(continued, root))
    return {
        "runs": runs,
        "debug": debug,
        "rows": rows,
        "columns": cols,
        "cells": cells,
        "failures": failures,
        "files": files,
    }


def continued_elsewhere(runs: list[Run]) -> dict[Path, Run]:
    """Unfinished runs (interrupted, failed, killed) that a run in another directory resumed
    from their checkpoints (``resumed_from`` in its metrics.json): their directory -> that run,
    which stands for them (a Ctrl-C, then the printed ``ckpt_path=`` in a new run directory)."""
    by_dir = {}
    for r in runs:
        resumed = r.get("resumed_from")
        if resumed and Path(resumed).parent.parent != r.dir.resolve():
            by_dir[Path(resumed).parent.parent] = r
    return {r.dir: by_dir[r.dir.resolve()] for r in runs if not r.ok and r.dir.resolve() in by_dir}


def left_out_continued(continued: dict[Path, Run], root: Path) -> str:
    """One line on the unfinished runs left out because another run continued them."""
    pairs = ", ".join(f"{_rel(a, root)} -> {_rel(b.dir, root)}" for a, b in continued.items())
    n = len(continued)
    return f"left out {n} unfinished run{'s' * (n != 1)} resumed in another directory ({pairs})"


def check_metric(runs: list[Run], metric: str, root: Path) -> None:
    """Stop before writing anything when no successful run has ``metric`` (a typo, or
    test/acc of runs with test=false): a table of n/a cells would look like missing results."""
    ok = [r for r in runs if r.ok]
    if not ok or any(r.get(r.key(metric)) is not None for r in ok):
        return
    numbers = (int, float)
    found = sorted(
        {
            k
            for r in ok
            for k, v in r.metrics.items()
            if "/" in k and "_ci95" not in k and isinstance(v, numbers) and not isinstance(v, bool)
        }
    )
    raise SystemExit(
        f"--metric {metric}: no successful run under {root} has it; "
        f"use one of: {', '.join(f'--metric {k}' for k in found) or '(none recorded)'}"
    )


def left_out(debug: list[Run]) -> str:
    """One line on the debugging runs the report leaves out."""
    modes = sorted({str(r.debug) for r in debug})
    return (
        f"left out {len(debug)} debugging run{'s' * (len(debug) != 1)} "
        f"({', '.join(f'debug={m}' for m in modes)}): their accuracy is no result"
    )


def print_report(rows, cols, cells, failures, metric, root, files, runs=()) -> None:
    from rich.console import Console
    from rich.markup import escape  # labels hold [variant]s, which Rich would read as markup
    from rich.table import Table

    console = Console()
    console.print(
        rich_table(
            f"{metric} (%) ± 95 % CI — {root}",
            CORNER,
            [col_label(c, cells) for c in cols],
            grid_rows(rows, cols, cells, row_label),
            caption=legend(metric, has_regression(cols, cells)),
            caption_justify="left",
        )
    )
    names, by_shape = shape_table([r for cell in cells.values() for r in cell.runs])
    if by_shape:
        title = "accuracy (%) by the episodes' ways and shots ± 95 % CI (episodes)"
        console.print(rich_table(title, "run", names, shape_rows(names, by_shape)))
    from metalearn.report_instances import print_table as print_instance_table

    print_instance_table(runs, console)  # sequence learners (MANN) only
    print_cross_domain(runs, console)  # runs on several sources (data=mix) only
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
        help="metric of the cells: test/acc (default) or val/acc_best (regression runs: "
        "test/mse, val/mse_best)",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip learning_curves.png")
    args = parser.parse_args(None if argv is None else list(argv))
    result = report(args.dir, args.out, args.metric, plot=not args.no_plot)
    return 1 if result["failures"] and not any(r.ok for r in result["runs"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
