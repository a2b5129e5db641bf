"""Your own images: ``data=folder``, one sub-folder per class.

Layouts, for ``data.root`` = the folder (``split: auto`` picks the first that fits):

1. ``folders``: ``<root>/{train,val,test}/<class>/<image>``;
2. ``files``: ``<root>/<class>/<image>`` with ``split_files`` naming, per split, a ``.txt``
   (one class per line) or a ``.csv`` (a ``label`` or ``class`` column; with a ``filename``
   column too, the files per split, as mini-ImageNet's csv files);
3. ``fraction``: ``<root>/<class>/<image>`` split by a seeded fraction of the classes
   (``fractions``, ranked by sha256 of (split_seed, class name): the same on every machine).

Images may be grayscale, colour or mixed (``channels: null`` takes 3 when any image is in
colour), of any size (``image_size: null`` keeps the images' own size when they all share
one), and classes may hold different numbers of images. Decoding thousands of JPEGs each run
is slow: the decoded, resized pixels are cached (``cache.py``).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from metalearn.data.sources.base import ClassImages
from metalearn.data.sources.cache import decode_classes
from metalearn.data.splits import SPLIT_NAMES, Splits, seeded_order
from metalearn.data.transforms import check_resize
from metalearn.errors import ConfigError, DataError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".pgm")
SPLITS = ("auto", "folders", "files", "fraction")


def files_of(invert: bool = False, resize: str = "lanczos", **_) -> dict:
    """How this folder's files look (saved in checkpoints, see data/transforms.py)."""
    return {"paper_white": bool(invert), "resize": resize}


FILES = files_of  # decided by the source's options


def class_folders(root: Path) -> dict[str, list[Path]]:
    """class name -> its image files (sorted), for every sub-folder of ``root``."""
    classes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise DataError(
                f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}): add some or remove it"
            )
        classes[folder.name] = files
    return classes


def read_split_file(path: Path) -> tuple[list[str], dict[str, list[str]] | None]:
    """(classes, files per class or None) listed by a .txt or .csv split file."""
    if not path.is_file():
        raise DataError(f"split file {path} not found: fix data.split_files")
    if path.suffix.lower() != ".csv":
        return [line.strip() for line in path.read_text().splitlines() if line.strip()], None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    column = next((c for c in ("label", "class") if rows and c in rows[0]), None)
    if column is None:
        raise DataError(f"{path} has no 'label' or 'class' column (a csv needs a header)")
    classes = list(dict.fromkeys(r[column] for r in rows))
    if "filename" not in rows[0]:
        return classes, None
    files: dict[str, list[str]] = {}
    for r in rows:
        files.setdefault(r[column], []).append(r["filename"])
    return classes, files


def split_classes(
    root: Path, split: str, split_files, fractions, split_seed: int
) -> dict[str, dict[str, list[Path]]]:
    """split -> class -> files."""
    if split not in SPLITS:
        raise ConfigError(f"data.split={split!r}: choose one of {', '.join(SPLITS)}")
    if split == "auto":
        if all((root / s).is_dir() for s in SPLIT_NAMES):
            split = "folders"
        else:
            split = "files" if split_files else "fraction"
    if split == "folders":
        missing = [s for s in SPLIT_NAMES if not (root / s).is_dir()]
        if missing:
            raise DataError(f"data.split=folders needs {root}/{{train,val,test}}/: no {missing}")
        return {s: class_folders(root / s) for s in SPLIT_NAMES}
    classes = class_folders(root)
    if not classes:
        raise DataError(
            f"{root} has no class sub-folders: put each class's images in <root>/<class>/ "
            "(or <root>/{train,val,test}/<class>/)"
        )
    if split == "files":
        return from_split_files(root, classes, split_files)
    return by_fraction(root, classes, fractions, split_seed)


def from_split_files(root: Path, classes: dict, split_files) -> dict:
    if not split_files or set(split_files) != set(SPLIT_NAMES):
        raise ConfigError(
            "data.split=files needs data.split_files with train, val and test entries, e.g. "
            "{train: train.txt, val: val.txt, test: test.txt} (paths relative to data.root)"
        )
    out = {}
    for s in SPLIT_NAMES:
        path = Path(split_files[s])
        path = path if path.is_absolute() else root / path
        names, files = read_split_file(path)
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise DataError(
                f"{path} names {len(unknown)} class(es) with no folder in {root}: "
                f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
            )
        if files is None:
            out[s] = {n: classes[n] for n in names}
        else:
            by_name = {n: {p.name: p for p in classes[n]} for n in names}
            out[s] = {n: [by_name[n].get(f, root / n / f) for f in files[n]] for n in names}
    return out


def by_fraction(root: Path, classes: dict, fractions, split_seed: int) -> dict:
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(
            f"data.fractions={fractions}: three positive shares of the classes (train, val, "
            "test) that sum to 1, e.g. [0.64, 0.16, 0.2]"
        )
    order = seeded_order(list(classes), split_seed)
    if len(order) < 3:
        raise DataError(f"{root} has {len(order)} classes: a split needs at least 3")
    n_val = max(1, round(fractions[1] * len(order)))
    n_test = max(1, round(fractions[2] * len(order)))
    parts = {
        "test": order[:n_test],
        "val": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
    }
    return {s: {n: classes[n] for n in sorted(parts[s])} for s in SPLIT_NAMES}


def load_folder(
    root,
    image_size: int | None = None,
    split_seed: int = 0,
    download: bool = False,
    split: str = "auto",
    split_files: dict | None = None,
    fractions=(0.64, 0.16, 0.2),
    invert: bool = False,
    resize: str = "lanczos",
    channels: int | None = None,
    cache: bool = True,
    cache_dir: str | None = None,
) -> Splits:
    """The classes of the image folder ``root`` (see the module doc)."""
    check_resize(resize)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root={root}: no such folder (one sub-folder per class)")
    by_split = split_classes(root, split, split_files, fractions, split_seed)
    decoded = decode_classes(
        root,
        by_split,
        image_size,
        channels,
        files_of(invert, resize),
        cache_dir=cache_dir if cache else None,
        use_cache=cache,
    )
    return Splits(*(ClassImages(*decoded[s]) for s in SPLIT_NAMES))
