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
) -> tuple[dict, torch.Tensor]:
    """Train the ``train`` entries of a copy of ``params``, one optimizer step per batch.

    Returns the fitted parameters (detached) and the loss of the last step.
    """
    fast = {n: p.detach().clone() for n, p in params.items()}
    trained = [fast[n].requires_grad_() for n in train]
    opt = make_optimizer(optimizer, trained, lr, adam_beta1)
    loss = torch.tensor(float("nan"))
    for x, y in batches:
        loss = F.cross_entropy(forward(fast, x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {n: p.detach() for n, p in fast.items()}, loss.detach()
