"""The data-source contract: what the data module may rely on in a source.

A source is a module ``metalearn/data/sources/<name>.py`` (``data.name=<name>``) with

* ``load_<name>(root, *, image_size, split_seed, download, **own options) -> Splits``: the
  meta-train/val/test classes found under ``root``. ``image_size`` is the square side to
  resize to (None: the files' own, where the source allows it); ``split_seed`` fixes any
  seeded split; ``download`` allows fetching missing files (checksummed, written atomically).
  Its own options are the other keys of ``conf/data/<name>.yaml``, each with a default; the
  data module refuses a key the loader does not take.
* a returned ``Splits`` of three ``ClassImages`` (uint8 with a channel axis, drawings stored
  ink-high) of one image shape; no class in two splits (the data module checks that).
* ``FILES``: how its files look, so a user's own images get the same conversion
  (``data/transforms.py``): ``{"paper_white": bool, "resize": <a recipe of RESIZERS>}``, or a
  function of the loader's own options returning one (``folder``: ``invert``, ``resize``).

``check_loader`` runs when the sources are discovered and ``check_splits`` on what a loader
returns; each names the missing piece, so a new source fails where it is written, not mid-run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol

from metalearn.data.sources.base import ClassImages
from metalearn.data.splits import Splits
from metalearn.data.transforms import RESIZERS
from metalearn.errors import ConfigError, DataError

# Keywords the data module passes every loader (its own options come on top).
REQUIRED = ("image_size", "split_seed", "download")
CONTRACT = "see metalearn/data/sources/protocol.py"


class Source(Protocol):
    def __call__(
        self, root: Any, *, image_size: int | None, split_seed: int, download: bool, **options
    ) -> Splits: ...


def check_loader(name: str, loader: Callable, files) -> None:
    """Raise ConfigError if ``load_<name>`` or its ``FILES`` break the contract above."""
    where = f"metalearn.data.sources.{name}.load_{name}"
    params = inspect.signature(loader).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        missing = [p for p in REQUIRED if p not in params]
        if missing:
            raise ConfigError(
                f"{where} does not take {', '.join(missing)}: every source's loader takes "
                f"(root, *, {', '.join(REQUIRED)}, **its own options) ({CONTRACT})"
            )
    if not callable(files):
        check_files(name, files)


def check_files(name: str, files) -> dict:
    """``files`` (a source's FILES, or what its FILES function returned) if well formed."""
    if not isinstance(files, dict) or set(files) != {"paper_white", "resize"}:
        raise ConfigError(
            f"metalearn.data.sources.{name}.FILES must be {{'paper_white': bool, 'resize': "
            f"recipe}} (or a function of the source's options returning one), got {files!r} "
            f"({CONTRACT})"
        )
    if files["resize"] not in RESIZERS:
        raise ConfigError(
            f"metalearn.data.sources.{name}.FILES resize={files['resize']!r} is unknown: "
            f"choose one of {sorted(RESIZERS)}"
        )
    return files


def check_splits(name: str, splits) -> Splits:
    """``splits`` if it is three ClassImages of one image shape; else a DataError."""
    if not isinstance(splits, Splits) or not all(
        isinstance(classes, ClassImages) for _, classes in splits.items()
    ):
        raise DataError(
            f"load_{name} returned {type(splits).__name__}, not Splits(train, val, test) of "
            f"ClassImages ({CONTRACT})"
        )
    shapes = {split: classes.pixels.shape[1:] for split, classes in splits.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{split} {tuple(shape)}" for split, shape in shapes.items())
        raise DataError(
            f"data={name} gives images of different shapes per split ({listed}) [channels, H, "
            "W]: set data.image_size (and data.channels) so every split is resized alike"
        )
    return splits
