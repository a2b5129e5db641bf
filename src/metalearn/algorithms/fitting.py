"""Plain (non-differentiable) fitting with a torch optimizer: Reptile's inner loop and the
test-time adaptation of Reptile and the fine-tuning baseline."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from metalearn.engines.base import check_inner_optimizer

Forward = Callable[[dict, torch.Tensor], torch.Tensor]  # (params, x) -> logits


def make_optimizer(name: str, params: list, lr: float, adam_beta1: float = 0.9):
    check_inner_optimizer(name)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.Adam(params, lr=lr, betas=(adam_beta1, 0.999))


def fit(
    forward: Forward,
    params: dict,
    train: Iterable[str],
    batches: Iterable[tuple],
    optimizer: str,
    lr: float,
    adam_beta1: float = 0.9,
    state: dict | None = None,
    loss_fn: Callable = F.cross_entropy,
) -> tuple[dict, torch.Tensor]:
    """Train the ``train`` entries of a copy of ``params``, one optimizer step per batch.

    ``state`` (parameter name -> that parameter's optimizer state, e.g. Adam's moments and step
    count) starts the optimizer where an earlier fit left it, and receives the new state.
    ``loss_fn(outputs, y)``: the task's loss (cross-entropy for classes, MSE for targets).
    Returns the fitted parameters (detached) and the loss of the last step.
    """
    fast = {n: p.detach().clone() for n, p in params.items()}
    trained = {n: fast[n].requires_grad_() for n in train}
    opt = make_optimizer(optimizer, list(trained.values()), lr, adam_beta1)
    for n, p in trained.items():
        if state and n in state:
            opt.state[p] = {k: v.clone().to(p.device) for k, v in state[n].items()}
    loss = torch.tensor(float("nan"))
    for x, y in batches:
        loss = loss_fn(forward(fast, x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if state is not None:
        state.update({n: dict(opt.state[p]) for n, p in trained.items() if opt.state[p]})
    return {n: p.detach() for n, p in fast.items()}, loss.detach()
