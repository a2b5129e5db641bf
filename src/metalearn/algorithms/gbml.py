"""Gradient-based meta-learning: MAML, FOMAML, Meta-SGD, Alpha-MAML, ANIL and MAML++.

One implementation; each variant is a set of switches (see ``conf/algo/*.yaml``):

* ``first_order``   FOMAML (Finn et al. 2017, sec. 5.2).
* ``inner_rates``   "fixed" scalar ``inner_lr`` (MAML); "metasgd": a learned rate per
  parameter element (Li et al. 2017); "lslr": learned per-layer, per-step rates (MAML++);
  "hypergradient": a scalar rate alpha learned online by hypergradient descent, plus the
  outer rate beta (Alpha-MAML, Behl et al. 2019). ``lslr: true`` is MAML++'s switch for
  ``inner_rates=lslr``.
* ``adapt``         "all" parameters, or "head" only (ANIL, Raghu et al. 2020).
  ``adapt_norm: false`` keeps the BatchNorm scale/shift out of the inner loop (learned in the
  outer loop only), as MAML++'s reference configs do.
* MAML++ (Antoniou et al. 2019): ``msl`` multi-step loss, ``bn_per_step``, ``da``
  derivative-order annealing, ``cosine`` outer learning-rate annealing.

Learned rates under first order (``first_order``, or MAML++'s first-order phase under ``da``):
the support gradients are constants, and each rate still gets the gradient of the shift it
scales (-g_t . dL/dphi), as in the MAML++ reference code (see engines/base.py). That needs
the plain SGD inner optimizer (``inner_optimizer=sgd``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from metalearn.algorithms import heads
from metalearn.algorithms.base import EpisodicModule
from metalearn.data.episodes import Episodes
from metalearn.engines.base import InnerLoop
from metalearn.errors import ConfigError
from metalearn.models.norm import StepNorm

INNER_RATES = ("fixed", "metasgd", "lslr", "hypergradient")
ADAPT = ("all", "head")


def msl_weights(steps: int, epoch: int, msl_epochs: int) -> np.ndarray:
    """MAML++ multi-step-loss importance, as in the reference code.

    Uniform at epoch 0; non-final weights decay linearly (floor 0.03/steps) while the final
    one grows; from ``msl_epochs`` on, the final step only. Always sums to 1.
    """
    if epoch >= msl_epochs or steps == 1:
        return np.eye(steps)[-1]
    w = np.full(steps, 1.0 / steps)
    decay = 1.0 / steps / msl_epochs
    floor = 0.03 / steps
    w[:-1] = np.maximum(w[:-1] - epoch * decay, floor)
    w[-1] = min(w[-1] + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return w


def norm_parameters(model: nn.Module) -> set[str]:
    """Names of the normalisation layers' parameters (Conv4's StepNorm scale/shift, affine
    BatchNorm weight/bias)."""
    kinds = (StepNorm, nn.modules.batchnorm._BatchNorm)
    return {
        f"{name}.{p}" if name else p
        for name, module in model.named_modules()
        if isinstance(module, kinds)
        for p, _ in module.named_parameters(recurse=False)
    }


def plain_sgd(opt: torch.optim.Optimizer) -> bool:
    return type(opt) is torch.optim.SGD and all(
        not g["momentum"] and not g["weight_decay"] for g in opt.param_groups
    )


class GBML(EpisodicModule):
    """MAML and its family. Args are the ``algo`` config keys (see conf/algo/maml.yaml)."""

    uses_engine = True
    trained_head = True

    def __init__(
        self,
        model,
        engine,
        optimizer,
        name: str = "maml",
        meta_batch_size: int = 32,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        inner_steps_test: int = 3,
        first_order: bool = False,
        inner_rates: str = "fixed",
        adapt: str = "all",
        adapt_norm: bool = True,
        inner_optimizer: str = "sgd",
        msl: bool = False,
        msl_epochs: int = 10,
        bn_per_step: bool = False,
        da: bool = False,
        da_epochs: int = 50,
        cosine: bool = False,
        min_lr: float = 0.0,
        alpha_lr: float = 1e-4,
        beta_lr: float = 1e-6,
        lslr: bool = False,
    ):
        if lslr and inner_rates not in ("fixed", "lslr"):
            raise ConfigError(f"algo.lslr=true conflicts with algo.inner_rates={inner_rates}")
        inner_rates = "lslr" if lslr else inner_rates
        if inner_rates not in INNER_RATES:
            raise ConfigError(f"algo.inner_rates={inner_rates!r}; choose one of {INNER_RATES}")
        if adapt not in ADAPT:
            raise ConfigError(f"algo.adapt={adapt!r}; choose one of {ADAPT}")
        if inner_steps < 1 or inner_steps_test < 1:
            raise ConfigError("algo.inner_steps and algo.inner_steps_test must be >= 1")
        if (first_order or da) and inner_rates != "fixed" and inner_optimizer != "sgd":
            raise ConfigError(
                f"algo.inner_rates={inner_rates} learns inner rates, which get first-order "
                f"meta-gradients (algo.first_order / algo.da) with algo.inner_optimizer=sgd only, "
                f"not {inner_optimizer}: set algo.inner_optimizer=sgd or algo.inner_rates=fixed"
            )
        if inner_rates == "hypergradient" and cosine:
            raise ConfigError(
                "algo.inner_rates=hypergradient sets the outer rate beta itself; "
                "set algo.cosine=false"
            )
        self.inner_steps, self.bn_per_step = inner_steps, bn_per_step
        super().__init__(model, optimizer, name, meta_batch_size, cosine, min_lr)
        self.engine = engine
        self.inner_lr, self.inner_steps_test = inner_lr, inner_steps_test
        self.first_order, self.inner_rates, self.adapt_scope = first_order, inner_rates, adapt
        self.inner_optimizer = inner_optimizer
        self.msl, self.msl_epochs, self.da, self.da_epochs = msl, msl_epochs, da, da_epochs
        self.alpha_lr, self.beta_lr = alpha_lr, beta_lr
        norm = norm_parameters(self.model) if not adapt_norm else set()
        self.adapted = [
            n
            for n, _ in self.model.named_parameters()
            if (adapt == "all" or n.startswith("head.")) and n not in norm
        ]
        self.rates = nn.ParameterDict(self._init_rates())
        engine.check(self.model, self.eval_loop())  # unsupported engine/model/optimizer: now
        if inner_rates == "hypergradient":  # outer rate beta and the last meta-gradient
            n_params = sum(p.numel() for p in self.model.parameters())
            dtype = next(self.model.parameters()).dtype
            # beta < 0: not set yet, take the optimizer's lr at the first step
            self.register_buffer("beta", torch.tensor(-1.0, dtype=dtype))
            self.register_buffer("prev_grad", torch.zeros(n_params, dtype=dtype))

    # ---- construction ------------------------------------------------------------------
    def model_options(self) -> dict:
        return {"bn_steps": self.inner_steps} if self.bn_per_step else {}

    def _init_rates(self) -> dict:
        shapes = dict(self.model.named_parameters())
        key = self.rate_key
        if self.inner_rates == "metasgd":
            return {
                key(n): nn.Parameter(torch.full_like(shapes[n], self.inner_lr))
                for n in self.adapted
            }
        if self.inner_rates == "lslr":
            return {
                key(n): nn.Parameter(torch.full((self.inner_steps,), self.inner_lr))
                for n in self.adapted
            }
        if self.inner_rates == "hypergradient":
            return {"alpha": nn.Parameter(torch.tensor(float(self.inner_lr)))}
        return {}

    @staticmethod
    def rate_key(name: str) -> str:
        return name.replace(".", "__")

    def inner_rate(self, name: str, step: int):
        if self.inner_rates == "fixed":
            return self.inner_lr
        if self.inner_rates == "hypergradient":
            return self.rates["alpha"]
        rate = self.rates[self.rate_key(name)]
        return rate[min(step, self.inner_steps - 1)] if self.inner_rates == "lslr" else rate

    def outer_parameters(self):
        if self.inner_rates == "hypergradient":  # alpha follows its hypergradient, not Adam
            return [p for n, p in self.named_parameters() if n != "rates.alpha"]
        return self.parameters()

    # ---- the inner loop ------------------------------------------------------------------
    def first_order_now(self, epoch: int) -> bool:
        """FOMAML always; MAML++ derivative-order annealing: first order before da_epochs."""
        return self.first_order or (self.da and epoch < self.da_epochs)

    def train_loop(self) -> InnerLoop:
        epoch = self.current_epoch
        weights = msl_weights(self.inner_steps, epoch, self.msl_epochs) if self.msl else None
        return InnerLoop(
            self.inner_steps,
            self.inner_rate,
            self.adapted,
            self.first_order_now(epoch),
            weights,
            self.inner_optimizer,
        )

    def eval_loop(self) -> InnerLoop:
        return InnerLoop(
            self.inner_steps_test,
            self.inner_rate,
            self.adapted,
            first_order=True,
            optimizer=self.inner_optimizer,
            meta=False,
        )

    def training_step(self, episodes, batch_idx):
        acc_pre = self.query_acc_before(episodes) if self.logging_step() else None
        out = self.engine(self.model, self.train_loop(), episodes)
        self.outer_step(out.objective)
        self.log_train(loss=out.loss.mean(), acc=out.acc.mean(), acc_pre=acc_pre)
        if self.inner_rates == "hypergradient":
            self.log_train(alpha=self.rates["alpha"].detach(), beta=self.beta)

    def query_logits(self, episodes) -> torch.Tensor:
        ways = int(episodes.support_y[0].max()) + 1
        init = heads.resolved(self.head_init, self.model, ways)
        if init == "trained":
            return self.engine(self.model, self.eval_loop(), episodes).logits
        logits = []
        for episode in zip(*episodes, strict=True):
            sx, sy = episode[:2]
            model = heads.with_head(self.model, sx, sy, ways, init)
            loop = replace(self.eval_loop(), lr=self.rate_for(model))
            single = Episodes(*(t.unsqueeze(0) for t in episode))
            logits.append(self.engine(model, loop, single).logits[0])
        return torch.stack(logits)

    def rate_for(self, model: nn.Module):
        """``inner_rate`` for ``model``, whose head may have another number of classes: a
        head's per-element learned rates (Meta-SGD) become their mean over the trained classes
        (the classes' labels were permuted in training, so no row is special)."""
        shapes = {n: p.shape for n, p in model.named_parameters()}

        def rate(name: str, step: int):
            r = self.inner_rate(name, step)
            if torch.is_tensor(r) and r.dim() and r.shape != shapes[name]:
                return r.mean(0, keepdim=True)
            return r

        return rate

    # ---- Alpha-MAML: hypergradient descent on alpha and beta -----------------------------
    def configure_optimizers(self):
        opt = super().configure_optimizers()
        if self.inner_rates == "hypergradient" and not plain_sgd(opt):
            raise ConfigError(
                "algo.inner_rates=hypergradient adapts beta as plain SGD's rate (Alpha-MAML): "
                "set algo.optimizer._target_=torch.optim.SGD without momentum or weight decay"
            )
        return opt

    def before_outer_step(self) -> None:
        if self.inner_rates != "hypergradient":
            return
        opt = self.optimizers().optimizer
        if self.beta < 0:
            self.beta.fill_(opt.param_groups[0]["lr"])
        alpha = self.rates["alpha"]
        with torch.no_grad():
            if alpha.grad is not None:  # d(query loss)/d(alpha), from the same backward
                alpha -= self.alpha_lr * alpha.grad
                alpha.grad = None
            grad = torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                    for p in self.model.parameters()
                ]
            )
            # d(loss_t)/d(beta) = -g_t . g_{t-1}; zero on the first step
            self.beta += self.beta_lr * torch.dot(grad, self.prev_grad)
            self.prev_grad.copy_(grad)
        for group in opt.param_groups:
            group["lr"] = float(self.beta)
