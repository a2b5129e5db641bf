"""Episodes: index sampling (numpy Generator) and materialisation to tensors.

An episode picks `ways` distinct classes in random order (label i = the i-th picked class, so
labels are remapped to 0..N-1 randomly per episode) and `shots + queries` distinct images per
class: the first `shots` are support, the rest query. Support and query are ordered by label.
All randomness comes from the Generator passed in, never from global RNG state.

Episodes of varying shape (data/shapes.py: ways and shots drawn per episode, Meta-Dataset's
imbalanced support sets) are a *ragged* meta-batch: ``Episodes`` whose four fields are tuples
of per-episode tensors instead of [B, ...] tensors. ``zip(*episodes)`` walks the tasks of
either kind alike; ``stacked_groups`` regroups a ragged batch by shape (engine=vmap).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class Episodes(NamedTuple):
    """A meta-batch of B episodes; float32 images in [0, 1] with ink = 1 (or normalised).

    Regular: each field one tensor (shapes below). Ragged (episodes of different shapes): each
    field a tuple of B per-episode tensors ([S_b, C, H, W], [S_b], [Q_b, C, H, W], [Q_b])."""

    support_x: Tensor  # [B, N*K, C, H, W]
    support_y: Tensor  # [B, N*K] int64 in 0..N-1
    query_x: Tensor  # [B, N*Q, C, H, W]
    query_y: Tensor  # [B, N*Q]

    def to(self, device, non_blocking: bool = False) -> Episodes:
        def move(t):
            if torch.is_tensor(t):
                return t.to(device, non_blocking=non_blocking)
            return tuple(x.to(device, non_blocking=non_blocking) for x in t)

        return Episodes(*(move(t) for t in self))

    @property
    def batch_size(self) -> int:
        return len(self.support_x)

    @property
    def ragged(self) -> bool:
        return not torch.is_tensor(self.support_x)

    def ways(self) -> list[int]:
        """Classes of each episode (labels are 0..N-1)."""
        return [int(y.max()) + 1 for y in self.support_y]

    def shots(self) -> list[float]:
        """Support images per class of each episode (a mean where classes differ)."""
        return [len(y) / w for y, w in zip(self.support_y, self.ways(), strict=True)]


class SemiEpisodes(NamedTuple):
    """Episodes with an unlabelled set each (``data.unlabelled``, data/unlabelled.py): the four
    ``Episodes`` fields, then the unlabelled images and their hidden labels.

    A type of its own rather than a fifth ``Episodes`` field, so the many ``zip(*episodes)``
    that walk (support, query) tasks stay as they are: an algorithm that does not declare
    ``uses_unlabelled`` gets ``labelled()`` (algorithms/base.py drops the set on arrival)."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    unlabelled_x: Tensor  # [B, U, C, H, W]: U = (N + D) * M, shuffled
    unlabelled_y: Tensor  # [B, U]: each image's episode label, -1 for a distractor class's;
    # for tests and analysis only: no algorithm may learn from it

    def to(self, device, non_blocking: bool = False) -> SemiEpisodes:
        return SemiEpisodes(*(t.to(device, non_blocking=non_blocking) for t in self))

    @property
    def batch_size(self) -> int:
        return len(self.support_x)

    def labelled(self) -> Episodes:
        return Episodes(*self[:4])


def labelled(episodes) -> Episodes:
    """The labelled episodes of a meta-batch, with or without an unlabelled set."""
    return Episodes(*episodes[:4])


def ragged(episodes: list[Episodes]) -> Episodes:
    """One ragged meta-batch from single episodes (each with B = 1)."""
    return Episodes(*(tuple(e[i][0] for e in episodes) for i in range(4)))


def shape_key(episode) -> tuple:
    """What must match for episodes to stack and share a head shape: the support and query
    sizes and the number of classes."""
    sx, sy, qx, _ = episode
    return (tuple(sx.shape), tuple(qx.shape), int(sy.max()) + 1)


def stacked_groups(episodes: Episodes) -> list[tuple[list[int], Episodes]]:
    """The meta-batch as groups of equal shape: (positions in the batch, regular Episodes).

    A regular batch is one group; a ragged one has a group per distinct shape."""
    if not episodes.ragged:
        return [(list(range(episodes.batch_size)), episodes)]
    groups: dict[tuple, list[int]] = {}
    tasks = list(zip(*episodes, strict=True))
    for b, task in enumerate(tasks):
        groups.setdefault(shape_key(task), []).append(b)
    return [
        (members, Episodes(*(torch.stack([tasks[b][i] for b in members]) for i in range(4))))
        for members in groups.values()
    ]


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


def seeded_generator(*seeds: int) -> torch.Generator:
    """A torch Generator seeded from non-negative integers only (e.g. seed, rank, step): draws
    that depend on the key, never on global RNG state, so a resumed run repeats them."""
    key = np.random.SeedSequence([int(s) for s in seeds])
    return torch.Generator().manual_seed(int(key.generate_state(1)[0]))


def materialise_varying(images, drawn: list) -> Episodes:
    """A ragged meta-batch from ``data.shapes.Episode`` draws of a ``ClassImages``: support
    ordered by label (class i has ``shots[i]`` images), then ``queries`` per class."""
    fields: list[list[Tensor]] = [[], [], [], []]
    for ep in drawn:
        ids = [int(images.offsets[c]) + img for c, img in zip(ep.classes, ep.images, strict=True)]
        support = np.concatenate([i[:k] for i, k in zip(ids, ep.shots, strict=True)])
        query = np.concatenate([i[k:] for i, k in zip(ids, ep.shots, strict=True)])
        labels = torch.arange(ep.ways, dtype=torch.int64)
        for field, value in zip(
            fields,
            (
                torch.from_numpy(images.pixels[support]).float().div_(255.0),
                labels.repeat_interleave(torch.from_numpy(np.asarray(ep.shots))),
                torch.from_numpy(images.pixels[query]).float().div_(255.0),
                labels.repeat_interleave(ep.queries),
            ),
            strict=True,
        ):
            field.append(value)
    return Episodes(*(tuple(f) for f in fields))


def as_indices(drawn: list) -> EpisodeIndices:
    """Draws of one shape (N-way, K shots per class) as ``EpisodeIndices``."""
    return EpisodeIndices(
        np.stack([ep.classes for ep in drawn]), np.stack([np.stack(ep.images) for ep in drawn])
    )
