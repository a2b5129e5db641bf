"""Semi-supervised Prototypical Networks (Ren et al. 2018, "Meta-Learning for Semi-Supervised
Few-Shot Classification", sec. 4.1 and 4.2).

Episodes carry an unlabelled set (``data.unlabelled``, data/unlabelled.py). ``semi``:

* ``soft_kmeans``: the support prototypes p_c are refined by one step of soft k-means over
  the unlabelled embeddings u_j: z_jc = softmax_c(-d(u_j, p_c)), and
  p~_c = (sum_{i in S_c} h(x_i) + sum_j z_jc u_j) / (|S_c| + sum_j z_jc)  (their eq. 4);
* ``soft_kmeans_cluster``: the same with an extra distractor cluster, its prototype at the
  origin and radius r (learned: ``learn_radius``; the N class clusters keep radius 1), so
  an image far from every class can fall to it (their eq. 5-6):
  z_jc = softmax_c(-d(u_j, p_c) / r_c^2 - A(r_c)), A(r) = log r + log(2 pi) / 2, and the
  refinement sums over the N classes only;
* ``none``: plain ProtoNet on the same episodes (the unlabelled set is ignored).

d is ProtoNet's scaled squared distance (``metric_scale`` * ||.||^2), the same one that
scores the queries against the refined prototypes. Without an unlabelled set (or an empty
one) every variant is exactly ProtoNet, so ``adapt(...).predict`` on a user's support set
works as ProtoNet's. Masked soft k-means (their sec. 4.3) is not implemented.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from metalearn.algorithms.protonet import ProtoNet, prototypes
from metalearn.data.episodes import SemiEpisodes, labelled
from metalearn.engines.base import accuracy, collect, is_ragged
from metalearn.errors import ConfigError

SEMI = ("none", "soft_kmeans", "soft_kmeans_cluster")
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def squared_distances(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """||x_j - centre_c||^2 [J, C]."""
    return (x.unsqueeze(1) - centres.unsqueeze(0)).pow(2).sum(-1)


def soft_kmeans_prototypes(
    support, labels, unlabelled, ways: int, scale=1.0, distractor_radius=None
) -> torch.Tensor:
    """Support prototypes refined by one soft k-means step over ``unlabelled`` [U, D] ([ways,
    D]); with ``distractor_radius``, an extra cluster at the origin takes its share."""
    protos = prototypes(support, labels, ways)
    if unlabelled is None or len(unlabelled) == 0:
        return protos
    dist = scale * squared_distances(unlabelled, protos)  # [U, ways]
    if distractor_radius is None:
        z = dist.neg().softmax(-1)
    else:
        r = distractor_radius.reshape(1, 1)
        origin = scale * unlabelled.pow(2).sum(-1, keepdim=True)  # distance to the origin
        logits = torch.cat([-dist - HALF_LOG_2PI, -origin / r**2 - torch.log(r) - HALF_LOG_2PI], 1)
        z = logits.softmax(-1)[:, :ways]  # the distractor's share refines no prototype
    counts = torch.bincount(labels, minlength=ways).to(protos)
    sums = protos * counts.unsqueeze(1) + z.T @ unlabelled
    return sums / (counts + z.sum(0)).unsqueeze(1)


class SemiProtoNet(ProtoNet):
    """Args are the ``algo`` config keys (conf/algo/semi_protonet.yaml)."""

    uses_unlabelled = True

    def __init__(
        self,
        model,
        optimizer,
        engine=None,
        name: str = "semi_protonet",
        semi: str = "soft_kmeans",
        distractor_radius: float = 1.0,
        learn_radius: bool = True,
        **protonet,
    ):
        if semi not in SEMI:
            raise ConfigError(f"algo.semi={semi!r}: choose one of {', '.join(SEMI)}")
        if not distractor_radius > 0:
            raise ConfigError(
                f"algo.distractor_radius={distractor_radius}: use a positive radius (1: the "
                "class clusters')"
            )
        super().__init__(model, optimizer, engine, name, **protonet)
        self.semi = semi
        # the distractor cluster's radius, as a log (stays positive); a buffer when fixed
        value = torch.tensor(math.log(distractor_radius))
        if semi != "soft_kmeans_cluster":
            self.log_radius = None
        elif learn_radius:
            self.log_radius = torch.nn.Parameter(value)
        else:
            self.register_buffer("log_radius", value)

    def episode_logits(self, sx, sy, qx, ux=None) -> torch.Tensor:
        unlabelled = None if self.semi == "none" else ux
        emb = self.model.features(torch.cat([sx, qx] + ([unlabelled] if unlabelled is not None
                                                         else [])))  # fmt: skip
        support, query = emb[: len(sx)], emb[len(sx) : len(sx) + len(qx)]
        ways = int(sy.max()) + 1
        radius = None if self.log_radius is None else self.log_radius.exp()
        protos = soft_kmeans_prototypes(
            support, sy, emb[len(sx) + len(qx) :], ways, self.metric_scale, radius
        )
        return -self.metric_scale * squared_distances(query, protos)

    def episode_loss(self, sx, sy, qx, qy, ux=None):
        logits = self.episode_logits(sx, sy, qx, ux)
        return F.cross_entropy(logits, qy), logits

    def training_step(self, episodes, batch_idx):
        losses, accs = [], []
        for sx, sy, qx, qy, ux in tasks(episodes):
            loss, logits = self.episode_loss(sx, sy, qx, qy, ux)
            losses.append(loss)
            accs.append(accuracy(logits.detach(), qy))
        loss = torch.stack(losses).mean()
        self.outer_step(loss)
        values = dict(loss=loss.detach(), acc=torch.stack(accs).mean())
        if self.log_radius is not None:
            values["distractor_radius"] = self.log_radius.detach().exp()
        self.log_train(**values)

    def query_logits(self, episodes) -> torch.Tensor:
        with torch.no_grad():
            return collect(
                [self.episode_logits(sx, sy, qx, ux) for sx, sy, qx, _, ux in tasks(episodes)],
                is_ragged(labelled(episodes)),
            )


def tasks(episodes):
    """(sx, sy, qx, qy, unlabelled x or None) per episode, with or without unlabelled sets."""
    if isinstance(episodes, SemiEpisodes):
        return zip(*episodes[:5], strict=True)
    return ((*task, None) for task in zip(*labelled(episodes), strict=True))
