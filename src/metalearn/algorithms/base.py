"""EpisodicModule: what every few-shot algorithm shares.

Manual optimisation, adaptation at validation/test time (with grad enabled: the Trainer must
run with ``inference_mode=False``), the task's metric (accuracy for classes, MSE for
regression: ``task``, metalearn/tasks.py) with a 95 % confidence interval over the fixed
evaluation episodes, the best validation value, a learning curve kept in the checkpoint,
and a guard that stops on a non-finite loss before it touches the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import lightning as L
import torch
from torch import nn

from metalearn.data.episodes import labelled
from metalearn.errors import ConfigError, NonFiniteLossError
from metalearn.fit_clock import FitClock
from metalearn.models.protocol import check_backbone
from metalearn.tasks import CLASSIFICATION, TaskKind, task_kind

# Version of what ``on_save_checkpoint`` writes under "metalearn" (metalearn.load checks it).
CHECKPOINT_FORMAT = 1


def mean_ci95(accs: torch.Tensor) -> tuple[float, float]:
    """Mean and 95 % confidence half-width (1.96 * std / sqrt(n)) of per-episode values
    (accuracies, MSEs)."""
    accs = accs.double()
    n = accs.numel()
    if n == 0:
        return math.nan, math.nan
    std = accs.std(unbiased=True).item() if n > 1 else 0.0
    return accs.mean().item(), 1.96 * std / math.sqrt(n)


def run_length(trainer) -> int:
    """Outer steps of the run: ``trainer.max_steps``, else Lightning's estimate. Schedules
    measured in it (cosine, eps, MAML++'s MSL/DA) need a run with an end."""
    if trainer.max_steps > 0:
        return int(trainer.max_steps)
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ConfigError(
            "the learning-rate and MAML++ schedules (algo.cosine, Reptile's eps, algo.msl / "
            "algo.da) are fractions of the run, which has no end: set trainer.max_steps (or "
            "trainer.max_epochs)"
        )
    return int(total)


def cosine_factor(step: int, total: int, base: float, min_lr: float = 0.0) -> float:
    """Cosine annealing from ``base`` at step 0 to ``min_lr`` at ``total``, then flat."""
    if base <= 0:
        return 1.0
    t = min(step, total) / total
    return (min_lr + (base - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))) / base


def episode_table(rows: torch.Tensor) -> dict:
    """(accuracy, ways, shots) rows as metrics.json's ``test/by_episode`` lists."""
    rows = rows.double().cpu()
    return {
        "acc": [round(float(v), 6) for v in rows[:, 0]],
        "ways": [int(v) for v in rows[:, 1]],
        "shots": [round(float(v), 4) for v in rows[:, 2]],
    }


class EpisodicModule(L.LightningModule):
    """Base class. Subclasses implement ``training_step`` and ``evaluate(episodes)``."""

    uses_engine = False  # whether the ``engine`` config (the differentiable inner loop) is used
    trained_head = False  # whether test-time adaptation starts from the trained N-way head
    head_init = "auto"  # how it starts for other numbers of classes (algorithms/heads.py)
    task_kinds: tuple[str, ...] = ("classification",)  # the kinds of task it can learn
    uses_unlabelled = False  # whether it gets episodes' unlabelled sets (data.unlabelled)

    def __init__(
        self,
        model: Callable[..., nn.Module] | nn.Module,
        optimizer: Callable,
        name: str = "",
        meta_batch_size: int = 32,
        cosine: bool = False,
        min_lr: float = 0.0,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.algo_name = name
        self.meta_batch_size = meta_batch_size
        self.model = model if isinstance(model, nn.Module) else model(**self.model_options())
        check_backbone(self.model, self.model_options().get("bn_steps", 1))
        self.optimizer_factory = optimizer
        self.cosine, self.min_lr = cosine, min_lr
        self._task = CLASSIFICATION
        self.val_best = CLASSIFICATION.worst
        self.history: list[dict] = []
        self.validated = 0  # validation epochs run by this process (not saved in checkpoints)
        self.run_config: dict | None = None  # the run's composed config, set by train.run
        self.preprocessing: dict | None = None  # how images become inputs (data/transforms.py)
        self._eval_accs: list[torch.Tensor] = []  # per batch: [B, 3] (acc, ways, shots)
        self.test_by_episode: dict | None = None  # varying shapes: each test episode's
        self._first_step: int | None = None  # the first outer step of this fit (None: none)
        self._log_step = True  # whether this training step logs (see log_train)
        self.fit_clock = FitClock()  # seconds in fit over all resumes (saved in checkpoints)

    # ---- the kind of task: loss and metric (set from the data by train.run) -------------
    @property
    def task(self) -> TaskKind:
        return self._task

    @task.setter
    def task(self, kind: str | TaskKind) -> None:
        kind = task_kind(kind)
        if kind.name not in self.task_kinds:
            raise ConfigError(
                f"algo={self.algo_name or type(self).__name__} learns "
                f"{' and '.join(self.task_kinds)} tasks only, and this data is {kind.name}: "
                "use a gradient-based algorithm (algo=maml, fomaml, metasgd, alpha_maml, "
                "maml_pp, anil, reptile) or algo=finetune"
            )
        self._task = kind
        if not self.history:
            self.val_best = kind.worst

    # ---- hooks for subclasses -------------------------------------------------------
    def model_options(self) -> dict:
        """Extra keyword arguments for building the model (e.g. per-step BatchNorm)."""
        return {}

    def outer_parameters(self):
        return self.parameters()

    def query_logits(self, episodes) -> torch.Tensor:
        """Adapt on each episode's support set; return its query logits [B, Q, N] (regression:
        predictions [B, Q, D]), detached.

        The one test-time procedure: evaluation and ``adapt(...).predict`` both go through it.
        """
        raise NotImplementedError

    def evaluate(self, episodes) -> torch.Tensor:
        """The task's query metric per episode [B] (accuracy, MSE; episodes of one shape or
        ragged)."""
        outputs = self.query_logits(episodes)
        if torch.is_tensor(outputs):
            return self.task.score(outputs, episodes.query_y)
        return torch.stack(
            [self.task.score(z, y) for z, y in zip(outputs, episodes.query_y, strict=True)]
        )

    # ---- a trained model in use (metalearn/learner.py) ---------------------------------
    def adapt(self, images, labels, **options):
        """Adapt to a support set of a user's own images; ``.predict(images)`` labels more.

        See ``metalearn.learner.adapt`` for what ``images``, ``labels`` and options may be."""
        from metalearn.learner import adapt

        if not self.task.episode_labels:
            raise ConfigError(
                f"adapt(images, labels) labels images, and this model learned {self.task.name} "
                "tasks: adapt it to support points with query_logits(Episodes(support_x, "
                "support_y, query_x, query_y)) (as python -m metalearn.show_sinusoid does)"
            )

        return adapt(self, images, labels, **options)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, **kwargs):
        """The learner a metalearn checkpoint holds (``metalearn.load``), checked to be a
        ``cls``. The checkpoint describes itself: no arguments are needed."""
        from metalearn.learner import load

        if kwargs:
            raise TypeError(
                f"{cls.__name__}.load_from_checkpoint takes no hyperparameters "
                f"({', '.join(kwargs)}): the checkpoint holds its settings"
            )
        return load(checkpoint_path, map_location=map_location, expect=cls)

    # ---- optimisation ------------------------------------------------------------------
    def configure_optimizers(self):
        opt = self.optimizer_factory(self.outer_parameters())
        if not self.cosine:
            return opt
        return self.annealed(opt, partial(cosine_factor, min_lr=self.min_lr))

    def annealed(self, opt, factor: Callable[..., float]) -> dict:
        """``opt`` with a per-step schedule: lr = base lr * factor(step, total=, base=).

        ``total`` is ``trainer.max_steps`` as it is now. A ``LambdaLR`` keeps no total in its
        state, so resuming with a larger ``max_steps`` stretches the schedule to the new end
        instead of restarting a cosine period."""
        total = max(1, run_length(self.trainer))
        factors = [partial(factor, total=total, base=g["lr"]) for g in opt.param_groups]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factors)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def check_finite(self, loss: torch.Tensor) -> None:
        """Raise NonFiniteLossError on a non-finite loss. Under DDP every rank raises when any
        rank's loss is non-finite (one all-reduce): a rank that stepped alone would apply
        NaN-averaged gradients, or wait forever in the next collective."""
        finite = bool(torch.isfinite(loss).all())
        everywhere = finite
        if self._trainer is not None and self.trainer.world_size > 1:
            everywhere = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not everywhere:
            what = f"({loss.item()})" if not finite else "on another DDP rank"
            raise NonFiniteLossError(
                f"non-finite training loss {what} at step {self.global_step}; the "
                "weights were not updated and the last checkpoint is kept. Lower the "
                "learning rates (algo.optimizer.lr, algo.inner_lr) or check the data."
            )

    def outer_step(self, objective: torch.Tensor) -> None:
        """One outer update: backward through Lightning (DDP-safe), then step the optimizer.

        A non-finite objective stops training here, before the step touches the weights. The
        check comes after the backward, so that its host-device sync does not stall a GPU
        that still has the forward queued (the meta-step is launch-bound)."""
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(objective)
        self.check_finite(objective)
        self.before_outer_step()
        opt.step()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()

    def before_outer_step(self) -> None:
        """Called with the meta-gradients in ``.grad``, before the optimizer steps."""

    def on_train_start(self) -> None:
        self._first_step = self.global_step
        self.fit_clock.start()

    def on_train_end(self) -> None:
        self.fit_clock.stop()

    @property
    def trained(self) -> bool:
        """Whether this process's fit ran (Lightning skips the fit of a run resumed at its
        ``trainer.max_steps``: a finished run's rerun trains nothing)."""
        return self._first_step is not None

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._log_step = self.logging_step() or self.global_step == self._first_step

    def logging_step(self) -> bool:
        """Whether Lightning writes this training step's logs (``trainer.log_every_n_steps``).

        Diagnostics that cost extra forward passes (``train/acc_pre``) are computed only then.
        """
        if self._trainer is None:
            return True
        trainer = self.trainer
        return bool(trainer.fast_dev_run) or trainer._logger_connector.should_update_logs

    def query_metric_before(self, episodes) -> torch.Tensor:
        """Mean query metric of the un-adapted model (train/acc_pre, train/mse_pre).

        Runs in eval mode so that inductive BatchNorm does not update its running statistics
        with these query batches (it normalises with them, as at test time; transductive
        BatchNorm is unaffected).
        """
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return torch.stack(
                    [
                        self.task.score(self.model(qx), qy)
                        for qx, qy in zip(episodes.query_x, episodes.query_y, strict=True)
                    ]
                ).mean()
        finally:
            self.model.train(was_training)

    def log_train(self, **values) -> None:
        """Log ``train/<key>`` on the steps whose logs are written (``logging_step``) and on
        the first step of a fit (for the progress bar); ``None`` values are skipped.
        ``metric`` and ``metric_pre`` are logged under the task's name (``acc``, ``mse``).

        Logging every step cost ~1.3 ms of host time per step (Lightning's bookkeeping), which
        a launch-bound GPU meta-step feels. The values go to the CPU here, once, so that the
        progress bar, which reads them after every step, does not sync the device each time.
        """
        if not self._log_step:
            return
        m = self.task.metric
        for k, v in values.items():
            if v is None:
                continue
            k = k.replace("metric", m)
            self.log(
                f"train/{k}",
                v.detach().cpu() if isinstance(v, torch.Tensor) else v,
                prog_bar=k in ("loss", m),
                on_step=True,
                batch_size=self.meta_batch_size,
            )

    # ---- evaluation -------------------------------------------------------------------
    def validation_step(self, episodes, batch_idx):
        self._eval_step(episodes)

    def test_step(self, episodes, batch_idx):
        self._eval_step(episodes)

    def _eval_step(self, episodes) -> None:
        with torch.enable_grad():
            accs = self.evaluate(episodes).detach().float()
        # each episode's shape beside its metric: (metric, ways, shots per class); regression
        # has no classes: (metric, 1, support points)
        episodes = labelled(episodes)
        if self.task.episode_labels:
            shape = torch.tensor([episodes.ways(), episodes.shots()], dtype=accs.dtype).T
        else:
            shape = torch.tensor([[1, len(y)] for y in episodes.support_y], dtype=accs.dtype)
        self._eval_accs.append(torch.cat([accs[:, None], shape.to(accs.device)], 1))

    def on_validation_epoch_start(self) -> None:
        self._eval_accs = []

    on_test_epoch_start = on_validation_epoch_start

    def _gathered_accs(self) -> torch.Tensor:
        """Every evaluated episode's accuracy [N] (all ranks')."""
        return self._gathered_rows()[:, 0]

    def _gathered_rows(self) -> torch.Tensor:
        """Every evaluated episode's (accuracy, ways, shots per class) [N, 3] (all ranks')."""
        rows = torch.cat(self._eval_accs) if self._eval_accs else torch.zeros(0, 3)
        rows = rows.to(self.device)
        self._eval_accs = []
        if self.trainer.world_size > 1:
            # DDP: ranks hold disjoint shares of the episodes, whose sizes may differ by one
            # (N episodes split with array_split). all_gather needs equal shapes: pad each
            # share to the largest, gather, keep each rank's real entries -> exactly N.
            counts = self.all_gather(torch.tensor(len(rows), device=self.device)).flatten()
            padded = rows.new_zeros(int(counts.max()), 3)
            padded[: len(rows)] = rows
            gathered = self.all_gather(padded).reshape(len(counts), -1, 3)
            rows = torch.cat([row[: int(n)] for row, n in zip(gathered, counts, strict=True)])
        return rows

    def on_validation_epoch_end(self) -> None:
        accs = self._gathered_accs()
        if self.trainer.sanity_checking or accs.numel() == 0:
            return
        value, ci = mean_ci95(accs)
        m = self.task.metric
        self.validated += 1
        self.val_best = self.task.better(self.val_best, value)
        self.history.append(
            {
                "epoch": self.current_epoch,
                "step": self.global_step,
                "train_s": round(self.fit_clock.seconds(), 2),  # time to reach this accuracy
                f"val/{m}": value,
                f"val/{m}_ci95": ci,
            }
        )
        self.log_dict(
            {f"val/{m}": value, f"val/{m}_ci95": ci, f"val/{m}_best": self.val_best},
            prog_bar=True,
            sync_dist=False,
        )
        self.log_dict(self._by_source("val", accs), sync_dist=False)

    def on_test_epoch_end(self) -> None:
        rows = self._gathered_rows()
        value, ci = mean_ci95(rows[:, 0])
        m = self.task.metric
        self.log_dict({f"test/{m}": value, f"test/{m}_ci95": ci}, sync_dist=False)
        self.log_dict(self._by_source("test", rows[:, 0]), sync_dist=False)
        # episodes of varying shapes: each one's shape and accuracy, for the report's tables
        varying = len(torch.unique(rows[:, 1:], dim=0)) > 1
        self.test_by_episode = episode_table(rows) if varying else None

    def _by_source(self, stage: str, values: torch.Tensor) -> dict:
        """Episodes of several sources (data=mix): ``<stage>/<metric>/<source>`` and its CI."""
        sources = getattr(getattr(self.trainer, "datamodule", None), "episode_sources", None)
        if sources is None:
            return {}
        from metalearn.data.mix import by_source

        return by_source(values, sources(stage), f"{stage}/{self.task.metric}")

    # ---- checkpoint state beyond parameters -------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["metalearn"] = {
            "format": CHECKPOINT_FORMAT,
            "preprocessing": self.preprocessing,
            "task": self.task.name,
            "val_best": self.val_best,
            "history": self.history,
            "train_s": self.fit_clock.seconds(),
            "config": self.run_config,  # what train.run was given (checked when resuming)
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Resuming a fit restores the curve; testing the *best* checkpoint after a fit must not
        # cut the curve (and val_best) back to that checkpoint's epoch.
        if self._trainer is not None and self.trainer.state.fn != "fit" and self.history:
            return
        state = checkpoint.get("metalearn", {})
        self.task = state.get("task", "classification")
        self.val_best = state.get("val_best", self.task.worst)
        self.history = list(state.get("history", []))
        if self._trainer is None or self.trainer.state.fn == "fit":  # not a test's best weights
            self.fit_clock.restore(state.get("train_s", 0.0))
