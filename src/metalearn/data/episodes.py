"""N-way K-shot episodes: index sampling (numpy Generator) and materialisation to tensors.

An episode picks `ways` distinct classes in random order (label i = the i-th picked class, so
labels are remapped to 0..N-1 randomly per episode) and `shots + queries` distinct images per
class: the first `shots` are support, the rest query. Support and query are ordered by label.
All randomness comes from the Generator passed in, never from global RNG state.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class Episodes(NamedTuple):
    """A meta-batch of B episodes; float32 images in [0, 1] with ink = 1 (or normalised)."""

    support_x: Tensor  # [B, N*K, C, H, W]
    support_y: Tensor  # [B, N*K] int64 in 0..N-1
    query_x: Tensor  # [B, N*Q, C, H, W]
    query_y: Tensor  # [B, N*Q]

    def to(self, device, non_blocking: bool = False) -> Episodes:
        return Episodes(*(t.to(device, non_blocking=non_blocking) for t in self))

    @property
    def batch_size(self) -> int:
        return self.support_x.shape[0]


class EpisodeIndices(NamedTuple):
    """Which images make up B episodes, before loading them."""

    classes: np.ndarray  # int64 [B, N]: classes[b, i] is the class with label i
    images: np.ndarray  # int64 [B, N, K+Q]: image ids within each class, distinct per class


def sample_indices(
    rng: np.random.Generator,
    num_episodes: int,
    num_classes: int,
    images_per_class,
    ways: int,
    shots: int,
    queries: int,
) -> EpisodeIndices:
    """Draw class ids and image ids for `num_episodes` episodes.

    ``images_per_class``: one number for all classes, or each class's count [num_classes]
    (ragged classes: each draws among its own images; the draws are the same as with one
    number when all counts are equal).
    """
    counts = np.broadcast_to(np.asarray(images_per_class, dtype=np.int64), (num_classes,))
    if ways > num_classes or shots + queries > counts.min():
        raise ValueError(
            f"{ways}-way {shots}+{queries} episodes need {ways} classes of {shots + queries}"
            f" images; have {num_classes} classes of {counts.min()}"
        )
    classes = np.stack([rng.permutation(num_classes)[:ways] for _ in range(num_episodes)])
    keys = rng.random((num_episodes, ways, int(counts.max())))
    if counts.min() != counts.max():  # a class's missing images sort last: never drawn
        keys[np.arange(keys.shape[-1]) >= counts[classes][..., None]] = 2.0
    images = np.argsort(keys, axis=-1)[..., : shots + queries]
    return EpisodeIndices(classes.astype(np.int64), images.astype(np.int64))


def gather(images, indices: EpisodeIndices) -> np.ndarray:
    """uint8 [B, N, K+Q, ch, H, W] from a ``ClassImages`` or a dense [C, n, H, W] array."""
    if isinstance(images, np.ndarray):
        return images[indices.classes[..., None], indices.images][:, :, :, None]
    flat = images.offsets[indices.classes][..., None] + indices.images
    return images.pixels[flat]


def materialise(images, indices: EpisodeIndices, shots: int) -> Episodes:
    """Gather uint8 ink-high images (``ClassImages``, or a dense [C, n, H, W] array) into float
    Episodes in [0, 1] (normalisation, where the data has it, comes after: data/datamodule.py)."""
    batch, ways, per_class = indices.images.shape
    x = torch.from_numpy(gather(images, indices)).float().div_(255.0)  # [B, N, K+Q, ch, H, W]
    queries = per_class - shots
    labels = torch.arange(ways, dtype=torch.int64)
    return Episodes(
        support_x=x[:, :, :shots].reshape(batch, ways * shots, *x.shape[3:]),
        support_y=labels.repeat_interleave(shots).expand(batch, -1).contiguous(),
        query_x=x[:, :, shots:].reshape(batch, ways * queries, *x.shape[3:]),
        query_y=labels.repeat_interleave(queries).expand(batch, -1).contiguous(),
    )


def sample_episodes(
    images: np.ndarray, rng: np.random.Generator, num_episodes: int, ways, shots, queries
) -> Episodes:
    """Sample and materialise `num_episodes` episodes from uint8 images [C, n, H, W]."""
    indices = sample_indices(rng, num_episodes, *images.shape[:2], ways, shots, queries)
    return materialise(images, indices, shots)


def seeded_rng(*seeds: int) -> np.random.Generator:
    """A numpy Generator seeded from non-negative integers only (e.g. seed, rank, epoch, index)."""
    return np.random.default_rng(np.random.SeedSequence([int(s) for s in seeds]))
