"""Fine-tuning baseline (transfer learning; cf. Chen et al. 2019, "A closer look at few-shot
classification").

Training is ordinary supervised learning: batches of ``batch_size`` meta-train images with
their global class labels, drawn from ``datamodule.splits.train`` by a generator seeded by
(seed, rank, step), through the backbone's ``features`` and a linear classifier over all
meta-train classes. The episodes the loader yields are ignored (keep ``meta_batch_size`` 1).

Evaluation, per episode: a fresh zero-initialised ``ways``-way head (zero: deterministic, and
with a frozen body the fit is plain logistic regression) is trained on the support set for
``inner_steps_test`` steps, with the body frozen or, with ``finetune_all``, trained too;
then the query set is scored.

Regression (a task family such as the sinusoids, whose outputs mean the same in every
task): the "pretrained on all tasks" baseline of Finn et al. (2017, sec. 5.1). The network
itself, head included, is trained on batches of points pooled from random training tasks
(``datamodule.pooled_batch``), then fine-tuned on each support set from where it is.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metalearn.algorithms.base import EpisodicModule
from metalearn.algorithms.fitting import fit
from metalearn.data.sources.base import ClassImages
from metalearn.data.transforms import normalise
from metalearn.engines.base import check_inner_optimizer, collect, is_ragged
from metalearn.errors import ConfigError

HEAD = ("head.weight", "head.bias")


class FineTune(EpisodicModule):
    """Args are the ``algo`` config keys (see conf/algo/finetune.yaml); ``engine`` is unused."""

    task_kinds = ("classification", "regression")

    def __init__(
        self,
        model,
        optimizer,
        engine=None,
        name: str = "finetune",
        meta_batch_size: int = 1,
        batch_size: int = 64,
        seed: int = 0,
        inner_lr: float = 0.01,
        inner_steps_test: int = 100,
        inner_optimizer: str = "adam",
        finetune_all: bool = False,
    ):
        check_inner_optimizer(inner_optimizer)
        if batch_size < 1 or inner_steps_test < 1:
            raise ConfigError("algo.batch_size and algo.inner_steps_test must be >= 1")
        super().__init__(model, optimizer, name, meta_batch_size)
        self.model.head.requires_grad_(False)  # episode heads are fitted at test time
        self.batch_size, self.seed = batch_size, seed
        self.inner_lr, self.inner_steps_test = inner_lr, inner_steps_test
        self.inner_optimizer, self.finetune_all = inner_optimizer, finetune_all
        self.classifier: nn.Linear | None = None  # over all meta-train classes (see setup)

    # ---- the pre-training classifier, sized by the data ----------------------------------
    def setup(self, stage: str) -> None:
        # classes: pre-train a classifier over all meta-train classes; targets: the head
        self.model.head.requires_grad_(not self.task.episode_labels)
        if self.classifier is None and self.task.episode_labels:
            self.build_classifier(self.trainer.datamodule.splits.train.num_classes)

    def build_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.model.head.in_features, num_classes)
        self.classifier.to(self.device, self.model.head.weight.dtype)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        weight = checkpoint.get("state_dict", {}).get("classifier.weight")
        if self.classifier is None and weight is not None:
            self.build_classifier(weight.shape[0])

    def outer_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    # ---- supervised pre-training -------------------------------------------------------------
    def supervised_batch(self, train: ClassImages, norm=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` meta-train images, each of a uniformly drawn class and a uniformly
        drawn image of it; labels = class ids. ``norm``: the data's (mean, std) per channel."""
        rng = np.random.default_rng([self.seed, self.global_rank, self.global_step])
        classes = rng.integers(train.num_classes, size=self.batch_size)
        counts = train.counts[classes] if train.ragged else train.images_per_class
        picks = rng.integers(counts, size=self.batch_size)
        x = torch.from_numpy(train.pixels[train.offsets[classes] + picks]).float().div_(255.0)
        x = normalise(x, norm).to(self.device, self.model.head.weight.dtype)
        return x, torch.from_numpy(classes).to(self.device)

    def pretraining_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Images with global class labels, or a task family's points pooled over tasks."""
        data = self.trainer.datamodule
        if hasattr(data, "pooled_batch"):  # a task family (data/sinusoid.py)
            rng = np.random.default_rng([self.seed, self.global_rank, self.global_step])
            x, y = data.pooled_batch(rng, self.batch_size)
            dtype = self.model.head.weight.dtype
            return x.to(self.device, dtype), y.to(self.device, dtype)
        return self.supervised_batch(data.splits.train, getattr(data, "norm", None))

    def training_step(self, episodes, batch_idx):
        x, y = self.pretraining_batch()
        if self.classifier is not None:
            out = self.classifier(self.model.features(x))
        else:
            out = self.model(x)
        loss = self.task.loss(out, y)
        self.outer_step(loss)
        self.log_train(loss=loss.detach(), metric=self.task.score(out.detach(), y))

    # ---- evaluation: fit a fresh head on each support set -------------------------------
    def start_head(self, outputs: int) -> dict:
        """The head fitted on a support set starts from zero (classes: the episode's own), or
        from the trained head (targets that mean the same in every task)."""
        if not self.task.episode_labels:
            head = self.model.head.named_parameters(prefix="head")
            return {n: p.detach().clone() for n, p in head}
        return self.fresh_head(outputs)

    def fresh_head(self, ways: int) -> dict:
        dim = self.model.head.in_features
        weight = self.model.head.weight.new_zeros(ways, dim)
        return {"head.weight": weight, "head.bias": weight.new_zeros(ways)}

    def query_logits(self, episodes) -> torch.Tensor:
        return collect(
            [self.episode_logits(sx, sy, qx) for sx, sy, qx in zip(*episodes[:3], strict=True)],
            is_ragged(episodes),
        )

    def episode_logits(self, sx, sy, qx) -> torch.Tensor:
        head = self.start_head(self.task.outputs(sy))
        if self.finetune_all:
            params = {**dict(self.model.named_parameters()), **head}

            def forward(p, x):
                return functional_call(self.model, p, (x,))

            fitted, _ = fit(
                forward,
                params,
                params,
                [(sx, sy)] * self.inner_steps_test,
                self.inner_optimizer,
                self.inner_lr,
                loss_fn=self.task.loss,
            )
            with torch.no_grad():
                return forward(fitted, qx)
        with torch.no_grad():
            fs, fq = self.model.features(sx), self.model.features(qx)

        def linear(p, f):
            return F.linear(f, p["head.weight"], p["head.bias"])

        fitted, _ = fit(
            linear,
            head,
            HEAD,
            [(fs, sy)] * self.inner_steps_test,
            self.inner_optimizer,
            self.inner_lr,
            loss_fn=self.task.loss,
        )
        with torch.no_grad():
            return linear(fitted, fq)
