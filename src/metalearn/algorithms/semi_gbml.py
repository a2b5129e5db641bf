"""Self-training for the MAML family: pseudo-labelled unlabelled images join the support set.

A simple gradient-based use of each episode's unlabelled set (``data.unlabelled``; the
classic self-training of semi-supervised learning, done per episode):

1. adapt to the support set with the test-time inner loop (no meta-gradient) and predict
   the episode's unlabelled images;
2. keep those whose top class probability is at least ``pseudo_threshold`` (a distractor
   class's image, belonging to none of the episode's classes, should rarely be that sure),
   labelled with that class;
3. run the algorithm's own inner loop (training: with its meta-gradient) on the support set
   plus the kept images, and score the queries as usual.

The pseudo-labels are constants (no gradient flows through their choice); the meta-gradient
flows through the inner loop on the enlarged support set, so the initialisation is learned
for adapting on it. Episodes then differ in support size: a ragged meta-batch, which every
engine takes. ``pseudo_threshold`` above 1 keeps nothing: the algorithm it extends, on the
same episodes. Without an unlabelled set it is that algorithm too.
"""

from __future__ import annotations

import torch

from metalearn.algorithms.gbml import GBML
from metalearn.data.episodes import Episodes, SemiEpisodes, labelled
from metalearn.errors import ConfigError


class SelfTrainingGBML(GBML):
    """Args: GBML's (conf/algo/maml.yaml) and ``pseudo_threshold`` (conf/algo/semi_maml.yaml)."""

    uses_unlabelled = True

    def __init__(self, *args, pseudo_threshold: float = 0.9, **kwargs):
        if not pseudo_threshold > 0:
            raise ConfigError(
                f"algo.pseudo_threshold={pseudo_threshold}: use a probability in (0, 1] (or "
                "above 1 to keep no pseudo-label)"
            )
        super().__init__(*args, **kwargs)
        self.pseudo_threshold = float(pseudo_threshold)
        self.pseudo_kept: torch.Tensor | None = None  # share of unlabelled images kept, last batch

    def with_pseudo_labels(self, episodes) -> Episodes:
        """The labelled episodes, each support set enlarged by its confident pseudo-labels."""
        plain = labelled(episodes)
        if not isinstance(episodes, SemiEpisodes) or self.pseudo_threshold > 1:
            return plain
        ux = episodes.unlabelled_x
        unknown = torch.zeros(ux.shape[:2], dtype=torch.long, device=ux.device)  # no labels
        probe = Episodes(plain.support_x, plain.support_y, ux, unknown)
        with torch.enable_grad():  # the inner loop differentiates, even at evaluation
            logits = self.run_engine(self.model, self.eval_loop(), probe,
                                     self.head_kind(plain)).logits  # fmt: skip
        sx, sy = [], []
        kept = []
        for b, z in enumerate(logits):
            confidence, label = z.detach().softmax(-1).max(-1)
            keep = confidence >= self.pseudo_threshold
            kept.append(keep.float().mean())
            sx.append(torch.cat([plain.support_x[b], ux[b][keep]]))
            sy.append(torch.cat([plain.support_y[b], label[keep]]))
        self.pseudo_kept = torch.stack(kept).mean()
        if len({len(y) for y in sy}) == 1:
            return Episodes(torch.stack(sx), torch.stack(sy), plain.query_x, plain.query_y)
        return Episodes(tuple(sx), tuple(sy), tuple(plain.query_x), tuple(plain.query_y))

    def training_step(self, episodes, batch_idx):
        super().training_step(self.with_pseudo_labels(episodes), batch_idx)
        self.log_train(pseudo_kept=self.pseudo_kept)

    def query_logits(self, episodes) -> torch.Tensor:
        return super().query_logits(self.with_pseudo_labels(episodes))
