"""Small builders shared by tests: a tiny Conv4 and random episodes (float64)."""

from __future__ import annotations

import torch

from metalearn.data.episodes import Episodes
from metalearn.models.conv4 import Conv4


def tiny_net(ways=3, seed=0, **kw) -> Conv4:
    torch.manual_seed(seed)
    kw.setdefault("channels", 4)
    kw.setdefault("image_size", 16)
    return Conv4(ways=ways, **kw).double()


def random_episodes(batch=2, ways=3, shots=2, queries=3, size=16, seed=1) -> Episodes:
    g = torch.Generator().manual_seed(seed)

    def images(n):
        return torch.rand(batch, n, 1, size, size, generator=g, dtype=torch.float64)

    def labels(k):
        return torch.arange(ways).repeat_interleave(k).repeat(batch, 1)

    return Episodes(images(ways * shots), labels(shots), images(ways * queries), labels(queries))
