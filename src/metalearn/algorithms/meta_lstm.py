"""Meta-Learner LSTM (Ravi & Larochelle, "Optimization as a Model for Few-Shot Learning",
ICLR 2017).

The learner (the backbone, ``model=``) is trained on an episode's support set by a *learned
optimizer*: an LSTM whose cell state is the learner's flattened parameters. The LSTM update
c_t = f_t * c_{t-1} + i_t * c~_t becomes a gradient step when c~_t = -grad_t: the input gate
i_t is a learned, per-coordinate learning rate, the forget gate f_t a learned weight decay
(shrinking the parameters to escape a bad spot). Coordinate-wise, as in Andrychowicz et al.
2016: every parameter coordinate is one row of a batch that shares the LSTM's weights, so the
meta-learner is small whatever the learner's size. Two layers:

1. a plain LSTM (``hidden_size`` units) over each coordinate's preprocessed support loss and
   gradient (Andrychowicz et al.'s preprocessing, ``preprocess``: (log|x|/p, sign x) when
   |x| >= e^-p, else (-1, e^p x); p = 10);
2. ``MetaLSTMCell``: f_t = sigmoid(W_F [h_t, c_{t-1}, f_{t-1}] + b_F),
   i_t = sigmoid(W_I [h_t, c_{t-1}, i_{t-1}] + b_I), c_t = f_t * c_{t-1} - i_t * grad_t, with
   h_t the first layer's output (the paper's eq. 2 feeds the loss and gradient there through
   the first layer; W_I, W_F, b_I, b_F are shared by all coordinates).

c_0 is the learner's learned initialisation: the backbone's own parameters. ``inner_steps``
updates on the support set (the whole support set each step), then the query loss of the
learner at c_T is backpropagated into the meta-learner's weights and into c_0. The learner's
gradients are inputs, detached (the paper drops the second derivatives through them, sec.
3.2); the meta-gradient still flows through the gates and the chain c_t <- c_{t-1}.

BatchNorm as in the paper and its reference code: batch statistics of the current support or
query batch, in training and at test (``model.bn_mode=transductive``, the default); its
scale/shift are learner coordinates like the weights. The gate biases start at
``forget_bias=5`` (f = 0.993: almost no decay) and ``input_bias=-4`` (i = 0.018): training
starts near plain SGD with a small rate, as the reference code's uniform(4, 6) / uniform(-5,
-4) do. Evaluation runs the same ``inner_steps`` (the meta-learner was trained for them).

Episodes with another number of classes than the backbone's head start each episode's head as
the other gradient-based algorithms do (``head_init``; algorithms/heads.py): its coordinates
join c_0 for that episode (the meta-learner is coordinate-wise, so any length works).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from metalearn.algorithms import heads
from metalearn.algorithms.base import EpisodicModule
from metalearn.data.episodes import Episodes
from metalearn.engines.base import Adapted, collect
from metalearn.errors import ConfigError


def preprocess(x: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """Andrychowicz et al. (2016) input scaling of gradients and losses: [..., 2] with
    (log|x| / p, sign(x)) where |x| >= e^-p, else (-1, e^p * x)."""
    big = x.abs() >= math.exp(-p)
    magnitude = torch.where(big, x.abs().clamp_min(math.exp(-p)).log() / p, -torch.ones_like(x))
    direction = torch.where(big, x.sign(), math.exp(p) * x)
    return torch.stack([magnitude, direction], -1)


class MetaLSTMCell(nn.Module):
    """The second layer, whose cell state is the learner's parameters (one row per coordinate).

    ``forward(h [P, H], grad [P], c [P], f [P], i [P]) -> (c_t, f_t, i_t)``."""

    def __init__(self, input_size: int, forget_bias: float, input_bias: float):
        super().__init__()
        # the reference code's init: small weights, so the biases set the starting rate/decay
        self.W_F = nn.Parameter(torch.empty(input_size + 2).uniform_(-0.01, 0.01))
        self.W_I = nn.Parameter(torch.empty(input_size + 2).uniform_(-0.01, 0.01))
        self.b_F = nn.Parameter(torch.tensor(float(forget_bias)))
        self.b_I = nn.Parameter(torch.tensor(float(input_bias)))

    def forward(self, h, grad, c, f, i):
        f_t = torch.sigmoid(torch.cat([h, c[:, None], f[:, None]], 1) @ self.W_F + self.b_F)
        i_t = torch.sigmoid(torch.cat([h, c[:, None], i[:, None]], 1) @ self.W_I + self.b_I)
        return f_t * c - i_t * grad, f_t, i_t


class MetaLSTM(EpisodicModule):
    """Args are the ``algo`` config keys (see conf/algo/meta_lstm.yaml); ``engine`` is unused
    (the inner loop is the meta-learner's own, not a differentiable SGD loop)."""

    trained_head = True

    def __init__(
        self,
        model,
        optimizer,
        engine=None,
        name: str = "meta_lstm",
        meta_batch_size: int = 1,
        inner_steps: int = 5,
        hidden_size: int = 20,
        forget_bias: float = 5.0,
        input_bias: float = -4.0,
        preprocess_p: float = 10.0,
        grad_clip: float | None = 0.25,
        head_init: str = "auto",
    ):
        heads.check_head_init(head_init)
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ConfigError(f"algo.inner_steps={inner_steps!r}: use a positive integer")
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ConfigError(f"algo.hidden_size={hidden_size!r}: use a positive integer")
        if not preprocess_p > 0:
            raise ConfigError(f"algo.preprocess_p={preprocess_p}: use a positive value (paper: 10)")
        super().__init__(model, optimizer, name, meta_batch_size)
        self.inner_steps, self.p, self.grad_clip = inner_steps, preprocess_p, grad_clip
        self.train_head_init = head_init
        if head_init in ("prototypes", "zeros"):
            self.model.head.requires_grad_(False)  # every episode builds its own: unused
        self.lstm = nn.LSTMCell(4, hidden_size)  # (loss, gradient), each preprocessed to 2
        self.meta_cell = MetaLSTMCell(hidden_size, forget_bias, input_bias)

    def outer_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def before_outer_step(self) -> None:
        if self.grad_clip:  # the reference code clips the meta-gradient norm (0.25)
            nn.utils.clip_grad_norm_(self.outer_parameters(), self.grad_clip)

    # ---- the learner as a flat vector ---------------------------------------------------
    def initial(self, sx, sy, ways: int, kind: str, meta: bool):
        """c_0 [P] and the (name, shape) layout that turns it back into parameters. The
        model's parameters (with ``kind``'s head for this episode), differentiable when
        ``meta``."""
        params = dict(self.model.named_parameters())
        if kind != "trained":
            with torch.set_grad_enabled(meta and torch.is_grad_enabled()):
                fs = [self.model.features(sx)] if kind == "prototypes" else [sx]
            params.update(
                heads.initial_heads(fs, [sy], [ways], kind, params["head.weight"].shape[1], meta)[0]
            )
        layout = [(n, p.shape) for n, p in params.items()]
        with torch.set_grad_enabled(meta and torch.is_grad_enabled()):
            c0 = torch.cat([p.flatten() for p in params.values()])
        return (c0 if meta else c0.detach()), layout

    def learner(self, c: torch.Tensor, layout, x: torch.Tensor) -> torch.Tensor:
        """The learner's outputs for x with parameters c."""
        sizes = [math.prod(shape) for _, shape in layout]
        params = {n: v.view(shape) for (n, shape), v in zip(layout, c.split(sizes), strict=True)}
        return functional_call(self.model, params, (x,))

    # ---- the meta-learner's inner loop --------------------------------------------------
    def inner_loop(self, c, layout, sx, sy, meta: bool):
        """``inner_steps`` meta-learner updates of c on the support set: (c_T, mean input gate,
        mean forget gate). Without ``meta`` no graph is kept (evaluation)."""
        f = i = torch.zeros_like(c)
        state = None
        for _ in range(self.inner_steps):
            theta = c.detach().requires_grad_()
            with torch.enable_grad():
                loss = self.task.loss(self.learner(theta, layout, sx), sy)
                (grad,) = torch.autograd.grad(loss, theta)  # an input: no second derivatives
            inputs = torch.cat(
                [preprocess(loss.detach(), self.p).expand(len(c), 2), preprocess(grad, self.p)], 1
            )
            with torch.set_grad_enabled(meta and torch.is_grad_enabled()):
                state = self.lstm(inputs, state)
                c, f, i = self.meta_cell(state[0], grad, c, f, i)
        return c, i.detach().mean(), f.detach().mean()

    def head_kind(self, episodes: Episodes) -> str:
        init = self.head_init if self.head_init != "auto" else self.train_head_init
        return heads.resolved(init, self.model, episodes.ways(), self.train_head_init)

    def run_episodes(self, episodes, meta: bool) -> Adapted:
        """Adapt the learner to each episode's support set; score its query set."""
        episodes = Episodes(*episodes)
        kind = self.head_kind(episodes)
        losses, metrics, logits, gates = [], [], [], []
        for sx, sy, qx, qy, ways in zip(*episodes, episodes.ways(), strict=True):
            c0, layout = self.initial(sx, sy, ways, kind, meta)
            c, i, f = self.inner_loop(c0, layout, sx, sy, meta)
            with torch.set_grad_enabled(meta and torch.is_grad_enabled()):
                out = self.learner(c, layout, qx)
                losses.append(self.task.loss(out, qy))
            metrics.append(self.task.score(out.detach(), qy))
            logits.append(out.detach())
            gates.append(torch.stack([i, f]))
        self._gates = torch.stack(gates).mean(0)
        objective = torch.stack(losses).mean()
        return Adapted(
            objective, torch.stack(losses).detach(), torch.stack(metrics),
            collect(logits, episodes.ragged),
        )  # fmt: skip

    def training_step(self, episodes, batch_idx):
        out = self.run_episodes(episodes, meta=True)
        self.outer_step(out.objective)
        rate, decay = self._gates
        self.log_train(
            loss=out.loss.mean(), metric=out.metric.mean(), input_gate=rate, forget_gate=decay
        )

    def query_logits(self, episodes):
        return self.run_episodes(episodes, meta=False).logits
