"""run(cfg) end to end: bad input gets a clear error and loses nothing; resume is exact;
a sweep writes one metrics.json per job."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import HydraException

from metalearn.errors import ConfigError, DataError, NonFiniteLossError
from metalearn.train import run
from tests.helpers import REPO, compose_cfg, patched_train, read_offline_run, scores


def run_with(tmp_path, data_root, *overrides):
    return run(compose_cfg(tmp_path, [f"data.root={data_root}", *overrides]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ways=2000"], "lower ways"),
        (["shots=10", "queries=15"], "queries"),
        (["data.name=imagenet"], "omniglot"),
        (["ways=1"], "ways >= 2"),
        (["shots=0"], "positive integer"),
        (["trainer.inference_mode=true"], "inference_mode=false"),
    ],
)
def test_bad_config_raises_clear_error(tmp_path, data_root, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run_with(tmp_path, data_root, *overrides)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["engine=vmap", "model.bn_mode=inductive"], "bn_mode=transductive"),
        (["engine=func", "algo.inner_optimizer=adam"], "engine=higher"),
        (["engine=higher", "algo.inner_optimizer=rmsprop"], "choose one of"),
    ],
)
def test_unsupported_engine_is_refused_when_built(tmp_path, data_root, overrides, message):
    from metalearn.instantiate import build

    cfg = compose_cfg(tmp_path, overrides)
    with pytest.raises(ConfigError, match=message):  # at construction, not at the first step
        build(cfg.algo, model=build(cfg.model), engine=build(cfg.engine))
    with pytest.raises(ConfigError, match=message):
        run_with(tmp_path, data_root, *overrides)


def test_unknown_key_names_the_close_ones(tmp_path, data_root):
    with pytest.raises(
        ConfigError, match=r"algo.inner_lrr is not a setting.*did you mean algo.inner_lr "
    ):
        run_with(tmp_path, data_root, "+algo.inner_lrr=0.1")


def test_unknown_algo_lists_choices(tmp_path):
    with pytest.raises(HydraException, match="Available options"):
        compose_cfg(tmp_path, ["algo=mamba"])


def test_missing_data_names_file_and_fix(tmp_path):
    with pytest.raises(DataError, match="omniglot") as err:
        run_with(tmp_path / "run", tmp_path / "empty", "data.download=false")
    assert "data.root" in str(err.value) or "METALEARN_DATA_DIR" in str(err.value)


def test_corrupt_data_names_the_file(tmp_path):
    root = tmp_path / "data"
    (root / "omniglot").mkdir(parents=True)
    for name in ("images_background_28.npz", "images_evaluation_28.npz"):
        (root / "omniglot" / name).write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="images_background_28.npz"):
        run_with(tmp_path / "run", root, "data.download=false")


def params_of(ckpt):
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items()}


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_root):
    run_with(tmp_path, data_root)  # one good epoch: checkpoints/last.ckpt
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = torch.load(last, map_location="cpu", weights_only=False)
    with pytest.raises(NonFiniteLossError, match="last.ckpt"):
        run_with(
            tmp_path, data_root, f"ckpt_path={last}", "trainer.max_steps=4", "algo.inner_lr=1e30"
        )
    after = torch.load(last, map_location="cpu", weights_only=False)
    assert after["global_step"] == before["global_step"] == 2
    for k, v in before["state_dict"].items():
        assert torch.equal(after["state_dict"][k], v), k
    assert all(torch.isfinite(v).all() for v in after["state_dict"].values())


def test_failed_job_marks_its_wandb_run_failed(tmp_path, data_root):
    with pytest.raises(NonFiniteLossError):
        run_with(tmp_path, data_root, "logger=wandb", "algo.inner_lr=1e30")
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert read_offline_run(run_dir)["exit_code"] == 1
    run_with(tmp_path / "ok", data_root, "logger=wandb", "test=false")
    (run_dir,) = (tmp_path / "ok" / "wandb").glob("offline-run-*")
    assert read_offline_run(run_dir)["exit_code"] == 0


def interrupt_after(step: int):
    """An ``on_train_batch_end`` that stops training after outer step ``step``, as if the job
    had been killed there (``max_steps`` stays as configured, so do the schedules)."""

    def hook(module, *args):
        if module.global_step >= step:
            module.trainer.should_stop = True

    return hook


@pytest.mark.parametrize(
    ("algo", "stop", "new_dir"),
    [
        ("maml", 3, False),  # at an epoch boundary, into the same run directory
        # mid-epoch (the loader restarts; batches are keyed by step), into a new directory,
        # with MAML++'s epoch-dependent multi-step loss and derivative-order annealing,
        # learned per-step rates, per-step BatchNorm and cosine outer learning rate
        ("maml_pp", 4, True),
        # its inner Adam state carries over from step to step (it is in the checkpoint), and
        # its outer rate anneals linearly
        ("reptile", 4, False),
        # each training sequence's order is drawn by (seed, rank, step), not global RNG state
        ("mann", 4, True),
    ],
)
def test_resume_is_exact(tmp_path, data_root, monkeypatch, algo, stop, new_dir):
    from metalearn.algorithms.base import EpisodicModule

    common = [f"algo={algo}", "data.batches_per_epoch=3", "test=false", "trainer.max_steps=6"]
    if algo == "maml_pp":
        common += ["algo.msl_fraction=0.67", "algo.da_fraction=0.5"]  # MSL 4, DA 3 of 6 steps
    if algo == "reptile":
        common += ["algo.inner_steps_test=3", "algo.meta_batch_size=2", "algo.inner_steps=2"]
    run_with(tmp_path / "straight", data_root, *common)
    with monkeypatch.context() as patch:
        patch.setattr(EpisodicModule, "on_train_batch_end", interrupt_after(stop), raising=False)
        run_with(tmp_path / "first", data_root, *common)
    first = tmp_path / "first" / "checkpoints" / "last.ckpt"
    first_ckpt = torch.load(first, map_location="cpu", weights_only=False)
    assert first_ckpt["global_step"] == stop
    resumed = tmp_path / ("resumed" if new_dir else "first")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_with(resumed, data_root, *common, f"ckpt_path={first}")
    # the loader is resumable (its batches are keyed by the step): no "unreliable results" warning
    assert not [w for w in caught if "not resumable" in str(w.message)]
    a = params_of(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = params_of(resumed / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    metrics = json.loads((resumed / "metrics.json").read_text())
    hist = metrics["curve"]
    # (a stop mid-epoch validates where it stopped, then again at the end of the epoch)
    assert [h["epoch"] for h in hist] == ([0, 1] if stop % 3 == 0 else [0, 1, 1])
    # the training time goes on from the first process's, at each point of the curve too
    trained_before = first_ckpt["metalearn"]["train_s"]
    assert 0 < trained_before < hist[-1]["train_s"] <= metrics["train_s"]
    assert [h["train_s"] for h in hist] == sorted(h["train_s"] for h in hist)
    assert hist[-1]["step"] == 6


def signal_at(step: int, signum: int):
    """An ``on_train_batch_end`` that sends this process ``signum`` after outer step ``step``."""

    def hook(module, *args):
        if module.global_step == step:
            os.kill(os.getpid(), signum)

    return hook


@pytest.mark.parametrize(
    ("signum", "name", "validated"),
    [
        (signal.SIGINT, "Ctrl-C", True),  # the step is validated, then written to last.ckpt
        (signal.SIGTERM, "SIGTERM", False),  # written at once (a grace period is short)
    ],
)
def test_signal_stops_after_the_step_and_resumes_exactly(
    tmp_path, data_root, monkeypatch, signum, name, validated
):
    # A signal mid-epoch: the step completes and is written to last.ckpt, the run ends
    # "interrupted" without testing, and resuming from it ends where a straight run does.
    from metalearn.algorithms.base import EpisodicModule

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    common = ["data.batches_per_epoch=3", "trainer.max_steps=6"]
    with monkeypatch.context() as patch:
        patch.setattr(EpisodicModule, "on_train_batch_end", signal_at(4, signum), raising=False)
        stopped = run_with(tmp_path / "first", data_root, *common)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert stopped["status"] == "interrupted" and "test/acc" not in stopped
    assert stopped["error"] == f"interrupted ({name}) at step 4"  # the report's failure list
    assert stopped["steps"] == 4
    assert stopped["curve"][-1]["step"] == (4 if validated else 3)
    on_disk = json.loads((tmp_path / "first" / "metrics.json").read_text())
    assert on_disk["status"] == "interrupted"
    ckpt = stopped["resume_from"]
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 4
    resumed = run_with(tmp_path / "first", data_root, *common, f"ckpt_path={ckpt}")
    assert resumed["status"] == "ok" and resumed["steps"] == 6
    straight = run_with(tmp_path / "straight", data_root, *common, "test=false")
    a = params_of(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = params_of(tmp_path / "first" / "checkpoints" / "last.ckpt")
    assert straight["steps"] == 6 and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_resumed_in_a_new_directory_stands_for_the_interrupted_one_in_the_report(
    tmp_path, data_root, monkeypatch, capsys
):
    # Ctrl-C, then the printed ckpt_path= added to the same command (a new run directory):
    # the report shows the resumed run's result, not an interrupted run counted as failed.
    from metalearn.algorithms.base import EpisodicModule
    from metalearn.report import report

    common = ["data.batches_per_epoch=3", "trainer.max_steps=6"]
    with monkeypatch.context() as patch:
        patch.setattr(EpisodicModule, "on_train_batch_end", signal_at(4, signal.SIGINT))
        stopped = run_with(tmp_path / "a", data_root, *common)
    ckpt = stopped["resume_from"]
    resumed = run_with(tmp_path / "b", data_root, *common, f"ckpt_path={ckpt}")
    assert resumed["status"] == "ok" and resumed["resumed_from"] == str(Path(ckpt).resolve())
    result = report(tmp_path, plot=False)
    assert not result["failures"] and [r.dir.name for r in result["runs"]] == ["b"]
    (cell,) = result["cells"].values()
    assert cell.text() == f"{100 * resumed['test/acc']:.1f} ± {100 * resumed['test/acc_ci95']:.1f}"
    line = "left out 1 unfinished run resumed in another directory (a -> b)"
    assert line in capsys.readouterr().out and line in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_testing_keeps_the_training_results(tmp_path, data_root, monkeypatch, signum):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from metalearn.algorithms.base import EpisodicModule

    last = tmp_path / "checkpoints" / "last.ckpt"
    trained = {}

    def signal_in_test(self, *args):
        trained.setdefault("bytes", last.read_bytes())
        os.kill(os.getpid(), signum)

    monkeypatch.setattr(EpisodicModule, "test_step", signal_in_test)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises((SystemExit, SIGTERMException)):
        run_with(tmp_path, data_root)
    # Lightning answers a KeyboardInterrupt by ignoring SIGINT for good; the run puts it back
    assert signal.getsignal(signal.SIGINT) == handler
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and "while testing" in metrics["error"]
    assert metrics["steps"] == 2 and metrics["val/acc_best"] > 0 and metrics["curve"]
    assert "test/acc" not in metrics and Path(metrics["resume_from"]) == last
    assert last.read_bytes() == trained["bytes"]  # not overwritten with the tested weights


CTRL_C_AT_STEP_1 = """
def ctrl_c(self, *args):
    if self.global_step == 1:
        os.kill(os.getpid(), signal.SIGINT)


EpisodicModule.on_train_batch_end = ctrl_c
"""


def test_ctrl_c_in_a_sweep_stops_the_sweep_and_says_how_to_resume(tmp_path, data_root):
    from tests.helpers import TINY

    script = patched_train(tmp_path / "ctrl_c.py", CTRL_C_AT_STEP_1)
    env = {**os.environ, "METALEARN_DATA_DIR": str(data_root), "WANDB_MODE": "offline"}
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(script), "-m", *TINY, "seed=1,2", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Ctrl-C: stopping after this step" in proc.stderr
    (job,) = [p.parent for p in sweep.glob("*/metrics.json")]  # the second job never started
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["steps"] == 1
    assert Path(metrics["resume_from"]).exists()
    # the advice resumes the sweep, each job from its own last.ckpt (one ckpt_path= for the
    # whole sweep would start every job from this job's checkpoint)
    advice = f"add hydra.sweep.dir={sweep} ckpt_path=auto to the same command"
    assert advice in proc.stderr and f"ckpt_path={metrics['resume_from']}" not in proc.stderr
    resume = [sys.executable, str(REPO / "train.py"), *cmd[2:], f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(
        [*resume, "ckpt_path=auto"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]
    assert [(m["seed"], m["status"], m["steps"]) for m in jobs] == [(1, "ok", 2), (2, "ok", 2)]
    assert jobs[0]["curve"][0] == metrics["curve"][0]  # continued, not started again


def test_checkpoint_writes_are_atomic(tmp_path, data_root, monkeypatch):
    # Killed while writing last.ckpt (here: torch.save fails half-way), the run keeps the
    # previous last.ckpt whole: the file is written beside it and renamed into place.
    from metalearn.checkpointing import AtomicCheckpointIO

    written = []
    original = AtomicCheckpointIO.save_checkpoint

    def counted(self, checkpoint, path, storage_options=None):
        written.append(Path(path).name)
        return original(self, checkpoint, path, storage_options)

    with monkeypatch.context() as patch:
        patch.setattr(AtomicCheckpointIO, "save_checkpoint", counted)
        run_with(tmp_path, data_root, "test=false")
    assert "last.ckpt" in written  # the run's checkpoints go through it
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        save({"partial": True}, f)
        raise KeyboardInterrupt  # as if killed mid-write

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"global_step": 99}, last)
    assert last.read_bytes() == before
    assert sorted(p.name for p in last.parent.iterdir() if p.suffix == ".tmp") == []


def test_resume_checks_the_checkpoints_settings(tmp_path, data_root, caplog):
    run_with(tmp_path / "first", data_root, "test=false")
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"another network.*model.channels: 8 -> 4"):
        run_with(tmp_path / "b", data_root, "model.channels=4", f"ckpt_path={ckpt}")
    with pytest.raises(ConfigError, match="no such file"):
        run_with(tmp_path / "c", data_root, f"ckpt_path={tmp_path / 'nothing.ckpt'}")
    with caplog.at_level("WARNING", logger="metalearn.resume"):
        run_with(
            tmp_path / "d",
            data_root,
            "shots=2",
            "trainer.max_steps=3",
            "test=false",
            f"ckpt_path={ckpt}",
        )
    (warning,) = [r.getMessage() for r in caplog.records if "changed settings" in r.getMessage()]
    assert warning.endswith("changed settings: data.shots: 1 -> 2; shots: 1 -> 2")  # not max_steps


def test_resume_in_a_new_directory_keeps_the_earlier_best(tmp_path, data_root):
    # Resumed with no inner adaptation, validation falls to chance: the earlier run's best
    # checkpoint must stay the best and be the one tested.
    first = run_with(tmp_path / "first", data_root, "data.batches_per_epoch=2", "test=false")
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    metrics = run_with(
        tmp_path / "resumed",
        data_root,
        "data.batches_per_epoch=2",
        "trainer.max_steps=4",
        "algo.inner_lr=0",
        f"ckpt_path={ckpt}",
    )
    accs = [h["val/acc"] for h in metrics["curve"]]
    assert len(accs) == 2 and accs[1] < accs[0]
    assert metrics["best_checkpoint"] == first["best_checkpoint"]
    assert metrics["val/acc_best"] == accs[0]


def test_run_shorter_than_an_epoch_validates_its_final_weights(tmp_path, data_root):
    metrics = run_with(tmp_path, data_root, "trainer.max_steps=1", "data.batches_per_epoch=5")
    assert [h["step"] for h in metrics["curve"]] == [1]
    assert metrics["val/acc_best"] == metrics["curve"][0]["val/acc"] > 0
    assert metrics["best_checkpoint"].endswith("last.ckpt") and np.isfinite(metrics["test/acc"])


def test_default_queries_fit_ten_shot_omniglot(tmp_path, data_root):
    # the README's sweep shots=1,5,10 on the default config: 10 + 15 queries would not fit
    metrics = run_with(tmp_path, data_root, "shots=10", "test=false")
    assert metrics["status"] == "ok" and metrics["queries"] == 10


def test_metrics_json_has_contract_keys(tmp_path, data_root):
    metrics = run_with(tmp_path, data_root)
    for key in (
        "test/acc",
        "test/acc_ci95",
        "val/acc_best",
        "algo",
        "dataset",
        "ways",
        "shots",
        "queries",
        "seed",
        "steps",
        "wall_s",
    ):
        assert key in metrics, key
    assert metrics["steps"] == 2 and np.isfinite(metrics["test/acc"])
    assert list((tmp_path / "checkpoints").glob("*.ckpt"))


def test_cli_multirun_writes_one_metrics_per_job(tmp_path, data_root):
    from tests.helpers import TINY

    env = {**os.environ, "METALEARN_DATA_DIR": str(data_root), "WANDB_MODE": "offline"}
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "algo=maml,fomaml",
        *TINY,
        f"hydra.sweep.dir={tmp_path}",
        "print_config=true",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = sorted(tmp_path.glob("*/metrics.json"))
    assert len(found) == 2
    assert {json.loads(p.read_text())["algo"] for p in found} == {"maml", "fomaml"}
    assert "inner_lr" in proc.stdout  # the config tree was printed
    assert (
        f"Sweep done: 2 jobs, 2 ok, 0 failed. Results table and curves: python -m "
        f"metalearn.report {tmp_path}" in proc.stdout
    )


def test_cli_error_is_one_message_and_keeps_earlier_results(tmp_path, data_root):
    # A finished run, then a typo while resuming in its directory: a short message naming the
    # fix, exit status 1, and the finished run's metrics.json untouched.
    from tests.helpers import TINY

    run_with(tmp_path, data_root, "test=false")
    before = (tmp_path / "metrics.json").read_text()
    env = {**os.environ, "METALEARN_DATA_DIR": str(data_root), "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "train.py", *TINY, "ways=2000", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "lower ways to at most" in proc.stderr and "Traceback" not in proc.stderr
    assert (proc.stdout + proc.stderr).count("Seed set to 42") == 1  # Lightning's lines once
    assert (tmp_path / "metrics.json").read_text() == before
    failed = json.loads((tmp_path / "metrics.failed.json").read_text())
    assert failed["status"] == "failed" and "ways=2000" in failed["error"]


def test_progress_bar_counts_epochs_from_max_steps():
    from types import SimpleNamespace

    from metalearn.progress import MetaProgressBar

    bar = MetaProgressBar()
    bar._trainer = SimpleNamespace(max_steps=600, num_training_batches=100, max_epochs=-1)
    assert bar._get_train_description(3).strip() == "Epoch 3/5"  # Lightning's: "Epoch 3/-2"
    bar._trainer = SimpleNamespace(max_steps=-1, num_training_batches=100, max_epochs=4)
    assert bar._get_train_description(0).strip() == "Epoch 0/3"


def test_help_lists_groups_and_examples():
    proc = subprocess.run(
        [sys.executable, "train.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    assert "algo: " in proc.stdout and "maml" in proc.stdout and "python train.py -m" in proc.stdout


@pytest.mark.parametrize("algo", ["maml", "reptile"])
def test_train_metrics_are_computed_and_logged_on_logging_steps_only(
    tmp_path, data_root, monkeypatch, algo
):
    from metalearn.algorithms.base import EpisodicModule

    calls, losses = [], []
    original, log = EpisodicModule.query_metric_before, EpisodicModule.log

    def counted(self, episodes):
        calls.append(self.global_step)
        return original(self, episodes)

    def logged(self, name, *args, **kwargs):
        if name == "train/loss":
            losses.append(self.global_step)
        return log(self, name, *args, **kwargs)

    monkeypatch.setattr(EpisodicModule, "query_metric_before", counted)
    monkeypatch.setattr(EpisodicModule, "log", logged)
    run_with(
        tmp_path,
        data_root,
        f"algo={algo}",
        "logger=csv",
        "test=false",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=3",
    )
    assert calls == [2, 5]  # the steps whose logs are written, before their outer update
    # and the first step, for the progress bar; not every step (logged after the outer update:
    # global_step has counted it)
    assert losses == [1, 3, 6]
    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))
    logged = [(int(r["step"]), float(r["train/acc_pre"])) for r in rows if r["train/acc_pre"]]
    assert [s for s, _ in logged] == [2, 5]
    assert all(0.0 <= a <= 1.0 for _, a in logged)


@pytest.mark.parametrize("engine", ["higher", "vmap"])
def test_same_seed_gives_bit_identical_runs_on_cpu_for_any_worker_count(
    tmp_path, data_root, engine
):
    """The determinism statement (docs/RESULTS.md): on CPU, a run is a function of its config:
    the same weights and metrics, bit for bit, run again or with DataLoader workers."""
    outcomes = []
    for name, workers in (("a", 0), ("b", 0), ("c", 2)):
        cfg = compose_cfg(tmp_path / name, [f"engine={engine}", f"data.num_workers={workers}"])
        metrics = run(cfg)
        weights = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
        outcomes.append((metrics, weights["state_dict"]))
    (m0, w0), *others = outcomes
    for m, w in others:
        assert m["test/acc"] == m0["test/acc"] and scores(m["curve"]) == scores(m0["curve"])
        assert all(torch.equal(w[k], w0[k]) for k in w0)


def test_a_run_logged_to_a_file_prints_plain_progress_lines(tmp_path, data_root, capfd):
    """stdout is no terminal (a SLURM job, nohup): the Rich bar would print nothing for the
    whole run, so plain lines say where training is."""
    cfg = compose_cfg(
        tmp_path,
        ["trainer.enable_progress_bar=true", "trainer.max_steps=4", "trainer.log_every_n_steps=1"],
    )
    run(cfg)
    out = capfd.readouterr().out
    assert "step 4/4  loss " in out and "steps/s" in out and "val/acc" in out


def test_ckpt_path_last_and_auto_resume_in_the_run_directory(tmp_path, data_root):
    """ckpt_path=auto: the first run starts fresh, the same command again (a preempted job
    requeued) continues from its last.ckpt; ckpt_path=last without one is a clear error."""
    with pytest.raises(ConfigError, match="has no checkpoints/last.ckpt yet"):
        run(compose_cfg(tmp_path / "none", ["ckpt_path=last"]))
    first = run(compose_cfg(tmp_path / "run", ["ckpt_path=auto"]))
    assert first["steps"] == 2
    longer = run(compose_cfg(tmp_path / "run", ["ckpt_path=auto", "trainer.max_steps=4"]))
    assert longer["steps"] == 4 and longer["curve"][0] == first["curve"][0]  # continued
    again = run(compose_cfg(tmp_path / "run", ["ckpt_path=last", "trainer.max_steps=5"]))
    assert again["steps"] == 5


def test_ckpt_path_auto_on_a_finished_run_tests_its_best_checkpoint_again(tmp_path, data_root):
    """A partly finished sweep rerun with ckpt_path=auto reruns its finished jobs too: their fit
    trains nothing, so nothing is validated again and the best checkpoint is the one tested."""
    overrides = ["ckpt_path=auto", "trainer.max_steps=4"]
    first = run(compose_cfg(tmp_path, overrides))
    assert len(first["curve"]) == 2 and not first["best_checkpoint"].endswith("last.ckpt")
    again = run(compose_cfg(tmp_path, overrides))
    assert again["steps"] == 4 and again["curve"] == first["curve"]
    assert again["best_checkpoint"] == first["best_checkpoint"]
    assert again["test/acc"] == first["test/acc"]
    assert again["val/acc_best"] == first["val/acc_best"]


def test_trainval_preset_trains_on_1200_characters_without_validation_and_tests_the_last_weights(
    tmp_path, data_root
):
    """experiment=protonet_omniglot_trainval (Snell et al.'s training set): no validation runs,
    the last weights are tested, and the run says it trained on the val classes."""
    overrides = [
        f"data.root={data_root}",
        "experiment=protonet_omniglot_trainval",
        "model.channels=8",
        "data.train_ways=10",
        "data.batches_per_epoch=2",
        "data.test_episodes=10",
        "data.eval_batch_size=5",
        "trainer.max_steps=3",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "print_config=false",
    ]
    # not TINY (it validates): the preset's own data.val_episodes=0 is under test
    cfg = compose_cfg(tmp_path, overrides, tiny=False)
    assert cfg.data.train_on_val and cfg.data.val_episodes == 0 and cfg.data.split == "vinyals"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = run(cfg)
    noise = [
        str(w.message)
        for w in caught
        if "monitored key" in str(w.message) or "length of" in str(w.message)
    ]
    assert not noise, noise  # no empty validation loop, no best checkpoint without a ranking
    assert metrics["status"] == "ok" and metrics["steps"] == 3 and 0 < metrics["test/acc"] <= 1
    assert metrics["curve"] == [] and metrics["val/acc_best"] is None, metrics  # nothing validated
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3  # resumable, and what was tested
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    cfg = compose_cfg(
        tmp_path / "es", [*overrides, "callbacks=[default,early_stopping]"], tiny=False
    )
    with pytest.raises(
        ConfigError,
        match=r"callbacks.early_stopping watches val/acc, but "
        r"data.val_episodes=0 validates nothing: remove it",
    ):
        run(cfg)
