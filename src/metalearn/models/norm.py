"""Normalisation layers every backbone uses: BatchNorm in the form that is exact under vmap.

BatchNorm's affine part is kept as explicit parameters (``scale``/``shift``) after an
affine-free ``F.batch_norm``: ``nn.BatchNorm2d(affine=True)`` gives silently wrong
meta-gradients under ``torch.func.vmap`` (functorch issue 534), so with this form every engine
runs the same network. The scale/shift (and running statistics) have one row per inner-loop
step, so ``forward(x, step=t)`` gives MAML++'s per-step BatchNorm when ``steps > 1``; steps
past the last reuse it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.errors import ConfigError

BN_MODES = ("transductive", "inductive")


class StepNorm(nn.Module):
    """Affine-free BatchNorm + explicit per-step, per-channel scale and shift.

    transductive: always normalise with the statistics of the current batch (as in MAML).
    inductive: track running statistics in training; in eval mode normalise with them,
    so each test image is classified independently of the others.
    """

    def __init__(
        self,
        channels: int,
        steps: int = 1,
        mode: str = "transductive",
        momentum: float = 0.1,
        eps: float = 1e-5,
    ):
        super().__init__()
        if mode not in BN_MODES:
            raise ConfigError(f"model.bn_mode={mode!r} is unknown; choose one of {BN_MODES}")
        self.mode, self.steps, self.momentum, self.eps = mode, steps, momentum, eps
        self.scale = nn.Parameter(torch.ones(steps, channels))
        self.shift = nn.Parameter(torch.zeros(steps, channels))
        if mode == "inductive":
            self.register_buffer("running_mean", torch.zeros(steps, channels))
            self.register_buffer("running_var", torch.ones(steps, channels))

    def forward(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        t = min(step, self.steps - 1)
        if self.mode == "transductive":
            x = F.batch_norm(x, None, None, training=True, eps=self.eps)
        else:
            x = F.batch_norm(
                x,
                self.running_mean[t],
                self.running_var[t],
                training=self.training,
                momentum=self.momentum,
                eps=self.eps,
            )
        return x * self.scale[t].view(1, -1, 1, 1) + self.shift[t].view(1, -1, 1, 1)
