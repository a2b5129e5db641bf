"""Heads for episodes with another number of classes than the model was trained with.

A MAML-family or Reptile model ends in an N-way linear head, fitted to the training episodes'
N. Adapting it to a problem with M != N classes needs a new M-way head to start from:

* ``prototypes`` (the default for M != N): Proto-MAML's initialisation (Triantafillou et al.
  2020, Meta-Dataset): row k = 2 c_k, bias k = -||c_k||^2, with c_k the mean support
  embedding of class k, so the un-adapted head already scores like a Prototypical Network;
* ``zeros``: all zero (every class equally likely before adaptation);
* ``trained``: keep the trained head (M must equal N).

``auto`` keeps the trained head when M == N (the procedure the model was trained and tested
with) and starts from prototypes otherwise. docs/adapt.md measures both on 20-way Omniglot.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from metalearn.algorithms.protonet import prototypes
from metalearn.errors import ConfigError

HEAD_INIT = ("auto", "trained", "prototypes", "zeros")


def check_head_init(init: str) -> None:
    if init not in HEAD_INIT:
        raise ConfigError(f"head_init={init!r}; choose one of {', '.join(HEAD_INIT)}")


def resolved(init: str, model: nn.Module, ways: int) -> str:
    """``init`` with ``auto`` decided for a ``ways``-way episode."""
    check_head_init(init)
    trained = model.head.out_features
    if init == "auto":
        return "trained" if ways == trained else "prototypes"
    if init == "trained" and ways != trained:
        raise ConfigError(
            f"head_init=trained keeps the model's {trained}-way head, but the support set has "
            f"{ways} classes: use head_init=prototypes or zeros (or auto)"
        )
    return init


def with_head(model: nn.Module, sx: torch.Tensor, sy: torch.Tensor, ways: int, init: str):
    """A copy of ``model`` whose head has ``ways`` outputs, initialised by ``init``
    (``prototypes`` or ``zeros``) from the support set (sx, sy)."""
    new = copy.deepcopy(model)
    old = model.head
    head = nn.Linear(old.in_features, ways).to(old.weight.device, old.weight.dtype)
    with torch.no_grad():
        if init == "zeros":
            head.weight.zero_()
            head.bias.zero_()
        else:
            c = prototypes(model.features(sx), sy, ways)
            head.weight.copy_(2 * c)
            head.bias.copy_(-c.pow(2).sum(1))
    new.head = head
    return new
