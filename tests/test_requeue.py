"""``hydra/launcher=slurm``: a job that reaches its time limit stops at a step boundary,
writes last.ckpt, is requeued through submitit's own protocol (its signal handler calls the
launcher's ``checkpoint()``), and the requeued job resumes to the same final weights.

No cluster: submitit's real ``SignalHandler`` runs with a job environment whose ``_requeue``
records instead of calling ``scontrol``; the requeued call is the pickled submission's
overrides composed and run again, as the launcher would."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from metalearn import requeue
from metalearn.algorithms.base import EpisodicModule
from metalearn.train import main, run
from tests.helpers import compose_cfg

submitit = pytest.importorskip("submitit", reason='pip install -e ".[slurm]"')
launchers = pytest.importorskip("hydra_plugins.metalearn_requeue")


class FakeSlurmJob:
    """What submitit's ``SignalHandler`` asks of the job environment."""

    global_rank = 0

    def __init__(self) -> None:
        self.requeued: list[int] = []

    def _requeue(self, countdown: int) -> None:  # scontrol requeue <job id>
        self.requeued.append(countdown)


def weights(out):
    return torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_a_job_at_its_time_limit_is_requeued_and_resumes_to_the_same_weights(
    tmp_path, data_root, monkeypatch
):
    from submitit.core.job_environment import SignalHandler
    from submitit.core.utils import DelayedSubmission, JobPaths

    overrides = [f"data.root={data_root}", "trainer.max_steps=5"]  # epochs: 2 steps
    run(compose_cfg(tmp_path / "whole", overrides))  # the same run, never interrupted

    # the job as submitit runs it: its submission, and submitit's handler on its signal
    launcher = launchers.RequeueSlurmLauncher(submitit_folder=str(tmp_path / ".submitit"))
    submission = DelayedSubmission(launcher, overrides, "hydra.sweep.dir", 0, "job_0", {})
    submission.set_timeout(timeout_min=60, max_num_timeout=3)
    job, paths = FakeSlurmJob(), JobPaths(tmp_path / ".submitit", job_id="1")
    paths.submitted_pickle.parent.mkdir(parents=True)
    handler = SignalHandler(job, paths, submission)
    signum = requeue.requeue_signal()
    previous = signal.signal(signum, handler.checkpoint_and_try_requeue)
    try:
        sent = []

        def time_limit_after_step_3(module, *args):  # SLURM: --signal=USR2@<delay>
            if module.global_step == 3 and not sent:  # mid-epoch
                sent.append(os.kill(os.getpid(), signum))

        monkeypatch.setattr(EpisodicModule, "on_train_batch_end", time_limit_after_step_3)
        out = tmp_path / "job"
        with pytest.raises(SystemExit):  # submitit exits the job once it is requeued
            requeue.run_requeueable(lambda: main(compose_cfg(out, overrides)))
    finally:
        signal.signal(signum, previous)

    # it stopped after step 3, wrote last.ckpt there (not only at the epoch's end, step 2),
    # then submitit requeued it once
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3
    assert job.requeued == [3]  # preempted before the time limit: no timeout counted
    assert not requeue.STATE.active and requeue.STATE.deferred is None

    # the requeued job: the pickled submission calls the launcher again, with ckpt_path=auto
    again = DelayedSubmission.load(paths.submitted_pickle)
    assert isinstance(again.function, launchers.RequeueSlurmLauncher)
    assert again.args[0] == [*overrides, "ckpt_path=auto"]
    assert again.args[1:3] == ("hydra.sweep.dir", 0)  # the same job, in the same directory
    metrics = requeue.run_requeueable(lambda: run(compose_cfg(out, again.args[0])))
    assert metrics["status"] == "ok" and metrics["steps"] == 5
    whole, resumed = weights(tmp_path / "whole"), weights(out)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_requeue_resumes_from_the_jobs_own_checkpoint_else_from_the_one_given(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    requeue.STATE.last_ckpt = last
    try:
        given = ["algo=maml", "ckpt_path=/runs/a/last.ckpt"]
        assert requeue.resume_overrides(given) == given  # nothing trained here yet
        assert requeue.resume_overrides(["algo=maml"]) == ["algo=maml", "ckpt_path=auto"]
        last.parent.mkdir()
        last.write_bytes(b"")
        assert requeue.resume_overrides(given) == ["algo=maml", "ckpt_path=auto"]
    finally:
        requeue.STATE.last_ckpt = None


def test_outside_a_requeueable_job_nothing_changes():
    """A plain run, or a sweep with another launcher: no signal handler, Lightning's own SLURM
    environment (with its auto-requeue) as Lightning chooses it."""
    assert requeue.requeue_callbacks("x/last.ckpt") == [] and requeue.cluster_plugins() == []


def test_hydra_launcher_slurm_is_the_requeueing_launcher(tmp_path):
    from hydra.core.plugins import Plugins

    cfg = compose_cfg(tmp_path, ["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = Plugins.instance()._instantiate(cfg.hydra.launcher)
    assert isinstance(launcher, launchers.RequeueSlurmLauncher)
    assert launcher.params["max_num_timeout"] > 0  # else submitit never requeues a timeout
