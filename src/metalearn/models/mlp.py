"""MLP: the regression network of Finn et al. (2017, sec. 5.1): two hidden layers of 40 ReLU
units on a point x, a linear head to y.

It meets the backbone contract (models/protocol.py): ``features`` is the last hidden layer,
``head`` the linear output layer, ``step`` is accepted and unused (no normalisation, hence
no per-step BatchNorm: ``algo.bn_per_step`` is refused with a clear error). ``ways`` is the
number of outputs: 1 for y = f(x) (the config passes ``ways``, which a regression task
requires to be 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.errors import ConfigError


class MLP(nn.Module):
    """Args:
    ways: outputs (1 for scalar regression; N for N-way logits).
    in_features: inputs per point (1 for the sinusoids' x).
    hidden: widths of the hidden layers (the paper: 40, 40).
    bn_steps: accepted for the contract; there is no normalisation to copy per step.
    """

    def __init__(self, ways: int = 1, in_features: int = 1, hidden=(40, 40), bn_steps: int = 1):
        super().__init__()
        if not hidden:
            raise ConfigError("model.hidden must list at least one layer width, e.g. [40, 40]")
        self.in_features = in_features
        widths = [in_features, *hidden]
        pairs = zip(widths[:-1], widths[1:], strict=True)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairs)
        self.head = nn.Linear(widths[-1], ways)

    def features(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        """The last hidden layer's activations [B, hidden[-1]]."""
        if x.dim() != 2 or x.shape[-1] != self.in_features:
            raise ConfigError(
                f"model=mlp takes points [batch, {self.in_features}], got {tuple(x.shape)}: use "
                "it with point data (data=sinusoid), or set model.in_features to the data's"
            )
        for layer in self.layers:
            x = F.relu(layer(x))
        return x

    def forward(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        return self.head(self.features(x, step))
