"""Meta-train / meta-val / meta-test class splits and the leakage check.

Split rules are deterministic functions of `split_seed` and the class/group names: each name is
ranked by sha256(f"{split_seed}/{name}") (`seeded_order`), so a split is the same on every
platform and numpy version and can be re-derived from the names alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from metalearn.data.sources.base import ClassImages, base_class_name

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Splits:
    train: ClassImages
    val: ClassImages
    test: ClassImages
    episode_groups: bool = False  # each episode's classes from one group (one alphabet)

    def items(self) -> list[tuple[str, ClassImages]]:
        return [(name, getattr(self, name)) for name in SPLIT_NAMES]

    def map(self, fn: Callable[[ClassImages], ClassImages]) -> Splits:
        return Splits(fn(self.train), fn(self.val), fn(self.test), self.episode_groups)

    def class_names(self) -> dict[str, list[str]]:
        """Class names per split, e.g. to log exactly which classes were used."""
        return {name: list(classes.names) for name, classes in self.items()}


def check_disjoint(splits: Splits, names: Sequence[str] = SPLIT_NAMES) -> None:
    """Raise ValueError if a class (rotations included, by base name) is in two of the splits
    ``names``."""
    bases = {name: {base_class_name(n) for n in c.names} for name, c in splits.items()}
    leaks = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = sorted(bases[a] & bases[b])
            if shared:
                leaks.append(f"{a}/{b}: {shared[:10]}{' ...' if len(shared) > 10 else ''}")
    if leaks:
        raise ValueError(
            "class leakage between splits (rotations count as the same class): " + "; ".join(leaks)
        )


def seeded_order(names: Sequence[str], seed: int) -> list[str]:
    """`names` (deduplicated) ranked by sha256(f"{seed}/{name}")."""
    return sorted(set(names), key=lambda n: hashlib.sha256(f"{seed}/{n}".encode()).hexdigest())


def select_groups(classes: ClassImages, groups: set[str]) -> ClassImages:
    """The classes whose group is in `groups`, in their original order."""
    return classes.subset([i for i, g in enumerate(classes.groups) if g in groups])


def split_by_counts(classes: ClassImages, counts: Sequence[int], seed: int) -> list[ClassImages]:
    """Split whole groups by `seeded_order`: the first counts[0] groups, the next counts[1], ..."""
    order = seeded_order(classes.groups, seed)
    if sum(counts) != len(order):
        raise ValueError(f"counts {list(counts)} must add up to the {len(order)} groups")
    parts, start = [], 0
    for count in counts:
        parts.append(select_groups(classes, set(order[start : start + count])))
        start += count
    return parts


def with_val_in_train(splits: Splits) -> Splits:
    """Meta-train on the train and val classes together (Snell et al. train on Omniglot's 1200
    characters, the Vinyals train + val); the val split stays as it is but must not be scored:
    its classes are training classes now."""
    train, val = splits.train, splits.val
    dense = isinstance(train.images, np.ndarray) and isinstance(val.images, np.ndarray)
    images = (
        np.concatenate([train.images, val.images])
        if dense and train.images.shape[1:] == val.images.shape[1:]
        else [train.class_images(c) for c in range(train.num_classes)]
        + [val.class_images(c) for c in range(val.num_classes)]
    )
    merged = ClassImages(images, train.names + val.names, train.groups + val.groups)
    return dataclasses.replace(splits, train=merged)
