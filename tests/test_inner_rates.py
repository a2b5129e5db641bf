"""The contract of each kind of inner rates (algorithms/inner_rates.py): the rate of a
parameter at each inner step, what the outer optimizer owns, the state_dict keys that
checkpoints hold, and the factory's errors."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from metalearn.algorithms.gbml import GBML
from metalearn.algorithms.inner_rates import (
    FixedRate,
    HypergradientRate,
    PerLayerPerStepRates,
    PerParameterRates,
    make_inner_rates,
)
from metalearn.engines.higher import HigherEngine
from metalearn.errors import ConfigError
from tests.helpers import tiny_net

STEPS, LR = 3, 0.3


def built(kind: str, **kw):
    """The rates of ``kind`` and the ParameterDict they build for a tiny net's parameters."""
    rates = make_inner_rates(kind, LR, STEPS, **kw)
    shapes = dict(tiny_net().named_parameters())
    return rates, torch.nn.ParameterDict(rates.build(list(shapes), shapes)), shapes


def gbml(kind: str, optimizer=torch.optim.Adam) -> GBML:
    return GBML(
        partial(tiny_net), HigherEngine(), partial(optimizer, lr=0.01), inner_rates=kind,
        inner_lr=LR, inner_steps=STEPS, meta_batch_size=2,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "cls"),
    [
        ("fixed", FixedRate),
        ("metasgd", PerParameterRates),
        ("lslr", PerLayerPerStepRates),
        ("hypergradient", HypergradientRate),
    ],
)
def test_factory_makes_the_kind_the_config_names(kind, cls):
    rates = make_inner_rates(kind, LR, STEPS)
    assert type(rates) is cls and rates.name == kind
    assert gbml(kind).inner_rates == kind  # still readable as the config string


def test_lslr_switch_is_inner_rates_lslr():
    assert type(make_inner_rates("fixed", LR, STEPS, lslr=True)) is PerLayerPerStepRates
    assert type(make_inner_rates("lslr", LR, STEPS, lslr=True)) is PerLayerPerStepRates
    with pytest.raises(ConfigError, match="algo.lslr=true conflicts with algo.inner_rates=metasgd"):
        make_inner_rates("metasgd", LR, STEPS, lslr=True)


def test_factory_names_the_kinds_on_an_unknown_one():
    with pytest.raises(ConfigError, match=r"algo.inner_rates='sgd'; choose one of .*'lslr'"):
        make_inner_rates("sgd", LR, STEPS)


def test_fixed_rate_is_inner_lr_at_every_step_and_learns_nothing():
    rates, learned, shapes = built("fixed")
    assert len(learned) == 0 and rates.outer_excluded() == set()
    assert {rates.rate(learned, n, t) for n in shapes for t in range(STEPS + 2)} == {LR}


def test_metasgd_rate_is_one_per_element_the_same_at_every_step():
    rates, learned, shapes = built("metasgd")
    assert set(learned) == {n.replace(".", "__") for n in shapes}
    for name, param in shapes.items():
        rate = rates.rate(learned, name, 0)
        assert rate.shape == param.shape and torch.all(rate == LR)
        assert all(rates.rate(learned, name, t) is rate for t in range(STEPS + 2))
    assert rates.outer_excluded() == set()  # the outer optimizer learns them


def test_lslr_rate_is_per_tensor_and_step_the_last_one_past_the_trained_steps():
    rates, learned, shapes = built("lslr")
    name = "head.weight"
    with torch.no_grad():
        learned["head__weight"].copy_(torch.tensor([0.1, 0.2, 0.3]))
    assert all(r.shape == (STEPS,) for r in learned.values()) and len(learned) == len(shapes)
    got = [rates.rate(learned, name, t).item() for t in range(STEPS + 2)]
    assert got == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])  # a longer test-time loop
    assert rates.outer_excluded() == set()


def test_hypergradient_rate_is_one_alpha_that_the_outer_optimizer_does_not_own():
    rates, learned, shapes = built("hypergradient")
    assert set(learned) == {"alpha"} and learned["alpha"].item() == pytest.approx(LR)
    assert all(rates.rate(learned, n, t) is learned["alpha"] for n in shapes for t in range(3))
    module = gbml("hypergradient", torch.optim.SGD)
    owned = {id(p) for p in module.outer_parameters()}
    assert id(module.rates["alpha"]) not in owned
    assert owned == {id(p) for p in module.model.parameters()}


@pytest.mark.parametrize("kind", ["metasgd", "lslr"])
def test_the_outer_optimizer_owns_learned_per_parameter_rates(kind):
    module = gbml(kind)
    owned = {id(p) for p in module.outer_parameters()}
    assert {id(r) for r in module.rates.values()} <= owned


@pytest.mark.parametrize(
    ("kind", "keys"),
    [
        ("fixed", set()),
        ("metasgd", {"rates.head__weight", "rates.blocks__0__conv__weight"}),
        ("lslr", {"rates.head__weight", "rates.blocks__0__conv__weight"}),
        ("hypergradient", {"rates.alpha", "beta", "prev_grad"}),
    ],
)
def test_state_dict_keys_are_those_of_earlier_checkpoints(kind, keys):
    state = gbml(kind).state_dict()
    extra = {k for k in state if not k.startswith("model.")}
    assert keys <= extra and all(k.startswith("rates.") or k in keys for k in extra)
    if kind == "hypergradient":
        assert state["beta"].item() == -1.0  # not set yet: the outer lr at the first step
        assert state["prev_grad"].numel() == sum(v.numel() for v in tiny_net().parameters())


@pytest.mark.parametrize("kind", ["metasgd", "lslr", "hypergradient"])
def test_learned_rates_under_first_order_need_the_sgd_inner_optimizer(kind):
    rates = make_inner_rates(kind, LR, STEPS)
    rates.check(first_order=True, da=False, inner_optimizer="sgd", cosine=False)
    rates.check(first_order=False, da=False, inner_optimizer="adam", cosine=False)
    for first_order, da in ((True, False), (False, True)):
        with pytest.raises(ConfigError, match=f"inner_rates={kind}.*inner_optimizer=sgd"):
            rates.check(first_order=first_order, da=da, inner_optimizer="adam", cosine=False)


def test_fixed_rate_takes_any_inner_optimizer_and_outer_schedule():
    rates = make_inner_rates("fixed", LR, STEPS)
    rates.check(first_order=True, da=True, inner_optimizer="adam", cosine=True)
    rates.check_outer_optimizer(torch.optim.Adam([torch.zeros(1, requires_grad=True)]))


def test_hypergradient_needs_plain_sgd_outside_and_no_cosine():
    rates = make_inner_rates("hypergradient", LR, STEPS)
    with pytest.raises(ConfigError, match="set algo.cosine=false"):
        rates.check(first_order=False, da=False, inner_optimizer="sgd", cosine=True)
    w = [torch.zeros(1, requires_grad=True)]
    rates.check_outer_optimizer(torch.optim.SGD(w, lr=0.1))
    for opt in (torch.optim.Adam(w), torch.optim.SGD(w, lr=0.1, momentum=0.9)):
        with pytest.raises(ConfigError, match="torch.optim.SGD without momentum"):
            rates.check_outer_optimizer(opt)
