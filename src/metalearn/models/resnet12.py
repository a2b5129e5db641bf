"""ResNet-12, the few-shot literature's larger backbone (Lee et al. 2019, MetaOptNet).

Four residual blocks; each is three conv3x3 (no bias) → StepNorm → LeakyReLU(0.1), the last
activation after adding a conv1x1 + StepNorm shortcut, then max-pool 2. Widths 64-160-320-640
and LeakyReLU(0.1) as in MetaOptNet (TADAM, Oreshkin et al. 2018, uses 64-128-256-512 and
swish); global average pooling gives a 640-d embedding (as in most later work; MetaOptNet
flattens the 5x5 map instead), so the head does not depend on the image size.

Regularisation as MetaOptNet's: with ``drop_rate > 0``, dropout after blocks 1-2 and DropBlock
(Ghiasi et al. 2018) after blocks 3-4, at a constant rate (no keep-rate schedule). It is random,
so ``engine=vmap`` needs ``engine.randomness=different`` then.

StepNorm (models/norm.py) keeps it exact under vmap and gives the ``bn_mode``/``bn_steps`` that
Conv4 has, so every algorithm and engine builds and runs it the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.errors import ConfigError
from metalearn.models.norm import StepNorm
from metalearn.models.protocol import check_channels

SLOPE = 0.1  # LeakyReLU negative slope (MetaOptNet)
WIDTH_RATIOS = (1, 2.5, 5, 10)  # 64-160-320-640


def drop_block(x: torch.Tensor, rate: float, block_size: int) -> torch.Tensor:
    """DropBlock: zero ``block_size`` squares so that about ``rate`` of the units are dropped,
    then rescale the kept ones. Seeds come from ``rand_like(x)`` so that vmap with
    ``randomness=different`` draws them per task."""
    h, w = x.shape[-2:]
    size = min(block_size, h, w)
    # seed rate so the blocks (which may overlap) cover ~rate of the map (Ghiasi et al. eq. 1)
    gamma = rate / size**2 * h * w / ((h - size + 1) * (w - size + 1))
    seeds = (torch.rand_like(x[..., : h - size + 1, : w - size + 1]) < gamma).to(x.dtype)
    # a seed at (i, j) drops the block whose top-left corner it is: pad, then max-pool
    blocks = F.max_pool2d(F.pad(seeds, [size - 1] * 4), size, stride=1)
    keep = 1.0 - blocks
    return x * keep * (keep.numel() / keep.sum().clamp(min=1.0))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, bn_steps: int, bn_mode: str):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False) for i in range(3)
        )
        self.norms = nn.ModuleList(StepNorm(cout, bn_steps, bn_mode) for _ in range(3))
        self.shortcut = nn.Conv2d(cin, cout, 1, bias=False)
        self.shortcut_norm = StepNorm(cout, bn_steps, bn_mode)

    def forward(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        out = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            out = norm(conv(out), step)
            if i < 2:
                out = F.leaky_relu(out, SLOPE)
        out = out + self.shortcut_norm(self.shortcut(x), step)
        return F.max_pool2d(F.leaky_relu(out, SLOPE), 2)


class ResNet12(nn.Module):
    """ResNet-12 and a linear head with ``ways`` outputs (see the module doc).

    Args:
        ways: number of classes per episode (head width).
        channels: the four blocks' widths (64, 160, 320, 640 in MetaOptNet), or one number c
            for (c, 2.5c, 5c, 10c), so ``model.channels=16`` shrinks it as it does Conv4.
        in_channels: image channels (3 for colour, 1 for grayscale).
        image_size: input height/width; only checked (>= 16: four 2x poolings), since the
            embedding is average-pooled.
        bn_mode: "transductive" (batch statistics; MAML default) or "inductive".
        bn_steps: number of per-step BatchNorm copies (1 = shared; MAML++ uses inner_steps).
        drop_rate: dropout (blocks 1-2) / DropBlock (blocks 3-4) rate in training; 0 = off.
        dropblock_size: DropBlock's square side (5 in MetaOptNet; clipped to the map).
    """

    def __init__(
        self,
        ways: int,
        channels: Sequence[int] = (64, 160, 320, 640),
        in_channels: int = 3,
        image_size: int = 84,
        bn_mode: str = "transductive",
        bn_steps: int = 1,
        drop_rate: float = 0.0,
        dropblock_size: int = 5,
    ):
        super().__init__()
        self.in_channels = in_channels
        if isinstance(channels, int):  # one width scales MetaOptNet's proportions (64 -> theirs)
            channels = [round(channels * r) for r in WIDTH_RATIOS]
        channels = [int(c) for c in channels]  # a Hydra ListConfig too
        if len(channels) != 4:
            raise ConfigError(
                f"model.channels={channels} must list 4 widths, e.g. [64,160,320,640]"
            )
        if image_size < 16:
            raise ConfigError(f"image_size={image_size} is too small for ResNet-12; use >= 16")
        if not 0.0 <= drop_rate < 1.0:
            raise ConfigError(f"model.drop_rate={drop_rate} must be in [0, 1)")
        self.drop_rate, self.dropblock_size = drop_rate, dropblock_size
        widths = [in_channels, *channels]
        self.blocks = nn.ModuleList(
            ResBlock(widths[i], widths[i + 1], bn_steps, bn_mode) for i in range(4)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # MetaOptNet's initialisation
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
        self.head = nn.Linear(channels[-1], ways)

    def features(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Average-pooled output of the four blocks: the [B, channels[-1]] embedding."""
        check_channels(x, self.in_channels)
        for i, block in enumerate(self.blocks):
            x = block(x, step)
            if self.training and self.drop_rate > 0:
                if i < 2:
                    x = F.dropout(x, self.drop_rate, training=True)
                else:
                    x = drop_block(x, self.drop_rate, self.dropblock_size)
        return x.mean((-2, -1))

    def forward(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        return self.head(self.features(x, step))
