"""Sweeps end to end on CPU: ``hydra/launcher=gpu_pool`` (no GPU: 2 parallel CPU processes),
a failing cell that loses nothing, one offline W&B run per job, the report on the real sweep,
and an Optuna smoke test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metalearn.checks import check_sweep_objective
from metalearn.errors import ConfigError
from metalearn.report import frame, report
from tests.helpers import REPO, compose_cfg, read_offline_run

TINY = [
    "model.channels=8",
    "algo.meta_batch_size=2",
    "queries=5",
    "data.batches_per_epoch=2",
    "trainer.max_steps=4",  # two epochs: two points per learning curve
    "data.val_episodes=10",
    "data.test_episodes=10",
    "data.eval_batch_size=5",
    "print_config=false",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "hydra.sweep.subdir=${hydra.job.num}",
]


def train(args: list[str], data_root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "METALEARN_DATA_DIR": str(data_root), "WANDB_MODE": "offline"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_root) -> tuple[Path, str]:
    """6 jobs = {maml, fomaml} x shots {1, 2, 20}; 20 shots + 5 queries > Omniglot's 20
    drawers per character: those two cells fail at setup, the other four train."""
    root = tmp_path_factory.mktemp("sweep")
    proc = train(
        [
            "-m",
            "hydra/launcher=gpu_pool",
            "algo=maml,fomaml",
            "shots=1,2,20",
            *TINY,
            "logger=wandb",
            f"hydra.sweep.dir={root}",
        ],
        data_root,
    )
    return root, proc.stdout + proc.stderr


def jobs(root: Path) -> dict[Path, dict]:
    return {p.parent: json.loads(p.read_text()) for p in sorted(root.glob("*/metrics.json"))}


def test_pool_runs_all_jobs_two_at_a_time(sweep):
    root, log = sweep
    assert "Joblib.Parallel(n_jobs=2," in log  # no GPU here: the CPU fallback of gpu_pool
    assert "CPU process with" in log
    found = jobs(root)
    assert len(found) == 6
    assert sum(m["status"] == "ok" for m in found.values()) == 4
    # two workers: the first two real jobs (0 and 1) overlap in time
    span = {
        d.name: (
            (d / ".hydra" / "config.yaml").stat().st_mtime,
            (d / "metrics.json").stat().st_mtime,
        )
        for d in found
    }
    (s0, e0), (s1, e1) = span["0"], span["1"]
    assert s1 < e0 and s0 < e1


def test_a_failing_cell_loses_nothing_and_says_why(sweep):
    root, _ = sweep
    found = jobs(root)
    failed = {d.name: m for d, m in found.items() if m["status"] != "ok"}
    assert sorted(failed) == ["2", "5"]
    for m in failed.values():
        assert m["shots"] == 20 and "shots+queries" in m["error"]
    for d, m in found.items():
        if m["status"] == "ok":
            assert 0.0 <= m["test/acc"] <= 1.0 and list((d / "checkpoints").glob("*.ckpt"))
            # the whole learning curve, even when the best (tested) checkpoint is epoch 0
            assert [c["epoch"] for c in m["curve"]] == [0, 1]


def test_a_sweep_whose_jobs_all_fail_exits_1(tmp_path, data_root):
    env = {**os.environ, "METALEARN_DATA_DIR": str(data_root), "WANDB_MODE": "offline"}
    cmd = [sys.executable, "train.py", "-m", "seed=1,2", "ways=2000", *TINY, "logger=none"]
    cmd.append(f"hydra.sweep.dir={tmp_path}")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Sweep done: 2 jobs, 0 ok, 2 failed" in proc.stdout
    assert "every job of the sweep failed" in proc.stderr
    assert len(jobs(tmp_path)) == 2  # both recorded


def test_report_on_the_real_sweep(sweep, tmp_path):
    root, _ = sweep
    out = report(root, tmp_path, echo=False)
    assert [r[2] for r in out["rows"]] == ["fomaml", "maml"]
    assert out["columns"] == [(5, 1), (5, 2), (5, 20)]
    md = (tmp_path / "results.md").read_text()
    for m in jobs(root).values():
        if m["status"] == "ok":
            assert f"{100 * m['test/acc']:.1f} ± {100 * m['test/acc_ci95']:.1f}" in md
    assert md.count("| failed |") == 2 and "## Failed jobs (2)" in md
    assert "shots+queries" in md
    assert (tmp_path / "results.csv").read_text().count("\n") == 1 + 6
    assert (tmp_path / "learning_curves.png").stat().st_size > 10_000
    df = frame(root)  # the same runs as a DataFrame
    assert len(df) == 6 and sorted(df.status) == ["failed"] * 2 + ["ok"] * 4
    assert (df["algo.first_order"] == (df.algo == "fomaml")).all()  # a config key that varies
    ok = df[df.status == "ok"].set_index("run")["test/acc"]
    assert ok.to_dict() == {d.name: m["test/acc"] for d, m in jobs(root).items() if "test/acc" in m}


def test_each_job_is_one_offline_wandb_run(sweep):
    root, _ = sweep
    ids = set()
    for job, metrics in jobs(root).items():
        if metrics["status"] != "ok":
            continue
        (run_dir,) = (job / "wandb").glob("offline-run-*")  # one run per job, in its dir
        run = read_offline_run(run_dir)
        ids.add(run["id"])
        assert run["group"] == str(root)  # grouped by sweep directory
        assert run["job_type"] == "train"  # what the run does; the algorithm is a tag
        assert set(run["tags"]) == {
            metrics["algo"],
            "omniglot",
            "5-way",
            f"{metrics['shots']}-shot",
        }
        # nested config, as W&B's Hydra guide logs it (the UI shows algo.inner_lr, ...)
        assert run["config"]["algo"]["inner_lr"] == 0.4
        assert run["config"]["shots"] == metrics["shots"]
        assert run["config"]["job"]["num"] == int(job.name)
        assert f"shots={metrics['shots']}" in run["config"]["job"]["overrides"]
        # summary: the final test accuracy and its CI, as in metrics.json
        assert run["summary"]["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
        assert run["summary"]["test/acc_ci95"] == pytest.approx(metrics["test/acc_ci95"], abs=1e-6)
        assert run["summary"]["val/acc_best"] == pytest.approx(metrics["val/acc_best"], abs=1e-6)
    assert len(ids) == 4


# ---- Optuna --------------------------------------------------------------------------------
def test_optuna_search_maximises_val_acc_best(tmp_path, data_root):
    pytest.importorskip(
        "hydra_plugins.hydra_optuna_sweeper",
        reason="pip install -e '.[optuna]' for hparams_search=optuna_lr",
    )
    train(
        [
            "hparams_search=optuna_lr",
            "hydra.sweeper.n_trials=2",
            "logger=none",
            *TINY,
            f"hydra.sweep.dir={tmp_path}",
        ],
        data_root,
    )
    trials = jobs(tmp_path)
    assert len(trials) == 2
    from omegaconf import OmegaConf

    result = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert result.best_value == pytest.approx(max(m["val/acc_best"] for m in trials.values()))
    assert set(result.best_params) == {"algo.inner_lr", "algo.optimizer.lr", "algo.inner_steps"}


@pytest.mark.parametrize("algo", ["maml", "metasgd", "maml_pp"])
def test_optuna_trials_evaluate_with_the_inner_steps_they_trained_with(algo):
    """A trial's sampled algo.inner_steps reaches validation/test too (was: trained with the
    sampled steps, ranked after the algorithm's inner_steps_test). The search file is merged
    as Hydra merges it (after the algo group), so this runs without the Optuna plugin."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    search = OmegaConf.load(REPO / "conf" / "hparams_search" / "optuna_lr.yaml")
    assert "algo.inner_steps" in search.hydra.sweeper.params  # the search does vary it
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", [f"algo={algo}", "output_dir=."])
    cfg = OmegaConf.merge(cfg, {"algo": search.algo})
    cfg.algo.inner_steps = 4  # what the sweeper passes a trial: algo.inner_steps=4
    assert cfg.algo.inner_steps_test == 4


def test_an_optuna_search_without_validation_is_refused_before_any_trial(tmp_path):
    """Optuna ranks trials by val/acc_best: with data.val_episodes=0 every trial returned
    nothing and failed. The check sees the job's sweeper target (the Optuna plugin's)."""
    target = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    cfg = compose_cfg(tmp_path, ["data.val_episodes=0"], tiny=False)
    with pytest.raises(ConfigError, match="data.val_episodes=0 validates nothing: set data"):
        check_sweep_objective(cfg, target)
    check_sweep_objective(compose_cfg(tmp_path, [], tiny=False), target)  # validates: fine
    check_sweep_objective(cfg, "hydra._internal.core_plugins.basic_sweeper.BasicSweeper")


# ---- GPU pool bookkeeping (no GPU needed) ----------------------------------------------------
def test_gpu_claims_are_exclusive_and_prefer_the_job_number(tmp_path, monkeypatch):
    monkeypatch.setenv("METALEARN_GPU_LOCK_DIR", str(tmp_path))
    from metalearn.pool import GpuClaim

    gpus = ["0", "1"]
    with GpuClaim(gpus, preferred=3) as first:  # job 3 -> GPU 3 mod 2 = 1
        assert first == 1
        with GpuClaim(gpus, preferred=1) as second:  # job 1 prefers GPU 1, taken -> GPU 0
            assert second == 0
            assert not GpuClaim(gpus, preferred=0).try_claim()  # both taken: a job would wait
    with GpuClaim(gpus, preferred=0) as again:  # released when the jobs ended
        assert again == 0


def test_a_gpu_claimed_by_another_process_frees_up_when_that_process_dies(tmp_path, monkeypatch):
    monkeypatch.setenv("METALEARN_GPU_LOCK_DIR", str(tmp_path))
    env = {**os.environ, "METALEARN_GPU_LOCK_DIR": str(tmp_path), "PYTHONPATH": str(REPO / "src")}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from metalearn.pool import GpuClaim\n"
         "with GpuClaim(['0']) as i: print('claimed', i, flush=True); time.sleep(60)"],
        env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "claimed 0"
        from metalearn.pool import GpuClaim

        assert not GpuClaim(["0"]).try_claim()  # held by the other process
        holder.kill()  # no release of its own: the OS drops the lock with the process
        holder.wait(timeout=30)
        with GpuClaim(["0"], poll_s=0.1) as index:
            assert index == 0
    finally:
        holder.kill()


def test_pool_size_falls_back_to_cpu_processes():
    from omegaconf import OmegaConf

    import metalearn.pool  # noqa: F401  registers the resolver

    if metalearn.pool.visible_gpus():
        pytest.skip("this machine has GPUs")
    assert OmegaConf.create({"n": "${gpu_pool_size:3}"}).n == 3


def test_launcher_configs_compose():
    from hydra import compose, initialize_config_dir

    import metalearn.pool  # noqa: F401  registers ${gpu_pool_size:}

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        pool = compose("train", ["hydra/launcher=gpu_pool"], return_hydra_config=True)
        assert "JoblibLauncher" in pool.hydra.launcher._target_
        assert pool.hydra.launcher.n_jobs == metalearn.pool.pool_size(2)
        pytest.importorskip(
            "hydra_plugins.hydra_submitit_launcher",
            reason='pip install -e ".[slurm]" for hydra/launcher=slurm',
        )
        slurm = compose(
            "train",
            ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        ).hydra.launcher
    assert "SlurmLauncher" in slurm._target_
    assert (slurm.partition, slurm.gpus_per_node, slurm.tasks_per_node) == ("gpu", 1, 1)
    assert slurm.timeout_min == 240 and slurm.submitit_folder.endswith(".submitit/%j")


@pytest.mark.parametrize(
    ("option", "module", "extra"),
    [
        ("hparams_search=optuna_lr", "hydra_plugins.hydra_optuna_sweeper", "optuna"),
        ("hydra/launcher=slurm", "hydra_plugins.hydra_submitit_launcher", "slurm"),
    ],
)
def test_a_missing_plugin_names_its_install_command(option, module, extra, tmp_path):
    import importlib.util
    import subprocess
    import sys

    try:
        installed = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        installed = False
    if installed:
        pytest.skip(f"{module} is installed here")
    done = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "-m", option],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and f'pip install -e ".[{extra}]"' in done.stderr
    assert "Traceback" not in done.stderr
