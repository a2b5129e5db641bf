"""The whole meta-step as one compiled graph: ``engine=vmap engine.compile=default``.

What is compiled (``torch.compile``, static shapes): the vmapped inner loops of a meta-batch,
the query losses and the meta-gradient, all inside one function,
``torch.func.grad_and_value(meta-objective)``, so that inductor sees forward, inner
gradients and second-order backward at once (no autograd tape between Python ops). The
engine interface stays: ``Adapted.objective`` is the output of an ``autograd.Function``
whose backward hands the precomputed meta-gradients to the model's parameters and to the
learned inner rates (``grad_output * g``), so the caller's ``backward`` is unchanged.

What becomes a graph input (so that values changing during training do not recompile): the
model's parameters, every inner rate ``loop.lr(name, step)`` (learned or fixed; floats become
0-dim tensors) and the step weights (MAML++'s annealed multi-step loss). What is baked into a
graph (a new graph when it changes): the model, the episode shapes and dtype, the inner steps,
the adapted names, first/second order, which step weights are non-zero, the vmap chunk size.
One graph per such key, at most ``max_graphs``; then (and for any key that fails to compile)
the engine runs eagerly, with a logged warning, and gives the same meta-gradients
(tests/test_compile.py).

Not compiled (eager vmap, same results): evaluation (``loop.meta=False`` or grad disabled),
ragged meta-batches (one graph per shape would recompile nearly every step) and heads built
per episode (Proto-MAML).

``mode="reduce-overhead"`` (CUDA only) also captures the graph as a CUDA graph; its outputs
are cloned, since a replay overwrites them. Untested on a GPU so far (bench/gpu_session.sh
measures it); on CPU the mode compiles as ``default``.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from torch import nn

from metalearn.engines.base import Adapted, InnerLoop, step_forward
from metalearn.engines.func import adapt_task
from metalearn.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(value) -> str | None:
    """``engine.compile`` as a torch.compile mode, or None for eager."""
    if value in (False, None, "false", "none"):
        return None
    if value is True or value == "true":
        return "default"
    if value not in MODES:
        raise ConfigError(f"engine.compile={value!r}; choose false or one of {MODES}")
    return value


class _MetaStep(torch.autograd.Function):
    """Objective, per-task loss/metric/logits from a compiled ``run``; the backward returns the
    meta-gradients ``run`` computed with them."""

    @staticmethod
    def forward(ctx, run, *inputs):  # run's gradients are those of the first inputs
        grads, (objective, losses, metrics, logits) = run(*inputs)
        ctx.n_inputs = len(inputs)
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(losses, metrics, logits)
        return objective, losses, metrics, logits

    @staticmethod
    def backward(ctx, g_objective, *_):
        grads = [g_objective * g for g in ctx.saved_tensors]
        return (None, *grads, *[None] * (ctx.n_inputs - len(grads)))


def _meta_step_fn(model, loop: InnerLoop, names, rate_keys, randomness, chunk_size, cudagraph):
    """A pure function of (parameters, rates, step weights, episodes) -> (meta-gradients of the
    parameters and rates, (objective, per-task losses, metrics, logits))."""
    forward = step_forward(model)
    k, r = len(names), len(rate_keys)

    def grad(f, sub):
        if loop.first_order:  # constant shifts (as in engines/vmap.py)
            with torch.no_grad():
                return torch.func.grad(f)(sub)
        return torch.func.grad(f)(sub)

    def objective(params, rates, weights, sx, sy, qx, qy):
        inner = dataclasses.replace(loop, lr=lambda n, t: rates[f"{t}:{n}"])

        def task(sx, sy, qx, qy):
            return adapt_task(forward, params, inner, sx, sy, qx, qy, grad, weight_values=weights)

        run = torch.func.vmap(task, randomness=randomness, chunk_size=chunk_size)
        losses, metrics, logits = run(sx, sy, qx, qy)
        return losses.mean(), (losses, metrics, logits)

    def meta_step(*inputs):
        params = dict(zip(names, inputs[:k], strict=True))
        rates = dict(zip(rate_keys, inputs[k : k + r], strict=True))
        weights, episodes = inputs[k + r], inputs[k + r + 1 :]
        (gp, gr), (obj, (losses, metrics, logits)) = torch.func.grad_and_value(
            objective, argnums=(0, 1), has_aux=True
        )(params, rates, list(weights.unbind()), *episodes)
        grads = [*(gp[n] for n in names), *(gr[key] for key in rate_keys)]
        out = grads, (obj, losses, metrics, logits.detach())
        if cudagraph:  # a CUDA-graph replay overwrites its outputs: keep copies
            out = torch.utils._pytree.tree_map(lambda t: t.clone(), out)
        return out

    return meta_step


class CompiledMetaStep:
    """Per-key cache of compiled meta-steps (see the module doc for what a key is)."""

    def __init__(
        self,
        mode: str = "default",
        max_graphs: int = 8,
        fullgraph: bool = True,
        backend: str = "inductor",
    ):
        self.mode, self.max_graphs, self.fullgraph = compile_mode(mode), max_graphs, fullgraph
        self.backend = backend
        if self.mode is None:
            raise ConfigError("CompiledMetaStep needs a torch.compile mode, not false")
        self.graphs: dict = {}  # key -> compiled function, or None: runs eagerly
        self.compile_seconds: dict = {}  # key -> seconds its first (compiling) call took
        # dynamo's own per-function limit must not fall back silently before ours does
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, max_graphs)

    def applies(self, loop: InnerLoop, episodes, heads) -> bool:
        return loop.meta and torch.is_grad_enabled() and heads is None and not episodes.ragged

    def __call__(
        self, model: nn.Module, loop: InnerLoop, episodes, randomness, chunk_size
    ) -> Adapted | None:
        """The compiled meta-step on ``episodes``; None where it runs eagerly instead."""
        names = [n for n, _ in model.named_parameters()]
        params = [p for _, p in model.named_parameters()]
        dtype, device = params[0].dtype, params[0].device
        rate_keys, rates = [], []
        for t in range(loop.steps):
            for n in loop.adapt:
                rate = loop.lr(n, t)
                rate_keys.append(f"{t}:{n}")
                rates.append(rate if torch.is_tensor(rate) else torch.tensor(rate, dtype=dtype))
        weights = loop.weights()
        key = (
            id(model),
            model.training,
            tuple(names),
            tuple(loop.adapt),
            loop.steps,
            loop.first_order,
            tuple(bool(w) for w in weights),
            loop.task,
            tuple(tuple(r.shape) for r in rates),
            tuple((tuple(x.shape), x.dtype) for x in episodes),
            dtype,
            str(device),
            randomness,
            chunk_size,
        )
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                log.warning(
                    "engine.compile: %d graphs compiled already (engine.max_graphs); this "
                    "meta-batch (episode shapes %s) runs eagerly",
                    len(self.graphs),
                    [tuple(x.shape) for x in episodes],
                )
                self.graphs[key] = None
            else:
                fn = _meta_step_fn(
                    model,
                    loop,
                    names,
                    rate_keys,
                    randomness,
                    chunk_size,
                    self.mode == "reduce-overhead" and device.type == "cuda",
                )
                # torch.compile takes a mode only with inductor
                how = {"mode": self.mode} if self.backend == "inductor" else {}
                self.graphs[key] = torch.compile(
                    fn, backend=self.backend, dynamic=False, fullgraph=self.fullgraph, **how
                )
                return self._first_call(key, params, rates, weights, episodes, device)
        if self.graphs[key] is None:
            return None
        return self._run(self.graphs[key], params, rates, weights, episodes, device)

    def _first_call(self, key, params, rates, weights, episodes, device) -> Adapted | None:
        start = time.perf_counter()
        try:
            out = self._run(self.graphs[key], params, rates, weights, episodes, device)
        except Exception as err:  # noqa: BLE001 - any compiler failure: run eagerly instead
            log.warning(
                "engine.compile: this meta-step does not compile (%s: %s); running it "
                "eagerly (same results, uncompiled speed)",
                type(err).__name__,
                str(err).strip().splitlines()[0] if str(err).strip() else "",
            )
            self.graphs[key] = None
            return None
        self.compile_seconds[key] = time.perf_counter() - start
        log.info(
            "engine.compile: graph %d compiled in %.1f s (mode %s; episode shapes %s; "
            "%d inner steps, %s order)",
            len(self.graphs),
            self.compile_seconds[key],
            self.mode,
            [tuple(x.shape) for x in episodes],
            key[4],
            "first" if key[5] else "second",
        )
        return out

    def _run(self, fn, params, rates, weights, episodes, device) -> Adapted:
        if self.mode == "reduce-overhead" and device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        values = torch.tensor(weights, dtype=params[0].dtype, device=device)
        inputs = [*params, *(r.to(device) for r in rates), values, *episodes]
        objective, losses, metrics, logits = _MetaStep.apply(
            lambda *xs: fn(*(x.detach() for x in xs)), *inputs
        )
        return Adapted(objective, losses, metrics, logits)
