"""SLURM time limits and preemption under ``hydra/launcher=slurm``: stop at a step boundary,
write ``last.ckpt``, and let submitit requeue the same job, which resumes from it.

submitit owns the requeue. It sends its signal (SIGUSR2, ``signal_delay_s`` before the time
limit, or on preemption) and its handler calls the job callable's ``checkpoint()``, pickles
what that returns, runs ``scontrol requeue`` and exits at once. The callable is Hydra's
launcher (``hydra_plugins.metalearn_requeue.RequeueSlurmLauncher``), whose ``checkpoint()``
resubmits the job with its overrides plus ``ckpt_path=auto``; the job directory is the same
(Hydra copies the sweep's resolved ``${now:...}`` into the resubmitted config), so the rerun
continues from that directory's ``last.ckpt``, with the same W&B run (its id is in the
checkpoint).

Exiting inside the signal handler would lose everything since the last epoch's checkpoint,
and a checkpoint written there would catch a half-done step. So, while a single-process fit
runs, ``RequeueOnTimeLimit`` takes the signal first and turns it into a SIGTERM: Lightning
stops at the end of the current step, ``metalearn.interrupt`` writes ``last.ckpt`` there, and
the run ends as interrupted; then the launcher hands the signal to submitit's handler, which
requeues. Outside a fit (data setup, the final test) and under DDP, submitit's handler runs
directly (no training is lost outside a fit; DDP resumes from the last epoch's checkpoint).

Lightning's own SLURM requeue (``SLURMEnvironment(auto_requeue=True)``: SIGUSR1, an
``hpc_ckpt_*.ckpt`` and ``scontrol requeue`` of the batch script) is switched off in these
jobs: two requeue mechanisms would requeue twice, and Lightning's bypasses our resume checks
and the job's Hydra directory. Lightning still reads ranks and nodes from SLURM.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from metalearn.interrupt import SignalDuringFit

log = logging.getLogger(__name__)


class _State:
    """This process's requeue state: whether it runs as a requeueable SLURM job, the run's
    ``last.ckpt``, and the requeue signal deferred to the end of the fit (signum, handler)."""

    active = False
    last_ckpt: Path | None = None
    deferred: tuple | None = None


STATE = _State()


def requeue_signal() -> signal.Signals:
    """The signal submitit sends before the time limit or on preemption (SIGUSR2 by default,
    ``SUBMITIT_PREEMPT_SIGNAL`` to change it)."""
    from submitit import JobEnvironment

    return JobEnvironment._usr_sig()


def requeue_callbacks(last_ckpt: Path) -> list:
    """``[RequeueOnTimeLimit]`` in a requeueable SLURM job, else nothing."""
    if not STATE.active:
        return []
    STATE.last_ckpt = Path(last_ckpt)
    return [RequeueOnTimeLimit(requeue_signal())]


def cluster_plugins() -> list:
    """Lightning's SLURM environment without its auto-requeue, in a requeueable job."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if not STATE.active or not SLURMEnvironment.detect():
        return []
    return [SLURMEnvironment(auto_requeue=False)]


class RequeueOnTimeLimit(SignalDuringFit):
    """During a single-process fit, the requeue signal stops training at the step boundary
    (as SIGTERM does: ``last.ckpt`` written there); the requeue itself is deferred to
    ``hand_over()`` after the run (see the module doc)."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signum = signum

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.world_size > 1 or threading.current_thread() is not threading.main_thread():
            return  # DDP: submitit's handler (rank 0 requeues); the ranks stop together
        self._install(self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning(
            "%s: time limit or preemption; stopping after this step to write last.ckpt, then "
            "requeueing",
            signal.Signals(signum).name,
        )
        STATE.deferred = (signum, self._previous)
        self._restore()
        signal.raise_signal(signal.SIGTERM)  # Lightning stops at the step's end


def run_requeueable(job):
    """``job()`` as a requeueable SLURM job: a fit stops at a step boundary on the requeue
    signal, and when the job ends that way, submitit's handler requeues it (and exits)."""
    STATE.active = True
    try:
        result = job()
    except BaseException:  # e.g. stopped at a step boundary, last.ckpt written:
        hand_over()  # requeue now if the signal came (submitit exits), else re-raise
        raise
    finally:
        STATE.active, STATE.last_ckpt = False, None
    STATE.deferred = None  # finished within its time: nothing to requeue
    return result


def hand_over() -> bool:
    """Run the requeue signal's deferred handler (submitit's: checkpoint, requeue, exit).
    False when no signal was deferred."""
    if STATE.deferred is None:
        return False
    signum, handler = STATE.deferred
    STATE.deferred = None
    if callable(handler):
        handler(signum, None)
    return True


def resume_overrides(overrides: list[str]) -> list[str]:
    """The job's overrides for its requeued run: ``ckpt_path=auto`` (this job directory's
    ``last.ckpt``), unless the job wrote none yet and was given its own ``ckpt_path``."""
    own = STATE.last_ckpt is not None and STATE.last_ckpt.is_file()
    given = [o for o in overrides if o.split("=", 1)[0].lstrip("+") == "ckpt_path"]
    if not own and given and given[-1].split("=", 1)[1] not in ("null", "auto", "last"):
        return list(overrides)  # nothing trained here yet: start again from that one
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+") != "ckpt_path"]
    return [*kept, "ckpt_path=auto"]
