"""Training-time augmentation of episode images (off by default): random crop after padding,
horizontal flip and colour jitter, as the ResNet-12 literature trains on mini-ImageNet.

Pure functions of a numpy Generator seeded by the training batch's own key, so batches stay
identical for any number of workers and a resumed run sees the same augmented images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from metalearn.errors import ConfigError


@dataclass(frozen=True)
class Augment:
    crop_padding: int = 0  # random crop of the original size after zero-padding by this much
    flip: bool = False  # random horizontal flip
    jitter: float = 0.0  # brightness, contrast (and saturation for colour) factors in 1 +- this

    def __post_init__(self):
        if self.crop_padding < 0 or not 0 <= self.jitter < 1:
            raise ConfigError(
                f"data.augment: crop_padding={self.crop_padding} must be >= 0 and "
                f"jitter={self.jitter} in [0, 1)"
            )

    @property
    def active(self) -> bool:
        return bool(self.crop_padding or self.flip or self.jitter)

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Augment float images in [0, 1] of shape [..., C, H, W], each independently."""
        shape = x.shape
        x = x.reshape(-1, *shape[-3:])
        n, c, h, w = x.shape
        if self.crop_padding:
            p = self.crop_padding
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            dy, dx = rng.integers(0, 2 * p + 1, size=(2, n))
            x = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
        if self.flip:
            flip = torch.from_numpy(rng.random(n) < 0.5)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if self.jitter:
            j = self.jitter
            b, k, s = (torch.from_numpy(rng.uniform(1 - j, 1 + j, n)).float() for _ in range(3))
            x = x * b.view(-1, 1, 1, 1)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * k.view(-1, 1, 1, 1) + mean
            if c == 3:
                gray = x.mean(dim=1, keepdim=True)
                x = gray + (x - gray) * s.view(-1, 1, 1, 1)
            x = x.clamp(0.0, 1.0)
        return x.reshape(shape)
