"""Shared pieces of the dataset sources: the `ClassImages` container and array helpers."""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metalearn.data.transforms import resize_bilinear as resize_images  # noqa: F401 (re-export)
from metalearn.errors import DataError

ROTATION_SUFFIXES = ("/rot90", "/rot180", "/rot270")


@dataclass
class ClassImages:
    """Images grouped by class; every dataset is stored ink-high (255 = stroke, 0 = background)."""

    images: np.ndarray  # uint8 [C, n, H, W]
    names: list[str]  # C unique class names
    groups: list[str]  # C, the unit that splits respect (alphabet, or the class itself)

    def __post_init__(self) -> None:
        self.names, self.groups = list(self.names), list(self.groups)
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [C, n, H, W], got {self.images.dtype}")
        if not len(self.names) == len(self.groups) == len(self.images):
            raise ValueError("images, names and groups must have one entry per class")
        if len(set(self.names)) != len(self.names):
            raise ValueError("class names must be unique")

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    @property
    def images_per_class(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def subset(self, indices) -> ClassImages:
        """The classes at `indices`, in that order."""
        indices = [int(i) for i in indices]
        return ClassImages(
            self.images[indices],
            [self.names[i] for i in indices],
            [self.groups[i] for i in indices],
        )


def stable_seed(*parts) -> int:
    """A 64-bit integer derived from `parts` by sha256: same on every platform and numpy version."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def base_class_name(name: str) -> str:
    """The unrotated class name: 'A/character01/rot90' -> 'A/character01'."""
    for suffix in ROTATION_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def take_samples(classes: ClassImages, samples_per_class: int, seed: int) -> ClassImages:
    """A random subset of `samples_per_class` images per class, seeded by (seed, class name)."""
    n = classes.images_per_class
    picks = [
        np.sort(np.random.default_rng(stable_seed(seed, name)).permutation(n)[:samples_per_class])
        for name in classes.names
    ]
    images = np.stack([classes.images[c][p] for c, p in enumerate(picks)])
    return ClassImages(images, classes.names, classes.groups)


def add_rotations(classes: ClassImages) -> ClassImages:
    """Each class plus its 90/180/270-degree rotations as new classes (same group)."""
    images = [classes.images] + [np.rot90(classes.images, k, axes=(2, 3)) for k in (1, 2, 3)]
    names = list(classes.names)
    for suffix in ROTATION_SUFFIXES:
        names += [name + suffix for name in classes.names]
    return ClassImages(np.ascontiguousarray(np.concatenate(images)), names, classes.groups * 4)


def group_by_label(images: np.ndarray, labels: np.ndarray, num_classes: int, path: Path):
    """[N, H, W] images with class labels -> [C, n, H, W]; every class needs the same count n."""
    counts = np.bincount(labels, minlength=num_classes)
    if len(counts) != num_classes or counts.min() != counts.max():
        raise DataError(
            f"{path}: classes have unequal image counts ({counts.min()}..{counts.max()}); the file"
            " is corrupt or not the expected release: delete it and fetch it again."
        )
    order = np.argsort(labels, kind="stable")
    return images[order].reshape(num_classes, counts[0], *images.shape[1:])


def load_npz(path: Path, keys: tuple[str, ...], fix: str) -> dict[str, np.ndarray]:
    """Read `keys` from an .npz, turning any read problem into a DataError that names the file."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in keys if k not in archive.files]
            if missing:
                raise DataError(
                    f"{path} lacks the arrays {missing} (it has {archive.files}): it is not the"
                    f" expected file. Delete it; {fix}"
                )
            return {k: archive[k] for k in keys}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"{path} is unreadable or corrupt ({err}). Delete it; {fix}") from err


def save_npy_atomic(array: np.ndarray, dest: Path) -> None:
    """np.save to a temp file next to `dest`, then rename: `dest` is never half-written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
