"""The backbone contract: what every algorithm may rely on in ``model``.

A backbone is an ``nn.Module`` with

* ``forward(x, step=0) -> logits [B, N]``: ``x`` is ``[B, C, H, W]``; ``step`` is the
  inner-loop step, which selects that step's normalisation (MAML++ per-step BatchNorm);
* ``features(x, step=0) -> [B, D]``: the embedding (ProtoNet, fine-tuning and Proto-MAML heads
  use it), with ``forward(x, step) == head(features(x, step))``;
* ``head: nn.Linear(D, N)``: the N-way classifier. For M classes an algorithm copies the model
  and sets ``head = nn.Linear(head.in_features, M)`` (``algorithms/heads.with_head``), so the
  head must be a plain attribute that nothing else holds on to;
* normalisation as ``models.norm.StepNorm`` (or none), never BatchNorm with its own affine
  weight/bias: that is silently wrong under ``engine=vmap`` and has no per-step copies;
* a constructor taking ``ways`` and, for ``algo.bn_per_step``, ``bn_steps`` (the number of
  per-step normalisation copies); the configs also pass ``in_channels`` and ``image_size``.

``check_backbone`` checks a built model (``EpisodicModule`` calls it) and names the missing
piece, so a user's own ``nn.Module`` fails at build time rather than mid-training.
"""

from __future__ import annotations

import inspect
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from metalearn.errors import ConfigError
from metalearn.models.norm import StepNorm


@runtime_checkable
class Backbone(Protocol):
    head: nn.Linear

    def forward(self, x: torch.Tensor, step: int = 0) -> torch.Tensor: ...

    def features(self, x: torch.Tensor, step: int = 0) -> torch.Tensor: ...


def takes_step(fn) -> bool:
    params = inspect.signature(fn).parameters.values()
    return any(p.name == "step" or p.kind is p.VAR_KEYWORD for p in params)


def check_backbone(model: nn.Module, bn_steps: int = 1) -> None:
    """Raise ConfigError naming what ``model`` lacks of the contract above.

    ``bn_steps > 1`` (``algo.bn_per_step``): its normalisation must have that many steps."""
    name = type(model).__name__
    if not isinstance(model, nn.Module):
        raise ConfigError(f"the model must be a torch nn.Module, got {name}")
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise ConfigError(
            f"{name}.head must be an nn.Linear (the N-way classifier on features(x)); got "
            f"{type(head).__name__}. Algorithms replace it by nn.Linear(head.in_features, ways) "
            "for other numbers of classes, so put any other layers in features"
        )
    for method, returns in (("features", "the [B, D] embedding head reads"), ("forward", "logits")):
        fn = getattr(model, method, None)
        if not callable(fn) or not takes_step(fn):
            raise ConfigError(
                f"{name} has no {method}(x, step=...) returning {returns}: add it, with step "
                "selecting the inner-loop step's normalisation (ignore it if there is none)"
            )
    norms = []
    for where, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            raise ConfigError(
                f"{name}.{where} is a BatchNorm with its own affine weight/bias, which is silently "
                "wrong under engine=vmap and has no per-step copies: use "
                "metalearn.models.norm.StepNorm (affine-free BatchNorm + explicit per-step "
                "scale/shift), or affine=False"
            )
        if isinstance(module, StepNorm):
            norms.append(module)
    if bn_steps > 1 and not any(n.steps >= bn_steps for n in norms):
        raise ConfigError(
            f"algo.bn_per_step needs {bn_steps} per-step normalisation copies, but {name} has no "
            "StepNorm(channels, steps=bn_steps): build its normalisation from bn_steps, or set "
            "algo.bn_per_step=false"
        )


def check_channels(x: torch.Tensor, in_channels: int) -> None:
    """A clear error instead of conv2d's when the images' channels differ from the model's."""
    if x.dim() < 3 or x.shape[-3] != in_channels:
        raise ConfigError(
            f"the model was built for {in_channels}-channel images but got input of shape "
            f"{tuple(x.shape)}: set model.in_channels={x.shape[-3] if x.dim() >= 3 else '?'} "
            "(or make the data give that many channels)"
        )
