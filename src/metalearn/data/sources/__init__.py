"""Dataset sources: name -> loader returning meta-train/val/test `Splits` of ink-high images."""

from __future__ import annotations

import difflib
import inspect

from metalearn.data.sources import folder, miniimagenet, omniglot, quickdraw
from metalearn.data.sources.base import ClassImages, add_rotations, take_samples, with_channels
from metalearn.data.sources.folder import load_folder
from metalearn.data.sources.miniimagenet import load_miniimagenet
from metalearn.data.sources.omniglot import load_omniglot
from metalearn.data.sources.quickdraw import load_quickdraw
from metalearn.data.splits import Splits
from metalearn.errors import ConfigError

SOURCES = {
    "omniglot": load_omniglot,
    "quickdraw": load_quickdraw,
    "folder": load_folder,
    "miniimagenet": load_miniimagenet,
}
# How each source's files look (polarity, resize recipe): see metalearn.data.transforms; a
# function of the source's options where they decide it.
FILES = {
    "omniglot": omniglot.FILES,
    "quickdraw": quickdraw.FILES,
    "folder": folder.files_of,
    "miniimagenet": miniimagenet.FILES,
}


def files_of(name: str, options: dict) -> dict:
    files = FILES[name]
    return files(**options) if callable(files) else dict(files)


__all__ = ["FILES", "SOURCES", "files_of", "ClassImages", "Splits", "load_splits"]


def check_source(name: str, options: dict) -> None:
    """Raise ConfigError for an unknown source, or an option its loader does not take."""
    if name not in SOURCES:
        raise ConfigError(f"data.name={name!r} is unknown: choose one of {sorted(SOURCES)}")
    params = inspect.signature(SOURCES[name]).parameters
    own = [p for p in params if p not in GENERIC]
    for key in options:
        if key not in params or key in GENERIC:
            close = difflib.get_close_matches(key, own, n=2)
            hint = f" (did you mean {' or '.join(f'data.{c}' for c in close)}?)" if close else ""
            raise ConfigError(
                f"data.{key} is not an option of data={name}{hint}; its own options: "
                f"{', '.join(own) or 'none'}"
            )


# What the data module passes every loader; the rest of a loader's keywords are its own options.
GENERIC = ("root", "image_size", "split_seed", "download", "channels")


def load_splits(
    name: str,
    root,
    *,
    image_size: int | None = 28,
    rotations: bool = False,
    samples_per_class: int | None = None,
    split_seed: int = 0,
    download: bool = True,
    channels: int | None = None,
    **options,
) -> Splits:
    """Load dataset `name`, keep `samples_per_class` seeded images per class, add rotations,
    convert to `channels` (null: as the source gives them).

    `options` go to the source's loader (e.g. quickdraw_format for quickdraw).
    """
    check_source(name, options)
    loader = SOURCES[name]
    if image_size is None and "image_size" in inspect.signature(loader).parameters:
        default = inspect.signature(loader).parameters["image_size"].default
        if default is not None:
            raise ConfigError(f"data={name} needs data.image_size (e.g. {default})")
    splits = loader(
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
    if channels is not None and channels != splits.train.channels:
        splits = splits.map(lambda c: with_channels(c, channels))
    return splits
