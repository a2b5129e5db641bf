"""Omniglot (Lake et al. 2015): 1623 handwritten characters x 20 drawers, ink-high after loading.

Files read from `<root>/omniglot/`, first match wins, for each of the two parts
`images_background` (964 characters, 30 alphabets) and `images_evaluation` (659, 20 alphabets):

1. `<part>_28.npz` when image_size == 28 and resize == "lanczos" (the project's npz, see the
   data README),
2. `<part>.npz` (105x105; resized when image_size is not 105, see `resize`),
3. `<part>/<Alphabet>/<characterNN>/*.png` (the unpacked official release; needs Pillow),
4. `<part>.zip` (the official zip of github.com/brendenlake/omniglot `python/`; needs Pillow),
5. otherwise, if download is on, that zip is fetched from `BASE_URL` (then read as in 4); its
   published md5 (`ZIP_MD5`) is checked whatever the URL, so a mirror must serve the same zip.
Whatever the format, each part must hold its official number of characters (`PART_CLASSES`),
and resizing follows the `_28.npz` files' recipe (Pillow LANCZOS on the original polarity), so
every format gives the same pixels. ``resize="binary"`` gives instead the images of the MAML and
Prototypical Networks reference codes: they open the 1-bit PNGs with Pillow and resize them as
1-bit images, i.e. nearest neighbour, so strokes stay binary (thinner and more aliased).

Split rules (``split``):

``vinyals``: the 1028/172/423-character split of Vinyals et al. (2016) that the papers' tables
use, from the split files in `<root>/omniglot/vinyals_split/` (see
`metalearn.data.sources.vinyals`).

``alphabets`` (the default, fixed by ``split_seed``):
- meta-test = all of `images_evaluation` (659 classes, 20 alphabets);
- meta-val = the background alphabets ranked by sha256(f"{split_seed}/{alphabet}"), taken in that
  order until they hold at least VAL_MIN_CLASSES = 150 characters;
- meta-train = the remaining background alphabets.
``within_alphabet``: every episode's classes come from one alphabet (Lake et al. 2015's
within-alphabet one-shot task, harder than episodes across alphabets: characters of one script
look alike); the alphabet is drawn uniformly among those with enough characters.

With split_seed=0: val = Alphabet_of_the_Magi, Anglo-Saxon_Futhorc, Early_Aramaic, Greek,
Japanese_(katakana), Syriac_(Estrangelo) (6 alphabets, 165 classes); train = the other 24 (799).
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from metalearn.data.download import download as fetch
from metalearn.data.sources.base import ClassImages, group_by_label, load_npz
from metalearn.data.sources.vinyals import vinyals_splits
from metalearn.data.splits import Splits, seeded_order, select_groups
from metalearn.data.transforms import RESIZERS, check_resize
from metalearn.errors import ConfigError, DataError

PARTS = ("images_background", "images_evaluation")
NATIVE_SIZE = 105
VAL_MIN_CLASSES = 150
BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
# Characters per part. Checked for every format (npz, PNG folder, zip) so a partial copy cannot
# silently give another split; a module constant so tests with tiny fake datasets can patch it.
PART_CLASSES = {"images_background": 964, "images_evaluation": 659}
# sha256 of the official zips. Unknown here: no machine this was written on was online, so these
# are NOT verified yet (download() then skips the sha256 check; the md5 below is still checked, and
# the zip to open and hold PART_CLASSES equal-sized classes). Put the real hex digests here.
ZIP_SHA256: dict[str, str | None] = {"images_background.zip": None, "images_evaluation.zip": None}
# md5 of the official zips as published (torchvision's Omniglot and others use the same values):
# always verified, whatever base_url (a mirror must serve the same bytes; this also catches a
# truncated body that came without a Content-Length).
ZIP_MD5 = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}
NPZ_KEYS = ("images", "labels", "class_names", "alphabets")


def files_of(resize: str = "lanczos", **_) -> dict:
    """The files' images: black strokes on white paper, inverted on loading, resized by
    ``resize`` (saved in checkpoints so a user's drawings go through the same recipe)."""
    return {"paper_white": True, "resize": resize}


FILES = files_of
SPLITS = ("alphabets", "vinyals")


def load_omniglot(
    root,
    *,
    image_size: int = 28,
    split_seed: int = 0,
    download: bool = True,
    base_url: str = BASE_URL,
    zip_sha256: dict[str, str | None] | None = None,
    split: str = "alphabets",
    within_alphabet: bool = False,
    resize: str = "lanczos",
) -> Splits:
    """Omniglot as meta-train/val/test `Splits` (see the module docstring for the rules)."""
    check_resize(resize)
    splits = omniglot_splits(
        root, image_size, resize, split_seed, download, base_url, zip_sha256, split
    )
    return dataclasses.replace(splits, episode_groups=bool(within_alphabet))


def omniglot_splits(
    root, image_size, recipe, split_seed, download, base_url, zip_sha256, split
) -> Splits:
    if split not in SPLITS:
        raise ConfigError(f"data.split={split!r} is unknown for Omniglot: choose one of {SPLITS}")
    folder = Path(root) / "omniglot"
    hashes = ZIP_SHA256 if zip_sha256 is None else zip_sha256
    background, evaluation = (
        load_part(folder, part, image_size, recipe, download, base_url, hashes) for part in PARTS
    )
    if split == "vinyals":
        return vinyals_splits(dict(zip(PARTS, (background, evaluation), strict=True)), folder)
    val_groups = val_alphabets(background, split_seed)
    train_groups = set(background.groups) - val_groups
    return Splits(
        train=select_groups(background, train_groups),
        val=select_groups(background, val_groups),
        test=evaluation,
    )


def val_alphabets(background: ClassImages, split_seed: int) -> set[str]:
    """Background alphabets in seeded order until they hold >= VAL_MIN_CLASSES classes."""
    chosen, count = set(), 0
    for alphabet in seeded_order(background.groups, split_seed):
        if count >= VAL_MIN_CLASSES:
            break
        chosen.add(alphabet)
        count += background.groups.count(alphabet)
    return chosen


def missing_message(folder: Path, image_size: int, recipe: str = "lanczos") -> str:
    npz = "{}_28.npz" if image_size == 28 and recipe == "lanczos" else "{}.npz"
    files = " and ".join(npz.format(p) for p in PARTS)
    return (
        f"Omniglot not found: put {files} (or the official images_background.zip/"
        f"images_evaluation.zip from {BASE_URL}) in {folder}/, or point data.root=... /"
        " METALEARN_DATA_DIR at the folder that holds omniglot/"
    )


def load_part(folder, part, image_size, recipe, download, base_url, hashes) -> ClassImages:
    """One part (background or evaluation) as ink-high ClassImages of image_size x image_size,
    resized by ``recipe``."""
    if image_size < 1:
        raise ConfigError(f"data.image_size={image_size}: use a positive size such as 28 or 105")
    candidates = [folder / f"{part}.npz", folder / part, folder / f"{part}.zip"]
    if image_size == 28 and recipe == "lanczos":
        candidates.insert(0, folder / f"{part}_28.npz")
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        path = folder / f"{part}.zip"
        if not download:
            missing = missing_message(folder, image_size, recipe)
            raise DataError(f"{missing} (data.download is false)")
        try:
            fetch(base_url + path.name, path, sha256=hashes.get(path.name), md5=ZIP_MD5[path.name])
        except DataError as err:
            raise DataError(f"{err}\n{missing_message(folder, image_size, recipe)}") from err
    if path.suffix == ".npz":
        classes = read_npz(path, folder)
    else:
        classes = read_pngs(path)
    if classes.num_classes != PART_CLASSES[part]:
        raise DataError(
            f"{path} holds {classes.num_classes} Omniglot characters, expected"
            f" {PART_CLASSES[part]} for {part}: it is partial or not the official release. Delete"
            f" it and put the complete one back (official zip: {BASE_URL}{part}.zip)"
        )
    return ClassImages(resize(classes.images, image_size, recipe), classes.names, classes.groups)


def resize(images: np.ndarray, size: int, recipe: str = "lanczos") -> np.ndarray:
    """Ink-high uint8 [C, n, H, W] to size x size by ``recipe`` on the original polarity
    (paper = 255); "lanczos" as the `_28.npz` files were made. Torch's antialiased bilinear
    differs in a third of the pixels (by up to 70 levels), so the zips would give other data
    than the npz."""
    if images.shape[-2:] == (size, size) and recipe == "lanczos":
        return images
    _pillow()
    return 255 - RESIZERS[recipe](255 - images, size)


def read_npz(path: Path, folder: Path) -> ClassImages:
    fix = f"copy it again from the project's data share, or put the official zip in {folder}/"
    arrays = load_npz(path, NPZ_KEYS, fix)
    images, labels = arrays["images"], arrays["labels"].astype(np.int64)
    names = [str(n) for n in arrays["class_names"]]
    if images.ndim != 3 or images.dtype != np.uint8 or len(labels) != len(images):
        raise DataError(
            f"{path} has images {images.dtype} {images.shape}: not [N,H,W] uint8. {fix}"
        )
    if len(arrays["alphabets"]) != len(names) or labels.min() < 0 or labels.max() >= len(names):
        raise DataError(f"{path}: labels/class_names/alphabets do not match. Delete it; {fix}")
    grouped = group_by_label(images, labels, len(names), path)
    return ClassImages(255 - grouped, names, [str(a) for a in arrays["alphabets"]])


def read_pngs(path: Path) -> ClassImages:
    """The official layout, as a folder or a zip: <part>/<Alphabet>/<characterNN>/*.png."""
    image_module = _pillow()
    by_class: dict[tuple[str, str], list[np.ndarray]] = {}
    try:
        for alphabet, character, open_png in _png_entries(path):
            with open_png() as f, image_module.open(f) as im:
                by_class.setdefault((alphabet, character), []).append(
                    np.asarray(im.convert("L"), dtype=np.uint8)
                )
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(
            f"{path} is unreadable or corrupt ({err}): delete it and download it again ({BASE_URL})"
        ) from err
    keys = sorted(by_class)
    sizes = {len(v) for v in by_class.values()}
    shapes = {im.shape for v in by_class.values() for im in v}
    if not keys or len(sizes) != 1 or len(shapes) != 1:
        raise DataError(
            f"{path}: expected <Alphabet>/<characterNN>/*.png with the same number of same-sized"
            f" images per character, found {len(keys)} characters, counts {sorted(sizes)},"
            f" shapes {sorted(shapes)}. Delete it and fetch the official release ({BASE_URL})"
        )
    images = np.stack([np.stack(by_class[k]) for k in keys])
    return ClassImages(255 - images, [f"{a}/{c}" for a, c in keys], [a for a, _ in keys])


def _png_entries(path: Path) -> Iterator[tuple[str, str, Callable]]:
    """(alphabet, character, opener) for every PNG, sorted by file name."""
    if path.is_dir():
        for png in sorted(path.glob("*/*/*.png")):
            yield png.parent.parent.name, png.parent.name, lambda p=png: open(p, "rb")
        return
    with zipfile.ZipFile(path) as archive:
        for name in sorted(archive.namelist()):
            parts = name.split("/")
            if name.endswith(".png") and len(parts) >= 3:
                yield parts[-3], parts[-2], lambda n=name: io.BytesIO(archive.read(n))


def _pillow():
    try:
        from PIL import Image
    except ImportError as err:
        raise DataError(
            "reading the original Omniglot PNGs needs Pillow: `pip install pillow`, or use the"
            " .npz files instead (see the module docstring of metalearn.data.sources.omniglot)"
        ) from err
    return Image
