"""paths, local, task_name and tags (lightning-hydra-template's conventions): one place for
the data, log and sweep roots; per-machine settings in a git-ignored file; each command's runs
in their own tree, so that a report over outputs/ sees training jobs only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import metalearn
from metalearn.evaluate import compose_for
from metalearn.report import report
from metalearn.train import run
from tests.helpers import REPO, compose_cfg


def hydra_dirs(overrides=()) -> tuple[str, str]:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    return cfg.hydra.run.dir, cfg.hydra.sweep.dir


def test_runs_land_in_a_tree_per_task_under_the_log_dir():
    run_dir, sweep_dir = hydra_dirs()
    assert run_dir.startswith("outputs/train/runs/") and sweep_dir.startswith("multirun/")
    run_dir, sweep_dir = hydra_dirs(
        ["paths.log_dir=/scratch/me", "paths.sweep_dir=/scratch/sweeps", "task_name=study"]
    )
    assert run_dir.startswith("/scratch/me/study/runs/")
    assert sweep_dir.startswith("/scratch/sweeps/")
    assert metalearn.compose(["task_name=study"]).output_dir.startswith("outputs/study/runs/")
    evaluation = compose_for({"data.name": "omniglot"}, [])
    assert evaluation.task_name == "evaluate"
    assert evaluation.output_dir.startswith("outputs/evaluate/runs/")


def test_paths_data_dir_is_every_datasets_root(tmp_path, monkeypatch):
    monkeypatch.setenv("METALEARN_DATA_DIR", "/from/env")
    for data in ("omniglot", "quickdraw", "miniimagenet"):
        assert compose_cfg(tmp_path, [f"data={data}"]).data.root == "/from/env"
        cfg = compose_cfg(tmp_path, [f"data={data}", "paths.data_dir=/datasets"])
        assert cfg.data.root == cfg.paths.data_dir == "/datasets"
    assert compose_cfg(tmp_path).paths.output_dir == str(tmp_path)  # = output_dir


def test_local_settings_are_optional_and_git_ignored():
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "conf/local/default.yaml"], cwd=REPO, check=False
    )
    assert ignored.returncode == 0
    for kept in ("conf/local/example.yaml", "conf/local/.gitkeep"):
        assert subprocess.run(["git", "check-ignore", "-q", kept], cwd=REPO).returncode == 1
    cfg = metalearn.compose(["local=example", "logger=csv"])
    assert cfg.logger.wandb == {"entity": "my-team"}  # a W&B setting, kept for logger=wandb
    assert cfg.paths.data_dir == os.environ.get("METALEARN_DATA_DIR", "/datasets/fewshot")


def test_local_wandb_setting_with_another_logger_and_tags_in_metrics(tmp_path, data_root):
    cfg = compose_cfg(
        tmp_path,
        [
            "local=example",
            "logger=csv",
            f"paths.data_dir={data_root}",
            "tags=[lr_study,v2]",
            "test=false",
        ],
    )
    metrics = run(cfg)
    assert metrics["status"] == "ok" and metrics["tags"] == ["lr_study", "v2"]
    assert (tmp_path / "csv" / "version_0" / "metrics.csv").exists()  # csv only, no W&B
    assert not (tmp_path / "wandb").exists()


def test_show_episode_has_its_own_tree_and_is_no_failed_job_in_a_report(tmp_path, data_root):
    env = dict(os.environ, METALEARN_DATA_DIR=str(data_root))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "metalearn.show_episode", "data=quickdraw", "ways=3"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (png,) = (tmp_path / "outputs" / "show_episode" / "runs").glob("*/*/episode.png")
    assert proc.stdout.strip().splitlines()[-1] == str(png.resolve())
    # one written before task_name existed: Hydra's job name tells it apart
    old = tmp_path / "outputs" / "2026-01-01" / "12-00-00" / ".hydra"
    old.mkdir(parents=True)
    OmegaConf.save({"ways": 5, "shots": 1}, old / "config.yaml")
    OmegaConf.save({"hydra": {"job": {"name": "show_episode"}}}, old / "hydra.yaml")
    job = tmp_path / "outputs" / "train" / "runs" / "2026-01-01" / "12-00-01"
    run(compose_cfg(job, [f"data.root={data_root}", "trainer.max_steps=1"]))
    (job / ".hydra").mkdir()
    result = report(tmp_path / "outputs", plot=False)
    assert [r.dir for r in result["runs"]] == [job] and not result["failures"]
    assert json.loads((job / "metrics.json").read_text())["status"] == "ok"
