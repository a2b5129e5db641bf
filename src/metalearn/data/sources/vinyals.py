"""The Vinyals et al. (2016) Omniglot class split: 1028 / 172 / 423 characters.

The split most Omniglot tables use (Matching Networks, MAML, Meta-SGD, Reptile, ProtoNet),
read from ``<root>/omniglot/vinyals_split/{train,val,test}.json`` as torchmeta ships them
(``VINYALS_URL``): each file maps ``background``/``evaluation`` -> alphabet -> character folder
names, i.e. the ``<Alphabet>/<characterNN>`` class names of the two Omniglot parts. Train =
25 background + 8 evaluation alphabets, val = 5 background, test = 13 evaluation; not quite
by whole alphabets: the split cuts the character list at 1200, inside Gurmukhi (41 of its
characters train, 4 test). No character is in two splits. The papers add the
90/180/270-degree rotations as new classes (``data.rotations=true``), within each split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from metalearn.data.sources.base import ClassImages
from metalearn.data.splits import SPLIT_NAMES, Splits
from metalearn.errors import DataError

VINYALS_URL = (
    "https://raw.githubusercontent.com/tristandeleu/pytorch-meta/master/"
    "torchmeta/datasets/assets/omniglot/"
)
# Characters per split; a module constant so tests with tiny fake datasets can patch it.
VINYALS_CLASSES = {"train": 1028, "val": 172, "test": 423}
PART_KEYS = {"images_background": "background", "images_evaluation": "evaluation"}


def vinyals_splits(parts: dict[str, ClassImages], folder: Path) -> Splits:
    """The classes of ``parts`` ({"images_background": ..., "images_evaluation": ...})
    listed by each split file under ``folder/vinyals_split``."""
    by_name = {
        (PART_KEYS[part], name): (classes, i)
        for part, classes in parts.items()
        for i, name in enumerate(classes.names)
    }
    return Splits(*(split_classes(folder, split, by_name) for split in SPLIT_NAMES))


def split_file(folder: Path, split: str) -> Path:
    return folder / "vinyals_split" / f"{split}.json"


def read_split(path: Path) -> list[tuple[str, str]]:
    """(part, "<Alphabet>/<characterNN>") for every character listed in one split file."""
    fix = (
        f"put the split file from {VINYALS_URL}{path.name} there (or use"
        " data.split=alphabets, which needs no list)"
    )
    if not path.is_file():
        raise DataError(f"Omniglot's Vinyals split needs {path}: {fix}")
    try:
        listing = json.loads(path.read_text())
        names = [
            (part, f"{alphabet}/{character}")
            for part, alphabets in listing.items()
            for alphabet, characters in alphabets.items()
            for character in characters
        ]
    except (ValueError, AttributeError, TypeError) as err:
        raise DataError(
            f"{path} is not a split file (JSON part -> alphabet -> [characters]): {err}."
            f" Delete it and {fix}"
        ) from err
    unknown = sorted({part for part, _ in names} - set(PART_KEYS.values()))
    if unknown:
        raise DataError(f"{path}: unknown parts {unknown}, expected background/evaluation: {fix}")
    return names


def split_classes(folder: Path, split: str, by_name: dict) -> ClassImages:
    path = split_file(folder, split)
    names = read_split(path)
    missing = [name for part, name in names if (part, name) not in by_name]
    if missing or len(set(names)) != len(names) or len(names) != VINYALS_CLASSES[split]:
        raise DataError(
            f"{path} lists {len(set(names))} distinct characters, expected"
            f" {VINYALS_CLASSES[split]} all in the Omniglot files"
            + (f" (not found: {missing[:5]})" if missing else "")
            + f": it is corrupt or another split. Delete it and put the one from {VINYALS_URL}"
        )
    found = [by_name[key] for key in names]
    images = np.stack([classes.images[i] for classes, i in found])
    groups = [classes.groups[i] for classes, i in found]
    return ClassImages(images, [name for _, name in names], groups)
