"""debug=default|fdr|limit|overfit|profiler, as lightning-hydra-template has them: each runs,
does what its name says, and is marked in metrics.json so that metalearn.report leaves it
out of its results."""

from __future__ import annotations

import json

import pytest
import torch

import metalearn
from metalearn.report import report
from metalearn.train import run
from tests.helpers import compose_cfg

OPTIONS = ["default", "fdr", "limit", "overfit", "profiler"]


@pytest.mark.parametrize("option", OPTIONS)
def test_debug_option_composes_a_cpu_run_without_loggers_in_its_own_tree(option):
    cfg = metalearn.compose([f"debug={option}"])
    assert cfg.debug == option and cfg.task_name == "debug"
    assert cfg.output_dir.startswith("outputs/debug/runs/")
    assert cfg.logger is None and cfg.data.num_workers == 0
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.detect_anomaly is True
    switches = {
        "default": {"max_steps": cfg.data.batches_per_epoch},  # one epoch
        "fdr": {"fast_dev_run": True},
        "limit": {"limit_train_batches": 2, "limit_val_batches": 2, "limit_test_batches": 2},
        "overfit": {"overfit_batches": 2},
        "profiler": {"profiler": {"_target_": "lightning.pytorch.profilers.SimpleProfiler"}},
    }[option]
    for key, value in switches.items():
        got = cfg.trainer[key]
        assert (got._target_ == value["_target_"]) if isinstance(value, dict) else got == value


def debug_run(tmp_path, data_root, *overrides):
    return run(compose_cfg(tmp_path, [f"data.root={data_root}", *overrides]))


def test_debug_fdr_is_one_step_and_marked_as_a_debug_run(tmp_path, data_root):
    metrics = debug_run(tmp_path, data_root, "debug=fdr", "trainer.max_steps=5")
    assert metrics["status"] == "ok" and metrics["debug"] == "fdr" and metrics["steps"] == 1
    assert json.loads((tmp_path / "metrics.json").read_text())["debug"] == "fdr"


def test_hand_set_fast_dev_run_is_marked_too(tmp_path, data_root):
    metrics = debug_run(tmp_path, data_root, "+trainer.fast_dev_run=true")
    assert metrics["debug"] == "fast_dev_run"


def test_a_normal_run_is_not_marked(tmp_path, data_root):
    assert "debug" not in debug_run(tmp_path, data_root, "test=false")


def test_debug_default_trains_with_anomaly_detection(tmp_path, data_root, monkeypatch):
    from metalearn.algorithms.base import EpisodicModule

    seen = []
    original = EpisodicModule.on_train_batch_start

    def spy(self, batch, batch_idx):
        seen.append(torch.is_anomaly_enabled())
        return original(self, batch, batch_idx)

    monkeypatch.setattr(EpisodicModule, "on_train_batch_start", spy)
    metrics = debug_run(tmp_path, data_root, "debug=default")
    assert metrics["status"] == "ok" and metrics["debug"] == "default" and metrics["steps"] == 2
    assert seen == [True, True]


def count_eval_episodes(monkeypatch) -> list[tuple[str, int]]:
    """(stage, episodes) of every validation/test batch."""
    from metalearn.algorithms.base import EpisodicModule

    batches = []
    original = EpisodicModule._eval_step

    def counted(self, episodes):
        batches.append((self.trainer.state.stage.value, len(episodes.support_x)))
        return original(self, episodes)

    monkeypatch.setattr(EpisodicModule, "_eval_step", counted)
    return batches


def test_debug_limit_runs_few_batches_of_each_split(tmp_path, data_root, monkeypatch):
    batches = count_eval_episodes(monkeypatch)
    metrics = debug_run(
        tmp_path,
        data_root,
        "debug=limit",
        "trainer.max_steps=4",
        "data.batches_per_epoch=10",  # limited to 2 per epoch
        "data.val_episodes=30",  # 6 batches of 5, limited to 2
        "data.test_episodes=30",
    )
    assert [h["step"] for h in metrics["curve"]] == [2, 4]  # epochs of 2 steps, validated
    assert batches == [("validate", 5)] * 4 + [("test", 5)] * 2


def training_batches(monkeypatch) -> list[float]:
    """A fingerprint (sum of the support images) of every training meta-batch."""
    from metalearn.algorithms.base import EpisodicModule

    sums = []
    original = EpisodicModule.on_train_batch_start

    def spy(self, batch, batch_idx):
        sums.append(float(batch.support_x.sum()))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(EpisodicModule, "on_train_batch_start", spy)
    return sums


def test_debug_overfit_trains_on_the_same_batches_every_epoch(tmp_path, data_root, monkeypatch):
    sums = training_batches(monkeypatch)
    debug_run(tmp_path / "normal", data_root, "trainer.max_steps=4", "test=false")
    normal = list(sums)
    assert len(set(normal)) == 4  # batches keyed by the step: all different
    sums.clear()
    metrics = debug_run(
        tmp_path / "overfit", data_root, "debug=overfit", "trainer.max_steps=6", "test=false"
    )
    assert metrics["debug"] == "overfit" and metrics["steps"] == 6
    assert sums == normal[:2] * 3  # the first 2 meta-batches, each epoch


def test_debug_profiler_writes_the_time_per_hook(tmp_path, data_root):
    metrics = debug_run(tmp_path, data_root, "debug=profiler")
    assert metrics["status"] == "ok" and metrics["debug"] == "profiler"
    profile = (tmp_path / "fit-profile.txt").read_text()
    assert "run_training_batch" in profile and "Total" in profile


def test_report_leaves_debug_runs_out_and_says_so(tmp_path, data_root, capsys):
    debug_run(tmp_path / "runs" / "real", data_root, "trainer.max_steps=1")
    debug_run(tmp_path / "runs" / "smoke", data_root, "debug=fdr", "shots=5")
    debug_run(tmp_path / "runs" / "by_hand", data_root, "+trainer.fast_dev_run=true", "ways=3")
    result = report(tmp_path / "runs", plot=False)
    assert [r.dir.name for r in result["runs"]] == ["real"]
    assert list(result["columns"]) == [(5, 1)] and not result["failures"]
    line = "left out 2 debugging runs (debug=fast_dev_run, debug=fdr): their accuracy is no result"
    assert line in capsys.readouterr().out
    assert line in (tmp_path / "runs" / "results.md").read_text()
