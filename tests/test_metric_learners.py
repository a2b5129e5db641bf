"""The metric-based learners' defining mechanisms, checked against independent computations
on a tiny float64 Conv4 and random episodes: Matching Networks' cosine attention and full
context embeddings, the Relation Network's relation module and MSE objective, the Siamese
network's weighted L1 + sigmoid and its one-shot rule. (Learning on real Omniglot:
tests/test_algorithm_learning.py; checkpoints and predict: tests/test_learner.py.)"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from metalearn.algorithms.matching import MatchingNetworks, attention
from metalearn.algorithms.relation import RelationNetwork, conv4_maps
from metalearn.algorithms.siamese import SiameseNetwork, pair_loss
from metalearn.errors import ConfigError
from metalearn.models.resnet12 import ResNet12
from tests.helpers import random_episodes, tiny_net
from tests.test_algorithms import fit, params

ADAM = partial(torch.optim.Adam, lr=1e-2)


def episode(shots=2, seed=1):
    eps = random_episodes(batch=1, shots=shots, seed=seed)
    return eps, *(t[0] for t in eps)


def cosine(a, b):
    return (a * b).sum() / (a.norm() * b.norm())


# ---- Matching Networks ---------------------------------------------------------------------
def matching(net=None, **kw) -> MatchingNetworks:
    model = tiny_net(**(net or {}))
    torch.manual_seed(1)  # the FCE LSTMs
    return MatchingNetworks(model, ADAM, **kw).double()


def test_matching_attention_sums_to_one_and_is_the_softmax_of_cosine_similarities():
    module = matching()
    _, sx, sy, qx, _ = episode()
    support, query = module.embed(sx, qx)
    attn = attention(query, support)
    torch.testing.assert_close(attn.sum(-1), torch.ones(len(qx), dtype=attn.dtype))
    for q in range(len(qx)):
        sims = torch.stack([cosine(query[q], s) for s in support])
        torch.testing.assert_close(attn[q], sims.exp() / sims.exp().sum())
        assert torch.equal(attn[q].argsort(), sims.argsort())  # more similar, more attention
    # P(y = k | x^) is the attention summed over class k's support images; logits are log P
    logits = module.episode_logits(sx, sy, qx)
    for k in range(3):
        torch.testing.assert_close(logits[:, k].exp(), attn[:, sy == k].sum(-1))


def test_matching_query_equal_to_a_support_image_attends_to_it_most():
    module = matching()
    _, sx, sy, qx, _ = episode()
    support, query = module.embed(sx, sx)  # queries = the support images themselves
    assert torch.equal(attention(query, support).argmax(-1), torch.arange(len(sx)))


def test_matching_without_fce_ignores_the_support_order_and_context():
    module = matching()
    _, sx, sy, qx, _ = episode()
    perm = torch.randperm(len(sx), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        module.episode_logits(sx[perm], sy[perm], qx), module.episode_logits(sx, sy, qx)
    )


def test_fce_embeddings_follow_the_papers_lstm_equations():
    """g(x_i) = fwd_i + bwd_i + g'(x_i) (bidirectional LSTM over the support sequence) and
    f(x^) = h_K of the attention LSTM, recomputed here from the gate equations."""
    module = matching(fce=True, fce_steps=3)
    fce = module.fce
    _, sx, sy, qx, _ = episode()
    g0, f0 = module.embed(sx, qx)
    lstm = fce.support_lstm

    def run(seq, suffix):
        w_ih, w_hh = getattr(lstm, f"weight_ih_l0{suffix}"), getattr(lstm, f"weight_hh_l0{suffix}")
        b = getattr(lstm, f"bias_ih_l0{suffix}") + getattr(lstm, f"bias_hh_l0{suffix}")
        h, c, out = torch.zeros_like(seq[0]), torch.zeros_like(seq[0]), []
        for x in seq:
            h, c = cell(w_ih @ x + w_hh @ h + b, c)
            out.append(h)
        return torch.stack(out)

    def cell(gates, c):
        i, f, g, o = gates.chunk(4, -1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        return o.sigmoid() * c.tanh(), c

    g = run(g0, "") + run(g0.flip(0), "_reverse").flip(0) + g0
    torch.testing.assert_close(fce.support(g0), g)

    cellw = fce.query_cell
    for q in range(len(qx)):
        f = f0[q]
        h, c = f, torch.zeros_like(f)
        r = (g @ h).softmax(0) @ g
        for _ in range(3):
            gates = cellw.weight_ih @ torch.cat([f, r]) + cellw.bias_ih
            h, c = cell(gates + cellw.weight_hh @ h + cellw.bias_hh, c)
            h = h + f
            r = (g @ h).softmax(0) @ g
        torch.testing.assert_close(fce.query(f0[q : q + 1], g)[0], h)


def test_fce_changes_the_embeddings_and_makes_queries_depend_on_the_support_set():
    """With inductive BatchNorm in eval mode (no batch statistics shared between images), a
    query's embedding reads the support set only through FCE's attention LSTM."""
    plain, full = (
        matching(net={"bn_mode": "inductive"}),
        matching(net={"bn_mode": "inductive"}, fce=True),
    )
    plain.eval(), full.eval()
    _, sx, sy, qx, _ = episode()
    s0, _, q0 = plain.embeddings(sx, sy, qx)
    s1, _, q1 = full.embeddings(sx, sy, qx)
    assert not torch.allclose(s0, s1) and not torch.allclose(q0, q1)
    _, sx2, sy2, _, _ = episode(seed=7)  # another support set, the same queries
    torch.testing.assert_close(plain.embeddings(sx2, sy2, qx)[2], q0)
    assert not torch.allclose(full.embeddings(sx2, sy2, qx)[2], q1)


def test_fce_is_consistent_under_permutations():
    """Queries are embedded independently: permuting them permutes the logits. The support
    set is read in label order, so listing the classes in another order changes nothing
    (1-shot: any permutation of the support set)."""
    module = matching(fce=True)
    module.eval()
    _, sx, sy, qx, _ = episode(shots=1)
    logits = module.episode_logits(sx, sy, qx)
    perm = torch.randperm(len(qx), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(module.episode_logits(sx, sy, qx[perm]), logits[perm])
    order = torch.tensor([2, 0, 1])
    torch.testing.assert_close(module.episode_logits(sx[order], sy[order], qx), logits)


def test_fce_steps_must_be_positive():
    with pytest.raises(ConfigError, match="algo.fce_steps=0.*positive"):
        matching(fce=True, fce_steps=0)


# ---- Relation Network ----------------------------------------------------------------------
def relation(net=None, **kw) -> RelationNetwork:
    return RelationNetwork(net or tiny_net(), ADAM, image_size=16, **kw).double()


def test_relation_scores_lie_in_0_1_and_train_by_mse_against_one_hot():
    module = relation()
    _, sx, sy, qx, qy = episode()
    scores = module.relation_scores(sx, sy, qx)
    assert scores.shape == (len(qx), 3) and bool(((scores > 0) & (scores < 1)).all())
    loss, logits = module.episode_loss(sx, sy, qx, qy)
    one_hot = torch.zeros(len(qx), 3, dtype=scores.dtype)
    one_hot[torch.arange(len(qx)), qy] = 1
    torch.testing.assert_close(loss, ((scores - one_hot) ** 2).mean())
    torch.testing.assert_close(logits, scores.log())  # predict's probabilities: r normalised


def test_relation_module_sees_each_class_sum_concatenated_with_each_query():
    """Conv4 without its last two max-pools gives maps; a class's k support maps are summed
    and concatenated with the query's along the channels: pair (q, k) is row q * N + k."""
    module = relation()
    _, sx, sy, qx, _ = episode(shots=2)
    seen = []
    module.relation.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    module.relation_scores(sx, sy, qx)
    maps = conv4_maps(module.model, torch.cat([sx, qx]))
    support, query = maps[: len(sx)], maps[len(sx) :]
    assert maps.shape[1:] == (4, 4, 4)  # 16x16 images: two pools, not four
    (pairs,) = seen
    assert pairs.shape == (len(qx) * 3, 8, 4, 4)
    for q in range(len(qx)):
        for k in range(3):
            want = torch.cat([support[sy == k].sum(0), query[q]])
            torch.testing.assert_close(pairs[q * 3 + k], want)


def test_relation_refuses_images_of_another_size_than_it_was_sized_for():
    module = relation()
    _, sx, sy, qx, _ = episode()
    with pytest.raises(ConfigError, match="sized for 16x16 images .* maps are 5 wide"):
        module.relation_scores(F.pad(sx, [2, 2, 2, 2]), sy, F.pad(qx, [2, 2, 2, 2]))


def test_relation_on_a_backbone_without_maps_compares_feature_vectors():
    net = ResNet12(ways=3, channels=[4, 4, 4, 4], in_channels=1, image_size=16).double()
    module = relation(net)
    _, sx, sy, qx, qy = episode()
    seen = []
    module.relation.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    scores = module.relation_scores(sx, sy, qx)
    feats = net.features(torch.cat([sx, qx]))
    assert seen[0].shape == (len(qx) * 3, 2 * feats.shape[1])
    torch.testing.assert_close(
        seen[0][1], torch.cat([feats[: len(sx)][sy == 1].sum(0), feats[len(sx)]])
    )
    assert bool(((scores > 0) & (scores < 1)).all())


# ---- Siamese network -----------------------------------------------------------------------
def siamese(**kw) -> SiameseNetwork:
    return SiameseNetwork(tiny_net(), ADAM, **kw).double()


def test_siamese_score_is_sigmoid_of_weighted_l1_distance():
    module = siamese()
    _, sx, _, qx, _ = episode()
    support, query = module.embed(sx, qx)
    alpha, bias = module.distance.alpha.weight[0], module.distance.alpha.bias[0]
    scores = module.distance(query, support)
    for q in range(len(qx)):
        for s in range(len(sx)):
            p = 1 / (1 + torch.exp(-(alpha * (query[q] - support[s]).abs()).sum() - bias))
            torch.testing.assert_close(scores[q, s].sigmoid(), p)


@pytest.mark.parametrize("shots", [1, 3])
def test_siamese_picks_the_class_of_the_most_similar_support_image(shots):
    module = siamese()
    _, sx, sy, qx, _ = episode(shots=shots)
    support, query = module.embed(sx, qx)
    p = module.distance(query, support).sigmoid()
    logits = module.episode_logits(sx, sy, qx)
    assert torch.equal(logits.argmax(-1), sy[p.argmax(-1)])
    for k in range(3):
        torch.testing.assert_close(logits[:, k].exp(), p[:, sy == k].amax(-1))


def test_siamese_mean_aggregate_averages_the_similarities_of_a_class():
    module = siamese(aggregate="mean")
    _, sx, sy, qx, _ = episode(shots=3)
    support, query = module.embed(sx, qx)
    p = module.distance(query, support).sigmoid()
    logits = module.episode_logits(sx, sy, qx)
    for k in range(3):
        torch.testing.assert_close(logits[:, k].exp(), p[:, sy == k].mean(-1))
    with pytest.raises(ConfigError, match="algo.aggregate='median'; choose one of max, mean"):
        siamese(aggregate="median")


def test_siamese_trains_on_every_pair_with_same_and_different_weighted_equally():
    module = siamese()
    _, sx, sy, qx, qy = episode()
    loss, _ = module.episode_loss(sx, sy, qx, qy)
    support, query = module.embed(sx, qx)
    emb, labels = torch.cat([support, query]), torch.cat([sy, qy])
    same, different = [], []
    for i in range(len(emb)):
        for j in range(i + 1, len(emb)):
            p = module.distance(emb[i : i + 1], emb[j : j + 1]).sigmoid()[0, 0]
            (same if labels[i] == labels[j] else different).append(p)
    want = 0.5 * -torch.stack(same).log().mean() + 0.5 * -(1 - torch.stack(different)).log().mean()
    torch.testing.assert_close(loss, want)
    assert pair_loss(torch.zeros(2, 2, dtype=torch.float64), torch.tensor([0, 1])).isfinite()


# ---- shared ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "learned"),
    [
        (matching, None),
        (partial(matching, fce=True), "fce.query_cell.weight_ih"),
        (relation, "relation.fc.0.weight"),
        (siamese, "distance.alpha.weight"),
    ],
)
def test_metric_learners_train_embedding_and_comparison_but_not_the_head(build, learned):
    module = build()
    before = params(module)
    fit(module, random_episodes(), steps=2)
    after = params(module)
    assert torch.equal(before["model.head.weight"], after["model.head.weight"])
    assert not torch.equal(
        before["model.blocks.0.conv.weight"], after["model.blocks.0.conv.weight"]
    )
    if learned:
        assert not torch.equal(before[learned], after[learned])
