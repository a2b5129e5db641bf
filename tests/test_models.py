"""Backbones: ResNet-12 (shapes, engines' meta-gradients, BatchNorm modes, DropBlock, config,
training on mini-ImageNet and its checkpoint), Conv4's channels and sizes, and the backbone
contract (check_backbone) with its messages."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from metalearn.algorithms import heads
from metalearn.algorithms.gbml import GBML
from metalearn.algorithms.protonet import ProtoNet
from metalearn.data.episodes import Episodes
from metalearn.engines.base import InnerLoop
from metalearn.engines.func import FuncEngine
from metalearn.engines.higher import HigherEngine
from metalearn.engines.vmap import VmapEngine
from metalearn.errors import ConfigError
from metalearn.models.conv4 import Conv4
from metalearn.models.norm import StepNorm
from metalearn.models.protocol import Backbone, check_backbone
from metalearn.models.resnet12 import ResNet12, drop_block
from tests.helpers import compose_cfg, random_episodes, reference_objective

ENGINES = {"higher": HigherEngine(), "func": FuncEngine(), "vmap": VmapEngine()}
TIGHT = dict(rtol=1e-9, atol=1e-12)
LR = 0.3


def tiny_resnet(ways=3, seed=0, **kw) -> ResNet12:
    """Float64 ResNet-12 of width 2 with non-trivial StepNorm scale/shift (so they matter)."""
    torch.manual_seed(seed)
    kw = {"channels": [2, 2, 2, 2], "image_size": 16} | kw
    net = ResNet12(ways=ways, **kw).double()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, StepNorm):
                m.scale.uniform_(0.5, 1.5, generator=g)
                m.shift.normal_(0.0, 0.3, generator=g)
    return net


def colour_episodes(batch=2, ways=3, shots=1, queries=2, size=16, seed=1) -> Episodes:
    return random_episodes(batch, ways, shots, queries, size, seed, channels=3)


# ---- ResNet-12 ---------------------------------------------------------------------------------
def test_resnet12_forward_backward_on_84px_colour():
    net = ResNet12(ways=5, channels=[4, 4, 4, 8], in_channels=3, image_size=84)
    x = torch.rand(4, 3, 84, 84)
    assert net.features(x).shape == (4, 8)  # average-pooled: the last block's width
    logits = net(x)
    assert logits.shape == (4, 5)
    F.cross_entropy(logits, torch.arange(4)).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # every block: three 3x3 convs without bias and a 1x1 shortcut, each followed by StepNorm
    block = net.blocks[0]
    assert [c.kernel_size for c in block.convs] == [(3, 3)] * 3
    assert all(c.bias is None for c in [*block.convs, block.shortcut])
    assert block.shortcut.kernel_size == (1, 1)
    assert sum(isinstance(m, StepNorm) for m in net.modules()) == 16


def test_resnet12_default_widths_and_one_number_widths():
    net = ResNet12(ways=5)
    assert [b.convs[0].out_channels for b in net.blocks] == [64, 160, 320, 640]
    assert net.head.in_features == 640
    assert 12.3e6 < sum(p.numel() for p in net.parameters()) < 12.5e6  # MetaOptNet's ~12.4M
    assert [b.convs[0].out_channels for b in ResNet12(5, channels=8).blocks] == [8, 20, 40, 80]
    with pytest.raises(ConfigError, match="4 widths"):
        ResNet12(5, channels=[8, 8])
    with pytest.raises(ConfigError, match=">= 16"):
        ResNet12(5, image_size=8)


def meta_grads(engine: str, episodes, steps=2, bn_steps=1, first_order=False):
    net = tiny_resnet(bn_steps=bn_steps)
    names = [n for n, _ in net.named_parameters()]
    loop = InnerLoop(steps, lambda n, t: LR, names, first_order)
    out = ENGINES[engine](net, loop, episodes)
    out.objective.backward()
    # out.loss, not the objective: higher's first-order objective is a surrogate (same gradient)
    return out.loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize(
    "case", [dict(), dict(first_order=True), dict(steps=3, bn_steps=3)], ids=str
)
def test_resnet12_meta_gradients_agree_across_engines(case):
    eps = colour_episodes()
    want_loss, want = meta_grads("func", eps, **case)
    assert all(g.abs().sum() > 0 for n, g in want.items() if "norms" in n)
    for engine in ("higher", "vmap"):
        loss, got = meta_grads(engine, eps, **case)
        torch.testing.assert_close(loss, want_loss, **TIGHT)
        for n in want:
            torch.testing.assert_close(got[n], want[n], **TIGHT, msg=f"{engine}: {n}")


def test_resnet12_loop_engine_equals_an_independent_maml():
    eps = colour_episodes()
    net = tiny_resnet()
    want = reference_objective(net, dict(net.named_parameters()), eps, steps=2, lr=LR)
    loop = InnerLoop(2, lambda n, t: LR, [n for n, _ in net.named_parameters()])
    torch.testing.assert_close(FuncEngine()(net, loop, eps).objective, want, **TIGHT)


def test_resnet12_per_step_and_inductive_batchnorm():
    net = tiny_resnet(bn_steps=3, bn_mode="inductive")
    norm = net.blocks[0].norms[0]
    assert norm.scale.shape == (3, 2) and norm.running_mean.shape == (3, 2)
    x = torch.rand(6, 3, 16, 16, dtype=torch.float64)
    outs = [net(x, step=t) for t in range(3)]  # training: batch statistics; step t's are updated
    assert not torch.allclose(outs[0], outs[1])
    assert torch.equal(net(x, step=7), net(x, step=2))  # steps past the last reuse it
    assert (norm.running_mean != 0).all()
    net.eval()  # inductive: running statistics, so one image's output is the batch's row
    torch.testing.assert_close(net(x[:1], step=1), net(x, step=1)[:1], **TIGHT)
    with pytest.raises(ConfigError, match="inductive.*engine=func"):
        VmapEngine()(net.train(), InnerLoop(1, lambda n, t: LR, ["head.weight"]), colour_episodes())


def test_gbml_builds_resnet12_with_per_step_batchnorm():
    model = functools.partial(ResNet12, ways=3, channels=[2, 2, 2, 2], image_size=16)
    algo = GBML(
        model, FuncEngine(), functools.partial(torch.optim.Adam), inner_steps=3, bn_per_step=True
    )
    assert algo.model.blocks[3].shortcut_norm.scale.shape == (3, 2)


def test_dropblock_drops_blocks_at_about_its_rate_and_vmap_needs_randomness():
    torch.manual_seed(0)
    x = torch.ones(8, 16, 10, 10)
    y = drop_block(x, 0.3, 3)
    dropped = (y == 0).float().mean().item()
    assert 0.2 < dropped < 0.4
    torch.testing.assert_close(y.mean(), x.mean())  # kept units are rescaled
    net = tiny_resnet(drop_rate=0.2)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    assert not torch.equal(net(x), net(x))  # random in training
    net.eval()
    assert torch.equal(net(x), net(x))  # off at evaluation
    net.train()
    loop = InnerLoop(1, lambda n, t: LR, [n for n, _ in net.named_parameters()])
    with pytest.raises(ConfigError, match="engine.randomness=different"):
        VmapEngine()(net, loop, colour_episodes())
    out = VmapEngine(randomness="different")(net, loop, colour_episodes())
    assert torch.isfinite(out.objective)


def test_deepcopy_and_head_replacement_on_resnet12():
    net = tiny_resnet().eval()
    eps = colour_episodes(ways=4, shots=2)
    sx, sy = eps.support_x[0], eps.support_y[0]
    new = heads.with_head(net, sx, sy, ways=4, init="prototypes")
    assert new.head.out_features == 4 and net.head.out_features == 3
    torch.testing.assert_close(new.features(sx), net.features(sx), **TIGHT)
    assert new.blocks[0].convs[0].weight is not net.blocks[0].convs[0].weight
    # Proto-MAML's head: the un-adapted model scores like ProtoNet (nearest class mean)
    f = net.features(sx)
    centres = torch.stack([f[sy == k].mean(0) for k in range(4)])
    assert torch.equal(new(sx).argmax(1), torch.cdist(f, centres).argmin(1))
    check_backbone(new)


# ---- Conv4: any channels and size ------------------------------------------------------------
@pytest.mark.parametrize(("cin", "size"), [(3, 84), (1, 28), (3, 20)])
def test_conv4_takes_one_or_three_channels_and_any_size(cin, size):
    net = Conv4(ways=5, channels=4, in_channels=cin, image_size=size)
    assert net(torch.rand(2, cin, size, size)).shape == (2, 5)
    assert net.head.in_features == 4 * (size // 16) ** 2


@pytest.mark.parametrize("model", [Conv4(5, in_channels=3), ResNet12(5, channels=2)])
def test_images_with_other_channels_than_the_model_get_a_message(model):
    with pytest.raises(ConfigError, match=r"built for 3-channel images.*model.in_channels=1"):
        model(torch.rand(2, 1, 28, 28))


# ---- the contract ------------------------------------------------------------------------------
class UserNet(nn.Module):
    """A user's own backbone that meets the contract (with ``affine=False``)."""

    def __init__(self, affine=False, head="linear"):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=affine))
        self.head = {
            "linear": nn.Linear(4, 3),
            "none": None,
            "mlp": nn.Sequential(nn.Linear(4, 3)),
        }[head]

    def features(self, x, step=0):
        return self.body(x).mean((-2, -1))

    def forward(self, x, step=0):
        return self.head(self.features(x, step))


class NoFeaturesNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

    def forward(self, x, step=0):
        return self.head(self.body(x).mean((-2, -1)))


class NoStepNet(UserNet):
    def forward(self, x):
        return self.head(self.features(x))


def test_check_backbone_accepts_the_builtin_backbones_and_a_conforming_user_net():
    for model in (Conv4(5), ResNet12(5, channels=2), UserNet()):
        check_backbone(model)
        assert isinstance(model, Backbone)
    check_backbone(Conv4(5, bn_steps=3), bn_steps=3)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (UserNet(head="none"), r"UserNet.head must be an nn.Linear .*got NoneType"),
        (UserNet(head="mlp"), r"head must be an nn.Linear .*got Sequential.*other layers"),
        (NoFeaturesNet(), r"NoFeaturesNet has no features\(x, step=...\)"),
        (NoStepNet(), r"NoStepNet has no forward\(x, step=...\)"),
        (UserNet(affine=True), r"UserNet.body.1 is a BatchNorm with its own affine.*StepNorm"),
    ],
    ids=["no head", "head not linear", "no features", "forward without step", "affine BN"],
)
def test_check_backbone_names_the_missing_piece(model, message):
    with pytest.raises(ConfigError, match=message):
        check_backbone(model)


def test_algorithms_check_the_model_they_build():
    with pytest.raises(ConfigError, match="no features"):
        ProtoNet(NoFeaturesNet(), functools.partial(torch.optim.Adam))
    with pytest.raises(ConfigError, match="bn_per_step needs 3 per-step"):
        GBML(
            lambda **kw: UserNet(), FuncEngine(), torch.optim.Adam, inner_steps=3, bn_per_step=True
        )


# ---- config ------------------------------------------------------------------------------------
def test_model_resnet12_composes_and_builds_as_the_algorithms_do(tmp_path):
    overrides = ["model=resnet12", "algo=maml_pp", "ways=4", "data=miniimagenet"]
    cfg = compose_cfg(tmp_path, overrides, tiny=False)
    assert list(cfg.model.channels) == [64, 160, 320, 640]
    assert cfg.model.in_channels == 3 and cfg.model.image_size == 84 and cfg.model.drop_rate == 0
    cfg.model.channels = [2, 2, 2, 4]
    net = instantiate(cfg.model)(bn_steps=cfg.algo.inner_steps)
    assert isinstance(net, ResNet12) and net.head.out_features == 4
    assert net.blocks[0].norms[0].scale.shape == (cfg.algo.inner_steps, 2)
    assert net(torch.rand(2, 3, 84, 84)).shape == (2, 4)
    cfg = compose_cfg(tmp_path, ["model=resnet12"])  # Omniglot; the tiny model.channels=8
    net = instantiate(cfg.model)()
    assert [b.convs[0].out_channels for b in net.blocks] == [8, 20, 40, 80]
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, cfg.ways)  # follows the data's channels


@pytest.mark.parametrize(
    "overrides",
    [["algo=protonet"], ["algo=maml", "engine=vmap", "algo.inner_steps=1"]],
    ids=["protonet", "maml-vmap"],
)
def test_resnet12_trains_on_mini_imagenet_and_its_checkpoint_adapts(overrides, tmp_path, data_root):
    """Two outer steps through run(cfg) on real 84x84 colour episodes into a narrow ResNet-12;
    the checkpoint loads as a ResNet-12 and adapts to 3 classes (MAML: a new 3-way head)."""
    import metalearn
    from metalearn.train import run

    cfg = compose_cfg(
        tmp_path,
        [
            "data=miniimagenet",
            "model=resnet12",
            "model.channels=[4,4,4,8]",
            f"data.root={data_root}",
            *overrides,
        ],
    )
    metrics = run(cfg)
    assert metrics["status"] == "ok" and 0.0 <= metrics["test/acc"] <= 1.0
    learner = metalearn.load(metrics["best_checkpoint"])
    assert isinstance(learner.model, ResNet12) and learner.model.in_channels == 3
    g = torch.Generator().manual_seed(0)
    support = torch.randint(0, 256, (6, 3, 84, 84), dtype=torch.uint8, generator=g)
    prediction = learner.adapt(support, [0, 0, 1, 1, 2, 2]).predict(support[:4])
    assert prediction.probs.shape == (4, 3)
