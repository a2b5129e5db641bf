"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra 2016).

A query x^ is labelled by attention over the support set: a(x^, x_i) = softmax_i of the cosine
similarity c(f(x^), g(x_i)), and P(y = k | x^) = sum of a(x^, x_i) over the support images
of class k. Trained end to end on the query log-likelihood log P(y | x^) (no inner loop);
the logits returned are log P, so their softmax is P itself.

Full context embeddings (``fce=true``, the paper's appendix): g reads the whole support set
with a bidirectional LSTM, g(x_i) = fwd_i + bwd_i + g'(x_i); f reads it with an attention
LSTM over ``fce_steps`` processing steps,

    h^_k, c_k = LSTM(f'(x^), [h_{k-1}, r_{k-1}], c_{k-1}),   h_k = h^_k + f'(x^),
    r_k = sum_i softmax_i(h_k . g(x_i)) g(x_i),               f(x^) = h_K,

where g', f' are the backbone's features (shared, as the paper's CNN). The LSTM's gates are
linear in [f'(x^), h_{k-1}, r_{k-1}], so it is an ``LSTMCell`` fed [f'(x^), r_{k-1}] with hidden
state h_{k-1}; h_0 = f'(x^) and c_0 = 0 (the paper leaves them open). The bidirectional LSTM
makes g depend on the support set's order: the images are read in label order (a stable
sort), so a prediction does not depend on how classes were listed. The paper's Omniglot
numbers (98.1 / 98.9 % 5-way, 93.8 / 98.5 % 20-way) are without FCE (the default here); its
mini-ImageNet rows use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms.metric import MetricLearner, ways_of
from metalearn.errors import ConfigError


def attention(query: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """a(x^_q, x_i) [Q, S]: softmax over the support set of the cosine similarities."""
    return F.cosine_similarity(query.unsqueeze(1), support.unsqueeze(0), dim=-1).softmax(-1)


def class_log_probs(attn: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """log P(y = k | x^) [Q, N]: the attention summed over each class's support images."""
    probs = attn @ F.one_hot(labels, ways).to(attn)
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


class FullContextEmbedding(nn.Module):
    """g (bidirectional LSTM over the support set) and f (attention LSTM), the appendix's."""

    def __init__(self, dim: int, steps: int):
        super().__init__()
        self.steps = steps
        self.support_lstm = nn.LSTM(dim, dim, bidirectional=True)
        self.query_cell = nn.LSTMCell(2 * dim, dim)

    def support(self, g: torch.Tensor) -> torch.Tensor:
        """g(x_i) = fwd_i + bwd_i + g'(x_i) for the support sequence g' [S, D]."""
        out, _ = self.support_lstm(g.unsqueeze(1))  # [S, 1, 2D]: a sequence of S, batch 1
        fwd, bwd = out.squeeze(1).chunk(2, dim=-1)
        return fwd + bwd + g

    def query(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """f(x^) = h_K for the queries f' [Q, D], attending to g(support) [S, D]."""
        h, c = f, torch.zeros_like(f)
        r = (h @ g.T).softmax(-1) @ g
        for _ in range(self.steps):
            h, c = self.query_cell(torch.cat([f, r], -1), (h, c))
            h = h + f
            r = (h @ g.T).softmax(-1) @ g
        return h


class MatchingNetworks(MetricLearner):
    """Args are the ``algo`` config keys (see conf/algo/matching.yaml); ``engine`` is unused."""

    def __init__(
        self,
        model,
        optimizer,
        engine=None,
        name: str = "matching",
        meta_batch_size: int = 4,
        fce: bool = False,
        fce_steps: int = 5,
    ):
        if fce and (not isinstance(fce_steps, int) or fce_steps < 1):
            raise ConfigError(
                f"algo.fce_steps={fce_steps!r}: the attention LSTM needs a positive number of "
                "processing steps (e.g. algo.fce_steps=5), or set algo.fce=false"
            )
        super().__init__(model, optimizer, name, meta_batch_size)
        self.fce = FullContextEmbedding(self.model.head.in_features, fce_steps) if fce else None

    def embeddings(self, sx, sy, qx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """g(support), its labels, f(query): with FCE the support set in label order."""
        support, query = self.embed(sx, qx)
        if self.fce is None:
            return support, sy, query
        order = torch.sort(sy, stable=True).indices
        support, sy = self.fce.support(support[order]), sy[order]
        return support, sy, self.fce.query(query, support)

    def episode_logits(self, sx, sy, qx) -> torch.Tensor:
        support, labels, query = self.embeddings(sx, sy, qx)
        return class_log_probs(attention(query, support), labels, ways_of(sy))

    def episode_loss(self, sx, sy, qx, qy):
        logits = self.episode_logits(sx, sy, qx)
        return F.nll_loss(logits, qy), logits
