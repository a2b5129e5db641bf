"""Sinusoid regression (Finn et al. 2017, sec. 5.1): the tasks, the MLP, MSE meta-gradients,
every gradient-based variant on it, the lowest-val-MSE checkpoint, the clear errors, and a
short learning run against the pretrained baseline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metalearn.data.episodes import Episodes
from metalearn.data.sinusoid import SinusoidDataModule, SinusoidFamily
from metalearn.engines.base import InnerLoop
from metalearn.engines.func import FuncEngine
from metalearn.engines.higher import HigherEngine
from metalearn.engines.vmap import VmapEngine
from metalearn.errors import ConfigError
from metalearn.instantiate import instantiate_callbacks
from metalearn.models.mlp import MLP
from metalearn.models.protocol import check_backbone
from metalearn.tasks import REGRESSION
from metalearn.train import run
from tests.helpers import assert_matches_finite_differences, compose_cfg, scores
from tests.helpers import reference_objective as shared_reference_objective

ENGINES = {"higher": HigherEngine(), "func": FuncEngine(), "vmap": VmapEngine()}
LR = 0.05

# a sinusoid run in seconds: 2 steps, 10 val and 10 test tasks
TINY = [
    "shots=5",
    "data.batches_per_epoch=2",
    "data.val_episodes=10",
    "data.test_episodes=10",
    "data.eval_queries=20",
    "trainer.max_steps=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=none",
    "print_config=false",
]


def sinusoid_run(tmp_path, *overrides, preset="maml_sinusoid"):
    """A tiny run of ``experiment=<preset>`` (its settings, any ``algo=`` over them)."""
    return run(compose_cfg(tmp_path, [f"experiment={preset}", *TINY, *overrides], tiny=False))


def tiny_mlp(seed=0) -> MLP:
    torch.manual_seed(seed)
    return MLP(ways=1, hidden=(6, 5)).double()


def sinusoid_episodes(batch=2, shots=4, queries=6, seed=1) -> Episodes:
    eps, _ = SinusoidFamily().episodes(np.random.default_rng(seed), batch, shots, queries)
    return Episodes(*(t.double() for t in eps))


def reference_objective(net, params, episodes, steps):
    """Second-order MAML objective with MSE, written independently of the engines."""
    return shared_reference_objective(net, params, episodes, steps, lr=LR, loss=F.mse_loss)


def engine_grads(engine, net, episodes, steps, first_order=False):
    names = [n for n, _ in net.named_parameters()]
    loop = InnerLoop(steps, lambda n, t: LR, names, first_order, task=REGRESSION)
    net.zero_grad()
    engine(net, loop, episodes).objective.backward()
    return [p.grad.clone() for p in net.parameters()]


# ---- the tasks -------------------------------------------------------------------------------
def test_tasks_are_sinusoids_with_the_papers_ranges():
    data = SinusoidDataModule(shots=5, test_episodes=400, eval_queries=20)
    episodes, tasks = data.fixed("test")
    assert episodes.support_x.shape == (400, 5, 1) and episodes.query_y.shape == (400, 20, 1)
    amplitude, phase = tasks[:, 0], tasks[:, 1]
    assert 0.1 <= amplitude.min() < 0.5 and 4.5 < amplitude.max() <= 5.0
    assert 0 <= phase.min() < 0.3 and math.pi - 0.3 < phase.max() <= math.pi
    x = torch.cat([episodes.support_x, episodes.query_x], 1).double().numpy()
    y = torch.cat([episodes.support_y, episodes.query_y], 1).double().numpy()
    assert -5 <= x.min() < -4.9 and 4.9 < x.max() <= 5
    np.testing.assert_allclose(y, amplitude[:, None, None] * np.sin(x - phase[:, None, None]),
                               atol=1e-5)  # fmt: skip


def test_training_tasks_are_fixed_by_seed_and_step_alone():
    def batch(seed, step):
        return SinusoidDataModule(shots=5, seed=seed, meta_batch_size=25).train_dataset()[step]

    a = batch(0, 3)
    assert a.support_x.shape == (25, 5, 1) and a.query_x.shape == (25, 5, 1)  # queries=auto: K
    for x, y in zip(a, batch(0, 3), strict=True):
        assert torch.equal(x, y)  # a resumed run's step 3 is the same batch
    assert not torch.equal(a.support_y, batch(0, 4).support_y)
    assert not torch.equal(a.support_y, batch(1, 3).support_y)


def test_val_and_test_tasks_are_fixed_by_eval_seed_only():
    def tasks(split, count=20, **kw):
        data = SinusoidDataModule(shots=5, val_episodes=count, test_episodes=count, **kw)
        return data.fixed(split)[1]

    np.testing.assert_array_equal(tasks("val", seed=0), tasks("val", seed=7))  # any run seed
    np.testing.assert_array_equal(tasks("test", count=5), tasks("test", count=20)[:5])
    assert not np.array_equal(tasks("val"), tasks("test"))
    assert not np.array_equal(tasks("test"), tasks("test", eval_seed=1))


def test_a_resumed_run_trains_on_the_same_tasks_as_an_uninterrupted_one(tmp_path):
    torch.set_num_threads(1)
    steps = ["data.batches_per_epoch=3", "test=false", "data.val_episodes=5"]
    straight = sinusoid_run(tmp_path / "straight", *steps, "trainer.max_steps=5")
    sinusoid_run(tmp_path / "part", *steps, "trainer.max_steps=2")
    resumed = sinusoid_run(
        tmp_path / "resumed", *steps, "trainer.max_steps=5",
        f"ckpt_path={tmp_path / 'part' / 'checkpoints' / 'last.ckpt'}",
    )  # fmt: skip
    after_resume = [h for h in resumed["curve"] if h["step"] > 2]  # its first part validated too
    assert scores(after_resume) == scores(straight["curve"]) and straight["curve"]  # same MSE

    def weights(run_dir):
        ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
        return ckpt["state_dict"]

    for name, w in weights(tmp_path / "straight").items():
        assert torch.equal(w, weights(tmp_path / "resumed")[name]), name


# ---- the network and its meta-gradients ------------------------------------------------------
def test_mlp_meets_the_backbone_contract_and_refuses_per_step_batchnorm():
    net = MLP()
    check_backbone(net)
    assert [layer.out_features for layer in net.layers] == [40, 40]  # the paper's
    assert net(torch.zeros(7, 1)).shape == (7, 1)
    assert torch.equal(net(torch.ones(3, 1)), net.head(net.features(torch.ones(3, 1))))
    with pytest.raises(ConfigError, match="bn_per_step=false"):
        check_backbone(net, bn_steps=5)
    with pytest.raises(ConfigError, match="data=sinusoid"):
        net(torch.zeros(2, 1, 28, 28))


@pytest.mark.parametrize("engine", ENGINES)
def test_maml_meta_gradient_on_sinusoids_matches_finite_differences(engine):
    net, eps = tiny_mlp(), sinusoid_episodes()
    got = engine_grads(ENGINES[engine], net, eps, steps=2)
    assert_matches_finite_differences(got, net, lambda p: reference_objective(net, p, eps, 2))


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_engines_agree_on_the_mlp(first_order):
    eps = sinusoid_episodes(batch=3)
    grads = {
        name: engine_grads(engine, tiny_mlp(), eps, steps=2, first_order=first_order)
        for name, engine in ENGINES.items()
    }
    for name in ("func", "vmap"):
        for g, w in zip(grads[name], grads["higher"], strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=name)
    if not first_order:  # and equal the independent computation
        net = tiny_mlp()
        params = dict(net.named_parameters())
        want = torch.autograd.grad(reference_objective(net, params, eps, 2), list(params.values()))
        for g, w in zip(grads["func"], want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


# ---- every algorithm that can, runs unchanged; the others say so -----------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        ["algo=maml"],
        ["algo=maml", "engine=higher"],
        ["algo=maml", "engine=func"],
        ["algo=fomaml"],
        ["algo=metasgd"],
        ["algo=alpha_maml"],
        # MAML++'s switches; per-step BatchNorm needs a network with BatchNorm (refused below)
        ["algo=maml_pp", "algo.bn_per_step=false", "algo.inner_steps=2", "algo.inner_steps_test=2"],
        ["algo=anil"],
        ["algo=reptile"],
        ["algo=finetune"],  # experiment=pretrained_sinusoid
    ],
    ids=lambda o: " ".join(o),
)
def test_gradient_based_variants_and_finetune_run_on_sinusoids(tmp_path, overrides):
    torch.set_num_threads(1)
    preset = "pretrained_sinusoid" if "algo=finetune" in overrides else "maml_sinusoid"
    metrics = sinusoid_run(tmp_path, *overrides, preset=preset)
    assert metrics["status"] == "ok" and metrics["metric"] == "mse"
    assert 0 < metrics["test/mse"] < 50 and metrics["test/mse_ci95"] > 0
    assert "test/acc" not in metrics and metrics["val/mse_best"] == metrics["curve"][-1]["val/mse"]
    assert json.loads((tmp_path / "metrics.json").read_text())["test/mse"] == metrics["test/mse"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algo=protonet"], "algo=protonet learns classification tasks only.*algo=maml"),
        (["ways=5"], "set ways=1"),
        (["model=conv4"], "use model=mlp"),
        (["algo=maml_pp", "algo.inner_steps=2"], "algo.bn_per_step=false"),
    ],
)
def test_bad_sinusoid_config_raises_one_clear_error(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        sinusoid_run(tmp_path, *overrides)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"


def test_protonet_refuses_a_regression_task_when_used_directly():
    from metalearn.algorithms.protonet import ProtoNet

    algo = ProtoNet(MLP(), torch.optim.Adam, name="protonet")
    with pytest.raises(ConfigError, match="classification tasks only"):
        algo.task = "regression"


# ---- checkpoint selection: the lowest validation MSE -----------------------------------------
def test_checkpoint_monitor_is_the_lowest_val_mse(tmp_path):
    """The configured callbacks watching val/acc (the best checkpoint, early stopping) watch
    the regression task's val/mse, lowest first."""
    cfg = compose_cfg(
        tmp_path, ["experiment=maml_sinusoid", "callbacks=[default,early_stopping]"], tiny=False
    )
    callbacks = instantiate_callbacks(cfg, REGRESSION)
    for name in ("model_checkpoint", "early_stopping"):
        assert (callbacks[name].monitor, callbacks[name].mode) == ("val/mse", "min"), name


def test_best_checkpoint_is_the_lowest_val_mse(tmp_path):
    # Trained, then resumed without inner adaptation (inner_lr 0): validation MSE rises. The
    # first run's checkpoint (lower MSE) must stay the best and be the one tested.
    torch.set_num_threads(1)  # tiny ops: a second thread only waits
    common = ["data.batches_per_epoch=50", "algo.meta_batch_size=10", "data.val_episodes=50"]
    first = sinusoid_run(tmp_path / "first", *common, "trainer.max_steps=300", "test=false")
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    metrics = sinusoid_run(
        tmp_path / "resumed", *common, "trainer.max_steps=350", "algo.inner_lr=0",
        f"ckpt_path={ckpt}",
    )  # fmt: skip
    mses = [h["val/mse"] for h in metrics["curve"]]
    assert len(mses) == 7 and mses[-1] > min(mses) + 0.3
    assert metrics["best_checkpoint"] == first["best_checkpoint"]
    assert metrics["val/mse_best"] == min(mses)


# ---- learning: MAML below the pretrained baseline and the un-adapted model -------------------
@pytest.mark.slow
def test_maml_learns_sinusoids_below_the_pretrained_baseline(tmp_path):
    from metalearn.learner import load
    from metalearn.show_sinusoid import mse_after, show, test_tasks

    torch.set_num_threads(1)  # tiny ops: a second thread only waits (10x slower when loaded)
    shared = ["data.test_episodes=200", "data.val_episodes=50", "trainer.max_steps=1000"]
    shared += ["data.batches_per_epoch=500", "logger=none", "print_config=false"]
    shared += ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    maml = run(compose_cfg(tmp_path / "maml", ["experiment=maml_sinusoid", *shared], tiny=False))
    base = run(
        compose_cfg(tmp_path / "base", ["experiment=pretrained_sinusoid", *shared], tiny=False)
    )
    # measured: MAML 1.82 +- 0.29 (un-adapted 3.26), pretrained 3.85 +- 0.65 (10 steps at 0.01,
    # 200 test tasks; 600 steps gave 2.36 and 3.76)
    assert maml["test/mse"] + maml["test/mse_ci95"] < base["test/mse"] - base["test/mse_ci95"]
    assert maml["test/mse"] < 0.7 * base["test/mse"]
    learner = load(maml["best_checkpoint"])
    episodes, _ = test_tasks(learner)
    unadapted, _ = mse_after(learner, episodes, 0)
    assert maml["test/mse"] < 0.7 * unadapted  # adaptation, not a better mean function
    # the figure's scores are the run's own test procedure (same tasks, same steps)
    table = show(
        {"maml": maml["best_checkpoint"], "pretrained": base["best_checkpoint"]},
        0,
        [1, 10],
        tmp_path / "fig",
    )
    assert table["maml"]["10 steps"]["mse"] == pytest.approx(maml["test/mse"], rel=1e-5)
    assert table["maml"]["0 steps"]["mse"] == pytest.approx(unadapted, rel=1e-6)
    assert table["pretrained"]["10 steps"]["mse"] == pytest.approx(base["test/mse"], rel=1e-5)
    assert (tmp_path / "fig" / "sinusoid.png").stat().st_size > 10_000
    with pytest.raises(ConfigError, match="query_logits"):  # not an image classifier
        learner.adapt([np.zeros((28, 28))], ["a"])
