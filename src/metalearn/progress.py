"""Training progress: Lightning's Rich bar with a meaningful epoch count on a terminal, plain
lines in a log file."""

from __future__ import annotations

import math
import sys
import time

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

from metalearn.errors import ConfigError

KINDS = ("auto", "rich", "lines", "tqdm")


def progress_bar(enabled: bool = True, kind: str = "auto", every: int | None = None):
    """The progress callback of ``callbacks.progress_bar`` (conf/callbacks/progress_bar.yaml):
    ``auto`` is the Rich bar on a terminal and plain lines when stdout is not one (a SLURM job,
    nohup, CI), where the bar would print nothing; ``rich``, ``lines`` or ``tqdm`` force one.
    None (no callback) when ``enabled`` is false (``trainer.enable_progress_bar=false``)."""
    if kind not in KINDS:
        raise ConfigError(f"callbacks.progress_bar.kind={kind!r}: choose one of {', '.join(KINDS)}")
    if not enabled:
        return None
    if kind == "auto":
        kind = "rich" if sys.stdout.isatty() else "lines"
    if kind == "rich":
        return MetaProgressBar()
    if kind == "tqdm":
        return TQDMProgressBar()
    return LineProgress(every=every)


class MetaProgressBar(RichProgressBar):
    """``Epoch 3/5`` from ``trainer.max_steps`` (training is sized in outer steps, so Lightning's
    own bar shows ``Epoch 3/-2``), and no ``v_num``."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        description = f"Epoch {current_epoch}"
        per_epoch = trainer.num_training_batches
        if trainer.max_steps > 0 and 0 < per_epoch < math.inf:
            description += f"/{math.ceil(trainer.max_steps / per_epoch) - 1}"
        elif trainer.max_epochs is not None and trainer.max_epochs > 0:
            description += f"/{trainer.max_epochs - 1}"
        return f"{description:{len(self.validation_description)}}"

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class LineProgress(ProgressBar):
    """Plain progress lines for logs (a SLURM job, ``nohup``, CI), where the Rich bar prints
    nothing: every ``every`` outer steps (None: 5 x ``trainer.log_every_n_steps``) and at the
    last one, ``step k/N`` with the logged train metrics, steps/s and the time left; one line
    per validation."""

    def __init__(self, every: int | None = None):
        super().__init__()
        self.every = None if every is None else max(1, int(every))
        self._enabled = True
        self._start: float | None = None
        self._first = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._start, self._first = time.monotonic(), trainer.global_step
        if self.every is None:
            self.every = 5 * max(1, int(trainer.log_every_n_steps))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, total = trainer.global_step, trainer.max_steps
        if not self._enabled or not (step % self.every == 0 or step == total):
            return
        done = step - self._first
        rate = done / max(time.monotonic() - (self._start or time.monotonic()), 1e-9)
        left = f", {format_seconds((total - step) / rate)} left" if total > 0 and rate > 0 else ""
        metrics = "  ".join(
            f"{k.removeprefix('train/')} {float(v):.4g}"
            for k, v in self.get_metrics(trainer, pl_module).items()
            if k.startswith("train/") and k.count("/") == 1
        )
        of = f"/{total}" if total > 0 else ""
        print(f"step {step}{of}  {metrics}  ({rate:.2f} steps/s{left})", flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        name = f"val/{pl_module.task.metric}"  # val/acc, or val/mse for regression
        if name in m:
            print(
                f"step {trainer.global_step}  {name} {float(m[name]):.4f} "
                f"± {float(m.get(f'{name}_ci95', 0)):.4f}  best {float(m[f'{name}_best']):.4f}",
                flush=True,
            )


def format_seconds(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
