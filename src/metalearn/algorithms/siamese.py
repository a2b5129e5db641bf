"""Siamese Neural Networks for one-shot recognition (Koch, Zemel & Salakhutdinov 2015).

Twin copies of one embedding network h read two images; the pair's probability of showing
the same class is p = sigmoid(sum_j alpha_j |h(x1)_j - h(x2)_j| + b), a learned weighted L1
distance. Trained with binary cross-entropy on same/different pairs; at test a query takes
the class of its most similar support image (one-shot, the paper's rule).

Here the pairs are every pair of images of a training episode (support and query: the
episode's N classes, K + Q images each), with the same and the different pairs weighted
equally (the paper's training set was balanced; here there are far more different pairs).
The twin network is the configured backbone's ``features`` (Conv4: 64-d on Omniglot) rather
than the paper's larger convnet with a 4096-unit sigmoid layer, so the embedding matches the
other methods'. For k shots, ``aggregate: max`` (default) keeps the paper's rule, the class of
the most similar support image; ``mean`` averages p over a class's images. The logits
returned are log p (of that support image, or log of the mean), so ``predict``'s
probabilities are the similarities normalised over the classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms.metric import MetricLearner, ways_of
from metalearn.errors import ConfigError

AGGREGATES = ("max", "mean")


class WeightedL1(nn.Module):
    """The twins' join: pre-sigmoid same-class score sum_j alpha_j |a_j - b_j| + b."""

    def __init__(self, dim: int):
        super().__init__()
        self.alpha = nn.Linear(dim, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Scores [A, B] of every pair of rows of a [A, D] and b [B, D]."""
        return self.alpha((a.unsqueeze(1) - b.unsqueeze(0)).abs()).squeeze(-1)


def pair_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the distinct pairs i < j of a score matrix [n, n], same-class
    and different-class pairs each weighted one half."""
    i, j = torch.triu_indices(len(labels), len(labels), offset=1, device=labels.device)
    same = (labels[i] == labels[j]).to(scores)
    losses = F.binary_cross_entropy_with_logits(scores[i, j], same, reduction="none")
    weights = same / same.sum().clamp(min=1) + (1 - same) / (1 - same).sum().clamp(min=1)
    return (losses * weights).sum() / 2


class SiameseNetwork(MetricLearner):
    """Args are the ``algo`` config keys (see conf/algo/siamese.yaml); ``engine`` is unused."""

    def __init__(
        self,
        model,
        optimizer,
        engine=None,
        name: str = "siamese",
        meta_batch_size: int = 4,
        aggregate: str = "max",
    ):
        if aggregate not in AGGREGATES:
            raise ConfigError(
                f"algo.aggregate={aggregate!r}; choose one of {', '.join(AGGREGATES)}"
            )
        super().__init__(model, optimizer, name, meta_batch_size)
        self.aggregate = aggregate
        self.distance = WeightedL1(self.model.head.in_features)

    def class_logits(self, scores: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
        """Per-class log similarity [Q, N] from the query-support scores [Q, S]."""
        log_p = F.logsigmoid(scores)
        ways = ways_of(sy)
        members = F.one_hot(sy, ways).T.bool()  # [N, S]
        if self.aggregate == "max":
            masked = log_p.unsqueeze(1).masked_fill(~members, -torch.inf)  # [Q, N, S]
            return masked.amax(-1)
        counts = members.sum(1).to(log_p)
        return (scores.sigmoid() @ members.T.to(log_p) / counts).clamp_min(1e-30).log()

    def episode_logits(self, sx, sy, qx) -> torch.Tensor:
        support, query = self.embed(sx, qx)
        return self.class_logits(self.distance(query, support), sy)

    def episode_loss(self, sx, sy, qx, qy):
        support, query = self.embed(sx, qx)
        emb = torch.cat([support, query])
        scores = self.distance(emb, emb)  # every pair of the episode's images
        loss = pair_loss(scores, torch.cat([sy, qy]))
        return loss, self.class_logits(scores[len(sx) :, : len(sx)], sy)
