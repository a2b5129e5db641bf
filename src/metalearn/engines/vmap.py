"""torch.func vmap engine: the per-task function of ``engines/func.py`` vmapped over tasks.

``adapt_task`` (the same function the loop engine runs) is vmapped over the meta-batch with
``torch.func.vmap``; its inner gradients come from ``torch.func.grad``, which composes with
ordinary autograd, so one ``backward`` of ``Adapted.objective`` (by the caller, e.g. Lightning's
``manual_backward``) gives the same meta-gradients as the loop (tests/test_engines.py).

What vmap cannot do, and what is refused with a ConfigError naming the fix:

* running-statistic updates (BatchNorm in training mode with running buffers, e.g.
  ``model.bn_mode=inductive``): in-place writes into an unbatched buffer fail under vmap;
* BatchNorm with its own affine weight/bias (``nn.BatchNorm2d(affine=True)``): its
  meta-gradients come out silently wrong under vmap (functorch issue 534), so such models are
  refused; Conv4's affine-free BatchNorm + explicit scale/shift is exact;
* dropout / DropBlock (``model.drop_rate > 0``) with ``engine.randomness=error``;
* inner optimizers other than plain SGD (momentum/adam need the higher engine).

First order: the inner gradients are taken under ``torch.no_grad`` (``torch.func.grad``
ignores an outer ``no_grad`` for its own differentiation), so no outer graph is recorded
through the support-set passes; the query pass still reaches theta through the constant
shifts, which is the first-order meta-gradient.

Episodes of different shapes (a ragged meta-batch, ``data.episodes=range|metadataset``) are
grouped by shape (``stacked_groups``) and each group is vmapped on its own. Padding to one shape
would not be exact: transductive BatchNorm would take its statistics over the padding too
(a masked normalisation the backbones do not have). Grouping is exact, and costs what the
per-task loop costs when no two episodes share a shape (Meta-Dataset's sampler):
bench/RESULTS.md measures it.

On CPU, glibc handing freed memory back to the OS makes vmap slow (large, short-lived
batched buffers go through mmap/munmap each step); ``tune_malloc()`` keeps them in the heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch
from torch import nn

from metalearn.data.episodes import Episodes, stacked_groups
from metalearn.engines.base import Adapted, InnerLoop, collect, step_forward
from metalearn.engines.compiled import CompiledMetaStep, compile_mode
from metalearn.engines.func import adapt_task, check_sgd
from metalearn.errors import ConfigError

RANDOMNESS = ("error", "different", "same")

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def tune_malloc() -> bool:
    """Keep freed memory in the process (glibc): no mmap'd chunks, no trimming.

    The same as starting the process with ``MALLOC_MMAP_MAX_=0`` and a huge
    ``MALLOC_TRIM_THRESHOLD_``, but at run time through ``mallopt``. Returns False where
    there is no glibc. The process then keeps its peak heap (RSS does not shrink).
    """
    name = ctypes.util.find_library("c")
    if os.name != "posix" or not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1
        return bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok)
    except (OSError, AttributeError):
        return False


def check_vmappable(model: nn.Module, randomness: str = "error") -> None:
    """Raise ConfigError if vmap would fail or silently give wrong gradients on ``model``."""
    for name, module in model.named_modules():
        where = name or type(model).__name__
        dropout = isinstance(module, nn.modules.dropout._DropoutNd)
        rate = module.p if dropout else getattr(module, "drop_rate", 0.0)  # ResNet-12's
        if randomness == "error" and module.training and rate > 0:
            raise ConfigError(
                f"engine=vmap: {where} drops activations at random in training (rate {rate}); "
                "set engine.randomness=different (a mask per task), or model.drop_rate=0"
            )
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.affine:
                raise ConfigError(
                    f"engine=vmap: {where} is a BatchNorm with affine weight/bias, whose "
                    "meta-gradients are silently wrong under vmap (functorch issue 534); use "
                    "affine-free BatchNorm followed by an explicit scale/shift (as Conv4 "
                    "does), or engine=func / engine=higher"
                )
            updates = module.training and module.track_running_stats
        else:
            updates = module.training and getattr(module, "mode", None) == "inductive"
        if updates:
            raise ConfigError(
                f"engine=vmap cannot update BatchNorm running statistics ({where}, "
                "model.bn_mode=inductive): use model.bn_mode=transductive, or engine=func / "
                "engine=higher for inductive BatchNorm"
            )


class VmapEngine:
    """Vmapped torch.func inner loop: all tasks of a meta-batch at once.

    Args:
        chunk_size: tasks per vmapped chunk. ``None``: the whole meta-batch. ``"auto"`` (the
            default): the whole meta-batch on accelerators; on CPU as many tasks as keep one
            chunk's largest activation under ``cpu_chunk_mb`` (bench/RESULTS.md: Conv4-64 at
            32 tasks runs 1.2-2x faster in chunks of 8 than all at once; small nets gain
            nothing from chunking). Smaller chunks also lower peak memory.
        randomness: ``torch.func.vmap``'s randomness: "error" (the default; no random ops in
            the model), "different" (independent dropout masks per task) or "same".
        tune_malloc: on CPU, call ``tune_malloc()`` once at the first call (see module doc).
        cpu_chunk_mb: the per-chunk activation budget of ``chunk_size="auto"`` on CPU.
        compile: ``False`` (eager) or a ``torch.compile`` mode ("default", "reduce-overhead":
            CUDA graphs on a GPU, ...): the whole training meta-step as one compiled graph
            (engines/compiled.py); same meta-gradients.
        max_graphs: compiled graphs kept (one per episode shape and loop structure); beyond
            them, meta-steps run eagerly (logged).
        compile_backend: torch.compile's backend: "inductor" (generated C++/Triton kernels);
            "aot_eager" traces the same graphs without generating code (quick to compile:
            tests, debugging).
    """

    name = "vmap"

    def __init__(
        self,
        chunk_size: int | str | None = "auto",
        randomness: str = "error",
        tune_malloc: bool = True,
        cpu_chunk_mb: float = 128.0,
        compile: bool | str = False,
        max_graphs: int = 8,
        compile_backend: str = "inductor",
    ):
        if randomness not in RANDOMNESS:
            raise ConfigError(f"engine.randomness={randomness!r}; choose one of {RANDOMNESS}")
        if (
            chunk_size != "auto"
            and chunk_size is not None
            and not (isinstance(chunk_size, int) and chunk_size >= 1)
        ):
            raise ConfigError(f"engine.chunk_size={chunk_size!r} must be >= 1, auto or null")
        self.chunk_size, self.randomness, self.tune_malloc = chunk_size, randomness, tune_malloc
        self.cpu_chunk_mb = cpu_chunk_mb
        self._malloc_done = False
        self._auto: dict = {}
        mode = compile_mode(compile)
        self.compiled = (
            CompiledMetaStep(mode, max_graphs, backend=compile_backend) if mode else None
        )

    def check(self, model: nn.Module, loop: InnerLoop) -> None:
        """Raise ConfigError if this engine cannot run ``loop`` on ``model`` (see module doc)."""
        check_sgd(loop, self.name)
        check_vmappable(model, self.randomness)

    def __call__(self, model: nn.Module, loop: InnerLoop, episodes, heads=None) -> Adapted:
        self.check(model, loop)
        cpu = episodes[1][0].device.type == "cpu"
        if self.tune_malloc and not self._malloc_done and cpu:
            self._malloc_done = True
            tune_malloc()
        episodes = Episodes(*episodes)
        if self.compiled and self.compiled.applies(loop, episodes, heads):
            chunk = self.chunk(model, episodes)
            out = self.compiled(model, loop, episodes, self.randomness, chunk)
            if out is not None:  # None: this one does not compile (logged); run it eagerly
                return out
        if not episodes.ragged and heads is None:
            return vmapped(model, loop, episodes, self.randomness, self.chunk(model, episodes))
        losses, accs, logits = ([None] * episodes.batch_size for _ in range(3))
        for members, group in stacked_groups(episodes):
            group_heads = None
            if heads is not None:
                group_heads = {n: torch.stack([heads[b][n] for b in members]) for n in heads[0]}
            out = vmapped_tasks(
                model, loop, group, self.randomness, self.chunk(model, group), group_heads
            )
            for i, b in enumerate(members):
                losses[b], accs[b], logits[b] = out[0][i], out[1][i], out[2][i]
        losses = torch.stack(losses)
        return Adapted(
            losses.mean(),
            losses.detach(),
            torch.stack(accs).detach(),
            collect(logits, episodes.ragged),
        )

    def chunk(self, model: nn.Module, episodes) -> int | None:
        if self.chunk_size != "auto":
            return self.chunk_size
        return self.auto_chunk(model, episodes) if episodes[0].device.type == "cpu" else None

    def auto_chunk(self, model: nn.Module, episodes) -> int | None:
        """Tasks per chunk on CPU: the largest activation of one task's query pass (measured
        once per model and episode shape with forward hooks) against ``cpu_chunk_mb``."""
        qx = episodes[2]
        key = (id(model), tuple(qx.shape), qx.dtype)
        if key not in self._auto:
            largest = 0

            def hook(module, inputs, output):
                nonlocal largest
                if torch.is_tensor(output):
                    largest = max(largest, output.numel() * output.element_size())

            handles = [m.register_forward_hook(hook) for m in model.modules()]
            try:
                with torch.no_grad():
                    model(qx[0])
            finally:
                for h in handles:
                    h.remove()
            tasks = int(self.cpu_chunk_mb * 2**20 // max(largest, 1))
            self._auto[key] = None if tasks >= qx.shape[0] else max(1, tasks)
        return self._auto[key]


def vmapped(
    model: nn.Module,
    loop: InnerLoop,
    episodes,
    randomness: str = "error",
    chunk_size: int | None = None,
) -> Adapted:
    """``adapt_task`` vmapped over the meta-batch, without ``VmapEngine``'s checks."""
    losses, accs, logits = vmapped_tasks(model, loop, episodes, randomness, chunk_size)
    return Adapted(losses.mean(), losses.detach(), accs.detach(), logits)


def vmapped_tasks(model, loop, episodes, randomness="error", chunk_size=None, heads=None):
    """Per-task (objective, accuracy, logits) of ``adapt_task`` vmapped over a regular batch;
    ``heads``: initial parameters per task ([B, ...] each) overriding the model's."""
    forward = step_forward(model)
    params = dict(model.named_parameters())

    def grad(f, sub):
        if loop.first_order:  # constant shifts: record nothing outside the inner grad
            with torch.no_grad():
                return torch.func.grad(f)(sub)
        return torch.func.grad(f)(sub)

    def task(sx, sy, qx, qy, head):
        return adapt_task(forward, {**params, **head}, loop, sx, sy, qx, qy, grad)

    run = torch.func.vmap(task, randomness=randomness, chunk_size=chunk_size)
    losses, metrics, logits = run(*episodes, heads or {})
    return losses, metrics, logits.detach()
