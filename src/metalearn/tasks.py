"""Kinds of task: what a model's output is scored against, and how.

Classification is one kind of task, not an assumption of the algorithms: an algorithm and
its engine take the loss and the metric from ``task`` (``TaskKind``), so the same MAML,
Reptile or fine-tuning code learns N-way classes and regresses functions (the sinusoid
benchmark of Finn et al. 2017, sec. 5.1).

* ``classification``: outputs are logits over the episode's N classes, labels ints in
  0..N-1 that name the episode's own classes (permuted per episode); loss cross-entropy,
  metric accuracy (higher is better).
* ``regression``: outputs are predictions of the targets' shape (``[Q, 1]`` for y = f(x)),
  which mean the same in every task; loss and metric the mean-squared error (lower is
  better).

A data module says which kind its episodes are (``task`` class attribute); an algorithm
lists the kinds it can learn (``task_kinds``) and gets its kind from the data (``train.run``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metalearn.errors import ConfigError


@dataclass(frozen=True)
class TaskKind:
    name: str
    metric: str  # logged as train/<metric>, val/<metric>, test/<metric> (+ _ci95, _best)
    mode: str  # "max" | "min": which direction is better (checkpoint selection)
    # True: labels name the episode's own classes (a model over other classes needs a new
    # head); False: outputs mean the same in every task (a pretrained head is kept).
    episode_labels: bool

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of one task's outputs (a scalar)."""
        if self.name == "classification":
            return F.cross_entropy(out, y)
        return F.mse_loss(out, y)

    def score(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The metric per task: out [..., Q, N] against y [..., Q] (classes) or [..., Q, D]
        (targets) -> [...]. Accuracy for classes, mean-squared error for targets."""
        if self.name == "classification":
            return (out.argmax(-1) == y).float().mean(-1)
        return (out - y).pow(2).mean((-2, -1))

    def outputs(self, support_y: torch.Tensor) -> int:
        """Outputs a model needs for a task with these support targets: its classes, or the
        targets' width."""
        if self.episode_labels:
            return int(support_y.max()) + 1
        return int(support_y.shape[-1])

    @property
    def worst(self) -> float:
        """The best-so-far value before anything was scored."""
        return 0.0 if self.mode == "max" else math.inf

    def better(self, a: float, b: float) -> float:
        """The better of two metric values."""
        return max(a, b) if self.mode == "max" else min(a, b)

    def label(self, value: float) -> str:
        """``value`` as a person reads it: 92.5 % for accuracy, 0.512 for an MSE."""
        return f"{value:.2%}" if self.metric == "acc" else f"{value:.4g}"


CLASSIFICATION = TaskKind("classification", "acc", "max", episode_labels=True)
REGRESSION = TaskKind("regression", "mse", "min", episode_labels=False)
KINDS = {k.name: k for k in (CLASSIFICATION, REGRESSION)}


def task_kind(kind: str | TaskKind) -> TaskKind:
    if isinstance(kind, TaskKind):
        return kind
    if kind not in KINDS:
        raise ConfigError(f"task kind {kind!r}: choose one of {', '.join(KINDS)}")
    return KINDS[kind]
