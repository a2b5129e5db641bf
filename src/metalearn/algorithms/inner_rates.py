"""The inner-loop learning rates of the MAML family, one small class per kind.

``algo.inner_rates`` picks one (``make_inner_rates``); GBML asks it, through ``InnerRates``:

* ``build``: the learned rates, GBML's ``rates`` ParameterDict (state_dict ``rates.<key>``);
* ``buffers``: state the kind keeps on GBML itself (state_dict ``<name>``);
* ``rate``: the rate of parameter ``name`` at inner step ``step``;
* ``outer_excluded``: learned rates that the outer optimizer must not own;
* ``logs``: what to log after a training step;
* ``before_outer_step``: its own update, with the meta-gradients in ``.grad``;
* ``check`` / ``check_outer_optimizer``: the settings that conflict with the kind.

The objects hold no tensors: the rates and buffers live on GBML, under the state_dict keys
earlier checkpoints have, so that those load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from metalearn.errors import ConfigError

INNER_RATES = ("fixed", "metasgd", "lslr", "hypergradient")


def rate_key(name: str) -> str:
    """A parameter's name as a ParameterDict key (no dots): ``head.weight`` -> ``head__weight``."""
    return name.replace(".", "__")


def plain_sgd(opt: torch.optim.Optimizer) -> bool:
    return type(opt) is torch.optim.SGD and all(
        not g["momentum"] and not g["weight_decay"] for g in opt.param_groups
    )


class InnerRates:
    """What GBML needs from a kind of inner rates; the defaults are a fixed rate's."""

    name = "fixed"
    learned = False  # the outer loop learns the rates (meta-gradients reach them)

    def __init__(self, inner_lr: float, inner_steps: int):
        self.inner_lr, self.inner_steps = inner_lr, inner_steps

    def check(self, first_order: bool, da: bool, inner_optimizer: str, cosine: bool) -> None:
        # first-order meta-gradients of learned rates (-g_t . dL/dphi) assume plain SGD steps
        if self.learned and (first_order or da) and inner_optimizer != "sgd":
            raise ConfigError(
                f"algo.inner_rates={self.name} learns inner rates, which get first-order "
                f"meta-gradients (algo.first_order / algo.da) with algo.inner_optimizer=sgd only, "
                f"not {inner_optimizer}: set algo.inner_optimizer=sgd or algo.inner_rates=fixed"
            )

    def check_outer_optimizer(self, opt: torch.optim.Optimizer) -> None:
        """Called with the outer optimizer once it is built."""

    def build(self, adapted: list[str], shapes: dict[str, torch.Tensor]) -> dict:
        """The learned rates of the ``adapted`` parameters (``shapes``: the model's)."""
        return {}

    def buffers(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {}

    def rate(self, rates: nn.ParameterDict, name: str, step: int):
        return self.inner_lr

    def outer_excluded(self) -> set[str]:
        """Names in GBML's ``named_parameters()`` left out of the outer optimizer."""
        return set()

    def logs(self, module) -> dict:
        return {}

    def before_outer_step(self, module) -> None:
        """Called with the meta-gradients in ``.grad``, before the outer optimizer steps."""


class FixedRate(InnerRates):
    """One scalar rate ``inner_lr`` for every parameter and step (MAML, Finn et al. 2017)."""


class PerParameterRates(InnerRates):
    """A learned rate per parameter element (Meta-SGD, Li et al. 2017)."""

    name = "metasgd"
    learned = True

    def build(self, adapted, shapes):
        return {
            rate_key(n): nn.Parameter(torch.full_like(shapes[n], self.inner_lr)) for n in adapted
        }

    def rate(self, rates, name, step):
        return rates[rate_key(name)]


class PerLayerPerStepRates(InnerRates):
    """A learned rate per parameter tensor and inner step (LSLR, MAML++, Antoniou et al. 2019)."""

    name = "lslr"
    learned = True

    def build(self, adapted, shapes):
        return {
            rate_key(n): nn.Parameter(torch.full((self.inner_steps,), self.inner_lr))
            for n in adapted
        }

    def rate(self, rates, name, step):
        # steps past the trained ones (a longer test-time loop) keep the last step's rate
        return rates[rate_key(name)][min(step, self.inner_steps - 1)]


class HypergradientRate(InnerRates):
    """One scalar rate alpha and the outer rate beta, both learned online by hypergradient
    descent (Alpha-MAML, Behl et al. 2019)."""

    name = "hypergradient"
    learned = True

    def __init__(self, inner_lr: float, inner_steps: int, alpha_lr: float, beta_lr: float):
        super().__init__(inner_lr, inner_steps)
        self.alpha_lr, self.beta_lr = alpha_lr, beta_lr

    def check(self, first_order, da, inner_optimizer, cosine):
        super().check(first_order, da, inner_optimizer, cosine)
        if cosine:
            raise ConfigError(
                "algo.inner_rates=hypergradient sets the outer rate beta itself; "
                "set algo.cosine=false"
            )

    def check_outer_optimizer(self, opt):
        if not plain_sgd(opt):
            raise ConfigError(
                "algo.inner_rates=hypergradient adapts beta as plain SGD's rate (Alpha-MAML): "
                "set algo.optimizer._target_=torch.optim.SGD without momentum or weight decay"
            )

    def build(self, adapted, shapes):
        return {"alpha": nn.Parameter(torch.tensor(float(self.inner_lr)))}

    def buffers(self, model):
        n_params = sum(p.numel() for p in model.parameters())
        dtype = next(model.parameters()).dtype
        # beta < 0: not set yet, take the optimizer's lr at the first step
        return {
            "beta": torch.tensor(-1.0, dtype=dtype),
            "prev_grad": torch.zeros(n_params, dtype=dtype),  # the last meta-gradient
        }

    def rate(self, rates, name, step):
        return rates["alpha"]

    def outer_excluded(self):
        return {"rates.alpha"}  # alpha follows its hypergradient, not the outer optimizer

    def logs(self, module):
        return {"alpha": module.rates["alpha"].detach(), "beta": module.beta}

    def before_outer_step(self, module):
        opt = module.optimizers().optimizer
        if module.beta < 0:
            module.beta.fill_(opt.param_groups[0]["lr"])
        alpha = module.rates["alpha"]
        with torch.no_grad():
            if alpha.grad is not None:  # d(query loss)/d(alpha), from the same backward
                alpha -= self.alpha_lr * alpha.grad
                alpha.grad = None
            grad = torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                    for p in module.model.parameters()
                ]
            )
            # d(loss_t)/d(beta) = -g_t . g_{t-1}; zero on the first step
            module.beta += self.beta_lr * torch.dot(grad, module.prev_grad)
            module.prev_grad.copy_(grad)
        for group in opt.param_groups:
            group["lr"] = float(module.beta)


def make_inner_rates(
    kind: str,
    inner_lr: float,
    inner_steps: int,
    lslr: bool = False,
    alpha_lr: float = 1e-4,
    beta_lr: float = 1e-6,
) -> InnerRates:
    """The rates ``algo.inner_rates=kind`` names; ``lslr=True`` is MAML++'s switch for
    ``kind="lslr"``."""
    if lslr and kind not in ("fixed", "lslr"):
        raise ConfigError(f"algo.lslr=true conflicts with algo.inner_rates={kind}")
    kind = "lslr" if lslr else kind
    if kind not in INNER_RATES:
        raise ConfigError(f"algo.inner_rates={kind!r}; choose one of {INNER_RATES}")
    if kind == "hypergradient":
        return HypergradientRate(inner_lr, inner_steps, alpha_lr, beta_lr)
    kinds = {"fixed": FixedRate, "metasgd": PerParameterRates, "lslr": PerLayerPerStepRates}
    return kinds[kind](inner_lr, inner_steps)
