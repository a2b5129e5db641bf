"""Reptile (Nichol, Achiam & Schulman 2018).

Per task: ``inner_steps`` steps of a plain inner optimizer (SGD, momentum or Adam) from theta
to phi. Outer update: theta <- theta + eps * mean_tasks(phi - theta), with eps annealed
linearly to 0 over ``trainer.max_steps``. The update is applied as the gradient of the
surrogate ``sum_p p * (theta - phi_mean)_p`` through ``manual_backward`` (so DDP averages it
over ranks) and an SGD outer optimizer whose learning rate is eps.

The inner optimizer's state (Adam's moments and step count, momentum buffers) carries over
from task to task and from one outer step to the next, as in Nichol et al.'s code (each task
restarts from theta, not the optimizer); evaluation starts each episode from a copy of it. It
is saved in checkpoints, so resuming is exact. Under DDP each rank keeps its own state and the
checkpoint holds every rank's (a resume on another number of processes starts every rank from
rank 0's, with a warning); evaluation starts from rank 0's on every rank, so a checkpoint's
val/test accuracy is the same on any number of processes.

Task data (``task_data``): "all" trains on the episode's support and query images together,
as Nichol et al. train on every sample of a task (no train/test split is needed, since the
outer update uses no query loss); "support" uses the support set only, exactly the K-shot
condition met at test time. Under "all", ``train/acc`` scores query images the inner loop
trained on (a fit accuracy, higher than held-out accuracy); ``val/acc`` is the held-out one.
Evaluation fine-tunes on the support set for ``inner_steps_test`` steps and scores the query
set.

Episodes whose number of classes varies (``data.episodes=range|metadataset``): each task fits
a head of its own (``head_init``: ``prototypes`` or ``zeros``, algorithms/heads.py) with the
body, and the outer update moves the body only (a per-episode head has no theta to move);
the inner optimizer's state carries over for the body's parameters.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch.func import functional_call

from metalearn.algorithms import heads
from metalearn.algorithms.base import EpisodicModule
from metalearn.algorithms.fitting import fit
from metalearn.data.episodes import seeded_generator
from metalearn.engines.base import check_inner_optimizer, collect, is_ragged
from metalearn.errors import ConfigError

TASK_DATA = ("all", "support")
log = logging.getLogger(__name__)


def on_cpu(state: dict) -> dict:
    return {n: {k: torch.as_tensor(v).cpu() for k, v in s.items()} for n, s in state.items()}


def world_size() -> int:
    """Processes in the default group; 1 outside DDP."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def from_rank_0(state: dict) -> dict:
    """Rank 0's ``state`` on every rank (on the CPU); a collective call under DDP."""
    if world_size() == 1:
        return state
    box = [on_cpu(state) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gathered(state: dict) -> list[dict]:
    """Every rank's ``state`` (rank order), on the CPU; a collective call under DDP."""
    if world_size() == 1:
        return [on_cpu(state)]
    states: list = [None] * world_size()
    dist.all_gather_object(states, on_cpu(state))
    return states


def body_state(state: dict) -> dict:
    """The inner optimizer state of every parameter but the head's."""
    return {n: s for n, s in state.items() if not n.startswith("head.")}


def linear_factor(step: int, total: int, base: float) -> float:
    """eps annealed linearly from its configured value to 0 at ``total`` steps."""
    return max(0.0, 1.0 - step / total)


class Reptile(EpisodicModule):
    """Args are the ``algo`` config keys (see conf/algo/reptile.yaml).

    ``engine`` is accepted for a uniform interface and unused: Reptile needs no
    differentiable inner loop.
    """

    trained_head = True
    task_kinds = ("classification", "regression")

    def __init__(
        self,
        model,
        optimizer,
        engine=None,
        name: str = "reptile",
        meta_batch_size: int = 5,
        inner_lr: float = 0.001,
        inner_steps: int = 5,
        inner_steps_test: int = 50,
        inner_optimizer: str = "adam",
        adam_beta1: float = 0.0,
        inner_batch_size: int | None = 10,
        task_data: str = "all",
        seed: int = 0,
        head_init: str = "auto",
    ):
        check_inner_optimizer(inner_optimizer)
        heads.check_head_init(head_init)
        if task_data not in TASK_DATA:
            raise ConfigError(f"algo.task_data={task_data!r}; choose one of {TASK_DATA}")
        if inner_steps < 1 or inner_steps_test < 1:
            raise ConfigError("algo.inner_steps and algo.inner_steps_test must be >= 1")
        if inner_batch_size is not None and inner_batch_size < 1:
            raise ConfigError("algo.inner_batch_size must be >= 1 (or null: the whole task)")
        super().__init__(model, optimizer, name, meta_batch_size)
        self.inner_lr, self.inner_steps, self.inner_steps_test = (
            inner_lr,
            inner_steps,
            inner_steps_test,
        )
        self.inner_optimizer, self.adam_beta1 = inner_optimizer, adam_beta1
        self.inner_batch_size, self.task_data, self.seed = inner_batch_size, task_data, seed
        self.inner_state: dict = {}  # parameter name -> inner optimizer state (see module doc)
        self.eval_state: dict | None = None  # evaluation's start under a Trainer: rank 0's
        self.train_head_init = head_init  # the training episodes' head (algorithms/heads.py)
        if head_init in ("prototypes", "zeros"):
            self.model.head.requires_grad_(False)  # every episode builds its own: unused

    # ---- outer learning rate eps: linear annealing to 0 ---------------------------------
    def configure_optimizers(self):
        return self.annealed(self.optimizer_factory(self.outer_parameters()), linear_factor)

    # ---- inner loop ------------------------------------------------------------------------
    def forward_with(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, params, (x,))

    def inner_batches(self, x, y, task: int) -> list[tuple]:
        """``inner_steps`` minibatches cycling through a seeded shuffle of the task's samples."""
        if self.inner_batch_size is None or self.inner_batch_size >= len(y):
            return [(x, y)] * self.inner_steps
        gen = seeded_generator(self.seed, self.global_rank, self.global_step, task)
        order = torch.cat(
            [
                torch.randperm(len(y), generator=gen)
                for _ in range(-(-self.inner_steps * self.inner_batch_size // len(y)))
            ]
        )
        order = order.to(y.device)
        size = self.inner_batch_size
        return [
            (x[order[i * size : (i + 1) * size]], y[order[i * size : (i + 1) * size]])
            for i in range(self.inner_steps)
        ]

    def fit_task(self, batches, state: dict, model=None) -> tuple[dict, torch.Tensor]:
        """Fine-tune a copy of theta (of ``model``, by default the learned one) on ``batches``,
        its optimizer starting from ``state``."""
        model = self.model if model is None else model
        params = dict(model.named_parameters())

        def forward(p, x):
            return functional_call(model, p, (x,))

        return fit(
            forward,
            params,
            params,
            batches,
            self.inner_optimizer,
            self.inner_lr,
            self.adam_beta1,
            state,
            self.task.loss,
        )

    def head_kind(self, episodes) -> str:
        """How the episodes' heads start: the model's (``trained``) or one built per episode."""
        init = self.head_init if self.head_init != "auto" else self.train_head_init
        outputs = [self.task.outputs(sy) for sy in episodes[1]]  # classes, or targets' width
        return heads.resolved(init, self.model, outputs, self.train_head_init)

    def task_model(self, sx, sy, kind: str):
        """The model a task fits: the learned one, or a copy with the episode's own head."""
        if kind == "trained":
            return self.model
        return heads.with_head(self.model, sx, sy, int(sy.max()) + 1, kind)

    def training_step(self, episodes, batch_idx):
        kind = self.head_kind(episodes)
        log_pre = self.logging_step() and kind == "trained"  # per-episode heads: no "before"
        before = self.query_metric_before(episodes) if log_pre else None
        theta = {n: p.detach() for n, p in self.model.named_parameters()}
        shift = {n: torch.zeros_like(p) for n, p in theta.items()}  # mean_tasks(theta - phi)
        moved = [n for n in shift if kind == "trained" or not n.startswith("head.")]
        losses, metrics = [], []
        for task, (sx, sy, qx, qy) in enumerate(zip(*episodes, strict=True)):
            x, y = (
                (torch.cat([sx, qx]), torch.cat([sy, qy])) if self.task_data == "all" else (sx, sy)
            )
            model = self.task_model(sx, sy, kind)
            state = self.inner_state if kind == "trained" else body_state(self.inner_state)
            phi, loss = self.fit_task(self.inner_batches(x, y, task), state, model)
            if kind != "trained":  # the episode's head state is moot beyond the episode
                self.inner_state.update(body_state(state))
            self.check_finite(loss)
            for n in moved:
                shift[n] += (theta[n] - phi[n]) / len(episodes.support_x)
            losses.append(loss)
            with torch.no_grad():
                metrics.append(self.task.score(functional_call(model, phi, (qx,)), qy))
        surrogate = sum((p * shift[n]).sum() for n, p in self.model.named_parameters())
        eps = self.optimizers().optimizer.param_groups[0]["lr"]
        self.outer_step(surrogate)
        self.log_train(
            loss=torch.stack(losses).mean(),
            metric=torch.stack(metrics).mean(),
            metric_pre=before,
            epsilon=eps,
        )

    # ---- evaluation --------------------------------------------------------------------------
    def query_logits(self, episodes) -> torch.Tensor:
        logits, start = [], self.inner_state if self.eval_state is None else self.eval_state
        kind = self.head_kind(episodes)
        for sx, sy, qx in zip(*episodes[:3], strict=True):
            model = self.task_model(sx, sy, kind)
            # a new head: the trained head's optimizer state is moot
            state = dict(start) if kind == "trained" else body_state(start)
            phi, _ = self.fit_task([(sx, sy)] * self.inner_steps_test, state, model)
            with torch.no_grad():
                logits.append(functional_call(model, phi, (qx,)))
        return collect(logits, is_ragged(episodes))

    def on_validation_start(self) -> None:
        self.eval_state = from_rank_0(self.inner_state)

    def on_validation_end(self) -> None:
        self.eval_state = None

    on_test_start, on_test_end = on_validation_start, on_validation_end

    # ---- checkpoint: every rank's inner optimizer state -----------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning dumps the checkpoint on every rank (rank 0 writes it): gathering is safe
        super().on_save_checkpoint(checkpoint)
        checkpoint["reptile_inner_states"] = gathered(self.inner_state)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        states = checkpoint.get("reptile_inner_states", [{}])
        rank, world = self.global_rank, self._trainer.world_size if self._trainer else 1
        if len(states) != world:
            log.warning(
                "the checkpoint holds the inner optimizer states of %d processes and this run "
                "has %d: every process resumes from process 0's",
                len(states),
                world,
            )
            rank = 0
        self.inner_state = states[rank]  # on the CPU; fit() moves it to the parameters
