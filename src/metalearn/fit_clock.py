"""``FitClock``: the seconds a run has spent in ``fit`` (training and validation), summed over
every process that trained it: a run resumed from a checkpoint starts from the checkpoint's
count, so a paper-length run trained in pieces still says how long it took to train."""

from __future__ import annotations

import time


class FitClock:
    def __init__(self) -> None:
        self.before, self.started = 0.0, None

    def start(self) -> None:
        self.started = time.monotonic()

    def stop(self) -> None:
        self.before, self.started = self.seconds(), None

    def seconds(self) -> float:
        running = time.monotonic() - self.started if self.started is not None else 0.0
        return self.before + running

    def restore(self, seconds: float) -> None:
        """The count of the checkpoint a fit resumes from."""
        self.before = float(seconds)
