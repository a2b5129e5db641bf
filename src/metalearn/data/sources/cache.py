"""Decode image files once: the resized uint8 pixels of a folder's images, cached on disk.

The cache file is keyed by every source file's path, size and modification time and by the
preprocessing (size, channels, resize recipe, polarity), so a changed, added or removed file,
or another setting, builds a new one. It is written under ``~/.cache/metalearn`` (see
``cache_folder``), to a temporary file renamed into place, so an interrupted build never leaves
a half-written cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from metalearn.data.sources.base import save_npy_atomic
from metalearn.data.transforms import Preprocessing, convert, decode
from metalearn.errors import DataError

log = logging.getLogger(__name__)
CACHE_VERSION = 3  # 2: EXIF orientation applied; 3: 16-bit grayscale scaled, not clipped


def cache_key(files: list[Path], root: Path, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps({**settings, "version": CACHE_VERSION}).encode())
    for f in files:
        st = f.stat()
        digest.update(f"{f.relative_to(root) if f.is_relative_to(root) else f}\0{st.st_size}\0"
                      f"{st.st_mtime_ns}\n".encode())  # fmt: skip
    return digest.hexdigest()[:24]


def cache_folder(root: Path, cache_dir: str | None) -> Path:
    """``cache_dir``, else ``$METALEARN_CACHE_DIR``, else ``$XDG_CACHE_HOME/metalearn`` (default
    ``~/.cache/metalearn``), in a sub-folder per data folder. Never beside the data: a data
    share is often read-only, or shared with others who did not ask for 200 MB of cache."""
    if cache_dir:
        return Path(cache_dir)
    base = (
        os.environ.get("METALEARN_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metalearn"
    )
    name = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return Path(base) / f"{root.name}-{name}"


def colour_request(files: list[Path], channels: int | None) -> int:
    """``channels``, or (null) 3 when any file is in colour, else 1 (headers only)."""
    if channels is not None:
        return int(channels)
    from metalearn.data.transforms import is_colour

    return 3 if any(is_colour(to_pil_header(f)) for f in files) else 1


def to_pil_header(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path} is not an image Pillow can decode ({err}): remove it") from err


def decode_all(files: list[Path], image_size: int | None, channels: int, files_spec: dict):
    """uint8 [N, channels, S, S] of ``files``; S = ``image_size`` or the files' common size."""
    decoded = [decode(f, channels, str(f)) for f in files]
    if image_size is None:
        sizes = sorted({im.shape[1:] for im in decoded})
        if len(sizes) != 1 or sizes[0][0] != sizes[0][1]:
            shown = ", ".join(f"{w}x{h}" for h, w in sizes[:4]) + (" ..." if len(sizes) > 4 else "")
            what = (
                f"the images are {shown}, not square"
                if len(sizes) == 1
                else f"the images have {len(sizes)} sizes ({shown})"
            )
            raise DataError(
                f"{what}: set data.image_size (e.g. 84) to resize them all to one square size"
            )
        image_size = sizes[0][0]
    spec = Preprocessing("folder", int(image_size), channels, **files_spec)
    return np.stack([convert(im, spec) for im in decoded])


def decode_classes(
    root: Path,
    by_split: dict[str, dict[str, list[Path]]],
    image_size: int | None,
    channels: int | None,
    files_spec: dict,
    cache_dir: str | None = None,
    use_cache: bool = True,
) -> dict[str, tuple[list[np.ndarray], list[str], list[str]]]:
    """split -> (per-class uint8 [n_c, ch, S, S], class names, groups) for ``by_split``'s files
    (split -> class -> files), decoded once and cached."""
    files = list(dict.fromkeys(f for classes in by_split.values() for fs in classes.values()
                               for f in fs))  # fmt: skip
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(files)} listed images are missing, e.g. {missing[0]}: "
            "restore them, or remove their rows from the split files"
        )
    settings = {"image_size": image_size, "channels": channels, **files_spec}
    pixels = None
    path = None
    if use_cache:
        path = cache_folder(root, cache_dir) / f"{cache_key(files, root, settings)}.npy"
        if path.is_file():
            try:
                pixels = np.load(path, allow_pickle=False)
                log.info("reusing the decoded images of %s: %s", root, path)
            except (OSError, ValueError) as err:
                log.warning("rebuilding the unreadable image cache %s (%s)", path, err)
    if pixels is None or len(pixels) != len(files):
        start = time.time()
        log.info("decoding %d images of %s (once: they are cached)", len(files), root)
        pixels = decode_all(files, image_size, colour_request(files, channels), files_spec)
        if path is not None:
            save_atomic(pixels, path)
            log.info("cached %d images in %.0f s: %s", len(files), time.time() - start, path)
    row = {f: i for i, f in enumerate(files)}
    out = {}
    for split, classes in by_split.items():
        names = list(classes)
        out[split] = ([pixels[[row[f] for f in classes[n]]] for n in names], names, names)
    return out


def save_atomic(array: np.ndarray, dest: Path) -> None:
    """Write the cache atomically; a cache that cannot be written is only a warning."""
    try:
        save_npy_atomic(array, dest)
    except OSError as err:
        log.warning("could not write the image cache %s (%s): decoding each run", dest, err)
