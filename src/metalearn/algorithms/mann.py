"""Memory-Augmented Neural Network, MANN (Santoro, Bartunov, Botvinick, Wierstra & Lillicrap,
"Meta-Learning with Memory-Augmented Neural Networks", ICML 2016).

An episode is a *sequence*: the images of N classes in random order, the image at step t
presented together with the one-hot label of step t-1 (the first step with a zero vector), so
the network must bind each image to the label it only learns one step later. Labels are
assigned to classes anew in every episode (the episodes already do: label i is the i-th class
drawn), so nothing about a class can be stored in the weights; the binding lives in an external
memory M (slots x size) that an LSTM controller reads and writes:

* read by content: w^r_t(i) = softmax_i cos(k_t, M_t(i)) per read head, r_t = sum_i w^r_t(i) M_t(i);
* written by least-recently-used access (LRUA): usage w^u_t = gamma w^u_{t-1} + w^r_t + w^w_t,
  the least-used weights w^lu_{t-1} (1 at the ``read_heads`` least-used slots of w^u_{t-1}),
  w^w_t = sigmoid(alpha) w^r_{t-1} + (1 - sigmoid(alpha)) w^lu_{t-1}, and, after the single
  least-used slot is zeroed, M_t(i) = M_{t-1}(i) + w^w_t(i) a_t, with keys k_t = tanh(W_k h_t)
  and a separate write vector a_t = tanh(W_a h_t) (``write: add``, as the reimplementations
  that learn) or the key itself (``write: key``, the paper's text);
* the controller reads [x_t, y_{t-1}, r_{t-1}]; the output is softmax(W [h_t, r_t]).

Trained on the cross-entropy of every step's prediction. Input: flattened pixels as in the
paper (``encoder: pixels``; the paper's Omniglot is 20x20: ``data.image_size=20``), or the
backbone's features trained end to end (``encoder: features``).

Two evaluations. ``test/acc`` (and ``adapt(...).predict``) is comparable with
the other algorithms' K-shot cells: the support images are fed as a sequence (a seeded shuffle),
then each query is one further step from that state, presented with the last support label,
and read without the other queries written. The paper's Table 1, accuracy at the 1st, 2nd,
3rd, 4th, 5th and 10th presentation of a class in a sequence of the episode's support and query
images shuffled together, is logged at test as ``test/acc_instance_<k>`` (with ``_ci95`` over
episodes) and tabulated by ``metalearn.report``. ``val/acc``, which selects the checkpoint, is
the sequence accuracy at the 2nd and later presentations (see ``validation_step``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms.base import EpisodicModule, mean_ci95
from metalearn.algorithms.metric import ways_of
from metalearn.data.episodes import Episodes, seeded_generator
from metalearn.errors import ConfigError

# the presentations of a class that the paper's Table 1 reports
TABLE_INSTANCES = (1, 2, 3, 4, 5, 10)
# what the memory holds before the first write: a tiny constant, so the cosine is defined
MEMORY_INIT = 1e-6


class MemoryState(NamedTuple):
    memory: torch.Tensor  # M [B, slots, size]
    read_weights: torch.Tensor  # w^r [B, heads, slots]
    usage: torch.Tensor  # w^u [B, slots]
    reads: torch.Tensor  # r [B, heads * size]
    h: torch.Tensor  # controller hidden [B, controller]
    c: torch.Tensor  # controller cell [B, controller]


def least_used(usage: torch.Tensor, n: int) -> torch.Tensor:
    """w^lu [B, slots]: 1 at the ``n`` least-used slots (ties: the lowest index), else 0."""
    idx = torch.sort(usage, dim=-1, stable=True).indices[:, :n]
    return torch.zeros_like(usage).scatter_(1, idx, 1.0)


def lrua_write(memory, read_weights, usage, keys, alpha):
    """One LRUA write. Returns (M_t, w^w_t).

    memory [B, S, D], read_weights w^r_{t-1} [B, H, S], usage w^u_{t-1} [B, S], keys k_t
    [B, H, D], alpha [B, H] (the write gate's logit)."""
    gate = torch.sigmoid(alpha).unsqueeze(-1)
    write_weights = gate * read_weights + (1 - gate) * least_used(usage, keys.shape[1]).unsqueeze(1)
    cleared = 1.0 - least_used(usage, 1)  # the least-used slot is zeroed before writing
    memory = memory * cleared.unsqueeze(-1) + write_weights.transpose(1, 2) @ keys
    return memory, write_weights


def content_read(memory, keys, sharpness: float = 1.0):
    """Cosine-attention read: (w^r_t [B, H, S] summing to one over slots, r_t [B, H, D]).

    ``sharpness`` multiplies the cosines before the softmax (1: the paper's)."""
    sims = F.cosine_similarity(keys.unsqueeze(2), memory.unsqueeze(1), dim=-1, eps=1e-8)
    weights = (sharpness * sims).softmax(-1)
    return weights, weights @ memory


def offset_labels(labels: torch.Tensor, ways: int) -> torch.Tensor:
    """y_{t-1} as inputs [B, T, ways]: step t carries step t-1's one-hot label, step 0 zeros."""
    onehot = F.one_hot(labels, ways).float()
    return torch.cat([torch.zeros_like(onehot[:, :1]), onehot[:, :-1]], 1)


def instance_numbers(labels: torch.Tensor) -> torch.Tensor:
    """[B, T]: which presentation of its class step t is (1 for the first, 2 for the second...)."""
    onehot = F.one_hot(labels)
    return onehot.cumsum(1).gather(2, labels.unsqueeze(-1)).squeeze(-1)


def per_instance_accuracy(correct, labels, instances=TABLE_INSTANCES) -> dict[int, torch.Tensor]:
    """{k: accuracy per episode at the k-th presentations of the classes [B']}: episodes whose
    sequence has no k-th presentation are left out (an empty tensor if none has)."""
    number = instance_numbers(labels)
    out = {}
    for k in instances:
        mask = number == k
        count = mask.sum(1)
        hits = (correct.bool() & mask).sum(1)
        has = count > 0
        out[k] = hits[has].float() / count[has].float()
    return out


class MANN(EpisodicModule):
    """Args are the ``algo`` config keys (see conf/algo/mann.yaml); ``engine`` is unused."""

    # its label input and output have ``ways`` units and a sequence stacks equal episodes
    varying_episodes = False

    def __init__(
        self,
        model,
        optimizer,
        engine=None,
        name: str = "mann",
        meta_batch_size: int = 16,
        encoder: str = "pixels",
        image_size: int = 28,
        channels: int = 1,
        controller_size: int = 64,
        memory_slots: int = 32,
        memory_size: int = 16,
        read_heads: int = 1,
        gamma: float = 0.95,
        grad_clip: float | None = 10.0,
        sharpness: float = 1.0,
        write: str = "add",
        seed: int = 0,
    ):
        if encoder not in ("pixels", "features"):
            raise ConfigError(
                f"algo.encoder={encoder!r}: use pixels (flattened images, the paper's) or "
                "features (the backbone's embedding, trained end to end)"
            )
        if write not in ("add", "key"):
            raise ConfigError(
                f"algo.write={write!r}: use add (a separate write vector a_t, as the working "
                "reimplementations) or key (the read key k_t itself, the paper's text)"
            )
        if not sharpness > 0:
            raise ConfigError(f"algo.sharpness={sharpness}: use a positive factor (1: the paper's)")
        if not 0 <= gamma <= 1:
            raise ConfigError(f"algo.gamma={gamma}: the usage decay must lie in [0, 1]")
        for key, value in dict(
            controller_size=controller_size, memory_slots=memory_slots,
            memory_size=memory_size, read_heads=read_heads,
        ).items():  # fmt: skip
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"algo.{key}={value!r}: use a positive integer")
        if read_heads > memory_slots:
            raise ConfigError(
                f"algo.read_heads={read_heads} > algo.memory_slots={memory_slots}: LRUA writes "
                "to the read_heads least-used slots; use fewer heads or more slots"
            )
        super().__init__(model, optimizer, name, meta_batch_size)
        self.encoder = encoder
        self.ways = self.model.head.out_features
        self.heads, self.slots, self.size = read_heads, memory_slots, memory_size
        self.gamma, self.grad_clip, self.sharpness = gamma, grad_clip, sharpness
        # the backbone's head is never used; with pixels the whole backbone is not (frozen, so
        # DDP sees no unused trainable parameters)
        (self.model if encoder == "pixels" else self.model.head).requires_grad_(False)
        width = channels * image_size * image_size if encoder == "pixels" else None
        width = width or self.model.head.in_features
        self.controller = nn.LSTMCell(width + self.ways + read_heads * memory_size, controller_size)
        self.key = nn.Linear(controller_size, read_heads * memory_size)
        self.alpha = nn.Linear(controller_size, read_heads)
        self.write = write
        self.seed = seed
        # a separate write vector: what is written (the image's features bound to the label seen
        # one step later) need not be what the same step looks up with
        self.add = nn.Linear(controller_size, read_heads * memory_size) if write == "add" else None
        self.out = nn.Linear(controller_size + read_heads * memory_size, self.ways)
        self._orders: torch.Generator | None = None

    def outer_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def before_outer_step(self) -> None:
        if self.grad_clip:  # the LSTM's gradients spike early in training
            nn.utils.clip_grad_norm_(self.outer_parameters(), self.grad_clip)

    # ---- the network -------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Inputs [B, T, C, H, W] -> [B, T, width]."""
        if self.encoder == "pixels":
            return images.flatten(2)
        return self.model.features(images.flatten(0, 1)).unflatten(0, images.shape[:2])

    def initial_state(self, batch: int, like: torch.Tensor) -> MemoryState:
        zeros = like.new_zeros
        return MemoryState(
            memory=torch.full((batch, self.slots, self.size), MEMORY_INIT).to(like),
            read_weights=zeros(batch, self.heads, self.slots),
            usage=zeros(batch, self.slots),
            reads=zeros(batch, self.heads * self.size),
            h=zeros(batch, self.controller.hidden_size),
            c=zeros(batch, self.controller.hidden_size),
        )

    def step(self, x, prev_label, state: MemoryState) -> tuple[torch.Tensor, MemoryState]:
        """One time step: inputs x [B, width], y_{t-1} [B, ways] -> (logits [B, ways], state)."""
        h, c = self.controller(torch.cat([x, prev_label, state.reads], -1), (state.h, state.c))
        batch = len(x)
        keys = torch.tanh(self.key(h)).view(batch, self.heads, self.size)
        adds = keys if self.add is None else torch.tanh(self.add(h)).view(keys.shape)
        memory, write_weights = lrua_write(
            state.memory, state.read_weights, state.usage, adds, self.alpha(h)
        )
        read_weights, reads = content_read(memory, keys, self.sharpness)
        usage = self.gamma * state.usage + read_weights.sum(1) + write_weights.sum(1)
        reads = reads.flatten(1)
        logits = self.out(torch.cat([h, reads], -1))
        return logits, MemoryState(memory, read_weights, usage, reads, h, c)

    def run_sequence(self, images, labels, state=None) -> tuple[torch.Tensor, MemoryState]:
        """Logits [B, T, ways] for the sequence images [B, T, ...] with labels [B, T]."""
        x = self.encode(images)
        prev = offset_labels(labels, self.ways).to(x)
        state = state or self.initial_state(len(x), x)
        logits = []
        for t in range(x.shape[1]):
            out, state = self.step(x[:, t], prev[:, t], state)
            logits.append(out)
        return torch.stack(logits, 1), state

    # ---- episodes as sequences ----------------------------------------------------------
    def shuffled(self, x, y, generator=None, same_order: bool = False):
        """Each episode's images (and labels) in its own random order (``same_order``: one
        order for all, so that an episode's order does not depend on its batch)."""
        draws = 1 if same_order else len(y)
        orders = torch.stack(
            [torch.randperm(y.shape[1], generator=generator) for _ in range(draws)]
        )
        orders = orders.expand(len(y), -1).to(y.device)
        picked = x[torch.arange(len(y), device=y.device).unsqueeze(1), orders]
        return picked, y.gather(1, orders)

    def sequences(self, episodes, generator=None):
        """Support and query images of each episode shuffled together: ([B, T, ...], [B, T])."""
        x = torch.cat([episodes.support_x, episodes.query_x], 1)
        y = torch.cat([episodes.support_y, episodes.query_y], 1)
        return self.shuffled(x, y, generator)

    def check_ways(self, labels) -> None:
        ways = ways_of(labels)
        if ways > self.ways:
            raise ConfigError(
                f"{ways} classes, but this MANN was trained with ways={self.ways}: its label "
                f"input and output have {self.ways} units. Use at most {self.ways} classes, or "
                f"train with ways={ways}"
            )

    def training_step(self, episodes, batch_idx):
        # each sequence's order: a function of (seed, rank, step), not of global RNG state, so
        # a resumed run sees the orders an uninterrupted one does
        generator = seeded_generator(self.seed, self.global_rank, self.global_step)
        images, labels = self.sequences(episodes, generator)
        logits, _ = self.run_sequence(images, labels)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        self.outer_step(loss)
        correct = logits.detach().argmax(-1) == labels
        later = instance_numbers(labels) > 1  # the first presentation is a guess
        self.log_train(loss=loss.detach(), acc=correct[later].float().mean())

    def query_logits(self, episodes) -> torch.Tensor:
        """The support set as a sequence (a fixed seeded shuffle of its order, the same for
        every episode, so predictions repeat and do not depend on the batch), then each query
        as one more step from that state, with the last support label."""
        self.check_ways(episodes.support_y)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            sx, sy = self.shuffled(
                episodes.support_x, episodes.support_y, generator, same_order=True
            )
            _, state = self.run_sequence(sx, sy)
            batch, queries = episodes.query_x.shape[:2]
            x = self.encode(episodes.query_x).flatten(0, 1)
            prev = F.one_hot(sy[:, -1], self.ways).to(x).repeat_interleave(queries, 0)
            expanded = MemoryState(*(s.repeat_interleave(queries, 0) for s in state))
            logits, _ = self.step(x, prev, expanded)
        return logits.view(batch, queries, -1)[..., : ways_of(episodes.support_y)]

    # ---- validation: the sequence accuracy after the first presentation --------------------
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_orders = torch.Generator().manual_seed(0)  # the same sequences every time

    def validation_step(self, episodes, batch_idx):
        """``val/acc``: per episode, the accuracy at the 2nd and later presentations of the
        classes in its shuffled support + query sequence (the paper's evaluation, and what MANN
        is trained on). The 1-shot queries after the support sequence (``test/acc``) stay at
        chance until the memory binding is learned, so a checkpoint chosen by them early is
        chosen by noise; the later presentations rise first with the label statistics, then
        with the binding, and average many more predictions per episode."""
        self.check_ways(episodes.support_y)
        with torch.no_grad():
            images, labels = self.sequences(episodes, self._val_orders)
            logits, _ = self.run_sequence(images, labels)
        later = instance_numbers(labels) > 1
        hits = ((logits.argmax(-1) == labels) & later).sum(1)
        accs = hits.float() / later.sum(1).clamp(min=1).float()
        episodes = Episodes(*episodes)
        shape = torch.tensor([episodes.ways(), episodes.shots()], dtype=accs.dtype).T
        self._eval_accs.append(torch.cat([accs[:, None], shape.to(accs.device)], 1))

    # ---- the paper's per-instance accuracies, at test --------------------------------------
    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._orders = torch.Generator().manual_seed(0)  # the same sequences every test
        self._instance_accs: dict[int, list[torch.Tensor]] = {k: [] for k in TABLE_INSTANCES}

    def test_step(self, episodes, batch_idx):
        super().test_step(episodes, batch_idx)
        with torch.no_grad():
            images, labels = self.sequences(episodes, self._orders)
            logits, _ = self.run_sequence(images, labels)
        correct = logits.argmax(-1) == labels
        for k, accs in per_instance_accuracy(correct, labels).items():
            self._instance_accs[k].append(accs.float())

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        logged = {}
        for k, parts in self._instance_accs.items():
            # gathered across DDP ranks as the episode accuracies are (rows: acc, ways, shots)
            self._eval_accs = [F.pad(p[:, None], (0, 2)) for p in parts]
            accs = self._gathered_accs()
            if accs.numel():
                logged[f"test/acc_instance_{k}"], logged[f"test/acc_instance_{k}_ci95"] = mean_ci95(
                    accs
                )
        self.log_dict(logged, sync_dist=False)
