"""Conv4, the standard few-shot backbone, with explicit BatchNorm modes.

Every block is conv3x3 → StepNorm (affine-free BatchNorm + explicit per-channel scale/shift,
exact under ``torch.func.vmap``; see models/norm.py) → ReLU → max-pool. Any input channels
and any image size of at least 16 (the head is sized from ``image_size``).

``forward(x, step=t)`` selects inner-loop step ``t``'s BatchNorm scale/shift and running
statistics when ``bn_steps > 1`` (MAML++ per-step BatchNorm); steps past the last reuse it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.errors import ConfigError
from metalearn.models.norm import BN_MODES, StepNorm
from metalearn.models.protocol import check_channels

__all__ = ["BN_MODES", "Conv4", "ConvBlock", "StepNorm"]  # StepNorm: re-exported for old imports


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, bn_steps: int, bn_mode: str):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = StepNorm(cout, bn_steps, bn_mode)

    def forward(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.norm(self.conv(x), step)), 2)


class Conv4(nn.Module):
    """Four conv blocks and a linear head with ``ways`` outputs.

    Args:
        ways: number of classes per episode (head width).
        channels: filters per conv layer (64 for Omniglot, 20 in the FF15 Quick Draw setup).
        in_channels: image channels.
        image_size: input height/width, used to size the head.
        bn_mode: "transductive" (batch statistics; MAML default) or "inductive".
        bn_steps: number of per-step BatchNorm copies (1 = shared; MAML++ uses inner_steps).
    """

    def __init__(
        self,
        ways: int,
        channels: int = 64,
        in_channels: int = 1,
        image_size: int = 28,
        bn_mode: str = "transductive",
        bn_steps: int = 1,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.blocks = nn.ModuleList(
            ConvBlock(in_channels if i == 0 else channels, channels, bn_steps, bn_mode)
            for i in range(4)
        )
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ConfigError(f"image_size={image_size} is too small for Conv4; use >= 16")
        self.head = nn.Linear(channels * side * side, ways)

    def features(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Flattened output of the four blocks (the embedding ProtoNet and fine-tuning use)."""
        check_channels(x, self.in_channels)
        for block in self.blocks:
            x = block(x, step)
        return x.flatten(1)

    def forward(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        return self.head(self.features(x, step))

    def reset_head(self) -> None:
        """Re-initialise the classifier (used by fine-tuning baselines)."""
        self.head.reset_parameters()
