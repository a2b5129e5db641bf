"""Prototypical Networks (Snell, Swersky & Zemel 2017).

No inner loop: embed support and query images with the backbone's ``features`` (one forward
of both together, as in the reference code), average each class's support embeddings into a
prototype, and score each query by the negative squared Euclidean distance to every
prototype. Trained end to end on the query cross-entropy (Adam in the paper).

Snell et al.'s protocol, set by ``experiment=protonet_omniglot``: training episodes wider than
the test's (``data.train_ways``: 60 on Omniglot; any width works, as there is no head), the
learning rate halved every 2000 episodes (``lr_halving_steps``), and BatchNorm with running
statistics at test (``model.bn_mode=inductive``: the reference code calls ``model.eval()``).

``metric_scale`` multiplies the distances (TADAM's metric scaling, Oreshkin et al. 2018;
``learn_metric_scale`` learns it). Snell et al. use 1; on 84x84 images the squared distances
over a Conv4's 800-d features are so large that the softmax starts saturated (query losses
of 20-60), and Adam then spends hundreds of steps shrinking the feature scale first.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from metalearn.algorithms.metric import MetricLearner
from metalearn.errors import ConfigError


def prototypes(support: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """Class means of the support embeddings [ways, D]."""
    sums = support.new_zeros(ways, support.shape[1]).index_add_(0, labels, support)
    return sums / torch.bincount(labels, minlength=ways).clamp(min=1).unsqueeze(1).to(sums)


def prototype_logits(support, labels, query, ways: int) -> torch.Tensor:
    """-||query_i - prototype_k||^2 [Q, ways]."""
    diff = query.unsqueeze(1) - prototypes(support, labels, ways).unsqueeze(0)
    return -diff.pow(2).sum(-1)


def halving_factor(step: int, total: int, base: float, every: int) -> float:
    """Snell et al.'s schedule: the learning rate halves every ``every`` outer steps."""
    return 0.5 ** (step // every)


class ProtoNet(MetricLearner):
    """Args are the ``algo`` config keys (see conf/algo/protonet.yaml); ``engine`` is unused."""

    def __init__(
        self,
        model,
        optimizer,
        engine=None,
        name: str = "protonet",
        meta_batch_size: int = 1,
        lr_halving_steps: int | None = None,
        metric_scale: float = 1.0,
        learn_metric_scale: bool = False,
    ):
        if lr_halving_steps is not None and lr_halving_steps < 1:
            raise ConfigError(
                f"algo.lr_halving_steps={lr_halving_steps}: use a positive number of outer steps"
                " (Snell et al.: 2000 episodes), or null for a constant learning rate"
            )
        if not metric_scale > 0:
            raise ConfigError(
                f"algo.metric_scale={metric_scale}: use a positive factor (1: Snell et al.'s"
                " plain squared distance)"
            )
        super().__init__(model, optimizer, name, meta_batch_size)
        self.lr_halving_steps = lr_halving_steps
        # a plain number unless learned, so checkpoints of the paper's form keep their keys
        self.metric_scale = (
            torch.nn.Parameter(torch.tensor(float(metric_scale)))
            if learn_metric_scale
            else float(metric_scale)
        )

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        if self.lr_halving_steps is None:
            return opt
        return self.annealed(opt, partial(halving_factor, every=self.lr_halving_steps))

    def episode_logits(self, sx, sy, qx) -> torch.Tensor:
        support, query = self.embed(sx, qx)
        return self.metric_scale * prototype_logits(support, sy, query, int(sy.max()) + 1)

    def episode_loss(self, sx, sy, qx, qy):
        logits = self.episode_logits(sx, sy, qx)
        return F.cross_entropy(logits, qy), logits
