"""The three inner-loop engines (higher, func loop, func vmap) compute the same thing.

For MAML, FOMAML, Meta-SGD, LSLR, MAML++ (multi-step loss + per-step BatchNorm) and ANIL on a
tiny Conv4 with BatchNorm (float64): equal meta-gradients (theta and learned inner rates) and
equal parameters after two outer Adam steps from the same init and episodes. The loop engine
(func) is the reference; it is itself checked against an independent computation and finite
differences in tests/test_gradients.py. Also: the traps vmap has (affine BatchNorm gives wrong
meta-gradients, running-statistic updates fail) are refused with a clear ConfigError.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metalearn.engines.base import InnerLoop
from metalearn.engines.func import FuncEngine
from metalearn.engines.higher import HigherEngine
from metalearn.engines.vmap import VmapEngine, vmapped
from metalearn.errors import ConfigError
from tests.helpers import random_episodes, tiny_net

ENGINES = {
    "higher": HigherEngine(),
    "func": FuncEngine(),
    "vmap": VmapEngine(),
    "func_recompute": FuncEngine(recompute=True),  # inner steps recomputed in the backward
}
TIGHT = dict(rtol=1e-9, atol=1e-12)
# A conv bias right before BatchNorm has no effect on the output: its meta-gradient is rounding
# noise (~1e-17), which Adam scales up to lr * g / (|g| + eps) ~ 1e-10 per step.
ADAM_NOISE = dict(rtol=1e-9, atol=1e-8)
LR = 0.3


class Algo:
    """An inner loop over the tiny net's parameters and its own learned rates (if any)."""

    def __init__(
        self, net, steps=2, first_order=False, rates="fixed", step_weights=None, adapt="all"
    ):
        names = [n for n, _ in net.named_parameters() if adapt == "all" or n.startswith("head.")]
        g = torch.Generator().manual_seed(7)
        shapes = dict(net.named_parameters())
        if rates == "metasgd":  # one learned rate per parameter element, not all equal
            self.rates = {
                n: (
                    LR * (0.5 + torch.rand(shapes[n].shape, generator=g, dtype=torch.float64))
                ).requires_grad_()
                for n in names
            }
            lr = lambda n, t: self.rates[n]  # noqa: E731
        elif rates == "lslr":  # one learned rate per layer and step
            self.rates = {
                n: (
                    LR * (0.5 + torch.rand(steps, generator=g, dtype=torch.float64))
                ).requires_grad_()
                for n in names
            }
            lr = lambda n, t: self.rates[n][t]  # noqa: E731
        else:
            self.rates = {}
            lr = lambda n, t: LR  # noqa: E731
        self.loop = InnerLoop(steps, lr, names, first_order, step_weights)


def maml(net):
    return Algo(net)


def fomaml(net):
    return Algo(net, first_order=True)


def metasgd(net):
    return Algo(net, rates="metasgd")


def lslr(net):
    return Algo(net, rates="lslr")


def mamlpp(net):  # multi-step loss over 3 steps, LSLR, per-step BatchNorm (bn_steps=steps)
    return Algo(net, steps=3, rates="lslr", step_weights=[0.2, 0.3, 0.5])


def mamlpp_first_order(net):  # MAML++ during derivative-order annealing
    return Algo(net, steps=3, rates="lslr", step_weights=[0.2, 0.3, 0.5], first_order=True)


def anil(net):
    return Algo(net, adapt="head")


ALGOS = {
    "maml": maml,
    "fomaml": fomaml,
    "metasgd": metasgd,
    "lslr": lslr,
    "mamlpp": mamlpp,
    "mamlpp_first_order": mamlpp_first_order,
    "anil": anil,
}
BN_STEPS = {"mamlpp": 3, "mamlpp_first_order": 3}


def setup(algo: str):
    net = tiny_net(bn_steps=BN_STEPS.get(algo, 1))
    with torch.no_grad():  # non-trivial BatchNorm scale/shift, so they matter
        for block in net.blocks:
            block.norm.scale.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(5))
            block.norm.shift.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(6))
    return net, ALGOS[algo](net)


def meta_grads(engine, algo: str, episodes) -> dict:
    """Meta-gradients (and loss, metric) of ``algo`` on the tiny net through ``engine``: a
    name in ENGINES or an engine object."""
    net, a = setup(algo)
    engine = ENGINES[engine] if isinstance(engine, str) else engine
    out = engine(net, a.loop, episodes)
    out.objective.backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    grads.update({f"rate:{n}": r.grad for n, r in a.rates.items()})
    return {
        n: (torch.zeros(1, dtype=torch.float64) if g is None else g.clone())
        for n, g in grads.items()
    } | {"loss": out.loss, "metric": out.metric}


@functools.cache
def reference_grads(algo: str) -> dict:
    return meta_grads("func", algo, random_episodes(batch=3))


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("engine", ["higher", "vmap", "func_recompute"])
def test_meta_gradients_equal_the_loop(engine, algo):
    got = meta_grads(engine, algo, random_episodes(batch=3))
    want = reference_grads(algo)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TIGHT, msg=f"{engine}/{algo}: {name}")
    nonzero = [n for n in want if n.startswith("rate:") and want[n].abs().sum() > 0]
    if algo in ("metasgd", "lslr", "mamlpp", "mamlpp_first_order"):
        assert nonzero, "learned inner rates should receive meta-gradients"


def two_outer_steps(engine: str, algo: str) -> dict:
    net, a = setup(algo)
    opt = torch.optim.Adam([*net.parameters(), *a.rates.values()], lr=1e-2)
    for seed in (11, 12):
        opt.zero_grad()
        ENGINES[engine](net, a.loop, random_episodes(batch=3, seed=seed)).objective.backward()
        opt.step()
    state = {n: p.detach().clone() for n, p in net.named_parameters()}
    return state | {f"rate:{n}": r.detach().clone() for n, r in a.rates.items()}


@pytest.mark.parametrize("algo", ["maml", "fomaml", "metasgd", "lslr", "mamlpp"])
def test_parameters_after_two_outer_steps_agree(algo):
    want = two_outer_steps("func", algo)
    init = {n: p.detach() for n, p in setup(algo)[0].named_parameters()}
    assert any(not torch.equal(want[n], init[n]) for n in init), "Adam should move the weights"
    for engine in ("higher", "vmap"):
        got = two_outer_steps(engine, algo)
        for name in want:
            tol = ADAM_NOISE if name.endswith("conv.bias") else TIGHT
            torch.testing.assert_close(got[name], want[name], **tol, msg=f"{engine}/{algo}: {name}")


@pytest.mark.parametrize("engine", [VmapEngine(chunk_size=2), VmapEngine(cpu_chunk_mb=1e-3)])
def test_chunked_vmap_equals_whole_batch(engine):
    eps = random_episodes(batch=3)
    want = reference_grads("lslr")
    net, a = setup("lslr")
    engine(net, a.loop, eps).objective.backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, want[n], **TIGHT)
    if engine.chunk_size == "auto":  # a tiny budget: one task per chunk
        assert engine.auto_chunk(net, eps) == 1


def gbml_mamlpp(engine):
    """GBML (float64, the tiny net) with MAML++'s switches: LSLR, multi-step loss, per-step
    BatchNorm, 2 inner steps."""
    from metalearn.algorithms.gbml import GBML

    return GBML(
        functools.partial(tiny_net, seed=0),
        engine,
        functools.partial(torch.optim.Adam, lr=1e-3),
        inner_lr=LR,
        inner_steps=2,
        inner_rates="lslr",
        msl=True,
        bn_per_step=True,
    ).double()


def test_gbml_gives_equal_meta_gradients_with_each_engine():
    """Through GBML's own switches (MAML++: LSLR, msl, per-step BN), one meta-objective each."""
    eps = random_episodes(batch=2)
    grads = {}
    for name, engine in ENGINES.items():
        torch.manual_seed(0)
        algo = gbml_mamlpp(engine)
        out = algo.engine(algo.model, algo.train_loop(), eps)
        out.objective.backward()
        grads[name] = {n: p.grad.clone() for n, p in algo.named_parameters() if p.grad is not None}
        assert any(n.startswith("rates.") for n in grads[name])
    for name in ("higher", "vmap"):
        assert grads[name].keys() == grads["func"].keys()
        for n in grads["func"]:
            torch.testing.assert_close(grads[name][n], grads["func"][n], **TIGHT)


# ---- the traps -----------------------------------------------------------------------------
class AffineBNNet(nn.Module):
    """conv → nn.BatchNorm2d(affine=True, batch statistics) → ReLU → pool → linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, affine=True, track_running_stats=False)
        self.head = nn.Linear(4 * 8 * 8, 3)
        with torch.no_grad():
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.normal_()

    def forward(self, x, step=0):
        return self.head(F.max_pool2d(F.relu(self.bn(self.conv(x))), 2).flatten(1))


def flat_grads(net, out):
    net.zero_grad()
    out.objective.backward()
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def test_trap_affine_batchnorm_gives_wrong_meta_gradients_under_vmap():
    """Documents functorch issue 534 (still so in torch 2.13): second-order MAML through an
    affine nn.BatchNorm2d differs between vmap and the loop by far more than rounding; the
    same net with affine-free BatchNorm agrees. VmapEngine therefore refuses such models."""
    eps = random_episodes(batch=2)
    net = AffineBNNet().double()
    loop = InnerLoop(2, lambda n, t: LR, [n for n, _ in net.named_parameters()])
    loop_grads = flat_grads(net, FuncEngine()(net, loop, eps))
    vmap_grads = flat_grads(net, vmapped(net, loop, eps))
    drift = ((vmap_grads - loop_grads).norm() / loop_grads.norm()).item()
    assert drift > 1e-3, f"affine BatchNorm under vmap now agrees ({drift:.1e}): issue fixed?"
    with pytest.raises(ConfigError, match="affine.*engine=func"):
        VmapEngine()(net, loop, eps)

    net.bn = nn.BatchNorm2d(4, affine=False, track_running_stats=False).double()
    loop.adapt = [n for n, _ in net.named_parameters()]
    torch.testing.assert_close(
        flat_grads(net, vmapped(net, loop, eps)),
        flat_grads(net, FuncEngine()(net, loop, eps)),
        **TIGHT,
    )


def test_vmap_refuses_running_statistic_updates_and_other_inner_optimizers():
    eps = random_episodes(batch=2)
    net = tiny_net(bn_mode="inductive")
    loop = InnerLoop(1, lambda n, t: LR, [n for n, _ in net.named_parameters()])
    with pytest.raises(ConfigError, match="inductive.*engine=func"):
        VmapEngine()(net, loop, eps)
    net.eval()  # evaluation reads running statistics without updating them: fine
    torch.testing.assert_close(
        VmapEngine()(net, loop, eps).loss, FuncEngine()(net, loop, eps).loss, **TIGHT
    )
    net = tiny_net()
    loop.optimizer = "adam"
    with pytest.raises(ConfigError, match="engine=higher"):
        VmapEngine()(net, loop, eps)
    with pytest.raises(ConfigError, match="randomness"):
        VmapEngine(randomness="sometimes")


class _Saved:
    """What autograd keeps for the backward, boxed so that its lifetime can be watched."""

    def __init__(self, tensor):
        self.tensor = tensor


def graph_bytes_kept(engine, steps: int) -> int:
    """Bytes of the distinct tensors the meta-objective's graph holds until its backward."""
    import weakref

    net = tiny_net(ways=5, channels=16, image_size=28)
    loop = InnerLoop(steps, lambda n, t: 0.1, [n for n, _ in net.named_parameters()])
    boxes = []

    def pack(t):
        boxes.append(weakref.ref(box := _Saved(t)))
        return box

    episodes = random_episodes(batch=1, ways=5, shots=5, queries=5, size=28)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
        out = engine(net, loop, episodes)
    kept = {}
    for ref in boxes:
        if (box := ref()) is not None:
            storage = box.tensor.untyped_storage()
            kept[storage.data_ptr()] = storage.nbytes()
    del out
    return sum(kept.values())


def test_recompute_keeps_one_parameter_copy_per_inner_step_not_its_activations():
    """engine.recompute: the graph held for the backward grows by one copy of the adapted
    parameters per inner step, not by the step's activations and double-backward graph (peak
    memory, which adds one recomputed step, is measured in bench/meta_step.py)."""
    params = sum(p.numel() * p.element_size() for p in tiny_net(ways=5, channels=16).parameters())
    plain = [graph_bytes_kept(FuncEngine(), s) for s in (1, 10)]
    flat = [graph_bytes_kept(FuncEngine(recompute=True), s) for s in (1, 10)]
    assert flat[1] - flat[0] <= 9 * params * 1.05, f"recompute kept {flat} bytes at 1/10 steps"
    assert plain[1] - plain[0] > 100 * (flat[1] - flat[0])  # what plain second order keeps


def test_recompute_refuses_what_a_second_pass_would_change():
    loop = InnerLoop(1, lambda n, t: 0.1, ["head.weight"])
    with pytest.raises(ConfigError, match="recompute=true: .* model.bn_mode=transductive"):
        FuncEngine(recompute=True).check(tiny_net(bn_mode="inductive").train(), loop)
