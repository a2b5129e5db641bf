"""Second order in constant memory: each inner step is recomputed in the outer backward.

A second-order meta-gradient backpropagates through every inner update
``phi_{t+1} = phi_t - a_t * grad L_support(phi_t)``. Plain autograd keeps every step's
activations and its double-backward graph until the outer backward, so memory grows with the
number of inner steps. ``recomputed_update`` keeps only each step's inputs (``phi_t``, the
meta-learned tensors the step reads, its rates) and rebuilds that one step's graph when the
outer backward reaches it: peak memory is one step's graph plus a parameter copy per step, at
the cost of one more support forward/backward per step.

Why not ``torch.utils.checkpoint``: its non-reentrant form silently returns wrong
meta-gradients when the checkpointed function calls ``torch.autograd.grad`` (measured on Conv4
in float64: errors of order 1), and its reentrant form refuses an outer ``torch.autograd.grad``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from metalearn.engines.base import shaped_rate
from metalearn.errors import ConfigError


class _Recomputed(torch.autograd.Function):
    """``step(*inputs, create_graph)`` -> new adapted tensors; the first ``adapted`` inputs are
    the tensors the inner gradient is taken for."""

    @staticmethod
    def forward(ctx, step: Callable, adapted: int, *inputs):
        ctx.step, ctx.adapted = step, adapted
        ctx.save_for_backward(*inputs)
        with torch.enable_grad():
            out = step(*_leaves(inputs, adapted, [True] * len(inputs)), create_graph=False)
        return tuple(o.detach() for o in out)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        needs = ctx.needs_input_grad[2:]
        inputs = _leaves(ctx.saved_tensors, ctx.adapted, needs)
        with torch.enable_grad():
            out = ctx.step(*inputs, create_graph=True)
            wanted = [x for x, need in zip(inputs, needs, strict=True) if need]
            got = iter(torch.autograd.grad(out, wanted, grads, allow_unused=True))
        return (None, None, *(next(got) if need else None for need in needs))


def _leaves(xs, adapted: int, needs) -> list[torch.Tensor]:
    # the adapted tensors always need grad: the inner gradient is taken with respect to them
    return [
        x.detach().requires_grad_(i < adapted or bool(need))
        for i, (x, need) in enumerate(zip(xs, needs, strict=True))
    ]


def recomputed_update(forward, fast: dict, loop, t: int, sx, sy, loss_fn) -> dict:
    """One second-order SGD inner step ``fast -> fast - lr * grad``, kept as its inputs only."""
    names = list(loop.adapt)
    others = [n for n in fast if n not in loop.adapt]
    rates = [loop.lr(n, t) for n in names]
    learned = [r for r in rates if torch.is_tensor(r)]
    k, m = len(names), len(others)

    def step(*xs, create_graph: bool):
        phi = xs[:k]
        given = iter(xs[k + m :])
        lrs = [next(given) if torch.is_tensor(r) else r for r in rates]
        params = dict(zip([*names, *others], xs[: k + m], strict=True))
        loss = loss_fn(forward(params, sx, t), sy)
        grads = torch.autograd.grad(loss, phi, create_graph=create_graph)
        return tuple(p - shaped_rate(lr, g) * g for p, lr, g in zip(phi, lrs, grads, strict=True))

    inputs = [*(fast[n] for n in names), *(fast[n] for n in others), *learned]
    new = _Recomputed.apply(step, k, *inputs)
    return {**fast, **dict(zip(names, new, strict=True))}


def check_recomputable(model: nn.Module) -> None:
    """Recomputing a step must give the same step: no random ops, no running statistics."""
    for name, module in model.named_modules():
        where = name or type(model).__name__
        if not module.training:
            continue
        rate = module.p if isinstance(module, nn.modules.dropout._DropoutNd) else 0.0
        if rate or getattr(module, "drop_rate", 0.0):
            raise ConfigError(
                f"engine.recompute=true: {where} drops activations at random, so a recomputed "
                "step would differ; set model.drop_rate=0, or engine.recompute=false"
            )
        bn = isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
        if bn or getattr(module, "mode", None) == "inductive":
            raise ConfigError(
                f"engine.recompute=true: {where} updates BatchNorm running statistics, which a "
                "recomputed step would update twice; use model.bn_mode=transductive, or "
                "engine.recompute=false"
            )
