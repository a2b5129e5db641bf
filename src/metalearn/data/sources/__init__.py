"""Dataset sources: name -> loader returning meta-train/val/test `Splits` of ink-high images."""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil

from metalearn.data.sources.base import ClassImages, add_rotations, take_samples, with_channels
from metalearn.data.sources.protocol import Source, check_files, check_loader, check_splits
from metalearn.data.splits import Splits
from metalearn.errors import ConfigError


def discover() -> tuple[dict, dict]:
    """Every module ``metalearn.data.sources.<name>`` with a ``load_<name>`` loader is a source
    (``data.name=<name>``); its ``FILES`` (a dict, or a function of the source's options) says
    how its files look (polarity, resize recipe: see metalearn.data.transforms). A new dataset
    is that module plus ``conf/data/<name>.yaml``; nothing to register. Each is checked against
    the contract in ``protocol.py`` here."""
    loaders, files = {}, {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        loader = getattr(module, f"load_{info.name}", None)
        if callable(loader):
            loaders[info.name] = loader
            files[info.name] = getattr(module, "FILES", {"paper_white": False, "resize": "lanczos"})
            check_loader(info.name, loader, files[info.name])
    return loaders, files


SOURCES, FILES = discover()


def files_of(name: str, options: dict) -> dict:
    files = FILES[name]
    return check_files(name, dict(files(**options) if callable(files) else files))


__all__ = ["FILES", "SOURCES", "files_of", "ClassImages", "Source", "Splits", "load_splits"]


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
    splits = check_splits(
        name,
        loader(root, image_size=image_size, split_seed=split_seed, download=download, **options),
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
