"""higher engine: the differentiable-optimizer inner loop of ``higher.innerloop_ctx``.

Second order keeps higher's gradient tape (``track_higher_grads=True``). First order runs
with ``track_higher_grads=False`` and returns a surrogate ``sum_p theta_p * G_p.detach()``
(G = the query loss's gradient at the adapted parameters) whose gradient is the first-order
meta-gradient, so it still reaches the parameters through ``manual_backward`` (and DDP's
gradient sync) instead of hand-written ``.grad``. Learned rates a_t get theirs from a second
surrogate term ``-sum_t a_t * (g_t * G).detach()`` (g_t: the support gradients of step t, as
the SGD inner optimizer applies them; momentum/adam inner steps give the rates none).
"""

from __future__ import annotations

import higher
import torch

from metalearn.engines.base import (
    Adapted,
    InnerLoop,
    aliases,
    check_inner_optimizer,
    collect,
    is_ragged,
    shaped_rate,
)


def inner_optimizer(loop: InnerLoop, params: list) -> torch.optim.Optimizer:
    check_inner_optimizer(loop.optimizer)
    groups = [{"params": [p]} for p in params]  # one group per tensor: per-tensor rates
    if loop.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=1.0)
    if loop.optimizer == "momentum":
        return torch.optim.SGD(groups, lr=1.0, momentum=loop.momentum)
    return torch.optim.Adam(groups, lr=1.0)


def recorder(store: list):
    """A ``grad_callback`` for higher that keeps the gradients it is given."""

    def callback(grads):
        store.append(grads)
        return grads

    return callback


def learned_rate(rate) -> bool:
    return torch.is_tensor(rate) and rate.requires_grad


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

    def __call__(self, model, loop: InnerLoop, episodes, heads: list | None = None) -> Adapted:
        named = dict(model.named_parameters())
        names, theta = list(named), list(named.values())
        opt = inner_optimizer(loop, [named[n] for n in loop.adapt])
        weights = loop.weights()
        task_loss = loop.task.loss
        objectives, losses, metrics, query_logits = [], [], [], []
        for b, (sx, sy, qx, qy) in enumerate(zip(*episodes, strict=True)):
            with higher.innerloop_ctx(
                model, opt, copy_initial_weights=False, track_higher_grads=not loop.first_order
            ) as (fmodel, diffopt):
                start = theta  # the task's initial parameters: theta, or its own head
                if heads is not None:
                    own = {**aliases(named), **heads[b]}
                    start = [own[n] for n in names]
                    fmodel.update_params(start)
                initial = dict(zip(names, start, strict=True))
                objective, loss, logits = 0.0, 0.0, None
                shifts: list[tuple] = []  # first order: (name, learned rate, its g_t) so far
                for t in range(loop.steps):
                    rates = [shaped_rate(loop.lr(n, t), initial[n]) for n in loop.adapt]
                    learned = [learned_rate(r) for r in rates]
                    keep = loop.first_order and loop.optimizer == "sgd" and any(learned)
                    seen: list = []  # the support gradients diffopt computes (all parameters)
                    diffopt.step(
                        task_loss(fmodel(sx, step=t), sy),
                        override={"lr": rates},
                        grad_callback=recorder(seen) if keep else None,
                    )
                    if keep:
                        g_t = dict(zip(names, seen[0], strict=True))
                        shifts += [
                            (n, r, g_t[n])
                            for n, r, is_learned in zip(loop.adapt, rates, learned, strict=True)
                            if is_learned and g_t[n] is not None
                        ]
                    if weights[t] or t == loop.steps - 1:
                        logits = fmodel(qx, step=t)
                        if weights[t]:
                            q_loss = weights[t] * task_loss(logits, qy)
                            loss = loss + q_loss.detach()
                            objective = objective + self._meta_term(
                                q_loss, fmodel, start, loop, shifts, names
                            )
                if logits is None:
                    logits = fmodel(qx, step=0)
                    objective = loss = task_loss(logits, qy)
                sync_buffers(fmodel, model)
            objectives.append(objective)
            losses.append(torch.as_tensor(loss).detach())
            metrics.append(loop.task.score(logits, qy).detach())
            query_logits.append(logits.detach())
        return Adapted(
            torch.stack(objectives).mean(),
            torch.stack(losses),
            torch.stack(metrics),
            collect(query_logits, is_ragged(episodes)),
        )

    @staticmethod
    def _meta_term(q_loss, fmodel, theta, loop: InnerLoop, shifts, names):
        """The query loss (second order), or the first-order surrogate (see module doc)."""
        if not loop.meta:  # evaluation: skip the surrogate's extra backward per episode
            return q_loss.detach()
        if not loop.first_order:
            return q_loss
        grads = torch.autograd.grad(q_loss, list(fmodel.parameters()), allow_unused=True)
        term = sum(
            (p * g.detach()).sum() for p, g in zip(theta, grads, strict=True) if g is not None
        )
        at_query = dict(zip(names, grads, strict=True))
        for name, rate, g in shifts:  # phi = theta - sum_t a_t g_t: dL/da_t = -g_t . G
            if at_query[name] is not None:
                term = term - (rate * (g * at_query[name]).detach()).sum()
        return term
