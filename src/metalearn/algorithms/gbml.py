"""Gradient-based meta-learning: MAML, FOMAML, Meta-SGD, Alpha-MAML, ANIL and MAML++.

One implementation; each variant is a set of switches (see ``conf/algo/*.yaml``):

* ``first_order``   FOMAML (Finn et al. 2017, sec. 5.2).
* ``inner_rates``   "fixed" scalar ``inner_lr`` (MAML); "metasgd": a learned rate per
  parameter element (Li et al. 2017); "lslr": learned per-layer, per-step rates (MAML++);
  "hypergradient": a scalar rate alpha learned online by hypergradient descent, plus the
  outer rate beta (Alpha-MAML, Behl et al. 2019). ``lslr: true`` is MAML++'s switch for
  ``inner_rates=lslr``. Each kind is a class in algorithms/inner_rates.py.
* ``adapt``         "all" parameters, or "head" only (ANIL, Raghu et al. 2020).
  ``adapt_norm: false`` keeps the BatchNorm scale/shift out of the inner loop (learned in the
  outer loop only), as MAML++'s reference configs do.
* MAML++ (Antoniou et al. 2019): ``msl`` multi-step loss, ``bn_per_step``, ``da``
  derivative-order annealing, ``cosine`` outer learning-rate annealing. The MSL and DA
  schedules span ``msl_fraction`` / ``da_fraction`` of the run (``trainer.max_steps``), so
  they scale with the run instead of silently falling outside a short one (the paper's
  10 and 50 of 150 epochs are fractions 0.067 and 0.333).

Episodes with another number of classes than the model's head (``data.episodes=range|
metadataset``): each episode gets its own head (``head_init``: ``prototypes`` as Proto-MAML,
Triantafillou et al. 2020, or ``zeros``; see algorithms/heads.py), in training and at test.

Learned rates under first order (``first_order``, or MAML++'s first-order phase under ``da``):
the support gradients are constants, and each rate still gets the gradient of the shift it
scales (-g_t . dL/dphi), as in the MAML++ reference code (see engines/base.py). That needs
the plain SGD inner optimizer (``inner_optimizer=sgd``).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from metalearn.algorithms import heads
from metalearn.algorithms.base import EpisodicModule, run_length
from metalearn.algorithms.inner_rates import make_inner_rates
from metalearn.data.episodes import Episodes
from metalearn.engines.base import InnerLoop, collect
from metalearn.errors import ConfigError
from metalearn.models.norm import StepNorm

ADAPT = ("all", "head")

log = logging.getLogger(__name__)


def msl_weights(steps: int, progress: float) -> np.ndarray:
    """MAML++ multi-step-loss importance at ``progress`` = step / (the MSL span in steps).

    The reference code's rule with its epoch / msl_epochs replaced by ``progress``: uniform at
    0; non-final weights decay linearly (floor 0.03/steps) while the final one grows; from
    progress 1 on, the final step only. Always sums to 1.
    """
    if progress >= 1 or steps == 1:
        return np.eye(steps)[-1]
    w = np.full(steps, 1.0 / steps)
    floor = 0.03 / steps
    w[:-1] = np.maximum(w[:-1] - progress / steps, floor)
    w[-1] = min(w[-1] + progress * (steps - 1) / steps, 1.0 - (steps - 1) * floor)
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


class HeadOnly(nn.Module):
    """The head of a model as a model of its own (parameter names kept: ``head.weight``...),
    for an inner loop on precomputed features."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        return self.head(x)


class GBML(EpisodicModule):
    """MAML and its family. Args are the ``algo`` config keys (see conf/algo/maml.yaml)."""

    uses_engine = True
    trained_head = True
    task_kinds = ("classification", "regression")

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
        msl_fraction: float = 10 / 150,
        bn_per_step: bool = False,
        da: bool = False,
        da_fraction: float = 50 / 150,
        cosine: bool = False,
        min_lr: float = 0.0,
        alpha_lr: float = 1e-4,
        beta_lr: float = 1e-6,
        lslr: bool = False,
        head_init: str = "auto",
    ):
        heads.check_head_init(head_init)
        rate_kind = make_inner_rates(inner_rates, inner_lr, inner_steps, lslr, alpha_lr, beta_lr)
        if adapt not in ADAPT:
            raise ConfigError(f"algo.adapt={adapt!r}; choose one of {ADAPT}")
        if inner_steps < 1 or inner_steps_test < 1:
            raise ConfigError("algo.inner_steps and algo.inner_steps_test must be >= 1")
        rate_kind.check(first_order, da, inner_optimizer, cosine)
        for key, value in (("msl_fraction", msl_fraction), ("da_fraction", da_fraction)):
            if not 0 <= value <= 1:
                raise ConfigError(
                    f"algo.{key}={value} is a fraction of the run (trainer.max_steps): use "
                    f"0..1 (the paper: msl_fraction={10 / 150:.4f}, da_fraction={50 / 150:.4f})"
                )
        self.inner_steps, self.bn_per_step = inner_steps, bn_per_step
        super().__init__(model, optimizer, name, meta_batch_size, cosine, min_lr)
        self.engine = engine
        self.inner_lr, self.inner_steps_test = inner_lr, inner_steps_test
        self.first_order, self.rate_kind, self.adapt_scope = first_order, rate_kind, adapt
        self.inner_optimizer = inner_optimizer
        self.msl, self.msl_fraction, self.da, self.da_fraction = msl, msl_fraction, da, da_fraction
        self.train_head_init = head_init  # the training episodes' head (algorithms/heads.py)
        if head_init in ("prototypes", "zeros"):
            self.model.head.requires_grad_(False)  # every episode builds its own: unused
        norm = norm_parameters(self.model) if not adapt_norm else set()
        self.adapted = [
            n
            for n, _ in self.model.named_parameters()
            if (adapt == "all" or n.startswith("head.")) and n not in norm
        ]
        shapes = dict(self.model.named_parameters())
        self.rates = nn.ParameterDict(rate_kind.build(self.adapted, shapes))
        engine.check(self.model, self.eval_loop())  # unsupported engine/model/optimizer: now
        for key, buffer in rate_kind.buffers(self.model).items():  # Alpha-MAML: beta, prev_grad
            self.register_buffer(key, buffer)

    # ---- construction ------------------------------------------------------------------
    def model_options(self) -> dict:
        return {"bn_steps": self.inner_steps} if self.bn_per_step else {}

    @property
    def inner_rates(self) -> str:
        """The kind of inner rates, as ``algo.inner_rates`` names it (``lslr: true``: "lslr")."""
        return self.rate_kind.name

    def inner_rate(self, name: str, step: int):
        return self.rate_kind.rate(self.rates, name, step)

    def outer_parameters(self):
        excluded = self.rate_kind.outer_excluded()
        if excluded:
            return [p for n, p in self.named_parameters() if n not in excluded]
        return self.parameters()

    # ---- the inner loop ------------------------------------------------------------------
    def span(self, fraction: float) -> int:
        """``fraction`` of the run in outer steps (resolved now: a resume with another
        ``trainer.max_steps`` rescales the schedules, as it does the cosine schedule)."""
        return round(fraction * run_length(self.trainer))

    def progress(self, step: int, fraction: float) -> float:
        """How far ``step`` is through the first ``fraction`` of the run: 0 at its start,
        >= 1 after it. A module without a Trainer (used on its own) is at the start."""
        if fraction == 0:
            return 1.0
        if self._trainer is None:
            return 0.0
        span = self.span(fraction)
        return step / span if span else 1.0

    def first_order_now(self, step: int) -> bool:
        """FOMAML always; MAML++ derivative-order annealing: first order for the first
        ``da_fraction`` of the run."""
        return self.first_order or (self.da and self.progress(step, self.da_fraction) < 1)

    def step_weights(self, step: int) -> np.ndarray | None:
        """MAML++ multi-step loss over the first ``msl_fraction`` of the run (None: off)."""
        if not self.msl:
            return None
        return msl_weights(self.inner_steps, self.progress(step, self.msl_fraction))

    def train_loop(self) -> InnerLoop:
        step = self.global_step
        return InnerLoop(
            self.inner_steps,
            self.inner_rate,
            self.adapted,
            self.first_order_now(step),
            self.step_weights(step),
            self.inner_optimizer,
            task=self.task,
        )

    def eval_loop(self) -> InnerLoop:
        return InnerLoop(
            self.inner_steps_test,
            self.inner_rate,
            self.adapted,
            first_order=True,
            optimizer=self.inner_optimizer,
            meta=False,
            task=self.task,
        )

    def head_kind(self, episodes) -> str:
        """How the episodes' heads start: ``trained`` (the model's head), ``prototypes`` or
        ``zeros`` (built per episode); see algorithms/heads.py."""
        init = self.head_init if self.head_init != "auto" else self.train_head_init
        outputs = [self.task.outputs(sy) for sy in episodes[1]]  # classes, or targets' width
        return heads.resolved(init, self.model, outputs, self.train_head_init)

    def training_step(self, episodes, batch_idx):
        kind = self.head_kind(episodes)
        log_pre = self.logging_step() and kind == "trained"  # per-episode heads: no "before"
        before = self.query_metric_before(episodes) if log_pre else None
        out = self.run_engine(self.model, self.train_loop(), episodes, kind)
        self.outer_step(out.objective)
        self.log_train(loss=out.loss.mean(), metric=out.metric.mean(), metric_pre=before)
        rate_logs = self.rate_kind.logs(self)
        if rate_logs:
            self.log_train(**rate_logs)

    def query_logits(self, episodes) -> torch.Tensor:
        kind = self.head_kind(episodes)
        return self.run_engine(self.model, self.eval_loop(), episodes, kind).logits

    # ---- ANIL: the body's features once per task ----------------------------------------
    def run_engine(self, model: nn.Module, loop: InnerLoop, episodes, head: str = "trained"):
        """The engine's inner loop on ``episodes``, starting from the model's head
        (``head="trained"``) or one built per episode (``prototypes`` / ``zeros``). When only
        the head adapts (ANIL), on the body's features, computed once per task instead of at
        every inner step (the same meta-gradients: tests/test_algorithms.py), which saves ANIL
        most of its time and of its memory for the backward."""
        episodes = Episodes(*episodes)
        ways, ragged = episodes.ways(), episodes.ragged
        dim = model.head.in_features
        if not self.features_once(model, loop):
            initial = None
            if head != "trained":
                with torch.set_grad_enabled(loop.meta and torch.is_grad_enabled()):
                    fs = [model.features(x) if head == "prototypes" else x for x in episodes[0]]
                initial = heads.initial_heads(fs, episodes.support_y, ways, head, dim, loop.meta)
            return self.engine(model, loop, episodes, initial)
        sx, sy, qx, qy = episodes
        fs = collect([model.features(x) for x in sx], ragged)
        fq = collect([model.features(x) for x in qx], ragged)
        initial = None
        if head != "trained":
            initial = heads.initial_heads(fs, sy, ways, head, dim, loop.meta)
        return self.engine(HeadOnly(model.head), loop, Episodes(fs, sy, fq, qy), initial)

    def features_once(self, model: nn.Module, loop: InnerLoop) -> bool:
        """Whether the body's features can be computed once per task: the head alone adapts,
        the body normalises the same way at every step (no per-step BatchNorm, no running
        statistics updated per forward), and the engine's meta-gradient needs nothing from the
        body's own passes (higher's first-order surrogate does: it keeps the full loop)."""
        if self.adapt_scope != "head" or self.bn_per_step:
            return False
        if loop.meta and loop.first_order and getattr(self.engine, "name", "") == "higher":
            return False
        return not any(
            getattr(m, "mode", None) == "inductive" and m.training for m in model.modules()
        )

    # ---- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        if self.msl or self.da:  # resolved before training: a run without an end fails here
            log.info(
                "MAML++ schedules over %d steps: multi-step loss for the first %s, first order"
                " for the first %s",
                run_length(self.trainer),
                self.span(self.msl_fraction) if self.msl else "(off)",
                self.span(self.da_fraction) if self.da else "(off)",
            )
        opt = super().configure_optimizers()
        self.rate_kind.check_outer_optimizer(opt)  # Alpha-MAML: plain SGD only
        return opt

    def before_outer_step(self) -> None:
        self.rate_kind.before_outer_step(self)  # Alpha-MAML: hypergradient steps on alpha, beta
