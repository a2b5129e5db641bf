"""Unlabelled images in episodes: semi-supervised few-shot episodes (Ren et al. 2018, "Meta-
Learning for Semi-Supervised Few-Shot Classification", sec. 4).

Each class's images are split once into a labelled part (``labelled_fraction`` of them) and an
unlabelled part, by a permutation seeded by (split_seed, class name) only: the same in every
run, every split, every episode. Support and query images come from the labelled part, the
unlabelled set from the unlabelled part, so it never holds an episode's support or query
image. An episode's unlabelled set holds ``per_class`` images of each of its N classes plus
``per_class`` images of each of ``distractors`` other classes of the same split (Ren et al.'s
distractor classes: never one of the episode's), shuffled. Its draws come from a Generator of
their own (the episode's seeds plus ``UNLABELLED_TAG``), so the labelled episodes are the same
whatever ``per_class`` and ``distractors`` are: a supervised run that ignores the unlabelled
set sees exactly the episodes a semi-supervised one does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from metalearn.data.episodes import Episodes, SemiEpisodes, seeded_rng
from metalearn.data.sources.base import ClassImages, stable_seed
from metalearn.data.splits import Splits
from metalearn.errors import ConfigError

UNLABELLED_TAG = 11  # the unlabelled set's random stream: (episode seeds..., UNLABELLED_TAG)
DISTRACTOR = -1  # unlabelled_y of a distractor class's image


@dataclass(frozen=True)
class Unlabelled:
    """The ``data.unlabelled`` keys; off (``per_class=0``) changes nothing."""

    per_class: int = 0
    distractors: int = 0
    labelled_fraction: float = 0.4

    def __post_init__(self):
        if self.per_class < 0 or self.distractors < 0:
            raise ConfigError("data.unlabelled.per_class and .distractors must be >= 0")
        if self.distractors and not self.per_class:
            raise ConfigError(
                f"data.unlabelled.distractors={self.distractors} adds per_class images of each "
                "distractor class, and per_class is 0: set data.unlabelled.per_class (Ren et "
                "al.: 5)"
            )
        if not 0 < self.labelled_fraction < 1:
            raise ConfigError(
                f"data.unlabelled.labelled_fraction={self.labelled_fraction}: use a fraction "
                "in (0, 1) (Ren et al.: 0.1 on Omniglot, 0.4 on mini-ImageNet)"
            )

    @property
    def active(self) -> bool:
        return self.per_class > 0


def split_class_images(classes: ClassImages, fraction: float, seed: int):
    """(labelled, unlabelled) ``ClassImages``: each class's images cut once by a permutation
    seeded by (seed, class name); round(fraction * n) labelled, at least one of each."""
    labelled, unlabelled = [], []
    for c, (name, n) in enumerate(zip(classes.names, classes.counts, strict=True)):
        order = np.random.default_rng(stable_seed(seed, "unlabelled", name)).permutation(int(n))
        cut = min(max(int(round(fraction * n)), 1), int(n) - 1)
        images = classes.class_images(c)
        labelled.append(images[np.sort(order[:cut])])
        unlabelled.append(images[np.sort(order[cut:])])
    return (
        ClassImages(labelled, classes.names, classes.groups),
        ClassImages(unlabelled, classes.names, classes.groups),
    )


def split_labelled(splits: Splits, fraction: float, seed: int) -> tuple[Splits, Splits]:
    """(labelled parts, unlabelled parts) of every split's classes."""
    parts = {name: split_class_images(c, fraction, seed) for name, c in splits.items()}
    return (
        Splits(*(parts[n][0] for n in ("train", "val", "test")), splits.episode_groups),
        Splits(*(parts[n][1] for n in ("train", "val", "test")), splits.episode_groups),
    )


class UnlabelledIndices(NamedTuple):
    """Which images make up B episodes' unlabelled sets."""

    classes: np.ndarray  # int64 [B, N + D]: the episode's N classes, then D distractors
    images: np.ndarray  # int64 [B, N + D, M]: image ids within each class's unlabelled part
    order: np.ndarray  # int64 [B, (N + D) * M]: the shuffle of the set


def sample_unlabelled(
    rng: np.random.Generator, episode_classes: np.ndarray, counts, spec: Unlabelled
) -> UnlabelledIndices:
    """The unlabelled sets of episodes whose classes are ``episode_classes`` [B, N] (label i
    = column i), drawn among classes of ``counts`` unlabelled images each."""
    counts = np.asarray(counts, dtype=np.int64)
    batch, ways = episode_classes.shape
    m, d = spec.per_class, spec.distractors
    if ways + d > len(counts):
        raise ConfigError(
            f"{ways}-way episodes with data.unlabelled.distractors={d} need {ways + d} classes;"
            f" a split has {len(counts)}: lower the distractors"
        )
    classes = np.zeros((batch, ways + d), np.int64)
    images = np.zeros((batch, ways + d, m), np.int64)
    order = np.zeros((batch, (ways + d) * m), np.int64)
    for b in range(batch):
        others = np.setdiff1d(np.arange(len(counts)), episode_classes[b])
        classes[b] = np.concatenate([episode_classes[b], rng.permutation(others)[:d]])
        for i, c in enumerate(classes[b]):
            images[b, i] = rng.permutation(int(counts[c]))[:m]
        order[b] = rng.permutation((ways + d) * m)
    return UnlabelledIndices(classes, images, order)


def check_fits(unlabelled: Splits, spec: Unlabelled) -> None:
    """Every class's unlabelled part holds ``per_class`` images (an error names the fix)."""
    for split, classes in unlabelled.items():
        if classes.images_per_class < spec.per_class:
            raise ConfigError(
                f"the {split} split's classes keep {classes.images_per_class} unlabelled images"
                f" (1 - data.unlabelled.labelled_fraction of each) but data.unlabelled."
                f"per_class={spec.per_class}: lower per_class or labelled_fraction"
            )


def materialise_unlabelled(images: ClassImages, indices: UnlabelledIndices, ways: int):
    """(unlabelled_x float [B, U, ch, H, W] in [0, 1], unlabelled_y [B, U]: the episode label of
    each image, ``DISTRACTOR`` for a distractor class's), U = (N + D) * M, shuffled."""
    batch, width, m = indices.images.shape
    flat = images.offsets[indices.classes][..., None] + indices.images  # [B, N + D, M]
    x = torch.from_numpy(images.pixels[flat.reshape(batch, -1)]).float().div_(255.0)
    labels = np.where(np.arange(width) < ways, np.arange(width), DISTRACTOR)
    y = np.broadcast_to(np.repeat(labels, m), (batch, width * m))
    rows = np.arange(batch)[:, None]
    x = x[torch.from_numpy(rows), torch.from_numpy(indices.order)]
    return x, torch.from_numpy(np.ascontiguousarray(y[rows, indices.order]))


def with_unlabelled(episodes: Episodes, x, y) -> SemiEpisodes:
    return SemiEpisodes(*episodes, x, y)


def eval_unlabelled_indices(
    images: ClassImages, episode_classes: np.ndarray, spec: Unlabelled, eval_seed, split_tag
) -> UnlabelledIndices:
    """Fixed episodes' unlabelled sets: episode e's drawn from (eval_seed, split, e, tag)."""
    parts = [
        sample_unlabelled(
            seeded_rng(eval_seed, split_tag, e, UNLABELLED_TAG), episode_classes[e : e + 1],
            images.counts, spec,
        )
        for e in range(len(episode_classes))
    ]  # fmt: skip
    if not parts:
        return sample_unlabelled(seeded_rng(eval_seed), episode_classes, images.counts, spec)
    return UnlabelledIndices(*(np.concatenate([p[i] for p in parts]) for i in range(3)))
