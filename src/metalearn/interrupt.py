"""Ctrl-C or SIGTERM during training: finish the step, write ``last.ckpt``, stop.

The first Ctrl-C (SIGINT) sets ``trainer.should_stop``: the current outer step completes,
Lightning validates the weights reached and the checkpoint callbacks write them, and the run
ends with ``status: interrupted`` in metrics.json (no test) and the ``ckpt_path=`` to resume
from; resuming is exact, as training batches are keyed by the outer step. A second Ctrl-C
aborts at once (Lightning's own handling; the checkpoints already written stay; `train.run`
puts the SIGINT handler back afterwards, which Lightning leaves ignoring Ctrl-C).

SIGTERM (``kill``, a cluster's preemption or time limit, ``docker stop``): Lightning stops at
the next step boundary with ``SIGTERMException``; before it unwinds, ``last.ckpt`` is written
at that step (no validation: a scheduler's grace period is short), and the run ends as
interrupted, with the ``ckpt_path=`` to resume from.

Why not Lightning's own handling: on Ctrl-C it stops where the KeyboardInterrupt lands, mid-step
(its OnExceptionCheckpoint would save that half-done step), and on SIGTERM it stops at the step
boundary without writing a checkpoint; neither says how to resume.

Single-process runs only: under DDP each rank would see the signal at a different step, and
a rank that stops alone leaves the others waiting, so DDP keeps Lightning's handling. Nor does
it replace a SIGINT handler other than Python's default (a parallel launcher's workers that
ignore SIGINT leave it to their parent).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException


class SignalDuringFit(L.Callback):
    """Holds a handler for ``signum`` while fitting and puts the previous one back when the fit
    ends, fails, or the handler chooses to (a second signal then gets the previous handling)."""

    signum = signal.SIGINT

    def __init__(self) -> None:
        self._previous = None

    def _install(self, handler) -> None:
        self._previous = signal.signal(self.signum, handler)

    def _restore(self) -> None:
        if self._previous is not None and signal.getsignal(self.signum) == self._handle:
            signal.signal(self.signum, self._previous)
        self._previous = None

    def _handle(self, signum, frame) -> None:
        raise NotImplementedError

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()


class StopOnInterrupt(SignalDuringFit):
    """The first SIGINT while fitting stops training gracefully; SIGTERM writes ``last_path``
    at the step where Lightning stops (see the module doc)."""

    def __init__(self, last_path) -> None:
        super().__init__()
        self.requested = False  # SIGINT: stopping after this step
        self.terminated = False  # SIGTERM: stopped, last_path written
        self.last_path = last_path
        self._trainer: L.Trainer | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if (
            trainer.world_size > 1
            or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        ):  # DDP; or a host that ignores or handles SIGINT itself (e.g. joblib's workers)
            return
        self._trainer = trainer
        self._install(self._handle)

    def resume_from(self) -> str:
        """``last_path`` if it was written, else "" (after a test, ModelCheckpoint's own path
        has been reset from the tested checkpoint's callback state)."""
        return str(self.last_path) if Path(self.last_path).is_file() else ""

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self._restore()  # a second Ctrl-C: the previous handler (KeyboardInterrupt)
        if self._trainer is not None:
            self._trainer.should_stop = True
        print(
            "\nCtrl-C: stopping after this step (validating it and writing last.ckpt);"
            " Ctrl-C again aborts now",
            file=sys.stderr,
            flush=True,
        )

    def on_exception(self, trainer, pl_module, exception) -> None:
        super().on_exception(trainer, pl_module, exception)
        # Lightning raises it at a step boundary (or inside validation, which leaves the weights
        # as they are): the training state is consistent. Not while testing: the model then
        # holds the best checkpoint's weights, not the training's.
        fitting = trainer.state.fn == TrainerFn.FITTING
        if isinstance(exception, SIGTERMException) and trainer.world_size == 1 and fitting:
            trainer.save_checkpoint(self.last_path, weights_only=False)
            self.terminated = True


@contextlib.contextmanager
def sigint_kept():
    """Put SIGINT's handler back when the block ends. After a Ctrl-C that reaches Lightning as a
    KeyboardInterrupt (the second one, or one while testing) it ignores SIGINT for good, which
    would leave a notebook or a later run in the same process deaf to Ctrl-C."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)


def ignore_sigint(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a terminal's Ctrl-C reaches the whole process group, and
    a worker that took it would exit and break the graceful stop; the main process decides."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
