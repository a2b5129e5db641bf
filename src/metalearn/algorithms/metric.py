"""What the metric-based learners without an inner loop share (ProtoNet, Matching, Relation,
Siamese).

Each episode is one forward of the embedding network over its support and query images
together (as ProtoNet), a comparison of the queries with the support set, and a loss on that
comparison; the outer optimizer steps on the mean over the meta-batch. The backbone's N-way
head is never used and stays frozen (so DDP sees no unused trainable parameters), which also
lets training episodes have any number of classes (``data.train_ways``).

A subclass gives ``episode_logits(sx, sy, qx) -> [Q, N]`` (the test-time rule, whose
softmax is what ``adapt(...).predict`` reports) and ``episode_loss(sx, sy, qx, qy) ->
(loss, logits)`` (its training objective, with the query logits for ``train/acc``).
"""

from __future__ import annotations

import torch

from metalearn.algorithms.base import EpisodicModule
from metalearn.engines.base import accuracy, collect, is_ragged


class MetricLearner(EpisodicModule):
    """Base class; ``engine`` is accepted (every algo is built with one) and unused."""

    any_train_ways = True  # no head: training episodes may be wider than the test's

    def __init__(self, model, optimizer, name: str, meta_batch_size: int):
        super().__init__(model, optimizer, name, meta_batch_size)
        self.model.head.requires_grad_(False)

    def outer_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def embed(self, sx: torch.Tensor, qx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Support and query embeddings from one forward (one BatchNorm batch, as ProtoNet)."""
        emb = self.model.features(torch.cat([sx, qx]))
        return emb[: len(sx)], emb[len(sx) :]

    def episode_logits(self, sx, sy, qx) -> torch.Tensor:
        raise NotImplementedError

    def episode_loss(self, sx, sy, qx, qy) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def training_step(self, episodes, batch_idx):
        losses, accs = [], []
        for sx, sy, qx, qy in zip(*episodes, strict=True):
            loss, logits = self.episode_loss(sx, sy, qx, qy)
            losses.append(loss)
            accs.append(accuracy(logits.detach(), qy))
        loss = torch.stack(losses).mean()
        self.outer_step(loss)
        self.log_train(loss=loss.detach(), acc=torch.stack(accs).mean())

    def query_logits(self, episodes) -> torch.Tensor:
        with torch.no_grad():
            return collect(
                [self.episode_logits(sx, sy, qx) for sx, sy, qx in zip(*episodes[:3], strict=True)],
                is_ragged(episodes),
            )


def ways_of(labels: torch.Tensor) -> int:
    """Classes of an episode whose labels are 0..N-1 (episodes and ``adapt`` both are)."""
    return int(labels.max()) + 1
