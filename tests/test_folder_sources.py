"""Your own images and mini-ImageNet: folders of real image files (written from the shared
data into temporary folders) give the same pixels and episodes as the built-in loaders;
mini-ImageNet's csv layout, colour and caching; ragged classes; each bad input's message."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metalearn.data.datamodule import (
    EpisodeDataModule,
    fixed_episode_indices,
    resolve_normalize,
)
from metalearn.data.episodes import materialise, sample_indices, seeded_rng
from metalearn.data.sources import load_splits
from metalearn.data.sources.base import ClassImages
from metalearn.data.sources.folder import load_folder
from metalearn.data.sources.miniimagenet import load_miniimagenet
from metalearn.data.splits import SPLIT_NAMES, check_disjoint
from metalearn.errors import ConfigError, DataError

PER_SPLIT = 25  # classes of each Omniglot split written out


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METALEARN_CACHE_DIR", str(tmp_path / "cache"))


def write_omniglot_folders(data_root: Path, root: Path) -> dict:
    """The first PER_SPLIT classes of each Omniglot split as the release's 105x105 PNGs (black
    on white) in <root>/{train,val,test}/<NNN_name>/; returns the npz loader's splits."""
    big = load_splits("omniglot", data_root, image_size=105)
    small = load_splits("omniglot", data_root, image_size=28)
    expected = {}
    for split in SPLIT_NAMES:
        classes = getattr(big, split)
        for c in range(PER_SPLIT):
            folder = root / split / f"{c:03d}_{classes.names[c].replace('/', '_')}"
            folder.mkdir(parents=True)
            for k, image in enumerate(classes.class_images(c)[:, 0]):
                Image.fromarray(255 - image).convert("1").save(folder / f"{k:02d}.png")
        expected[split] = getattr(small, split).subset(range(PER_SPLIT))
    return expected


def test_omniglot_written_as_png_folders_gives_the_npz_pixels_and_episodes(data_root, tmp_path):
    expected = write_omniglot_folders(data_root, tmp_path / "omni")
    splits = load_folder(tmp_path / "omni", image_size=28, invert=True)
    for split in SPLIT_NAMES:
        got, want = getattr(splits, split), expected[split]
        assert got.channels == 1 and got.num_classes == PER_SPLIT
        np.testing.assert_array_equal(got.pixels, want.pixels)
        a = fixed_episode_indices(got, 20, 5, 1, 5, 0, "val")
        b = fixed_episode_indices(want, 20, 5, 1, 5, 0, "val")
        for x, y in zip(materialise(got, a, 1), materialise(want, b, 1), strict=True):
            assert x.equal(y)


def test_quickdraw_written_as_png_folders_gives_the_npz_pixels(data_root, tmp_path):
    quickdraw = load_splits("quickdraw", data_root, samples_per_class=10)
    for c in range(12):
        folder = tmp_path / "qd" / quickdraw.train.names[c]
        folder.mkdir(parents=True)
        for k, image in enumerate(quickdraw.train.class_images(c)[:, 0]):
            Image.fromarray(image).save(folder / f"{k}.png")
    splits = load_folder(tmp_path / "qd", image_size=28, fractions=[0.5, 0.25, 0.25])
    got = {n: splits.train.class_images(i) for i, n in enumerate(splits.train.names)}
    for name in got:
        c = quickdraw.train.names.index(name)
        np.testing.assert_array_equal(got[name], quickdraw.train.class_images(c))
    assert sorted(sum((getattr(splits, s).names for s in SPLIT_NAMES), [])) == sorted(
        quickdraw.train.names[:12]
    )
    check_disjoint(splits)


@pytest.fixture(scope="module")
def mini_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("mini-cache"))


@pytest.fixture(scope="module")
def mini(data_root, mini_cache):
    os.environ["METALEARN_CACHE_DIR"] = mini_cache
    try:
        return load_miniimagenet(data_root)
    finally:
        del os.environ["METALEARN_CACHE_DIR"]


def test_miniimagenet_from_its_csv_layout(mini, data_root):
    assert [getattr(mini, s).num_classes for s in SPLIT_NAMES] == [64, 16, 20]
    assert mini.train.pixels.shape[1:] == (3, 84, 84) and mini.train.channels == 3
    check_disjoint(mini)
    first = sorted((data_root / "miniimagenet" / "images").glob("n01532829*.jpg"))[0]
    c = mini.train.names.index("n01532829")
    decoded = np.asarray(Image.open(first).convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(mini.train.class_images(c)[0], decoded)
    # colour drawn in the figure and in episodes: channels kept
    dm = EpisodeDataModule("miniimagenet", data_root, 5, 1, 2, 2, image_size=84)
    dm._splits, dm.norm = mini, None
    assert dm.train_dataset()[0].support_x.shape == (2, 5, 3, 84, 84)


def test_miniimagenet_names_missing_files(data_root, tmp_path):
    root = tmp_path / "miniimagenet"
    root.mkdir()
    (root / "images").symlink_to(data_root / "miniimagenet" / "images")
    for s in SPLIT_NAMES:
        shutil.copy(data_root / "miniimagenet" / f"{s}.csv", root / f"{s}.csv")
    with open(root / "test.csv", "a") as f:
        f.write("n0000000000000001.jpg,n01930112\nn0000000000000002.jpg,n01930112\n")
    with pytest.raises(DataError, match=r"2 of 10002 listed images are missing, e\.g\. .*n00000"):
        load_miniimagenet(tmp_path)


def test_decoded_images_are_cached_and_rebuilt_when_a_file_changes(data_root, tmp_path, caplog):
    src = data_root / "miniimagenet" / "images"
    for c in ("n01532829", "n01558993", "n01704323"):
        (tmp_path / "photos" / c).mkdir(parents=True)
        for f in sorted(src.glob(f"{c}*.jpg"))[:6]:
            shutil.copy(f, tmp_path / "photos" / c / f.name)
    caplog.set_level(logging.INFO, logger="metalearn")
    first = load_folder(tmp_path / "photos", image_size=32)
    assert "decoding 18 images" in caplog.text
    caplog.clear()
    again = load_folder(tmp_path / "photos", image_size=32)
    assert "reusing the decoded images" in caplog.text and "decoding" not in caplog.text
    for s in SPLIT_NAMES:
        np.testing.assert_array_equal(getattr(first, s).pixels, getattr(again, s).pixels)
    changed = next((tmp_path / "photos" / "n01532829").iterdir())
    Image.new("RGB", (84, 84), (255, 0, 0)).save(changed, format="JPEG")
    caplog.clear()
    load_folder(tmp_path / "photos", image_size=32)
    assert "decoding 18 images" in caplog.text


def ragged_folder(data_root: Path, root: Path, counts: list[int]) -> Path:
    with np.load(data_root / "omniglot" / "images_background_28.npz") as f:
        images = f["images"]
    for c, n in enumerate(counts):
        (root / f"class{c:02d}").mkdir(parents=True)
        for k in range(n):  # 20 drawers per character: wrap into other characters' drawings
            Image.fromarray(images[(20 * c + k) % len(images)]).save(
                root / f"class{c:02d}" / f"{k:03d}.png"
            )
    return root


def test_ragged_classes_sample_valid_episodes(data_root, tmp_path):
    counts = [12, 40, 7, 25, 9, 60, 15, 8, 30, 11]
    root = ragged_folder(data_root, tmp_path / "ragged", counts)
    classes = load_folder(root, image_size=28, fractions=[0.8, 0.1, 0.1]).train
    assert classes.ragged and sorted(classes.counts) != [classes.counts[0]] * len(classes.counts)
    for seed in range(20):
        idx = sample_indices(seeded_rng(seed), 4, classes.num_classes, classes.counts, 3, 2, 5)
        for episode_classes, episode_images in zip(idx.classes, idx.images, strict=True):
            for c, ids in zip(episode_classes, episode_images, strict=True):
                assert len(set(ids)) == 7 and ids.max() < classes.counts[c]
    equal = ClassImages(classes.pixels[: 8 * 7].reshape(8, 7, 1, 28, 28), list("abcdefgh"),
                        list("abcdefgh"))  # fmt: skip
    a = sample_indices(seeded_rng(3), 4, 8, 7, 3, 2, 5)
    b = sample_indices(seeded_rng(3), 4, 8, equal.counts, 3, 2, 5)
    np.testing.assert_array_equal(a.images, b.images)  # equal classes: the old draws


def test_a_class_too_small_for_the_episode_is_named(data_root, tmp_path):
    root = ragged_folder(data_root, tmp_path / "ragged", [30, 30, 4] + [30] * 17)
    dm = EpisodeDataModule(
        "folder", root, ways=2, shots=1, queries=5, meta_batch_size=1, image_size=28,
        split="fraction", fractions=[0.6, 0.2, 0.2],
    )  # fmt: skip
    with pytest.raises(ConfigError, match="class 'class02' of the .* split has 4 images"):
        dm.setup()


def test_bad_folders_get_their_messages(data_root, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_folder(empty, image_size=28)
    root = ragged_folder(data_root, tmp_path / "bad", [5, 5, 5])
    (root / "class01" / "broken.png").write_text("not a png")
    with pytest.raises(DataError, match="broken.png is not an image"):
        load_folder(root, image_size=28)
    (root / "class01" / "broken.png").unlink()
    Image.new("L", (40, 40)).save(root / "class01" / "big.png")
    with pytest.raises(DataError, match="2 sizes .*set data.image_size"):
        load_folder(root, image_size=None)
    for s, names in (("train", "class00"), ("val", "class01"), ("test", "class09")):
        (root / f"{s}.txt").write_text(names + "\n")
    with pytest.raises(DataError, match="test.txt names 1 class.*class09"):
        load_folder(
            root, image_size=28, split="files",
            split_files={s: f"{s}.txt" for s in SPLIT_NAMES},
        )  # fmt: skip
    with pytest.raises(ConfigError, match="data.fractionz is not an option of data=folder"):
        EpisodeDataModule("folder", root, 2, 1, 1, 1, fractionz=[0.5, 0.25, 0.25])


def test_a_users_jpegs_become_exactly_the_training_inputs(mini, mini_cache, data_root, monkeypatch):
    """mini-ImageNet normalised with its meta-train statistics: the adapt API's preprocessing of
    the original JPEG files equals the episode tensors the model was trained and tested on."""
    import csv

    from metalearn.data.transforms import Preprocessing, prepare

    monkeypatch.setenv("METALEARN_CACHE_DIR", mini_cache)  # the fixture's decoded images
    dm = EpisodeDataModule("miniimagenet", data_root, 5, 1, 2, 2, image_size=84, normalize="auto")
    dm.setup()
    assert dm.norm == resolve_normalize("auto", mini.train)
    spec = Preprocessing.from_dict(dm.preprocessing().to_dict())
    assert spec.channels == 3 and len(spec.mean) == 3 and 0.3 < spec.mean[0] < 0.6
    episodes = dm.eval_dataset("test")[0]
    index = dm.eval_dataset("test").index
    with open(data_root / "miniimagenet" / "test.csv") as f:
        rows = list(csv.DictReader(f))
    files = {}
    for r in rows:
        files.setdefault(r["label"], []).append(
            data_root / "miniimagenet" / "images" / r["filename"]
        )
    c, i = index.classes[0][0], index.images[0][0][0]  # episode 0, label 0, first support image
    path = files[mini.test.names[c]][i]
    torch.testing.assert_close(
        prepare([path], spec)[0], episodes.support_x[0, 0], rtol=0, atol=1e-6
    )


def test_augmentation_is_keyed_by_the_batch_and_off_by_default(data_root):
    plain = EpisodeDataModule("omniglot", data_root, 5, 1, 3, 2, batches_per_epoch=4)
    augmented = EpisodeDataModule(
        "omniglot", data_root, 5, 1, 3, 2, batches_per_epoch=4,
        augment={"crop_padding": 4, "flip": True, "jitter": 0.4},
    )  # fmt: skip
    a, b = plain.train_dataset()[5], augmented.train_dataset()[5]
    assert a.support_y.equal(b.support_y) and not a.support_x.equal(b.support_x)
    again = augmented.train_dataset()[5]  # the same step: the same augmented images
    assert again.support_x.equal(b.support_x) and again.query_x.equal(b.query_x)
    assert not augmented.train_dataset()[6].support_x.equal(b.support_x)
    assert not plain.augment.active


def write_photos(data_root: Path, root: Path, sideways: bool) -> Path:
    """Ten classes of three non-square mini-ImageNet crops (84x63, lossless PNG). ``sideways``:
    stored as a camera stores photos it took turned, with the EXIF Orientation tag that
    viewers apply (6: turn 90 degrees clockwise, 8: anticlockwise, 3: half a turn)."""
    turn = Image.Transpose
    turns = {6: turn.ROTATE_90, 8: turn.ROTATE_270, 3: turn.ROTATE_180}
    jpegs = sorted((data_root / "miniimagenet" / "images").iterdir())[:30]
    for k, jpeg in enumerate(jpegs):
        with Image.open(jpeg) as im:
            photo = im.convert("RGB").crop((0, 0, 84, 63))
        folder = root / f"class{k // 3}"
        folder.mkdir(parents=True, exist_ok=True)
        if sideways:
            tag = (6, 8, 3)[k % 3]
            exif = Image.Exif()
            exif[0x0112] = tag
            photo.transpose(turns[tag]).save(folder / f"{k}.png", exif=exif)
        else:
            photo.save(folder / f"{k}.png")
    return root


def test_photos_stored_sideways_with_exif_orientation_are_read_upright(data_root, tmp_path):
    """Training on a folder, its cache and adapting to a user's photos all see a phone's photo
    as image viewers show it, not as the sensor stored it."""
    from metalearn.data.transforms import Preprocessing, prepare

    upright = write_photos(data_root, tmp_path / "upright", sideways=False)
    phone = write_photos(data_root, tmp_path / "phone", sideways=True)
    with Image.open(phone / "class0" / "0.png") as im:
        assert im.size == (63, 84)  # stored sideways
    with pytest.raises(DataError, match="are 84x63, not square"):  # one size, once upright
        load_folder(phone, image_size=None, fractions=[0.6, 0.2, 0.2])
    a = load_folder(upright, image_size=32, fractions=[0.6, 0.2, 0.2])
    b = load_folder(phone, image_size=32, fractions=[0.6, 0.2, 0.2])
    for s in SPLIT_NAMES:
        np.testing.assert_array_equal(getattr(a, s).pixels, getattr(b, s).pixels)
    spec = Preprocessing(source="folder", image_size=32, channels=3, resize="lanczos")
    files = sorted((phone / "class0").iterdir())
    torch.testing.assert_close(
        prepare(files, spec), prepare(sorted((upright / "class0").iterdir()), spec), rtol=0, atol=0
    )
