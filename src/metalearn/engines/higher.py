"""higher engine: the differentiable-optimizer inner loop of ``higher.innerloop_ctx``.

Second order keeps higher's gradient tape (``track_higher_grads=True``). First order runs
with ``track_higher_grads=False`` and returns a surrogate ``sum_p theta_p * g_p.detach()``
whose gradient is the first-order meta-gradient, so it still reaches the parameters through
``manual_backward`` (and DDP's gradient sync) instead of hand-written ``.grad``.
"""

from __future__ import annotations

import higher
import torch

from metalearn.engines.base import (
    Adapted,
    InnerLoop,
    accuracy,
    check_inner_optimizer,
    cross_entropy,
)


def inner_optimizer(loop: InnerLoop, params: list) -> torch.optim.Optimizer:
    check_inner_optimizer(loop.optimizer)
    groups = [{"params": [p]} for p in params]  # one group per tensor: per-tensor rates
    if loop.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=1.0)
    if loop.optimizer == "momentum":
        return torch.optim.SGD(groups, lr=1.0, momentum=loop.momentum)
    return torch.optim.Adam(groups, lr=1.0)


def sync_buffers(fmodel, model) -> None:
    """Copy running statistics updated on higher's functional copy back to the model."""
    with torch.no_grad():
        for (_name, mine), theirs in zip(model.named_buffers(), fmodel.buffers(), strict=True):
            if mine is not theirs:
                mine.copy_(theirs)


class HigherEngine:
    name = "higher"

    def check(self, model, loop: InnerLoop) -> None:
        """Raise ConfigError if this engine cannot run ``loop`` on ``model``."""
        check_inner_optimizer(loop.optimizer)

    def __call__(self, model, loop: InnerLoop, episodes) -> Adapted:
        named = dict(model.named_parameters())
        theta = list(named.values())
        opt = inner_optimizer(loop, [named[n] for n in loop.adapt])
        weights = loop.weights()
        objectives, losses, accs = [], [], []
        for sx, sy, qx, qy in zip(*episodes, strict=True):
            with higher.innerloop_ctx(
                model, opt, copy_initial_weights=False, track_higher_grads=not loop.first_order
            ) as (fmodel, diffopt):
                objective, loss, logits = 0.0, 0.0, None
                for t in range(loop.steps):
                    rates = [loop.rate(n, t) for n in loop.adapt]
                    diffopt.step(cross_entropy(fmodel(sx, step=t), sy), override={"lr": rates})
                    if weights[t] or t == loop.steps - 1:
                        logits = fmodel(qx, step=t)
                        if weights[t]:
                            q_loss = weights[t] * cross_entropy(logits, qy)
                            loss = loss + q_loss.detach()
                            objective = objective + self._meta_term(q_loss, fmodel, theta, loop)
                if logits is None:
                    logits = fmodel(qx, step=0)
                    objective = loss = cross_entropy(logits, qy)
                sync_buffers(fmodel, model)
            objectives.append(objective)
            losses.append(torch.as_tensor(loss).detach())
            accs.append(accuracy(logits, qy).detach())
        return Adapted(torch.stack(objectives).mean(), torch.stack(losses), torch.stack(accs))

    @staticmethod
    def _meta_term(q_loss, fmodel, theta, loop: InnerLoop):
        if not loop.first_order:
            return q_loss
        fast = list(fmodel.parameters())
        grads = torch.autograd.grad(q_loss, fast, allow_unused=True)
        return sum(
            (p * g.detach()).sum() for p, g in zip(theta, grads, strict=True) if g is not None
        )
