"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales 2018, "Learning to Compare").

An embedding f and a learned relation module g score every (query, class) pair: the class's
support features are summed (k-shot: element-wise sum, as the paper), concatenated with the
query's along the channels, and g maps the pair to a relation score r in [0, 1] (a sigmoid).
Trained with the mean squared error between r and the one-hot query labels, the paper's
objective (regression, not cross-entropy); no inner loop. The logits returned are log r, so
``predict``'s probabilities are the scores normalised over the classes.

With ``model=conv4`` the embedding is Conv4 without its last two max-pools (feature maps of
channels x image_size/4 squared: 64 x 7 x 7 on Omniglot) and g is the paper's: two blocks of
conv3x3 - BatchNorm - ReLU - max-pool, then a ReLU layer of ``hidden`` units (8) and one
output. Any other backbone (ResNet-12, a user's) gives flat vectors from its ``features``; g
is then the same head as an MLP on the concatenated vectors (2D -> ``hidden`` -> 1), since a
globally pooled embedding has no map left to convolve.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms.metric import MetricLearner, ways_of
from metalearn.errors import ConfigError
from metalearn.models.conv4 import Conv4, ConvBlock
from metalearn.models.norm import StepNorm
from metalearn.models.protocol import check_channels


def conv4_maps(model: Conv4, x: torch.Tensor) -> torch.Tensor:
    """Conv4's feature maps with its last two max-pools left out (Sung et al.'s embedding)."""
    check_channels(x, model.in_channels)
    for i, block in enumerate(model.blocks):
        x = F.relu(block.norm(block.conv(x)))
        if i < 2:
            x = F.max_pool2d(x, 2)
    return x


def bn_mode_of(model: nn.Module) -> str:
    """The backbone's BatchNorm mode, which the relation module's BatchNorm follows."""
    norms = [m for m in model.modules() if isinstance(m, StepNorm)]
    return norms[0].mode if norms else "transductive"


class ConvRelation(nn.Module):
    """g on feature-map pairs [P, 2C, s, s] -> pre-sigmoid scores [P] (the paper's module)."""

    def __init__(self, channels: int, side: int, hidden: int, bn_mode: str):
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                ConvBlock(2 * channels, channels, 1, bn_mode),
                ConvBlock(channels, channels, 1, bn_mode),
            ]
        )
        self.side, out = side, side // 4
        if out < 1:
            raise ConfigError(
                f"the relation module halves the {side}x{side} feature maps twice: use "
                "data.image_size >= 16"
            )
        self.fc = nn.Sequential(
            nn.Linear(channels * out * out, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        if pairs.shape[-1] != self.side:
            raise ConfigError(
                f"the relation module was sized for {4 * self.side}x{4 * self.side} images "
                f"(algo.image_size), but the feature maps are {pairs.shape[-1]} wide: give "
                "images of the size it was trained on (algo.image_size follows data.image_size)"
            )
        for block in self.blocks:
            pairs = block(pairs)
        return self.fc(pairs.flatten(1)).squeeze(-1)


class VectorRelation(nn.Module):
    """g on vector pairs [P, 2D] -> pre-sigmoid scores [P] (for backbones without maps)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.fc(pairs).squeeze(-1)


class RelationNetwork(MetricLearner):
    """Args are the ``algo`` config keys (see conf/algo/relation.yaml); ``engine`` is unused."""

    def __init__(
        self,
        model,
        optimizer,
        engine=None,
        name: str = "relation",
        meta_batch_size: int = 4,
        hidden: int = 8,
        image_size: int = 28,
    ):
        super().__init__(model, optimizer, name, meta_batch_size)
        if isinstance(self.model, Conv4):
            channels = self.model.blocks[-1].conv.out_channels
            self.relation = ConvRelation(channels, image_size // 4, hidden, bn_mode_of(self.model))
        else:
            self.relation = VectorRelation(self.model.head.in_features, hidden)

    def embed(self, sx, qx):
        if not isinstance(self.model, Conv4):
            return super().embed(sx, qx)
        maps = conv4_maps(self.model, torch.cat([sx, qx]))
        return maps[: len(sx)], maps[len(sx) :]

    def relation_logits(self, sx, sy, qx) -> torch.Tensor:
        """Pre-sigmoid relation scores [Q, N] of every (query, class) pair."""
        support, query = self.embed(sx, qx)
        ways = ways_of(sy)
        classes = support.new_zeros(ways, *support.shape[1:]).index_add_(0, sy, support)
        shape = (len(query), ways, *support.shape[1:])
        pairs = torch.cat([classes.unsqueeze(0).expand(shape), query.unsqueeze(1).expand(shape)], 2)
        return self.relation(pairs.flatten(0, 1)).view(len(query), ways)

    def relation_scores(self, sx, sy, qx) -> torch.Tensor:
        """r in [0, 1] [Q, N]."""
        return self.relation_logits(sx, sy, qx).sigmoid()

    def episode_logits(self, sx, sy, qx) -> torch.Tensor:
        return F.logsigmoid(self.relation_logits(sx, sy, qx))  # log r

    def episode_loss(self, sx, sy, qx, qy):
        z = self.relation_logits(sx, sy, qx)
        target = F.one_hot(qy, z.shape[1]).to(z)
        return F.mse_loss(z.sigmoid(), target), F.logsigmoid(z)
