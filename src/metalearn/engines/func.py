"""torch.func engine: one pure function per task, looped over the meta-batch."""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from metalearn.engines.base import (
    Adapted,
    InnerLoop,
    aliases,
    collect,
    is_ragged,
    shaped_rate,
    step_forward,
)
from metalearn.engines.recompute import check_recomputable, recomputed_update
from metalearn.errors import ConfigError


def adapt_task(
    forward,
    params: dict,
    loop: InnerLoop,
    sx,
    sy,
    qx,
    qy,
    grad,
    recompute: bool = False,
    weight_values=None,
) -> tuple:
    """Adapt ``params`` on (sx, sy); return (weighted query loss, final query metric, final
    query outputs, detached). Loss and metric are ``loop.task``'s.

    ``grad(f, sub) -> dict`` differentiates ``f(sub)`` w.r.t. the dict ``sub``; it is
    ``torch.autograd.grad`` in the loop engine and ``torch.func.grad`` under vmap.
    ``recompute``: second-order steps and query passes keep only their inputs and are
    recomputed in the outer backward (engines/recompute.py; loop engine only).
    ``weight_values``: the step weights' values (tensors) where they are inputs of a compiled
    graph (engines/compiled.py); which steps are scored still follows ``loop.weights()``.
    """
    second_order = recompute and not loop.first_order
    query = partial(checkpoint, forward, use_reentrant=False) if second_order else forward
    fast = dict(params)
    weights = loop.weights()
    values = weights if weight_values is None else weight_values
    loss = loop.task.loss
    objective, logits = 0.0, None
    for t in range(loop.steps):
        if second_order:
            fast = recomputed_update(forward, fast, loop, t, sx, sy, loss)
        else:
            fast = sgd_update(forward, fast, loop, t, sx, sy, grad)
        if weights[t] or t == loop.steps - 1:
            logits = query(fast, qx, t)
            if weights[t]:
                objective = objective + values[t] * loss(logits, qy)
    if logits is None:  # no inner steps: score the initial parameters
        logits = forward(fast, qx, 0)
        objective = loss(logits, qy)
    return objective, loop.task.score(logits, qy), logits.detach()


def sgd_update(forward, fast: dict, loop: InnerLoop, t: int, sx, sy, grad) -> dict:
    """One inner SGD step on the support set (first order: the gradient is a constant)."""

    def support_loss(sub):
        return loop.task.loss(forward({**fast, **sub}, sx, t), sy)

    grads = grad(support_loss, {n: fast[n] for n in loop.adapt})
    for n in loop.adapt:
        g = grads[n].detach() if loop.first_order else grads[n]
        fast = {**fast, n: fast[n] - shaped_rate(loop.lr(n, t), g) * g}
    return fast


def check_sgd(loop: InnerLoop, engine: str) -> None:
    if loop.optimizer != "sgd":
        raise ConfigError(
            f"engine={engine} supports algo.inner_optimizer=sgd only, got {loop.optimizer!r}; "
            "use engine=higher for momentum/adam inner optimizers"
        )


class FuncEngine:
    """``functional_call`` + ``torch.autograd.grad(create_graph=not first_order)``, per task.

    Args:
        recompute: second order in memory that does not grow with the inner steps: each step
            is recomputed in the outer backward (engines/recompute.py), one more support
            pass per step.
    """

    name = "func"

    def __init__(self, recompute: bool = False):
        self.recompute = recompute

    def check(self, model, loop: InnerLoop) -> None:
        """Raise ConfigError if this engine cannot run ``loop`` on ``model``."""
        check_sgd(loop, self.name)
        if self.recompute and model.training:
            check_recomputable(model)

    def __call__(self, model, loop: InnerLoop, episodes, heads: list | None = None) -> Adapted:
        self.check(model, loop)
        forward = step_forward(model)
        params = dict(model.named_parameters())

        def grad(f, sub):
            gs = torch.autograd.grad(f(sub), list(sub.values()), create_graph=not loop.first_order)
            return dict(zip(sub, gs, strict=True))

        losses, metrics, logits = [], [], []
        for b, (sx, sy, qx, qy) in enumerate(zip(*episodes, strict=True)):
            start = params if heads is None else {**aliases(params), **heads[b]}
            loss, metric, task_logits = adapt_task(
                forward, start, loop, sx, sy, qx, qy, grad, self.recompute
            )
            losses.append(loss)
            metrics.append(metric)
            logits.append(task_logits)
        losses = torch.stack(losses)
        return Adapted(
            losses.mean(),
            losses.detach(),
            torch.stack(metrics).detach(),
            collect(logits, is_ragged(episodes)),
        )
