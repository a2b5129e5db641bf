"""ProtoNet's paper protocol (Snell et al. 2017): wider training episodes, the step-halving
learning rate, BatchNorm with running statistics at test; on the composed configs."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate

from metalearn.algorithms.protonet import ProtoNet
from metalearn.errors import ConfigError
from metalearn.train import run
from tests.helpers import compose_cfg, random_episodes, tiny_net


def protonet(**kw) -> ProtoNet:
    return ProtoNet(tiny_net(**kw.pop("net", {})), partial(torch.optim.Adam, lr=1e-3), **kw)


def test_learning_rate_halves_every_lr_halving_steps():
    module = protonet(lr_halving_steps=3)
    module.trainer = SimpleNamespace(max_steps=100)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-3] * 3 + [5e-4] * 3 + [2.5e-4] * 2)
    assert not isinstance(protonet().configure_optimizers(), dict)  # default: constant rate
    with pytest.raises(ConfigError, match="lr_halving_steps=0: use a positive number"):
        protonet(lr_halving_steps=0)


def test_metric_scale_multiplies_the_squared_distances_and_can_be_learned():
    """TADAM's metric scaling: logits = -scale * ||q - c||^2; learned, it gets a gradient."""
    sx, sy, qx, qy = (t[0] for t in random_episodes())
    plain, scaled = protonet(), protonet(metric_scale=0.25)
    scaled.load_state_dict(plain.state_dict())  # a fixed scale adds no weights
    torch.testing.assert_close(
        scaled.episode_logits(sx, sy, qx), 0.25 * plain.episode_logits(sx, sy, qx)
    )
    learned = protonet(metric_scale=0.25, learn_metric_scale=True)
    assert any(p is learned.metric_scale for p in learned.outer_parameters())
    torch.nn.functional.cross_entropy(learned.episode_logits(sx, sy, qx), qy).backward()
    assert learned.metric_scale.grad is not None and learned.metric_scale.grad != 0
    with pytest.raises(ConfigError, match="metric_scale=0.0: use a positive factor"):
        protonet(metric_scale=0.0)


@pytest.mark.parametrize(("bn_mode", "independent"), [("inductive", True), ("transductive", False)])
def test_inductive_batchnorm_scores_each_query_on_its_own_at_test(bn_mode, independent):
    """model.bn_mode=inductive (the paper preset): at test, after model.eval() as in the
    reference, a query's logits do not depend on the other queries of its episode."""
    module = protonet(net={"bn_mode": bn_mode})
    module.train()
    with torch.no_grad():  # a training forward, so inductive BatchNorm has running statistics
        module.episode_logits(*(t[0] for t in random_episodes(seed=3)[:3]))
    sx, sy, qx, _ = (t[0] for t in random_episodes())
    module.eval()
    with torch.no_grad():
        alone = module.episode_logits(sx, sy, qx[:1])
        together = module.episode_logits(sx, sy, qx)[:1]
    assert torch.allclose(alone, together, atol=1e-12) == independent


def test_protonet_omniglot_trains_60_way_and_tests_ways(tmp_path, data_root):
    cfg = compose_cfg(tmp_path, ["experiment=protonet_omniglot", f"data.root={data_root}"])
    dm = instantiate(cfg.data)
    dm.setup()
    assert dm.num_classes == {"train": 4112, "val": 688, "test": 1692}  # Vinyals x4 rotations
    train = dm.train_dataset()[0]
    assert train.support_y.shape[-1] == 60 * 1 and train.query_y.shape[-1] == 60 * 5
    assert int(train.query_y.max()) == 59
    val = dm.eval_dataset("val")[0]
    assert val.support_y.shape[-1] == 5 and val.query_y.shape[-1] == 5 * 15


def test_train_ways_default_to_the_test_episodes(tmp_path, data_root):
    cfg = compose_cfg(tmp_path, ["algo=protonet", f"data.root={data_root}"])
    dm = instantiate(cfg.data)
    dm.setup()
    train = dm.train_dataset()[0]
    assert (dm.train_ways, dm.train_queries) == (5, 15)
    assert train.query_y.shape[-1] == 5 * 15


def test_train_ways_with_a_head_is_refused_before_training(tmp_path, data_root):
    cfg = compose_cfg(tmp_path, ["algo=maml", "data.train_ways=60", f"data.root={data_root}"])
    with pytest.raises(ConfigError, match="data.train_ways=60 differs from ways=5.*5-way head"):
        run(cfg)


def test_train_ways_larger_than_the_training_split_names_the_key(tmp_path, data_root):
    cfg = compose_cfg(tmp_path, ["algo=protonet", "data.train_ways=900", f"data.root={data_root}"])
    with pytest.raises(ConfigError, match="train split has 799 classes but data.train_ways=900"):
        instantiate(cfg.data).setup()
