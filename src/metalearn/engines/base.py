"""What every inner-loop engine takes and returns.

An engine is the only place that knows how a differentiable inner loop is computed.
``engine(model, loop, episodes, heads=None) -> Adapted``: adapt a copy of the model's
parameters on each episode's support set for ``loop.steps`` steps and score its query set.
``heads`` (one dict per task, or None) overrides a task's initial parameters by name: a head
built for that episode's number of classes (algorithms/heads.py); the override may carry a
graph back to the model's parameters (Proto-MAML's prototype head), which the meta-gradient
follows. Episodes may be ragged (data/episodes.py): each task then has its own shapes.
``Adapted.objective`` is the meta-objective (mean over tasks); one ``backward`` of it yields
the meta-gradients of the model's parameters and of any learned inner-loop rates.
``engine.check(model, loop)`` raises ConfigError for what the engine cannot run (GBML calls
it when it is built).

Semantics shared by all engines (tests hold them to it):
* second order: the query loss is differentiated through every inner update;
* first order: the support gradients g_t are constants (no second derivatives), so theta's
  meta-gradient is sum_t w_t * dL_t/dphi_t, and a learned inner rate a_t, which scales the
  shift phi_{t+1} = phi_t - a_t * g_t, gets -sum_{s>t} w_s * g_t . dL_s/dphi_s (as in the
  MAML++ reference code, whose first-order phase still trains its per-step rates);
* ``step_weights`` (MAML++ multi-step loss) weight the query loss after each step; ``None``
  means the final step only;
* a per-element rate (Meta-SGD) of a head another width than the task's (a head built per
  episode) applies its mean over classes (``shaped_rate``): labels are permuted per episode,
  so no row is special.
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
    logits: torch.Tensor | tuple | None = None  # [B, Q, N] query outputs, detached (ragged: a
    # tuple of [Q_b, N_b])


def shaped_rate(rate, param: torch.Tensor):
    """``rate`` for ``param``: a per-element rate of another shape (a head built per episode,
    another number of classes) becomes its mean over the class rows."""
    if torch.is_tensor(rate) and rate.dim() and rate.shape != param.shape:
        return rate.mean(0, keepdim=True)
    return rate


def aliases(params: dict) -> dict:
    """Aliases of the model's parameters for a task whose head is computed from them
    (prototypes): differentiating the support loss by the aliases and the head gives partial
    derivatives (the head a variable of its own, as ``torch.func.grad`` treats it), while the
    meta-gradient still reaches the parameters through both."""
    return {n: p.view_as(p) for n, p in params.items()}


def collect(tensors: list, ragged: bool):
    """Per-task results as one [B, ...] tensor, or a tuple where tasks differ in shape."""
    return tuple(tensors) if ragged else torch.stack(tensors)


def is_ragged(episodes) -> bool:
    return not torch.is_tensor(episodes[0])


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == y).float().mean()


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def step_forward(model: nn.Module) -> Callable:
    """``forward(params, x, step)`` through ``torch.func.functional_call``."""

    def forward(params, x, step):
        return torch.func.functional_call(model, params, (x,), {"step": step})

    return forward
