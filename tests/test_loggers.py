"""Loggers: ``logger=[...]`` lists, TensorBoard, W&B as its Hydra guide has it (nested config,
entity, job_type, checkpoints as artifacts, one run continued across resumes), and the last
step of a fit always logged."""

from __future__ import annotations

import base64
import csv
import hashlib
from pathlib import Path

import pytest
import torch

import metalearn
from metalearn.train import run
from tests.helpers import TINY, read_offline_run


def tiny(tmp_path: Path, data_root: Path, *overrides: str) -> list[str]:
    return [*TINY, f"data.root={data_root}", f"output_dir={tmp_path}", *overrides]


def csv_rows(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "csv" / "version_0" / "metrics.csv").open()))


def test_logger_options_combine_as_a_list_on_the_command_line(tmp_path):
    def chosen(*overrides):
        return set(metalearn.compose([f"output_dir={tmp_path}", *overrides]).get("logger") or {})

    assert chosen() == {"wandb", "csv"}  # the default
    assert chosen("logger=[csv,tensorboard]") == {"csv", "tensorboard"}
    assert chosen("logger=tensorboard") == {"tensorboard"}
    assert chosen("logger=many_loggers") == {"csv", "tensorboard", "wandb"}
    assert chosen("logger=none") == chosen("logger=[]") == set()


def test_csv_and_tensorboard_together_log_the_same_run(tmp_path, data_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = metalearn.compose(
        tiny(tmp_path, data_root, "logger=[csv,tensorboard]", "trainer.max_steps=4")
    )
    cfg.trainer.log_every_n_steps = 2
    metrics = run(cfg)
    rows = [r for r in csv_rows(tmp_path) if r["train/loss"]]
    (events,) = (tmp_path / "tensorboard").glob("version_0")
    board = EventAccumulator(str(events))
    board.Reload()
    losses = board.Scalars("train/loss")
    assert [e.step for e in losses] == [int(r["step"]) for r in rows] == [1, 3]
    assert [e.value for e in losses] == pytest.approx([float(r["train/loss"]) for r in rows])
    (val,) = board.Scalars("val/acc_best")[-1:]
    assert val.value == pytest.approx(metrics["val/acc_best"])


@pytest.mark.parametrize(
    ("max_steps", "every", "logged"),
    [
        (3, 10, [2]),  # shorter than the logging interval: nothing was logged
        (5, 2, [1, 3, 4]),  # not a multiple of it: the last step was missing
        (4, 2, [1, 3]),  # a multiple: as before, once
    ],
)
def test_the_last_step_of_a_fit_always_logs_train_metrics(
    tmp_path, data_root, max_steps, every, logged
):
    cfg = metalearn.compose(
        tiny(tmp_path, data_root, "logger=csv", "test=false", f"trainer.max_steps={max_steps}")
    )
    cfg.trainer.log_every_n_steps = every
    run(cfg)
    rows = [r for r in csv_rows(tmp_path) if r["train/loss"]]
    assert [int(r["step"]) for r in rows] == logged  # Lightning's step: outer steps done - 1
    assert all(r["train/acc_pre"] for r in rows)  # the logging-step diagnostics too


def test_a_resumed_fit_logs_its_steps_right_after_the_checkpoints(tmp_path, data_root):
    # the checkpoint is written at an epoch's end; resuming replayed that end and shifted the
    # step axis by one per resume (6 steps logged 0..5, the resumed ones 7..12)
    steps = []
    for version, max_steps in enumerate((6, 12)):
        resume = ["ckpt_path=last"] if version else []
        common = ["logger=csv", "test=false", "data.batches_per_epoch=3"]
        cfg = metalearn.compose(
            tiny(tmp_path, data_root, *common, f"trainer.max_steps={max_steps}", *resume)
        )
        cfg.trainer.log_every_n_steps = 1
        run(cfg)
        path = tmp_path / "csv" / f"version_{version}" / "metrics.csv"
        rows = list(csv.DictReader(path.open()))
        steps.append([int(r["step"]) for r in rows if r["train/loss"]])
    assert steps == [list(range(6)), list(range(6, 12))]


def test_wandb_logs_the_config_nested_with_entity_and_job_type(tmp_path, data_root):
    cfg = metalearn.compose(tiny(tmp_path, data_root, "logger=wandb", "+logger.wandb.notes=x"))
    cfg.logger.wandb.entity = "my-team"
    metrics = run(cfg)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    logged = read_offline_run(run_dir)
    config = logged["config"]
    assert config["algo"]["inner_lr"] == 0.4 and config["data"]["name"] == "omniglot"
    assert config["shots"] == 1 and config["trainer"]["max_steps"] == 2
    assert not [k for k in config if "." in k]  # nothing flattened into dotted keys
    assert logged["entity"] == "my-team"
    assert logged["job_type"] == "train"
    assert "maml" in logged["tags"]  # the algorithm: a tag (and algo.name), not the job type
    # 2 steps < log_every_n_steps=10: the last step's train metrics still reach W&B
    assert "train/loss" in logged["summary"]
    assert logged["summary"]["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)


def test_an_evaluation_logs_to_wandb_as_job_type_evaluate_when_asked(tmp_path, data_root):
    from metalearn.evaluate import evaluate

    run(metalearn.compose(tiny(tmp_path / "train", data_root, "logger=none")))
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    quiet = evaluate(ckpt, [f"data.root={data_root}"], output_dir=tmp_path / "quiet")
    assert not (tmp_path / "quiet" / "wandb").exists()  # no logger unless asked for
    logged = evaluate(ckpt, [f"data.root={data_root}", "logger=wandb"], tmp_path / "eval")
    (run_dir,) = (tmp_path / "eval" / "wandb").glob("offline-run-*")
    record = read_offline_run(run_dir)
    assert record["job_type"] == "evaluate"
    assert record["summary"]["test/acc"] == pytest.approx(logged["test/acc"], abs=1e-6)
    assert logged["test/acc"] == quiet["test/acc"]


def md5(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


@pytest.mark.parametrize("when", ["true", "all"])
def test_wandb_log_model_stores_the_best_and_last_checkpoints_offline(tmp_path, data_root, when):
    metrics = run(
        metalearn.compose(
            tiny(tmp_path, data_root, "logger=wandb", f"logger.wandb.log_model={when}")
        )
    )
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    logged = read_offline_run(run_dir)  # finished: its exit record was written
    assert logged["exit_code"] == 0
    by_role = {a["metadata"]["role"]: a for a in logged["artifacts"]}
    assert {a["name"] for a in logged["artifacts"]} == {f"model-{logged['id']}"}
    assert by_role["best"]["aliases"] >= {"best"} and by_role["last"]["aliases"] >= {"last"}
    assert by_role["best"]["metadata"]["score"] == pytest.approx(metrics["val/acc_best"])
    best, last = Path(metrics["best_checkpoint"]), tmp_path / "checkpoints" / "last.ckpt"
    assert by_role["best"]["digests"]["model.ckpt"] == md5(best)
    assert by_role["last"]["digests"]["model.ckpt"] == md5(last)
    assert len(logged["artifacts"]) == 2  # each file once (the fit and the test both finalise)


def test_resuming_from_a_checkpoint_continues_its_wandb_run(tmp_path, data_root):
    out = tmp_path / "run"
    first = run(metalearn.compose(tiny(out, data_root, "logger=wandb", "ckpt_path=auto")))
    (first_dir,) = (out / "wandb").glob("offline-run-*")
    run_id = read_offline_run(first_dir)["id"]
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["wandb"]["id"] == run_id
    # the same command again, longer (a requeued job): the same W&B run goes on
    longer = tiny(out, data_root, "logger=wandb", "ckpt_path=auto", "trainer.max_steps=4")
    second = run(metalearn.compose(longer))
    (second_dir,) = set((out / "wandb").glob("offline-run-*")) - {first_dir}
    resumed = read_offline_run(second_dir)
    assert resumed["id"] == run_id
    assert first["steps"] == 2 and second["steps"] == 4
    before = read_offline_run(first_dir)["global_steps"]
    assert min(resumed["global_steps"]) >= max(before)  # its history goes on, not from 0
    # a fresh run in another directory is a new W&B run; an explicit id wins over the saved one
    other = tiny(tmp_path / "new", data_root, "logger=wandb", "logger.wandb.id=chosen01")
    run(metalearn.compose([*other, f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}"]))
    (new_dir,) = (tmp_path / "new" / "wandb").glob("offline-run-*")
    assert read_offline_run(new_dir)["id"] == "chosen01"
