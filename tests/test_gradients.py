"""Meta-gradients are right: engines vs an independent torch.func computation and
finite differences (float64, tiny Conv4 with BatchNorm)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metalearn.engines.base import InnerLoop
from metalearn.engines.func import FuncEngine
from metalearn.engines.higher import HigherEngine
from tests.helpers import (
    assert_matches_finite_differences,
    random_episodes,
    reference_objective,
    tiny_net,
)

ENGINES = {"higher": HigherEngine(), "func": FuncEngine()}
LR = 0.3


def engine_grads(engine, net, episodes, steps, first_order=False, adapt=None):
    names = adapt or [n for n, _ in net.named_parameters()]
    loop = InnerLoop(steps, lambda n, t: LR, names, first_order)
    net.zero_grad()
    engine(net, loop, episodes).objective.backward()
    return [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("steps", [1, 2])
def test_second_order_equals_independent_torch_func(engine, steps):
    net, eps = tiny_net(), random_episodes()
    got = engine_grads(ENGINES[engine], net, eps, steps)
    params = dict(net.named_parameters())
    want = torch.autograd.grad(reference_objective(net, params, eps, steps), list(params.values()))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
def test_second_order_matches_finite_differences(engine):
    net, eps = tiny_net(channels=2), random_episodes(batch=1)
    got = engine_grads(ENGINES[engine], net, eps, steps=2)
    assert_matches_finite_differences(got, net, lambda p: reference_objective(net, p, eps, 2))


@pytest.mark.parametrize("engine", ENGINES)
def test_first_order_equals_detached_and_differs_from_second_order(engine):
    net, eps = tiny_net(), random_episodes()
    first = engine_grads(ENGINES[engine], net, eps, steps=2, first_order=True)
    second = engine_grads(ENGINES[engine], net, eps, steps=2)
    # detached reference: dL_query/dphi evaluated at the (first-order) adapted phi
    params = {n: p.detach() for n, p in net.named_parameters()}
    want = [torch.zeros_like(p) for p in params.values()]
    for sx, sy, qx, qy in zip(*eps, strict=True):
        fast = {n: p.clone().requires_grad_() for n, p in params.items()}
        for _ in range(2):
            loss = F.cross_entropy(functional_call(net, fast, (sx,)), sy)
            grads = torch.autograd.grad(loss, list(fast.values()))
            fast = {
                n: (w - LR * g).detach().requires_grad_()
                for (n, w), g in zip(fast.items(), grads, strict=True)
            }
        q = F.cross_entropy(functional_call(net, fast, (qx,)), qy) / len(eps.support_x)
        for acc, g in zip(want, torch.autograd.grad(q, list(fast.values())), strict=True):
            acc += g
    for g, w in zip(first, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    gap = max((a - b).abs().max().item() for a, b in zip(first, second, strict=True))
    assert gap > 1e-4, "first-order gradients should differ from second-order ones"


@pytest.mark.parametrize("engine", ENGINES)
def test_head_only_adaptation_leaves_body_fixed_in_inner_loop(engine):
    """ANIL: adapting only the head equals MAML where the body's inner step size is 0."""
    net, eps = tiny_net(), random_episodes()
    head = [n for n, _ in net.named_parameters() if n.startswith("head.")]
    got = engine_grads(ENGINES[engine], net, eps, steps=2, adapt=head)
    loop = InnerLoop(
        2, lambda n, t: LR if n.startswith("head.") else 0.0, [n for n, _ in net.named_parameters()]
    )
    net.zero_grad()
    FuncEngine()(net, loop, eps).objective.backward()
    for g, p in zip(got, net.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("engine", [*ENGINES, "vmap"])
def test_first_order_rate_gradient_is_minus_g_dot_query_gradient(engine):
    # Learned per-layer, per-step rates a_t (MAML++'s LSLR) under first order, two steps:
    # phi_2 = theta - a_0 g_0 - a_1 g_1 with the g_t constant, so dL(phi_2)/da_t = -g_t . G,
    # G = dL/dphi_2. Computed here with plain autograd on detached copies.
    from metalearn.engines.vmap import VmapEngine

    net, eps = tiny_net(), random_episodes(batch=1)
    names = [n for n, _ in net.named_parameters()]
    rates = {n: torch.tensor([0.3, 0.2], dtype=torch.float64, requires_grad=True) for n in names}
    loop = InnerLoop(2, lambda n, t: rates[n][t], names, first_order=True)
    (VmapEngine() if engine == "vmap" else ENGINES[engine])(net, loop, eps).objective.backward()

    def grads_at(fast, x, y):
        fast = {n: w.detach().requires_grad_() for n, w in fast.items()}
        loss = F.cross_entropy(functional_call(net, fast, (x,)), y)
        return dict(zip(fast, torch.autograd.grad(loss, list(fast.values())), strict=True))

    sx, sy, qx, qy = (a[0] for a in eps)
    fast, support_grads = dict(net.named_parameters()), []
    for t in range(2):
        support_grads.append(grads_at(fast, sx, sy))
        fast = {n: (w - rates[n][t] * support_grads[t][n]).detach() for n, w in fast.items()}
    query_grad = grads_at(fast, qx, qy)
    for n in names:
        want = torch.stack([-(support_grads[t][n] * query_grad[n]).sum() for t in range(2)])
        torch.testing.assert_close(rates[n].grad, want, rtol=1e-9, atol=1e-12, msg=n)
