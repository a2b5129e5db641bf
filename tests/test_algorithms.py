"""Each variant's defining mechanism, checked directly on a tiny float64 Conv4 and random
episodes (see tests/helpers.py); the last tests run every variant end to end on real data."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from functools import partial
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.func import functional_call
from torch.utils.data import DataLoader

from metalearn.algorithms.finetune import FineTune
from metalearn.algorithms.gbml import GBML, msl_weights
from metalearn.algorithms.protonet import ProtoNet
from metalearn.algorithms.reptile import Reptile
from metalearn.data.episodes import Episodes
from metalearn.data.sources.base import ClassImages
from metalearn.engines.base import InnerLoop
from metalearn.engines.func import FuncEngine
from metalearn.engines.higher import HigherEngine
from metalearn.errors import ConfigError
from metalearn.models.conv4 import StepNorm
from metalearn.train import run
from tests.helpers import ALGOS, REPO, random_episodes, reference_objective, tiny_net

ENGINES = {"higher": HigherEngine(), "func": FuncEngine()}
VARIANTS = ALGOS


def gbml(engine="higher", lr=0.01, optimizer=torch.optim.Adam, **kw) -> GBML:
    """A GBML on a tiny net; the net is built by the module (so bn_per_step reaches it)."""
    kw.setdefault("inner_lr", 0.3)
    kw.setdefault("meta_batch_size", 2)
    return GBML(partial(tiny_net), ENGINES[engine], partial(optimizer, lr=lr), **kw)


def cpu_trainer(max_steps: int) -> L.Trainer:
    """A quiet CPU Trainer: no logger, checkpoints, progress bar or validation."""
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        limit_val_batches=0,
    )


def fit(module, episodes, steps=1, max_steps=None) -> L.Trainer:
    """``steps`` outer steps of ``module`` through a real Trainer, on the same episodes."""
    trainer = cpu_trainer(max_steps or steps)
    trainer.fit(module, train_dataloaders=DataLoader([episodes] * steps, batch_size=None))
    return trainer


def at_step(module, step=0, max_steps=10):
    module.trainer = SimpleNamespace(global_step=step, current_epoch=0, max_steps=max_steps)
    return module


def meta_grads(module, episodes, loop=None) -> dict:
    module.zero_grad()
    module.engine(module.model, loop or module.train_loop(), episodes).objective.backward()
    return {
        n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for n, p in module.named_parameters()
    }


def params(module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# ---- MAML++ multi-step loss ------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_msl_weights_sum_to_one_start_uniform_end_on_last_step(steps):
    progress = np.linspace(0, 1.5, 16)
    for t in progress:
        w = msl_weights(steps, t)
        assert w.sum() == pytest.approx(1.0, abs=1e-12) and (w > 0).sum() >= 1
    np.testing.assert_allclose(msl_weights(steps, 0.0), np.full(steps, 1 / steps))
    for t in (1.0, 1.1, 10.0):
        np.testing.assert_array_equal(msl_weights(steps, t), np.eye(steps)[-1])
    finals = [msl_weights(steps, t)[-1] for t in progress]
    assert finals == sorted(finals)  # the last step's weight only grows


def test_msl_weights_reach_the_train_loop():
    # msl over 0.4 of a 10-step run: steps 0..3 weighted, from step 4 the last step only
    module = gbml(msl=True, msl_fraction=0.4, inner_steps=3)
    for step in range(10):
        loop = at_step(module, step, max_steps=10).train_loop()
        np.testing.assert_allclose(loop.weights(), msl_weights(3, step / 4))
    assert gbml(inner_steps=3).train_loop().step_weights is None  # msl off: last step only


@pytest.mark.parametrize("key", ["msl_fraction", "da_fraction"])
def test_schedule_fractions_outside_0_1_are_refused(key):
    with pytest.raises(ConfigError, match=rf"algo.{key}=3 is a fraction of the run.*0..1"):
        gbml(**{key: 3})


def test_schedules_need_a_run_with_an_end():
    module = gbml(msl=True, da=True)
    module.trainer = SimpleNamespace(max_steps=-1, estimated_stepping_batches=math.inf)
    with pytest.raises(ConfigError, match="set trainer.max_steps"):
        module.configure_optimizers()


# ---- learned inner rates: Meta-SGD and LSLR -----------------------------------------------------
@pytest.mark.parametrize("rates", ["metasgd", "lslr"])
def test_learned_rates_get_meta_gradients_and_change(rates):
    module, eps = gbml(inner_rates=rates, inner_steps=2), random_episodes()
    shapes = dict(module.model.named_parameters())
    for name, rate in module.rates.items():
        want = shapes[name.replace("__", ".")].shape if rates == "metasgd" else (2,)
        assert rate.shape == want and torch.all(rate == 0.3)
    grads = meta_grads(module, eps)
    for name in module.rates:
        g = grads[f"rates.{name}"]
        if name.endswith("conv__bias"):  # BatchNorm cancels a conv bias: no gradient
            assert g.abs().max() < 1e-20
        elif rates == "lslr":
            assert torch.all(g.abs() > 1e-8), name  # every step's rate gets a meta-gradient
        else:
            assert g.abs().sum() > 1e-8, name
    before = params(module)
    fit(module, eps)
    for name, rate in module.rates.items():
        moved = (rate - before[f"rates.{name}"]).abs().max().item()
        assert moved < 1e-12 if name.endswith("conv__bias") else moved > 1e-5, name


def test_learned_rates_refuse_first_order_without_sgd_and_conflicts():
    assert gbml(inner_rates="metasgd", first_order=True).first_order
    with pytest.raises(ConfigError, match="inner_optimizer=sgd"):
        gbml(inner_rates="metasgd", first_order=True, inner_optimizer="adam")
    with pytest.raises(ConfigError, match="inner_optimizer=sgd"):
        gbml(inner_rates="lslr", da=True, inner_optimizer="momentum")
    with pytest.raises(ConfigError, match="lslr"):
        gbml(inner_rates="metasgd", lslr=True)
    assert gbml(lslr=True).inner_rates == "lslr"


# ---- MAML++ per-step BatchNorm ------------------------------------------------------------------
def test_step_norm_uses_step_t_scale_shift_and_running_stats():
    torch.manual_seed(0)
    norm = StepNorm(3, steps=3, mode="inductive").double()
    with torch.no_grad():
        for buf in (norm.scale, norm.shift, norm.running_mean):
            buf.copy_(torch.randn_like(buf))
        norm.running_var.copy_(torch.rand_like(norm.running_var) + 0.5)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    norm.eval()
    for t in range(3):
        mean, var = norm.running_mean[t].view(1, -1, 1, 1), norm.running_var[t].view(1, -1, 1, 1)
        want = (x - mean) / torch.sqrt(var + norm.eps) * norm.scale[t].view(
            1, -1, 1, 1
        ) + norm.shift[t].view(1, -1, 1, 1)
        torch.testing.assert_close(norm(x, step=t), want)
    norm.train()
    stats = norm.running_mean.clone()
    out = norm(x, step=1)  # training: batch statistics, step 1's affine, step 1's stats updated
    batch = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        x.var((0, 2, 3), unbiased=False, keepdim=True) + norm.eps
    )
    torch.testing.assert_close(
        out, batch * norm.scale[1].view(1, -1, 1, 1) + norm.shift[1].view(1, -1, 1, 1)
    )
    torch.testing.assert_close(norm.running_mean[1], 0.9 * stats[1] + 0.1 * x.mean((0, 2, 3)))
    torch.testing.assert_close(norm.running_mean[[0, 2]], stats[[0, 2]], rtol=0, atol=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_per_step_bn_inner_loop_uses_step_t_at_step_t(engine, monkeypatch):
    module = gbml(engine, bn_per_step=True, msl=True, inner_steps=3)
    assert module.model.blocks[0].norm.scale.shape == (3, 4)  # built with bn_steps=inner_steps
    used, forward = [], StepNorm.forward

    def recording(norm, x, step=0):
        if norm.scale.shape[1] == 4 and x.shape[-1] == 16:  # the first block only
            used.append(step)
        return forward(norm, x, step)

    monkeypatch.setattr(StepNorm, "forward", recording)  # higher patches a subclass
    grads = meta_grads(at_step(module, 0), random_episodes(batch=1))
    assert used == [0, 0, 1, 1, 2, 2]  # (support, query) after each inner step t
    scale_grad = grads["model.blocks.0.norm.scale"]
    assert torch.all(scale_grad.abs().sum(1) > 0)  # every step's scale shapes the objective


@pytest.mark.parametrize(
    "engine",
    [
        "higher",
        "func",
    ],
)
def test_per_step_bn_running_statistics_per_step(engine):
    module = GBML(
        partial(tiny_net, bn_mode="inductive"),
        ENGINES[engine],
        partial(torch.optim.Adam, lr=0.01),
        inner_steps=2,
        inner_lr=0.3,
        meta_batch_size=1,
        bn_per_step=True,
    )
    norm = module.model.blocks[0].norm
    stats = norm.running_mean.clone()
    eps = random_episodes(batch=1)
    loop = InnerLoop(1, module.inner_rate, module.adapted, first_order=True)
    module.engine(module.model, loop, eps)  # one step: support and query at step 0 only
    assert not torch.equal(norm.running_mean[0], stats[0])
    torch.testing.assert_close(norm.running_mean[1], stats[1], rtol=0, atol=0)
    module.engine(module.model, module.train_loop(), eps)  # two steps: step 1's stats move
    assert not torch.equal(norm.running_mean[1], stats[1])


# ---- MAML++ derivative-order annealing-----------------------------------------------------------
def reference_grads(net, episodes, steps, lr, first_order) -> list[torch.Tensor]:
    """Independent MAML meta-gradient (functional_call + autograd.grad)."""
    theta = dict(net.named_parameters())
    total = reference_objective(net, theta, episodes, steps, lr, first_order)
    return list(torch.autograd.grad(total, list(theta.values())))


@pytest.mark.parametrize("engine", ENGINES)
def test_derivative_order_annealing(engine):
    module, eps = gbml(engine, da=True, da_fraction=0.5, inner_steps=2), random_episodes()
    at_step(module, max_steps=4)  # first order for half of 4 steps
    assert [module.first_order_now(s) for s in range(4)] == [True, True, False, False]
    first = reference_grads(module.model, eps, 2, 0.3, first_order=True)
    second = reference_grads(module.model, eps, 2, 0.3, first_order=False)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(first, second, strict=True))
    for step, want in ((0, first), (1, first), (2, second), (3, second)):
        got = meta_grads(at_step(module, step, max_steps=4), eps)
        for g, w in zip(
            [got[f"model.{n}"] for n, _ in module.model.named_parameters()], want, strict=True
        ):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert gbml(first_order=True, da=True).first_order_now(99)  # FOMAML stays first order


# ---- MAML++ cosine annealing of the outer learning rate------------------------------------------
def test_cosine_schedule_start_middle_end():
    module = at_step(gbml(lr=1e-2, cosine=True, min_lr=1e-4), max_steps=10)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-2)
    assert lrs[5] == pytest.approx((1e-2 + 1e-4) / 2)
    assert lrs[10] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert not isinstance(at_step(gbml()).configure_optimizers(), dict)  # cosine off


def test_cosine_schedule_resumed_with_more_steps_ends_at_min_lr():
    def schedule(max_steps):
        module = at_step(gbml(lr=1e-2, cosine=True, min_lr=1e-4), max_steps=max_steps)
        conf = module.configure_optimizers()
        return conf["optimizer"], conf["lr_scheduler"]["scheduler"]

    opt, sched = schedule(4)
    for _ in range(2):
        opt.step()
        sched.step()
    state = opt.state_dict(), sched.state_dict()
    opt, sched = schedule(8)  # resumed with trainer.max_steps=8, as Lightning restores it
    opt.load_state_dict(state[0])
    sched.load_state_dict(state[1])
    lrs = []
    for _ in range(8):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    step3 = 1e-4 + (1e-2 - 1e-4) * 0.5 * (1 + math.cos(math.pi * 3 / 8))
    assert lrs[0] == pytest.approx(step3)  # on the 8-step curve, not a new cosine period
    assert lrs[5] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-4)  # then flat
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


# ---- evaluation: inner_steps_test plain steps on the support set, then the query set --------
@pytest.mark.parametrize("engine", [*ENGINES, "vmap"])
def test_evaluate_adapts_inner_steps_test_steps_on_a_copy(engine):
    from metalearn.engines.vmap import VmapEngine

    module = GBML(
        partial(tiny_net),
        VmapEngine() if engine == "vmap" else ENGINES[engine],
        partial(torch.optim.Adam, lr=1e-3),
        inner_lr=0.3,
        inner_steps=1,
        inner_steps_test=4,
    )
    eps, theta = random_episodes(batch=3, queries=5), params(module.model)
    expected_acc, expected_loss = [], []
    for sx, sy, qx, qy in zip(*eps, strict=True):  # reference: 4 plain SGD steps per episode
        fast = {n: p.detach().clone().requires_grad_() for n, p in theta.items()}
        for _ in range(4):
            loss = F.cross_entropy(functional_call(module.model, fast, (sx,)), sy)
            grads = torch.autograd.grad(loss, list(fast.values()))
            fast = {
                n: (w - 0.3 * g).detach().requires_grad_()
                for (n, w), g in zip(fast.items(), grads, strict=True)
            }
        logits = functional_call(module.model, fast, (qx,))
        expected_acc.append((logits.argmax(-1) == qy).double().mean())
        expected_loss.append(F.cross_entropy(logits, qy))
    torch.testing.assert_close(module.evaluate(eps).double(), torch.stack(expected_acc))
    out = module.engine(module.model, module.eval_loop(), eps)
    torch.testing.assert_close(out.loss, torch.stack(expected_loss).detach())
    for n, p in module.model.named_parameters():
        assert torch.equal(p, theta[n])


def test_mean_ci95():
    from metalearn.algorithms.base import mean_ci95

    mean, ci = mean_ci95(torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert mean == pytest.approx(0.75) and ci == pytest.approx(1.96 * 0.5 / 2)
    assert mean_ci95(torch.tensor([0.6])) == (pytest.approx(0.6), 0.0)
    assert all(math.isnan(v) for v in mean_ci95(torch.zeros(0)))


# ---- ANIL----------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_anil_leaves_the_body_unchanged_in_the_inner_loop(engine):
    module, eps = gbml(engine, adapt="head", inner_steps=2), random_episodes()
    assert module.adapted == ["head.weight", "head.bias"]
    net = module.model
    theta = dict(net.named_parameters())
    total = 0.0  # reference: the body's features at theta, only the head adapted
    for sx, sy, qx, qy in zip(*eps, strict=True):
        w, b = theta["head.weight"], theta["head.bias"]
        fs, fq = net.features(sx), net.features(qx)
        for _ in range(2):
            gw, gb = torch.autograd.grad(
                F.cross_entropy(F.linear(fs, w, b), sy), (w, b), create_graph=True
            )
            w, b = w - 0.3 * gw, b - 0.3 * gb
        total = total + F.cross_entropy(F.linear(fq, w, b), qy)
    want_objective = total / 2
    want = torch.autograd.grad(want_objective, list(theta.values()))
    out = module.engine(net, module.train_loop(), eps)
    torch.testing.assert_close(out.objective, want_objective, rtol=1e-10, atol=1e-12)
    got = meta_grads(module, eps)
    for (n, _), w in zip(net.named_parameters(), want, strict=True):
        torch.testing.assert_close(got[f"model.{n}"], w, rtol=1e-9, atol=1e-12)
    assert got["model.blocks.0.conv.weight"].abs().sum() > 0  # the outer loop learns the body


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("engine", ["higher", "func", "vmap"])
def test_anil_computes_the_body_features_once_with_the_same_meta_gradients(engine, first_order):
    """ANIL's inner loop runs on the body's features computed once per task: the objective,
    meta-gradients and evaluation logits equal the full per-step loop's."""
    from metalearn.engines.vmap import VmapEngine

    engines = {**ENGINES, "vmap": VmapEngine()}
    module = gbml("higher", adapt="head", inner_steps=3, first_order=first_order)
    module.engine = engines[engine]
    eps = random_episodes()
    loop = module.train_loop()
    cached = module.features_once(module.model, loop)
    assert cached == (not (first_order and engine == "higher"))  # higher's FO surrogate: full
    module.zero_grad()
    fast = module.run_engine(module.model, loop, eps)
    fast.objective.backward()
    got = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad()
    full = module.engine(module.model, loop, eps)
    full.objective.backward()
    want = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    torch.testing.assert_close(fast.objective, full.objective, rtol=1e-10, atol=1e-12)
    assert got.keys() == want.keys() and "model.blocks.0.conv.weight" in got
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12)
    evaluation = module.eval_loop()
    assert module.features_once(module.model, evaluation)
    torch.testing.assert_close(
        module.run_engine(module.model, evaluation, eps).logits,
        module.engine(module.model, evaluation, eps).logits,
        rtol=1e-9,
        atol=1e-12,
    )


@pytest.mark.parametrize("engine", ENGINES)
def test_adapt_norm_false_keeps_batchnorm_out_of_the_inner_loop(engine):
    # MAML++'s reference configs: BN scale/shift are learned by the outer loop only.
    module, eps = gbml(engine, adapt_norm=False, inner_steps=2), random_episodes()
    norm = {n for n, _ in module.model.named_parameters() if ".norm." in n}
    assert norm and not norm & set(module.adapted)
    assert set(module.adapted) | norm == {n for n, _ in module.model.named_parameters()}
    params = dict(module.model.named_parameters())
    total = 0.0  # reference: theta's conv and head weights adapted, BN scale/shift fixed
    for sx, sy, qx, qy in zip(*eps, strict=True):
        fast = dict(params)
        for _ in range(2):
            loss = F.cross_entropy(functional_call(module.model, fast, (sx,)), sy)
            grads = torch.autograd.grad(loss, [fast[n] for n in module.adapted], create_graph=True)
            fast.update({n: fast[n] - 0.3 * g for n, g in zip(module.adapted, grads, strict=True)})
        total = total + F.cross_entropy(functional_call(module.model, fast, (qx,)), qy)
    want = torch.autograd.grad(total / 2, list(params.values()))
    got = meta_grads(module, eps)
    for n, w in zip(params, want, strict=True):
        torch.testing.assert_close(got[f"model.{n}"], w, rtol=1e-9, atol=1e-12)
    assert got["model.blocks.0.norm.scale"].abs().sum() > 0  # the outer loop learns them
    assert len(gbml(engine).adapted) == len(params)  # default: everything adapts


# ---- inner optimizers----------------------------------------------------------------------------
@pytest.mark.parametrize("inner", ["momentum", "adam"])
def test_inner_optimizers_with_higher(inner):
    eps = random_episodes()
    sgd = gbml(inner_steps=2, inner_lr=0.01)
    other = gbml(inner_steps=2, inner_lr=0.01, inner_optimizer=inner)
    other.load_state_dict(sgd.state_dict())
    a = sgd.engine(sgd.model, sgd.train_loop(), eps).loss
    b = other.engine(other.model, other.train_loop(), eps).loss
    assert torch.isfinite(b).all() and not torch.allclose(a, b)
    grads = meta_grads(other, eps)
    assert all(torch.isfinite(g).all() for g in grads.values())
    lslr = gbml(inner_steps=2, inner_lr=0.01, inner_optimizer=inner, lslr=True)
    assert meta_grads(lslr, eps)["rates.head__weight"].abs().sum() > 0
    with pytest.raises(ConfigError, match="higher"):
        module = gbml("func", inner_optimizer=inner)
        module.engine(module.model, module.train_loop(), eps)


# ---- Alpha-MAML----------------------------------------------------------------------------------
def same_query(episodes: Episodes) -> Episodes:
    """Query = support: a larger step helps while alpha is small, hurts once it overshoots."""
    return Episodes(episodes.support_x, episodes.support_y, episodes.support_x, episodes.support_y)


def query_loss(module, episodes, alpha: float) -> float:
    loop = InnerLoop(1, lambda n, t: alpha, module.adapted, first_order=True)
    return module.engine(module.model, loop, episodes).loss.mean().item()


@pytest.mark.parametrize(("alpha0", "direction"), [(0.01, +1), (1.0, -1)])
def test_alpha_moves_to_lower_the_query_loss(alpha0, direction):
    eps = same_query(random_episodes())
    module = gbml(
        inner_rates="hypergradient",
        inner_lr=alpha0,
        alpha_lr=0.05,
        beta_lr=0.0,
        optimizer=torch.optim.SGD,
        lr=0.0,
    )
    h = 1e-5
    slope = (query_loss(module, eps, alpha0 + h) - query_loss(module, eps, alpha0 - h)) / (2 * h)
    assert np.sign(slope) == -direction  # the constructed problem: the right direction is known
    trainer = fit(module, eps)
    alpha1 = module.rates["alpha"].item()
    assert np.sign(alpha1 - alpha0) == direction
    assert alpha1 - alpha0 == pytest.approx(-0.05 * slope, rel=1e-4)  # exact hypergradient step
    assert query_loss(module, eps, alpha1) < query_loss(module, eps, alpha0)  # theta unchanged
    assert {"train/alpha", "train/beta"} <= set(trainer.callback_metrics)


class RecordingGBML(GBML):
    """Records the meta-gradient and the parameters before every outer step."""

    def before_outer_step(self) -> None:
        self.seen = getattr(self, "seen", [])
        grad = torch.cat([p.grad.flatten() for p in self.model.parameters()])
        self.seen.append((grad, torch.cat([p.detach().flatten() for p in self.model.parameters()])))
        super().before_outer_step()


def test_beta_hypergradient_and_sgd_at_rate_beta():
    eps = random_episodes()
    module = RecordingGBML(
        partial(tiny_net),
        HigherEngine(),
        partial(torch.optim.SGD, lr=0.05),
        inner_rates="hypergradient",
        inner_lr=0.3,
        meta_batch_size=2,
        alpha_lr=0.0,
        beta_lr=0.01,
    )
    fit(module, eps, steps=3)
    (g1, t1), (g2, t2), (g3, t3) = module.seen
    beta2 = 0.05 + 0.01 * torch.dot(g2, g1).item()  # no previous gradient at the first step
    beta3 = beta2 + 0.01 * torch.dot(g3, g2).item()
    assert module.beta.item() == pytest.approx(beta3, rel=1e-10)
    torch.testing.assert_close(t2, t1 - 0.05 * g1)  # plain SGD at rate beta
    torch.testing.assert_close(t3, t2 - beta2 * g2)


def test_alpha_maml_refuses_non_sgd_outer_optimizer_and_cosine():
    with pytest.raises(ConfigError, match="SGD"):
        fit(gbml(inner_rates="hypergradient"), random_episodes())
    with pytest.raises(ConfigError, match="cosine"):
        gbml(inner_rates="hypergradient", cosine=True)


# ---- Reptile-------------------------------------------------------------------------------------
def reptile(**kw) -> Reptile:
    kw = {
        "inner_lr": 0.1,
        "inner_steps": 3,
        "inner_optimizer": "sgd",
        "inner_batch_size": None,
        "meta_batch_size": 2,
        **kw,
    }
    eps0 = kw.pop("eps0", 0.5)
    return Reptile(tiny_net(), partial(torch.optim.SGD, lr=eps0), **kw)


def reference_phi(net, x, y, steps, inner, opt=None, theta=None) -> dict:
    """``steps`` steps from ``theta`` (default: ``net``'s parameters); ``opt`` (an optimizer
    over ``net``'s parameters) carries its state over from earlier tasks, as in Nichol et al.'s
    code."""
    theta = params(net) if theta is None else theta
    if opt is None:
        net = copy.deepcopy(net)
        opt = (
            torch.optim.SGD(net.parameters(), lr=0.1)
            if inner == "sgd"
            else torch.optim.Adam(net.parameters(), lr=0.1, betas=(0.0, 0.999))
        )
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(theta[n])
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return params(net)


@pytest.mark.parametrize(("inner", "task_data"), [("sgd", "all"), ("adam", "support")])
def test_reptile_outer_step_is_theta_plus_eps_mean_shift(inner, task_data):
    module, eps = reptile(inner_optimizer=inner, task_data=task_data), random_episodes()
    theta = params(module.model)
    net = copy.deepcopy(module.model)  # one inner optimizer for both tasks (its state carries)
    opt = (
        torch.optim.SGD(net.parameters(), lr=0.1)
        if inner == "sgd"
        else torch.optim.Adam(net.parameters(), lr=0.1, betas=(0.0, 0.999))
    )
    phis = []
    for sx, sy, qx, qy in zip(*eps, strict=True):
        x, y = (torch.cat([sx, qx]), torch.cat([sy, qy])) if task_data == "all" else (sx, sy)
        phis.append(reference_phi(net, x, y, 3, inner, opt, theta))
    fit(module, eps, max_steps=1)
    for n, p in module.model.named_parameters():
        phi_mean = sum(phi[n] for phi in phis) / len(phis)
        torch.testing.assert_close(
            p.detach(), theta[n] + 0.5 * (phi_mean - theta[n]), rtol=1e-12, atol=1e-14
        )


def test_reptile_epsilon_anneals_linearly_to_zero():
    module = at_step(reptile(eps0=1.0), max_steps=4)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_reptile_inner_minibatches_cycle_through_the_task():
    module = reptile(inner_batch_size=4, inner_steps=5)
    x, y = torch.arange(10.0), torch.arange(10)
    batches = module.inner_batches(x, y, task=0)
    assert [len(b[1]) for b in batches] == [4] * 5
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen[:10].tolist()) == list(range(10))  # one full pass before repeating
    assert all(
        torch.equal(a[1], b[1])
        for a, b in zip(batches, module.inner_batches(x, y, task=0), strict=True)
    )  # seeded


def test_reptile_inner_adam_state_carries_over_and_is_checkpointed():
    module, eps = reptile(inner_optimizer="adam"), random_episodes()
    fit(module, eps, max_steps=2)  # 2 outer steps of 2 tasks of 3 inner steps
    state = module.inner_state
    assert state.keys() == dict(module.model.named_parameters()).keys()
    assert all(float(s["step"]) == 12 for s in state.values())
    before = {n: {k: v.clone() for k, v in s.items()} for n, s in state.items()}
    module.evaluate(eps)  # evaluation starts from a copy
    for n, s in state.items():
        assert all(torch.equal(v, before[n][k]) for k, v in s.items())
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    other = reptile(inner_optimizer="adam")
    other.on_load_checkpoint(checkpoint)
    assert other.inner_state.keys() == state.keys()
    accs = module.evaluate(eps)
    other.model.load_state_dict(module.model.state_dict())
    torch.testing.assert_close(other.evaluate(eps), accs)
    support = [(eps.support_x[0], eps.support_y[0])] * 3
    torch.testing.assert_close(
        other.fit_task(support, dict(other.inner_state))[0],
        module.fit_task(support, dict(state))[0],
    )
    fresh, _ = other.fit_task(support, {})  # a fresh Adam adapts differently
    assert not torch.equal(fresh["head.weight"], module.fit_task(support, state)[0]["head.weight"])


def test_reptile_evaluation_fine_tunes_on_support_and_keeps_theta():
    module, eps = reptile(inner_steps_test=5), random_episodes()
    theta = params(module.model)
    phi = reference_phi(module.model, eps.support_x[0], eps.support_y[0], 5, "sgd")
    want = (
        (functional_call(module.model, phi, (eps.query_x[0],)).argmax(-1) == eps.query_y[0])
        .double()
        .mean()
    )
    assert module.evaluate(eps)[0].item() == pytest.approx(want.item(), abs=1e-6)
    for n, p in module.model.named_parameters():
        assert torch.equal(p, theta[n])


# ---- ProtoNet------------------------------------------------------------------------------------
def test_protonet_logits_are_negative_squared_distances_to_prototypes():
    module, eps = ProtoNet(tiny_net(), partial(torch.optim.Adam, lr=1e-3)), random_episodes()
    sx, sy, qx = eps.support_x[0], eps.support_y[0], eps.query_x[0]
    emb = module.model.features(torch.cat([sx, qx]))
    support, query = emb[: len(sx)], emb[len(sx) :]
    logits = module.episode_logits(sx, sy, qx)
    assert logits.shape == (len(qx), 3)
    for k in range(3):
        proto = support[sy == k].mean(0)
        for i in range(len(qx)):
            want = -((query[i] - proto) ** 2).sum()
            torch.testing.assert_close(logits[i, k], want, rtol=1e-12, atol=1e-12)


def test_protonet_trains_the_body_only():
    module, eps = ProtoNet(tiny_net(), partial(torch.optim.Adam, lr=1e-2)), random_episodes()
    before = params(module.model)
    fit(module, eps, steps=2)
    after = params(module.model)
    assert torch.equal(before["head.weight"], after["head.weight"])
    assert not torch.equal(before["blocks.0.conv.weight"], after["blocks.0.conv.weight"])


# ---- fine-tuning baseline------------------------------------------------------------------------
class FakeData(L.LightningDataModule):
    """Class c, image i is the constant (10c + i) / 255; episodes for the loader's steps."""

    def __init__(self, classes=7, per_class=4):
        super().__init__()
        images = (np.arange(classes)[:, None] * 10 + np.arange(per_class)[None, :]).astype(np.uint8)
        images = np.broadcast_to(images[..., None, None], (classes, per_class, 16, 16)).copy()
        names = [f"c{i}" for i in range(classes)]
        self.splits = SimpleNamespace(train=ClassImages(images, names, names))

    def train_dataloader(self):
        return DataLoader([random_episodes(batch=1)] * 2, batch_size=None)


def finetune(**kw) -> FineTune:
    return FineTune(
        tiny_net(), partial(torch.optim.Adam, lr=1e-2), batch_size=16, inner_steps_test=5, **kw
    )


def test_finetune_pretrains_on_global_class_labels():
    module, data = finetune(), FakeData()
    x, y = module.supervised_batch(data.splits.train)
    assert x.shape == (16, 1, 16, 16) and y.max() < 7
    torch.testing.assert_close((x[:, 0, 0, 0] * 255).round().long() // 10, y)
    before = params(module.model)
    cpu_trainer(2).fit(module, datamodule=data)
    assert module.classifier.out_features == 7
    assert not torch.equal(
        before["blocks.0.conv.weight"], params(module.model)["blocks.0.conv.weight"]
    )


@pytest.mark.parametrize("finetune_all", [False, True])
def test_finetune_fits_a_fresh_head_per_episode(finetune_all):
    module, eps = finetune(finetune_all=finetune_all), random_episodes()
    theta = params(module.model)
    accs = module.evaluate(eps)
    assert accs.shape == (2,)
    for n, p in module.model.named_parameters():
        assert torch.equal(p, theta[n])  # adaptation works on a copy
    with torch.no_grad():
        module.model.head.weight.add_(5.0)  # the trained head plays no part
    torch.testing.assert_close(module.evaluate(eps), accs)


@pytest.mark.parametrize("finetune_all", [False, True])
def test_finetune_fit_separates_the_support_set(finetune_all):
    # Scored on its own support set, a fitted head is right on every image; an unfitted
    # (zero) head ties on all classes and scores 1/ways.
    module = FineTune(
        tiny_net(channels=8),  # 8 features: 9 support images are separable
        partial(torch.optim.Adam, lr=1e-2),
        inner_lr=0.1,
        inner_steps_test=50,
        finetune_all=finetune_all,
    )
    eps = random_episodes(shots=3)
    on_support = Episodes(eps.support_x, eps.support_y, eps.support_x, eps.support_y)
    torch.testing.assert_close(module.evaluate(on_support), torch.ones(2))


# ---- every variant composes and runs on real data------------------------------------------------
TINY = [
    "model.channels=8",
    "algo.meta_batch_size=2",
    "data.batches_per_epoch=2",
    "data.val_episodes=4",
    "data.test_episodes=4",
    "data.eval_batch_size=2",
    "trainer.max_steps=3",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=none",
    "print_config=false",
]


@pytest.mark.parametrize("algo", VARIANTS)
def test_every_variant_runs(algo, tmp_path, data_root):
    torch.set_num_threads(1)  # small convolutions: a second thread only adds contention
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"algo={algo}", *TINY, f"output_dir={tmp_path}"])
    metrics = run(cfg)
    assert metrics["status"] == "ok" and metrics["algo"] == algo
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["steps"] == 3
    no_inner_loop = algo in (
        "reptile",
        "protonet",
        "matching",
        "relation",
        "siamese",
        "finetune",
    )  # they ignore engine=
    assert metrics["engine"] == (None if no_inner_loop else "higher")


@pytest.mark.slow
def test_multirun_over_all_variants_with_fast_dev_run(tmp_path, data_root):
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        f"algo={','.join(VARIANTS)}",
        "+trainer.fast_dev_run=true",
        f"hydra.sweep.dir={tmp_path}",
        *[o for o in TINY if not o.startswith("trainer.max_steps")],
    ]
    env = {**os.environ, "METALEARN_DATA_DIR": str(data_root), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    found = {}
    for path in tmp_path.glob("*/metrics.json"):
        metrics = json.loads(path.read_text())
        found[metrics["algo"]] = metrics["status"]
    assert found == dict.fromkeys(VARIANTS, "ok")


@pytest.mark.parametrize(
    ("overrides", "expect"),
    [
        (
            [],
            {"msl": True, "inner_rates": "lslr", "bn_per_step": True, "da": True, "cosine": True},
        ),
        (["algo.adapt_norm=true"], {"inner_rates": "lslr"}),
        (["algo.msl=false"], {"msl": False, "inner_rates": "lslr", "da": True}),
        (["algo.lslr=false"], {"msl": True, "inner_rates": "fixed"}),
        (["algo.bn_per_step=false", "algo.da=false"], {"bn_per_step": False, "da": False}),
    ],
)
def test_maml_pp_components_are_separate_switches(overrides, expect):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["algo=maml_pp", "output_dir=.", *overrides])
    module = instantiate(cfg.algo, model=instantiate(cfg.model), engine=instantiate(cfg.engine))
    assert {k: getattr(module, k) for k in expect} == expect
    assert module.model.blocks[0].norm.scale.shape[0] == (5 if module.bn_per_step else 1)
    adapts_norm = "blocks.0.norm.scale" in module.adapted
    assert adapts_norm == ("algo.adapt_norm=true" in overrides)  # MAML++: outer loop only
