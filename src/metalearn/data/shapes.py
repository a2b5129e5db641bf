"""Episodes whose number of classes and support examples per class vary (``data.episodes``).

* ``fixed``: every episode N-way K-shot with Q queries per class (data/episodes.py).
* ``range``: ways uniform in ``ways_range``, shots uniform in ``shots_range`` (the same for
  every class of an episode), ``queries`` per class: a simple spread of shapes.
* ``metadataset``: the procedure of Triantafillou et al. (2020, "Meta-Dataset", sec. 3.2):
  1. ways uniform in [min_ways, min(max_ways, classes available)];
  2. queries per class q = min(max_queries, floor(smallest chosen class / 2)), balanced;
  3. support size |S| = min(max_support, sum_c ceil(beta * min(max_support_per_class,
     n_c - q))) with beta ~ U(0, 1];
  4. each class's share of |S| - N is proportional to n_c * exp(a_c), a_c ~ U[log .5, log 2),
     plus one example: k_c = min(floor(share_c * (|S| - N)) + 1, n_c - q). Imbalanced.
  The bounds are Meta-Dataset's; on small data they scale themselves: ways never exceed the
  split's classes (Omniglot's smallest split has 165), the half-the-class rule caps queries
  (10 of Omniglot's 20 images), and n_c - q caps the support (10 per class on Omniglot).

Every draw is a pure function of the Generator passed in, as for fixed episodes. With
``groups`` (e.g. Omniglot's alphabets, ``data.within_alphabet``) all classes of an episode come
from one group: a group is drawn uniformly among those with enough classes, then its classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from metalearn.errors import ConfigError

MODES = ("fixed", "range", "metadataset")


@dataclass(frozen=True)
class EpisodeShapes:
    """How each episode's shape is drawn (the ``data.episodes`` keys)."""

    mode: str = "fixed"
    ways: int = 5  # fixed
    shots: int = 1  # fixed
    queries: int = 15  # fixed and range: query images per class
    ways_range: tuple[int, int] = (5, 5)  # range
    shots_range: tuple[int, int] = (1, 1)  # range
    min_ways: int = 5  # metadataset
    max_ways: int = 50
    max_support: int = 500
    max_support_per_class: int = 100
    max_queries: int = 10

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"data.episodes={self.mode!r}: choose one of {', '.join(MODES)}")
        for key in ("ways_range", "shots_range"):
            low, high = getattr(self, key)
            if not 1 <= low <= high:
                raise ConfigError(f"data.{key}={[low, high]}: use [min, max] with 1 <= min <= max")
        if self.ways_range[0] < 2 or self.min_ways < 2 or self.max_ways < self.min_ways:
            raise ConfigError(
                "episodes need at least 2 classes: data.ways_range[0] and "
                "data.metadataset.min_ways >= 2, and max_ways >= min_ways"
            )
        if self.max_support < self.max_ways or self.max_queries < 1:
            raise ConfigError(
                "data.metadataset.max_support must be >= max_ways (one support image per "
                "class) and max_queries >= 1"
            )

    @property
    def varying(self) -> bool:
        return self.mode != "fixed"

    def most_ways(self) -> int:
        return {"fixed": self.ways, "range": self.ways_range[1], "metadataset": self.max_ways}[
            self.mode
        ]

    def fewest_ways(self) -> int:
        return {"fixed": self.ways, "range": self.ways_range[0], "metadataset": self.min_ways}[
            self.mode
        ]

    def least_images(self) -> int:
        """Images a class needs at least (one support + one query for metadataset)."""
        if self.mode == "fixed":
            return self.shots + self.queries
        if self.mode == "range":
            return self.shots_range[1] + self.queries
        return 2


@dataclass
class Episode:
    """One episode's draw: class ids (label i = classes[i]), support images per class, queries
    per class, and each class's image ids (support first, then queries)."""

    classes: np.ndarray  # int64 [N]
    shots: np.ndarray  # int64 [N]
    queries: int
    images: list[np.ndarray]  # N arrays of shots[i] + queries image ids

    @property
    def ways(self) -> int:
        return len(self.classes)


def pick_classes(rng, counts, low: int, high: int, groups, enough: int, key: str) -> np.ndarray:
    """Classes of one episode, between ``low`` and ``high`` of them (uniform), among classes
    with at least ``enough`` images; from one group when ``groups`` is given."""
    eligible = np.flatnonzero(counts >= enough)
    if groups is not None:
        names, members = np.unique(groups[eligible], return_inverse=True)
        fits = np.flatnonzero(np.bincount(members, minlength=len(names)) >= low)
        if len(fits) == 0:
            raise ConfigError(
                f"{key}: no group (alphabet) has {low} classes for an episode from one group: "
                "lower the ways, or set data.within_alphabet=false"
            )
        eligible = eligible[members == fits[rng.integers(len(fits))]]
    if len(eligible) < low:
        raise ConfigError(
            f"{key}: episodes of at least {low} classes, but {len(eligible)} classes have "
            f"{enough} images or more: lower it"
        )
    ways = int(rng.integers(low, min(high, len(eligible)) + 1))
    return eligible[rng.permutation(len(eligible))[:ways]].astype(np.int64)


def draw_episode(
    rng: np.random.Generator,
    counts: np.ndarray,
    shapes: EpisodeShapes,
    groups: np.ndarray | None = None,
) -> Episode:
    """One episode of ``shapes.mode`` from classes of ``counts`` images each."""
    counts = np.asarray(counts, dtype=np.int64)
    if shapes.mode == "metadataset":
        return _metadataset(rng, counts, shapes, groups)
    if shapes.mode == "range":
        (low, high), key = shapes.ways_range, "data.ways_range"
        shots = int(rng.integers(shapes.shots_range[0], shapes.shots_range[1] + 1))
    else:
        low = high = shapes.ways
        key, shots = "ways", shapes.shots
    classes = pick_classes(rng, counts, low, high, groups, shots + shapes.queries, key)
    per_class = np.full(len(classes), shots, np.int64)
    return Episode(classes, per_class, shapes.queries, _images(rng, counts, classes, per_class,
                                                               shapes.queries))  # fmt: skip


def _metadataset(rng, counts, shapes: EpisodeShapes, groups) -> Episode:
    classes = pick_classes(
        rng, counts, shapes.min_ways, shapes.max_ways, groups, 2, "data.metadataset.min_ways"
    )
    n = counts[classes]
    queries = int(min(shapes.max_queries, (n // 2).min()))
    remaining = n - queries
    beta = rng.uniform()  # [0, 1): floor(beta * c + 1) = ceil of a U(0, 1] draw's product
    contributions = np.minimum(shapes.max_support_per_class, remaining)
    size = int(min(np.floor(beta * contributions + 1).sum(), shapes.max_support))
    weights = n * np.exp(rng.uniform(math.log(0.5), math.log(2.0), size=len(classes)))
    shares = weights / weights.sum()
    shots = np.minimum(np.floor(shares * (size - len(classes))).astype(np.int64) + 1, remaining)
    return Episode(classes, shots, queries, _images(rng, counts, classes, shots, queries))


def _images(rng, counts, classes, shots, queries: int) -> list[np.ndarray]:
    """Each class's shots + queries distinct image ids, drawn among its own images."""
    return [
        rng.permutation(int(counts[c]))[: int(k) + queries].astype(np.int64)
        for c, k in zip(classes, shots, strict=True)
    ]
