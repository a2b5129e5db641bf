"""torch.func engine: one pure function per task, looped over the meta-batch."""

from __future__ import annotations

import torch

from metalearn.engines.base import Adapted, InnerLoop, step_forward
from metalearn.errors import ConfigError


def adapt_task(forward, params: dict, loop: InnerLoop, sx, sy, qx, qy, grad) -> tuple:
    """Adapt ``params`` on (sx, sy); return (weighted query loss, final query metric, final
    query outputs, detached). Loss and metric are ``loop.task``'s.

    ``grad(f, sub) -> dict`` differentiates ``f(sub)`` w.r.t. the dict ``sub``; it is
    ``torch.autograd.grad`` in the loop engine and ``torch.func.grad`` under vmap.
    """
    fast = dict(params)
    weights = loop.weights()
    loss = loop.task.loss
    objective, logits = 0.0, None
    for t in range(loop.steps):

        def support_loss(sub, t=t):
            return loss(forward({**fast, **sub}, sx, t), sy)

        grads = grad(support_loss, {n: fast[n] for n in loop.adapt})
        for n in loop.adapt:
            g = grads[n].detach() if loop.first_order else grads[n]
            fast[n] = fast[n] - loop.lr(n, t) * g
        if weights[t] or t == loop.steps - 1:
            logits = forward(fast, qx, t)
            if weights[t]:
                objective = objective + weights[t] * loss(logits, qy)
    if logits is None:  # no inner steps: score the initial parameters
        logits = forward(fast, qx, 0)
        objective = loss(logits, qy)
    return objective, loop.task.score(logits, qy), logits.detach()


def check_sgd(loop: InnerLoop, engine: str) -> None:
    if loop.optimizer != "sgd":
        raise ConfigError(
            f"engine={engine} supports algo.inner_optimizer=sgd only, got {loop.optimizer!r}; "
            "use engine=higher for momentum/adam inner optimizers"
        )


class FuncEngine:
    """``functional_call`` + ``torch.autograd.grad(create_graph=not first_order)``, per task."""

    name = "func"

    def check(self, model, loop: InnerLoop) -> None:
        """Raise ConfigError if this engine cannot run ``loop`` on ``model``."""
        check_sgd(loop, self.name)

    def __call__(self, model, loop: InnerLoop, episodes) -> Adapted:
        self.check(model, loop)
        forward = step_forward(model)
        params = dict(model.named_parameters())

        def grad(f, sub):
            gs = torch.autograd.grad(f(sub), list(sub.values()), create_graph=not loop.first_order)
            return dict(zip(sub, gs, strict=True))

        losses, metrics, logits = [], [], []
        for sx, sy, qx, qy in zip(*episodes, strict=True):
            loss, metric, task_logits = adapt_task(forward, params, loop, sx, sy, qx, qy, grad)
            losses.append(loss)
            metrics.append(metric)
            logits.append(task_logits)
        losses = torch.stack(losses)
        return Adapted(
            losses.mean(), losses.detach(), torch.stack(metrics).detach(), torch.stack(logits)
        )
