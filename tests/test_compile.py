"""engine.compile: the whole meta-step as one compiled graph gives the loop's meta-gradients.

float64 on CPU, a tiny Conv4 (tests/helpers.py), 2 tasks: second order, first order, Meta-SGD
and MAML++ (learned per-step rates, multi-step loss, per-step BatchNorm) through GBML's own
switches, with the graphs dynamo and AOTAutograd capture (backend aot_eager), and Meta-SGD
(second order, learned rates) through inductor's generated C++ too. Changing step weights
and rates reuse one graph; what cannot compile, or exceeds ``max_graphs``, runs eagerly with
a logged warning and the same results. In float32 the compiled meta-gradient stays within
``FLOAT32_RTOL`` (norm-wise) of the float64 one, as eager float32's does. Compiling takes tens
of seconds even on an idle core (minutes under load), so the compiling tests are marked slow.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from torch import nn

from metalearn.data.episodes import Episodes
from metalearn.engines.base import InnerLoop
from metalearn.engines.func import FuncEngine
from metalearn.engines.vmap import VmapEngine
from metalearn.errors import ConfigError
from tests.helpers import random_episodes, tiny_net
from tests.test_engines import LR, TIGHT, gbml_mamlpp, meta_grads, setup

EPISODES = dict(batch=2, ways=3, shots=1, queries=2)
INDUCTOR = pytest.mark.skipif(
    not os.environ.get("METALEARN_TEST_INDUCTOR"),
    reason="METALEARN_TEST_INDUCTOR=1 compiles through inductor's C++ (minutes on 2 cores)",
)


def compiled_engine(**kw) -> VmapEngine:
    # aot_eager: the graphs dynamo and AOTAutograd capture (where a wrong meta-gradient would
    # come from), run without generated code: compiling is minutes faster than inductor's
    kw.setdefault("compile_backend", "aot_eager")
    return VmapEngine(compile="default", **kw)


@pytest.mark.slow
@pytest.mark.parametrize(
    "algo, backend",
    [
        ("maml", "aot_eager"),
        ("fomaml", "aot_eager"),
        ("metasgd", "aot_eager"),
        # inductor generates and compiles C++ for minutes on 2 cores (once, standalone: 48 min
        # wall under load, gradients equal func's to 1e-14): opt-in, not in the default run
        pytest.param("metasgd", "inductor", marks=INDUCTOR),
    ],
)
def test_compiled_meta_gradients_equal_the_loop(algo, backend):
    episodes = random_episodes(**EPISODES)
    engine = compiled_engine(compile_backend=backend)
    got = meta_grads(engine, algo, episodes)
    assert len(engine.compiled.compile_seconds) == 1, "the meta-step should have compiled"
    want = meta_grads("func", algo, episodes)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TIGHT, msg=f"{algo}: {name}")
    if algo == "metasgd":
        assert any(want[n].abs().sum() > 0 for n in want if n.startswith("rate:"))


# float32: the compiled step's meta-gradient is as close to the float64 one as eager float32's
# is (both ~2-4e-6 norm-wise on the tiny net, measured); the stated tolerance is 2e-5.
FLOAT32_RTOL = 2e-5


def flat_grads(engine, episodes, dtype) -> torch.Tensor:
    net, a = setup("maml")
    net.to(dtype)
    episodes = Episodes(*(t.to(dtype) if t.is_floating_point() else t for t in episodes))
    engine(net, a.loop, episodes).objective.backward()
    return torch.cat([p.grad.flatten().double() for p in net.parameters()])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=INDUCTOR)])
def test_compiled_float32_meta_gradient_within_stated_tolerance_of_float64(backend):
    episodes = random_episodes(**EPISODES)
    truth = flat_grads(FuncEngine(), episodes, torch.float64)

    def error(engine):
        return ((flat_grads(engine, episodes, torch.float32) - truth).norm() / truth.norm()).item()

    eager, compiled = error(FuncEngine()), error(compiled_engine(compile_backend=backend))
    assert 0 < eager < FLOAT32_RTOL, "float32 itself should round at this level"
    assert 0 < compiled < FLOAT32_RTOL, (
        f"compiled float32 off by {compiled:.1e} (eager {eager:.1e})"
    )


@pytest.mark.slow
def test_compiled_mamlpp_through_gbml_reuses_one_graph_as_weights_and_rates_change():
    """GBML's MAML++ switches (LSLR, multi-step loss, per-step BatchNorm); two meta-steps with
    other step weights and moved rates/parameters run the same graph, and match engine=func."""
    episodes = random_episodes(**EPISODES)

    def build(engine):
        algo = gbml_mamlpp(engine)
        with torch.no_grad():
            for i, rate in enumerate(algo.rates.values()):
                rate.mul_(1 + 0.1 * i)  # unequal learned rates, so each one matters
        return algo

    engine = compiled_engine()
    algos = {"func": build(FuncEngine()), "compiled": build(engine)}
    for weights in ([0.3, 0.7], [0.1, 0.9]):
        grads = {}
        for name, algo in algos.items():
            algo.zero_grad()
            loop = algo.train_loop()
            loop.step_weights = weights
            algo.engine(algo.model, loop, episodes).objective.backward()
            grads[name] = {
                n: p.grad.clone() for n, p in algo.named_parameters() if p.grad is not None
            }
        assert any(n.startswith("rates.") for n in grads["func"])
        assert grads["compiled"].keys() == grads["func"].keys()
        for n in grads["func"]:
            torch.testing.assert_close(grads["compiled"][n], grads["func"][n], **TIGHT, msg=n)
        for algo in algos.values():  # move parameters and rates: inputs, not constants
            with torch.no_grad():
                for p in algo.parameters():
                    p.mul_(0.9)
    assert len(engine.compiled.graphs) == 1, "weights and rates are inputs: no recompile"


@torch.compiler.disable
def untraceable(x):  # what dynamo skips: fullgraph=True cannot make one graph through it
    return x


class UntraceableNet(nn.Module):
    """The tiny Conv4 with one call dynamo must not trace."""

    def __init__(self):
        super().__init__()
        self.net = tiny_net()

    def forward(self, x, step=0):
        return untraceable(self.net(x, step=step))


@pytest.mark.slow
def test_what_does_not_compile_runs_eagerly_with_a_logged_warning(caplog):
    episodes = random_episodes(**EPISODES)
    net = UntraceableNet()
    loop = InnerLoop(1, lambda n, t: LR, [n for n, _ in net.named_parameters()])
    engine = compiled_engine()
    with caplog.at_level(logging.WARNING, logger="metalearn.engines.compiled"):
        got = engine(net, loop, episodes)
    assert "does not compile" in caplog.text and "eagerly" in caplog.text
    got.objective.backward()
    got_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    FuncEngine()(net, loop, episodes).objective.backward()
    for g, p in zip(got_grads, net.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, **TIGHT)
    assert list(engine.compiled.graphs.values()) == [None]  # not retried at every step


def test_beyond_max_graphs_meta_steps_run_eagerly_logged(caplog):
    episodes = random_episodes(**EPISODES)
    net, a = setup("maml")
    with caplog.at_level(logging.WARNING, logger="metalearn.engines.compiled"):
        out = compiled_engine(max_graphs=0)(net, a.loop, episodes)
    assert "max_graphs" in caplog.text
    torch.testing.assert_close(out.loss, FuncEngine()(net, a.loop, episodes).loss, **TIGHT)


def test_evaluation_and_unknown_modes():
    episodes = random_episodes(**EPISODES)
    net, a = setup("maml")
    engine = compiled_engine()
    with torch.no_grad():  # evaluation: eager vmap, nothing compiled
        out = engine(net, a.loop, episodes)
    assert engine.compiled.graphs == {}
    torch.testing.assert_close(out.loss, FuncEngine()(net, a.loop, episodes).loss, **TIGHT)
    with pytest.raises(ConfigError, match="engine.compile=.*choose false or one of"):
        VmapEngine(compile="fastest")
    assert VmapEngine(compile=False).compiled is None
