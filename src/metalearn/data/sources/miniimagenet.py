"""mini-ImageNet (Vinyals et al. 2016) in the layout of Ravi & Larochelle's distribution:
``<root>/miniimagenet/images/<file>.jpg`` and ``<root>/miniimagenet/{train,val,test}.csv``
(``filename,label``): 64/16/20 classes of 84x84 colour images (600 per class in the full
release; any subset the csv files list). ImageNet's terms of use apply: research only.

Read through the folder source's decoding and cache (``folder.py``, ``cache.py``); a csv row
whose image is missing is an error naming the file and how many are missing.
"""

from __future__ import annotations

from pathlib import Path

from metalearn.data.sources.base import ClassImages
from metalearn.data.sources.cache import decode_classes
from metalearn.data.sources.folder import read_split_file
from metalearn.data.splits import SPLIT_NAMES, Splits
from metalearn.errors import DataError

FOLDER = "miniimagenet"
# The files: photos (no inversion), resized with Pillow's LANCZOS when image_size is not 84.
FILES = {"paper_white": False, "resize": "lanczos"}


def load_miniimagenet(
    root,
    image_size: int | None = 84,
    split_seed: int = 0,
    download: bool = False,
    channels: int | None = 3,
    cache: bool = True,
    cache_dir: str | None = None,
) -> Splits:
    folder = Path(root) / FOLDER
    csvs = [folder / f"{s}.csv" for s in SPLIT_NAMES]
    if not all(p.is_file() for p in csvs) or not (folder / "images").is_dir():
        raise DataError(
            f"mini-ImageNet not found: put images/ and train.csv, val.csv, test.csv (Ravi & "
            f"Larochelle's layout) in {folder}/, or point data.root=... / METALEARN_DATA_DIR at "
            "the folder that holds miniimagenet/"
        )
    by_split = {}
    for split, path in zip(SPLIT_NAMES, csvs, strict=True):
        classes, files = read_split_file(path)
        if files is None:
            raise DataError(f"{path} must have filename,label columns")
        by_split[split] = {c: [folder / "images" / f for f in files[c]] for c in classes}
    decoded = decode_classes(
        folder,
        by_split,
        image_size,
        channels,
        FILES,
        cache_dir=cache_dir,
        use_cache=cache,
    )
    return Splits(*(ClassImages(*decoded[s]) for s in SPLIT_NAMES))
