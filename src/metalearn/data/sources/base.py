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
    """Images grouped by class, uint8, with a channel axis (1 = grayscale, 3 = RGB); drawings
    are stored ink-high (255 = stroke, 0 = background).

    ``images`` may be dense, ``[C, n, H, W]`` (grayscale) or ``[C, n, ch, H, W]``, or ragged:
    a list of one ``[n_c, H, W]`` / ``[n_c, ch, H, W]`` array per class (classes of different
    sizes). Either way ``pixels`` holds every image ``[N, ch, H, W]`` and class c's are
    ``pixels[offsets[c]:offsets[c + 1]]`` (``class_images(c)``).
    """

    images: np.ndarray | list
    names: list[str]  # C unique class names
    groups: list[str]  # C, the unit that splits respect (alphabet, or the class itself)

    def __post_init__(self) -> None:
        self.names, self.groups = list(self.names), list(self.groups)
        if isinstance(self.images, np.ndarray):
            if self.images.dtype != np.uint8 or self.images.ndim not in (4, 5):
                raise ValueError(
                    f"images must be uint8 [C, n, (ch,) H, W], got {self.images.dtype} "
                    f"{self.images.shape}"
                )
            dense = self.images if self.images.ndim == 5 else self.images[:, :, None]
            c, n = dense.shape[:2]
            self.pixels = dense.reshape(c * n, *dense.shape[2:])
            self.offsets = np.arange(c + 1, dtype=np.int64) * n
        else:
            per_class = [a if a.ndim == 4 else a[:, None] for a in self.images]
            if not per_class or any(a.dtype != np.uint8 for a in per_class):
                raise ValueError("images must be a non-empty list of uint8 arrays, one per class")
            if len({a.shape[1:] for a in per_class}) != 1:
                raise ValueError("every image must have the same [ch, H, W] shape")
            self.pixels = np.concatenate(per_class)
            self.offsets = np.concatenate([[0], np.cumsum([len(a) for a in per_class])])
        if not len(self.names) == len(self.groups) == self.num_classes:
            raise ValueError("images, names and groups must have one entry per class")
        if len(set(self.names)) != len(self.names):
            raise ValueError("class names must be unique")

    @property
    def num_classes(self) -> int:
        return len(self.offsets) - 1

    @property
    def counts(self) -> np.ndarray:
        """Images per class [C]."""
        return np.diff(self.offsets)

    @property
    def images_per_class(self) -> int:
        """The smallest class's number of images (all of them, when classes are equal)."""
        return int(self.counts.min())

    @property
    def ragged(self) -> bool:
        return bool(self.counts.min() != self.counts.max())

    @property
    def channels(self) -> int:
        return self.pixels.shape[1]

    @property
    def image_size(self) -> int:
        return self.pixels.shape[-1]

    def class_images(self, c: int) -> np.ndarray:
        """Class ``c``'s images [n_c, ch, H, W]."""
        return self.pixels[self.offsets[c] : self.offsets[c + 1]]

    def subset(self, indices) -> ClassImages:
        """The classes at `indices`, in that order."""
        indices = [int(i) for i in indices]
        names = [self.names[i] for i in indices]
        groups = [self.groups[i] for i in indices]
        if isinstance(self.images, np.ndarray):
            return ClassImages(self.images[indices], names, groups)
        return ClassImages([self.class_images(i) for i in indices], names, groups)


def with_channels(classes: ClassImages, channels: int) -> ClassImages:
    """The classes' images with 1 or 3 channels: gray repeated to RGB, or RGB to luminance
    exactly as Pillow's ``convert("L")`` (ITU-R 601-2 in 16-bit fixed point), which converts a
    user's colour image for a grayscale model (data/transforms.py)."""
    pixels = classes.pixels
    if pixels.shape[1] == channels:
        return classes
    if channels == 3:
        converted = np.repeat(pixels, 3, axis=1)
    else:
        weights = np.array([19595, 38470, 7471], dtype=np.uint32).reshape(1, 3, 1, 1)
        converted = (pixels.astype(np.uint32) * weights).sum(1, keepdims=True) + 0x8000
        converted = (converted >> 16).astype(np.uint8)
    per_class = np.split(converted, classes.offsets[1:-1])
    return ClassImages(per_class, classes.names, classes.groups)


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
    picks = [
        np.sort(np.random.default_rng(stable_seed(seed, name)).permutation(n)[:samples_per_class])
        for name, n in zip(classes.names, classes.counts, strict=True)
    ]
    if isinstance(classes.images, np.ndarray):
        images = np.stack([classes.images[c][p] for c, p in enumerate(picks)])
    else:
        images = [classes.class_images(c)[p] for c, p in enumerate(picks)]
    return ClassImages(images, classes.names, classes.groups)


def add_rotations(classes: ClassImages) -> ClassImages:
    """Each class plus its 90/180/270-degree rotations as new classes (same group)."""
    names = list(classes.names)
    for suffix in ROTATION_SUFFIXES:
        names += [name + suffix for name in classes.names]
    if isinstance(classes.images, np.ndarray):
        dense = classes.images
        images = [dense] + [np.rot90(dense, k, axes=(-2, -1)) for k in (1, 2, 3)]
        return ClassImages(np.ascontiguousarray(np.concatenate(images)), names, classes.groups * 4)
    per_class = [classes.class_images(c) for c in range(classes.num_classes)]
    rotated = [np.ascontiguousarray(np.rot90(a, k, axes=(-2, -1))) for k in (1, 2, 3)
               for a in per_class]  # fmt: skip
    return ClassImages(per_class + rotated, names, classes.groups * 4)


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
