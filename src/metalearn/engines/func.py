"""torch.func engine: one pure function per task, looped over the meta-batch."""

from __future__ import annotations

import torch

from metalearn.engines.base import (
    Adapted,
    InnerLoop,
    accuracy,
    aliases,
    collect,
    cross_entropy,
    is_ragged,
    shaped_rate,
    step_forward,
)
from metalearn.errors import ConfigError


def adapt_task(forward, params: dict, loop: InnerLoop, sx, sy, qx, qy, grad) -> tuple:
    """Adapt ``params`` on (sx, sy); return (weighted query loss, final query accuracy, final
    query logits, detached).

    ``grad(f, sub) -> dict`` differentiates ``f(sub)`` w.r.t. the dict ``sub``; it is
    ``torch.autograd.grad`` in the loop engine and ``torch.func.grad`` under vmap.
    """
    fast = dict(params)
    weights = loop.weights()
    objective, logits = 0.0, None
    for t in range(loop.steps):

        def support_loss(sub, t=t):
            return cross_entropy(forward({**fast, **sub}, sx, t), sy)

        grads = grad(support_loss, {n: fast[n] for n in loop.adapt})
        for n in loop.adapt:
            g = grads[n].detach() if loop.first_order else grads[n]
            fast[n] = fast[n] - shaped_rate(loop.lr(n, t), g) * g
        if weights[t] or t == loop.steps - 1:
            logits = forward(fast, qx, t)
            if weights[t]:
                objective = objective + weights[t] * cross_entropy(logits, qy)
    if logits is None:  # no inner steps: score the initial parameters
        logits = forward(fast, qx, 0)
        objective = cross_entropy(logits, qy)
    return objective, accuracy(logits, qy), logits.detach()


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

    def __call__(self, model, loop: InnerLoop, episodes, heads: list | None = None) -> Adapted:
        self.check(model, loop)
        forward = step_forward(model)
        params = dict(model.named_parameters())

        def grad(f, sub):
            gs = torch.autograd.grad(f(sub), list(sub.values()), create_graph=not loop.first_order)
            return dict(zip(sub, gs, strict=True))

        losses, accs, logits = [], [], []
        for b, (sx, sy, qx, qy) in enumerate(zip(*episodes, strict=True)):
            start = params if heads is None else {**aliases(params), **heads[b]}
            loss, acc, task_logits = adapt_task(forward, start, loop, sx, sy, qx, qy, grad)
            losses.append(loss)
            accs.append(acc)
            logits.append(task_logits)
        losses = torch.stack(losses)
        return Adapted(
            losses.mean(),
            losses.detach(),
            torch.stack(accs).detach(),
            collect(logits, is_ragged(episodes)),
        )
