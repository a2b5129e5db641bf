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
* inner optimizers other than plain SGD (momentum/adam need the higher engine).

First order: the inner gradients are taken under ``torch.no_grad`` (``torch.func.grad``
ignores an outer ``no_grad`` for its own differentiation), so no outer graph is recorded
through the support-set passes; the query pass still reaches theta through the constant
shifts, which is the first-order meta-gradient.

On CPU, glibc handing freed memory back to the OS makes vmap slow (large, short-lived
batched buffers go through mmap/munmap each step); ``tune_malloc()`` keeps them in the heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch
from torch import nn

from metalearn.engines.base import Adapted, InnerLoop, step_forward
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


def check_vmappable(model: nn.Module) -> None:
    """Raise ConfigError if vmap would fail or silently give wrong gradients on ``model``."""
    for name, module in model.named_modules():
        where = name or type(model).__name__
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
        chunk_size: tasks per vmapped chunk (``None``: the whole meta-batch); smaller chunks
            lower peak memory at some speed.
        randomness: ``torch.func.vmap``'s randomness: "error" (the default; no random ops in
            the model), "different" (independent dropout masks per task) or "same".
        tune_malloc: on CPU, call ``tune_malloc()`` once at the first call (see module doc).
    """

    name = "vmap"

    def __init__(
        self, chunk_size: int | None = None, randomness: str = "error", tune_malloc: bool = True
    ):
        if randomness not in RANDOMNESS:
            raise ConfigError(f"engine.randomness={randomness!r}; choose one of {RANDOMNESS}")
        if chunk_size is not None and chunk_size < 1:
            raise ConfigError(f"engine.chunk_size={chunk_size!r} must be >= 1 or null")
        self.chunk_size, self.randomness, self.tune_malloc = chunk_size, randomness, tune_malloc
        self._malloc_done = False

    def __call__(self, model: nn.Module, loop: InnerLoop, episodes) -> Adapted:
        check_sgd(loop, self.name)
        check_vmappable(model)
        if self.tune_malloc and not self._malloc_done and episodes[0].device.type == "cpu":
            self._malloc_done = True
            tune_malloc()
        return vmapped(model, loop, episodes, self.randomness, self.chunk_size)


def vmapped(
    model: nn.Module,
    loop: InnerLoop,
    episodes,
    randomness: str = "error",
    chunk_size: int | None = None,
) -> Adapted:
    """``adapt_task`` vmapped over the meta-batch, without ``VmapEngine``'s checks."""
    forward = step_forward(model)
    params = dict(model.named_parameters())

    def grad(f, sub):
        if loop.first_order:  # constant shifts: record nothing outside the inner grad
            with torch.no_grad():
                return torch.func.grad(f)(sub)
        return torch.func.grad(f)(sub)

    def task(sx, sy, qx, qy):
        return adapt_task(forward, params, loop, sx, sy, qx, qy, grad)

    losses, accs = torch.func.vmap(task, randomness=randomness, chunk_size=chunk_size)(*episodes)
    return Adapted(losses.mean(), losses.detach(), accs.detach())
