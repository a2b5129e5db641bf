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

Training on episodes whose number of classes varies (``data.episodes=range|metadataset``)
builds a head per episode in training too (``algo.head_init``: ``prototypes``, Proto-MAML,
whose meta-gradient flows through the prototypes into the body; or ``zeros``); the model's
own N-way head is then unused, and evaluation starts every episode's head the same way.
docs/episodes.md measures the two.
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


def resolved(init: str, model: nn.Module, ways, trained_with: str = "auto") -> str:
    """``init`` with ``auto`` decided for ``ways``-way episodes (a number, or a list: one
    decision for a meta-batch). ``trained_with``: the model's training head (``algo.head_init``);
    a model trained with per-episode heads is evaluated with them (``auto``)."""
    check_head_init(init)
    check_head_init(trained_with)
    trained = model.head.out_features
    ways = [ways] if isinstance(ways, int) else list(ways)
    if init == "auto":
        init = trained_with
    if init == "auto":
        return "trained" if all(w == trained for w in ways) else "prototypes"
    if init == "trained" and any(w != trained for w in ways):
        other = next(w for w in ways if w != trained)
        raise ConfigError(
            f"head_init=trained keeps the model's {trained}-way head, but the support set has "
            f"{other} classes: use head_init=prototypes or zeros (or auto)"
        )
    return init


def initial_heads(features, labels, ways: list[int], init: str, dim: int, meta: bool):
    """Each episode's head as initial parameters for an engine (``{head.weight, head.bias}``
    per episode), from the support ``features`` [S_b, D] per episode: ``prototypes`` (row k =
    2 c_k, bias -||c_k||^2) or ``zeros``. With ``meta`` the prototype heads keep their graph to
    the body (Proto-MAML's meta-gradient); otherwise they are constants."""
    out = []
    for f, y, w in zip(features, labels, ways, strict=True):
        if init == "zeros":
            weight, bias = f.new_zeros(w, dim), f.new_zeros(w)
        else:
            with torch.set_grad_enabled(meta and torch.is_grad_enabled()):
                c = prototypes(f, y, w)
                weight, bias = 2 * c, -c.pow(2).sum(1)
        if not weight.requires_grad:  # the engines differentiate the support loss by them
            weight, bias = weight.detach().requires_grad_(), bias.detach().requires_grad_()
        out.append({"head.weight": weight, "head.bias": bias})
    return out


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
