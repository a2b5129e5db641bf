"""Callbacks come from conf/callbacks (hydra.utils.instantiate): the defaults keep the run's
behaviour; EarlyStopping, LearningRateMonitor or another save_top_k need no code edits."""

from __future__ import annotations

import csv

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from metalearn.checkpointing import BestCheckpoint
from metalearn.errors import ConfigError
from metalearn.instantiate import instantiate_callbacks
from metalearn.interrupt import StopOnInterrupt
from metalearn.progress import LineProgress
from metalearn.train import run
from tests.helpers import compose_cfg


def run_with(tmp_path, data_root, *overrides):
    return run(compose_cfg(tmp_path, [f"data.root={data_root}", *overrides]))


def test_default_callbacks_checkpoint_handle_signals_and_show_progress(tmp_path):
    callbacks = instantiate_callbacks(compose_cfg(tmp_path, ["trainer.enable_progress_bar=true"]))
    assert list(callbacks) == [
        "model_checkpoint",
        "last_checkpoint",
        "stop_on_interrupt",
        "progress_bar",
    ]
    best, last = callbacks["model_checkpoint"], callbacks["last_checkpoint"]
    assert isinstance(best, BestCheckpoint) and best.monitor == "val/acc" and best.mode == "max"
    assert type(last) is ModelCheckpoint and last.filename == "last"
    assert best.dirpath == last.dirpath == str(tmp_path / "checkpoints")
    assert isinstance(callbacks["stop_on_interrupt"], StopOnInterrupt)
    assert isinstance(callbacks["progress_bar"], LineProgress)  # pytest's stdout is no terminal
    # trainer.enable_progress_bar=false (tests' tiny settings): no progress callback, else
    # Lightning refuses the combination
    assert "progress_bar" not in instantiate_callbacks(compose_cfg(tmp_path))


def test_early_stopping_added_from_its_config_file_stops_training(tmp_path, data_root):
    metrics = run_with(
        tmp_path,
        data_root,
        "callbacks=[default,early_stopping]",
        "callbacks.early_stopping.patience=1",
        "callbacks.early_stopping.min_delta=1.0",  # no improvement can count
        "data.batches_per_epoch=2",
        "trainer.max_steps=10",
    )
    assert metrics["status"] == "ok" and metrics["steps"] == 4  # 2 validations, then stopped
    assert 0 <= metrics["test/acc"] <= 1  # the best checkpoint is still tested


def test_save_top_k_from_the_command_line_keeps_more_checkpoints(tmp_path, data_root):
    run_with(
        tmp_path,
        data_root,
        "callbacks.model_checkpoint.save_top_k=-1",
        "data.batches_per_epoch=1",
        "trainer.max_steps=3",
        "test=false",
    )
    best = sorted(p.name for p in (tmp_path / "checkpoints").glob("best-*.ckpt"))
    assert best == [f"best-epoch00{e}-step{e + 1}.ckpt" for e in range(3)]


def test_a_callback_added_by_its_target_logs_the_learning_rate(tmp_path, data_root):
    run_with(
        tmp_path,
        data_root,
        "+callbacks.lr_monitor._target_=lightning.pytorch.callbacks.LearningRateMonitor",
        "logger=csv",
        "trainer.log_every_n_steps=1",
        "test=false",
    )
    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))
    rates = [float(r["lr-Adam"]) for r in rows if r.get("lr-Adam")]
    assert rates and all(r == pytest.approx(1e-3) for r in rates)


def test_callbacks_none_runs_with_lightnings_defaults(tmp_path, data_root):
    metrics = run_with(tmp_path, data_root, "callbacks=none")
    assert metrics["status"] == "ok" and 0 <= metrics["test/acc"] <= 1  # the final weights
    assert metrics["best_checkpoint"] == ""
    # Lightning's own checkpoint of the latest epoch; none of ours
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch=0-step=2.ckpt"]


def test_a_callback_without_target_names_the_fix(tmp_path, data_root):
    with pytest.raises(ConfigError, match=r"callbacks.patience is not a callback: give it a _t"):
        run_with(tmp_path, data_root, "+callbacks.patience=3")
