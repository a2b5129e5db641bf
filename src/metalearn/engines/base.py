"""What every inner-loop engine takes and returns.

An engine is the only place that knows how a differentiable inner loop is computed.
``engine(model, loop, episodes) -> Adapted``: adapt a copy of the model's parameters on each
episode's support set for ``loop.steps`` steps and score its query set. ``Adapted.objective``
is the meta-objective (mean over tasks); one ``backward`` of it yields the meta-gradients of
the model's parameters and of any learned inner-loop rates. ``engine.check(model, loop)``
raises ConfigError for what the engine cannot run (GBML calls it when it is built).

Semantics shared by all engines (tests hold them to it):
* second order: the query loss is differentiated through every inner update;
* first order: the support gradients g_t are constants (no second derivatives), so theta's
  meta-gradient is sum_t w_t * dL_t/dphi_t, and a learned inner rate a_t, which scales the
  shift phi_{t+1} = phi_t - a_t * g_t, gets -sum_{s>t} w_s * g_t . dL_s/dphi_s (as in the
  MAML++ reference code, whose first-order phase still trains its per-step rates);
* ``step_weights`` (MAML++ multi-step loss) weight the query loss after each step; ``None``
  means the final step only;
* the loss and the metric are the task's (``loop.task``: cross-entropy and accuracy for
  classes, MSE for regression; metalearn/tasks.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.errors import ConfigError
from metalearn.tasks import CLASSIFICATION, TaskKind

Rate = Callable[[str, int], "torch.Tensor | float"]
INNER_OPTIMIZERS = ("sgd", "momentum", "adam")


def check_inner_optimizer(name: str) -> None:
    if name not in INNER_OPTIMIZERS:
        raise ConfigError(f"algo.inner_optimizer={name!r}; choose one of {INNER_OPTIMIZERS}")


@dataclass
class InnerLoop:
    """One inner loop: how many steps, which parameters, at what rates."""

    steps: int
    lr: Rate  # (parameter name, step) -> scalar or parameter-shaped rate
    adapt: Sequence[str]  # names of the parameters adapted in the inner loop
    first_order: bool = False
    step_weights: Sequence[float] | None = None
    optimizer: str = "sgd"  # sgd | momentum | adam (momentum and adam: higher engine only)
    momentum: float = 0.9
    meta: bool = True  # False: adapt and score only (evaluation); no meta-objective to backward
    task: TaskKind = CLASSIFICATION  # the loss and the metric (metalearn/tasks.py)

    def weights(self) -> list[float]:
        if self.step_weights is None:
            return [0.0] * (self.steps - 1) + [1.0]
        if len(self.step_weights) != self.steps:
            raise ValueError(f"{len(self.step_weights)} step weights for {self.steps} steps")
        return [float(w) for w in self.step_weights]


@dataclass
class Adapted:
    objective: torch.Tensor  # scalar meta-objective, mean over tasks (backward me)
    loss: torch.Tensor  # [B] weighted query loss per task, detached (for logging)
    metric: torch.Tensor  # [B] the task's query metric (accuracy, MSE) after the last step
    logits: torch.Tensor | None = None  # [B, Q, N] query outputs after the last step, detached


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == y).float().mean()


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def step_forward(model: nn.Module) -> Callable:
    """``forward(params, x, step)`` through ``torch.func.functional_call``."""

    def forward(params, x, step):
        return torch.func.functional_call(model, params, (x,), {"step": step})

    return forward
