"""Dataset sources: name -> loader returning meta-train/val/test `Splits` of ink-high images."""

from __future__ import annotations

from metalearn.data.sources import omniglot, quickdraw
from metalearn.data.sources.base import ClassImages, add_rotations, take_samples
from metalearn.data.sources.omniglot import load_omniglot
from metalearn.data.sources.quickdraw import load_quickdraw
from metalearn.data.splits import Splits
from metalearn.errors import ConfigError

SOURCES = {"omniglot": load_omniglot, "quickdraw": load_quickdraw}
# How each source's files look (polarity, resize recipe): see metalearn.data.transforms.
FILES = {"omniglot": omniglot.FILES, "quickdraw": quickdraw.FILES}

__all__ = ["FILES", "SOURCES", "ClassImages", "Splits", "load_splits"]


def load_splits(
    name: str,
    root,
    *,
    image_size: int = 28,
    rotations: bool = False,
    samples_per_class: int | None = None,
    split_seed: int = 0,
    download: bool = True,
    **options,
) -> Splits:
    """Load dataset `name`, keep `samples_per_class` seeded images per class, add rotations.

    `options` go to the source's loader (e.g. quickdraw_format for quickdraw).
    """
    if name not in SOURCES:
        raise ConfigError(f"data.name={name!r} is unknown: choose one of {sorted(SOURCES)}")
    splits = SOURCES[name](
        root, image_size=image_size, split_seed=split_seed, download=download, **options
    )
    if samples_per_class is not None:
        available = min(c.images_per_class for _, c in splits.items())
        if not 1 <= samples_per_class <= available:
            raise ConfigError(
                f"data.samples_per_class={samples_per_class} but data={name} has {available}"
                f" images per class: set it to 1..{available}, or null for all"
            )
        splits = splits.map(lambda c: take_samples(c, samples_per_class, split_seed))
    if rotations:
        splits = splits.map(add_rotations)
    return splits
