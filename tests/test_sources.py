"""Dataset sources on the real data: counts, polarity, splits, rotations, file formats, errors."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from metalearn.data.sources import FILES, SOURCES, load_splits
from metalearn.data.sources import omniglot as omniglot_module
from metalearn.data.sources.base import ClassImages, load_npz
from metalearn.data.sources.folder import load_folder
from metalearn.data.sources.omniglot import load_omniglot
from metalearn.data.sources.protocol import check_files, check_loader, check_splits
from metalearn.data.sources.quickdraw import CATEGORIES, load_quickdraw, read_bitmap_file
from metalearn.data.splits import Splits, check_disjoint
from metalearn.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def omniglot(data_root) -> Splits:
    return load_omniglot(data_root)


@pytest.fixture(scope="module")
def quickdraw(data_root) -> Splits:
    return load_quickdraw(data_root)


def test_omniglot_counts_and_whole_alphabets(omniglot):
    train, val, test = omniglot.train, omniglot.val, omniglot.test
    assert train.num_classes + val.num_classes == 964
    assert test.num_classes == 659
    assert val.num_classes >= 150
    assert len(set(train.groups) | set(val.groups)) == 30
    assert not set(train.groups) & set(val.groups), "an alphabet is split across train/val"
    assert len(set(test.groups)) == 20
    assert {c.images_per_class for _, c in omniglot.items()} == {20}
    check_disjoint(omniglot)


def test_omniglot_split_is_seeded(data_root, omniglot):
    again = load_omniglot(data_root)
    other = load_omniglot(data_root, split_seed=1)
    assert again.val.names == omniglot.val.names
    assert set(other.val.groups) != set(omniglot.val.groups)
    assert other.test.names == omniglot.test.names  # the test split never depends on the seed


@pytest.mark.parametrize("dataset", ["omniglot", "quickdraw"])
def test_ink_is_high(dataset, omniglot, quickdraw):
    splits = omniglot if dataset == "omniglot" else quickdraw
    for _, classes in splits.items():
        images = classes.images
        assert images.dtype == np.uint8
        assert images.mean() < 60, "mostly background must be dark: ink should be 255"
        assert images.max() == 255 and (images == 0).mean() > 0.5


def test_omniglot_105_and_resized_shapes(data_root):
    big = load_omniglot(data_root, image_size=105)
    assert big.test.images.shape == (659, 20, 105, 105)
    assert big.train.images.shape[1:] == (20, 105, 105)
    assert big.test.images.mean() < 60
    assert load_omniglot(data_root).test.images.shape == (659, 20, 28, 28)


def test_omniglot_resized_from_105_equals_the_28_files(tmp_path, data_root, omniglot):
    # A machine with only the 105x105 files (or the official zips, read the same way) must see
    # the same 28x28 pixels as one with the _28.npz files: same episodes, comparable results.
    (tmp_path / "omniglot").mkdir()
    for part in omniglot_module.PARTS:
        (tmp_path / "omniglot" / f"{part}.npz").symlink_to(data_root / "omniglot" / f"{part}.npz")
    resized = load_omniglot(tmp_path, download=False)
    for split in ("train", "val", "test"):
        a, b = getattr(resized, split), getattr(omniglot, split)
        assert a.names == b.names
        assert np.array_equal(a.images, b.images), split


def test_omniglot_binary_resize_gives_the_reference_codes_images(data_root, omniglot):
    # data.resize=binary: the MAML and ProtoNet reference codes open the 1-bit PNGs with Pillow
    # and resize them as 1-bit images, which Pillow does by nearest neighbour even when asked
    # for LANCZOS (as MAML's resize script asks). Computed independently, as the README says.
    binary = load_omniglot(data_root, resize="binary")
    with np.load(data_root / "omniglot" / "images_evaluation.npz") as f:
        originals, labels = f["images"], f["labels"]
    first = originals[labels == 0]  # paper = 255
    expected = [255 - 255 * np.asarray(Image.fromarray(a == 255).resize((28, 28))) for a in first]
    assert np.array_equal(binary.test.images[0], np.stack(expected).astype(np.uint8))
    asked_lanczos = Image.fromarray(first[0] == 255).resize((28, 28), Image.LANCZOS)
    assert np.array_equal(255 - 255 * np.asarray(asked_lanczos), expected[0])
    assert set(np.unique(binary.train.images)) == {0, 255}
    assert binary.test.names == omniglot.test.names
    assert not np.array_equal(binary.test.images, omniglot.test.images)


def test_unknown_resize_recipe_names_the_choices(data_root, tmp_path):
    for load in (load_omniglot, load_folder):
        with pytest.raises(ConfigError, match=r"data.resize='bicubic' is unknown.*binary"):
            load(tmp_path, resize="bicubic")


def test_missing_105_files_are_named_for_binary_resize(tmp_path):
    with pytest.raises(DataError, match=r"images_background\.npz and images_evaluation\.npz"):
        load_omniglot(tmp_path, resize="binary", download=False)


def test_a_source_breaking_the_contract_is_named_where_it_is_written(omniglot):
    def load_mine(root, image_size=28, split_seed=0):
        return omniglot

    with pytest.raises(ConfigError, match=r"load_mine does not take download.*protocol.py"):
        check_loader("mine", load_mine, {"paper_white": False, "resize": "lanczos"})
    with pytest.raises(ConfigError, match=r"mine.FILES resize='nearest' is unknown"):
        check_loader("mine", lambda root, **kw: omniglot, {"paper_white": 0, "resize": "nearest"})
    with pytest.raises(ConfigError, match=r"FILES must be \{'paper_white'"):
        check_files("mine", {"invert": True})
    for name, loader in SOURCES.items():  # the shipped sources meet it
        check_loader(name, loader, FILES[name])


def test_a_loader_returning_other_than_splits_of_one_shape_is_refused(data_root, omniglot):
    with pytest.raises(DataError, match="returned dict, not Splits"):
        check_splits("mine", {"train": omniglot.train})
    big = load_omniglot(data_root, image_size=105)
    mixed = Splits(omniglot.train, big.val, omniglot.test)
    with pytest.raises(DataError, match=r"val \(1, 105, 105\).*set data.image_size"):
        check_splits("mine", mixed)


def test_rotations_quadruple_classes_within_split(data_root, omniglot):
    rotated = load_splits("omniglot", data_root, rotations=True)
    for split, classes in rotated.items():
        plain = getattr(omniglot, split)
        assert classes.num_classes == 4 * plain.num_classes
        assert {n.split("/rot")[0] for n in classes.names} == set(plain.names)
    i = rotated.test.names.index(omniglot.test.names[0] + "/rot90")
    np.testing.assert_array_equal(
        rotated.test.images[i], np.rot90(omniglot.test.images[0], 1, axes=(1, 2))
    )
    check_disjoint(rotated)


def test_check_disjoint_catches_leaks(omniglot):
    leaked = ClassImages(
        omniglot.test.images[:1], [omniglot.test.names[0] + "/rot180"], omniglot.test.groups[:1]
    )
    bad = Splits(train=omniglot.train, val=leaked, test=omniglot.test)
    with pytest.raises(ValueError, match="val/test.*" + omniglot.test.names[0].split("/")[0]):
        check_disjoint(bad)


def test_quickdraw_split_sizes(quickdraw):
    assert [c.num_classes for _, c in quickdraw.items()] == [207, 69, 69]
    assert quickdraw.train.images.shape[1:] == (100, 28, 28)
    assert sorted(sum(quickdraw.class_names().values(), [])) == sorted(CATEGORIES)
    check_disjoint(quickdraw)


def test_quickdraw_samples_per_class_is_seeded(data_root):
    a = load_splits("quickdraw", data_root, samples_per_class=20)
    b = load_splits("quickdraw", data_root, samples_per_class=20)
    c = load_splits("quickdraw", data_root, samples_per_class=20, split_seed=1)
    assert a.train.images.shape == (207, 20, 28, 28)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    shared = sorted(set(a.train.names) & set(c.train.names))[0]
    assert not np.array_equal(
        a.train.images[a.train.names.index(shared)], c.train.images[c.train.names.index(shared)]
    )
    with pytest.raises(ConfigError, match="samples_per_class=200.*100 images per class"):
        load_splits("quickdraw", data_root, samples_per_class=200)


def test_unknown_dataset_lists_choices(data_root):
    with pytest.raises(
        ConfigError, match=r"choose one of \['folder', 'miniimagenet', 'omniglot', 'quickdraw'\]"
    ):
        load_splits("mnist", data_root)


def _fake_omniglot_tree(folder, alphabets, chars=2, drawers=3, size=105):
    from PIL import Image

    rng = np.random.default_rng(0)
    for a in alphabets:
        for c in range(1, chars + 1):
            cdir = folder / a / f"character{c:02d}"
            cdir.mkdir(parents=True)
            for d in range(1, drawers + 1):
                paper = np.full((size, size), 255, np.uint8)  # original polarity: 255 = paper
                paper[rng.integers(0, size, 50), rng.integers(0, size, 50)] = 0
                Image.fromarray(paper).convert("1").save(cdir / f"0001_{d:02d}.png")


def test_original_png_layout_folder_and_zip(tmp_path, monkeypatch):
    pytest.importorskip("PIL", reason="Pillow is needed to read the original PNG layout")
    monkeypatch.setattr(
        omniglot_module, "PART_CLASSES", {"images_background": 160, "images_evaluation": 6}
    )
    omni = tmp_path / "omniglot"
    _fake_omniglot_tree(omni / "images_background", [f"Bg{i:02d}" for i in range(40)], chars=4)
    _fake_omniglot_tree(omni / "images_evaluation", ["EvA", "EvB"], chars=3)
    # the evaluation part as the official zip instead of a folder
    with zipfile.ZipFile(omni / "images_evaluation.zip", "w") as archive:
        for png in sorted((omni / "images_evaluation").rglob("*.png")):
            archive.write(png, png.relative_to(omni).as_posix())
    for png in (omni / "images_evaluation").rglob("*.png"):
        png.unlink()
    for d in sorted((omni / "images_evaluation").rglob("*"), reverse=True):
        d.rmdir()
    (omni / "images_evaluation").rmdir()

    splits = load_omniglot(tmp_path, image_size=28, download=False)
    # val takes whole alphabets until >= 150 classes: 38 of the 40 fake alphabets
    assert (splits.val.num_classes, splits.train.num_classes) == (152, 8)
    assert not set(splits.train.groups) & set(splits.val.groups)
    assert splits.test.names == [f"Ev{a}/character{c:02d}" for a in "AB" for c in (1, 2, 3)]
    assert splits.test.images.shape == (6, 3, 28, 28)
    assert splits.test.images.mean() < 60  # inverted: ink high
    full = load_omniglot(tmp_path, image_size=105, download=False)
    assert (full.test.images == 255).sum() > 0 and set(np.unique(full.test.images)) <= {0, 255}


def test_partial_omniglot_is_refused(tmp_path, monkeypatch):
    pytest.importorskip("PIL", reason="Pillow is needed to read the original PNG layout")
    omni = tmp_path / "omniglot"
    _fake_omniglot_tree(omni / "images_background", ["BgA", "BgB"])
    _fake_omniglot_tree(omni / "evaluation_tree" / "images_evaluation", ["EvA"], chars=3)
    with zipfile.ZipFile(omni / "images_evaluation.zip", "w") as archive:
        for png in sorted((omni / "evaluation_tree").rglob("*.png")):
            archive.write(png, png.relative_to(omni / "evaluation_tree").as_posix())
    with pytest.raises(DataError, match=r"images_background holds 4 .*expected 964.*Delete it"):
        load_omniglot(tmp_path, download=False)
    monkeypatch.setitem(omniglot_module.PART_CLASSES, "images_background", 4)
    with pytest.raises(DataError, match=r"images_evaluation\.zip holds 3 .*expected 659"):
        load_omniglot(tmp_path, download=False)


def test_missing_omniglot_names_files(tmp_path):
    with pytest.raises(DataError, match="images_background_28.npz.*images_evaluation_28.npz"):
        load_omniglot(tmp_path, download=False)
    with pytest.raises(DataError, match="quickdraw_345x100_28.npz"):
        load_quickdraw(tmp_path, download=False)


def test_corrupt_npz_names_file(tmp_path):
    omni = tmp_path / "omniglot"
    omni.mkdir()
    (omni / "images_background_28.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match=r"images_background_28\.npz.*(corrupt|unreadable)"):
        load_omniglot(tmp_path, download=False)
    np.savez(omni / "images_background_28.npz", images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match=r"images_background_28\.npz lacks .*labels"):
        load_omniglot(tmp_path, download=False)


def test_npz_corrupt_in_the_middle_names_file(tmp_path):
    # damaged compressed data: zlib's own error must come out as a DataError naming the file
    path = tmp_path / "a.npz"
    np.savez_compressed(path, images=np.random.default_rng(0).integers(0, 255, (64, 28, 28)))
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 2000] = bytes(2000)
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"a\.npz is unreadable or corrupt"):
        load_npz(path, ("images",), "fetch it again")


def test_numpy_bitmap_files_load(tmp_path):
    folder = tmp_path / "quickdraw" / "numpy_bitmap"
    folder.mkdir(parents=True)
    for i, name in enumerate(CATEGORIES):
        rows = np.full((6, 784), i % 256, np.uint8)
        rows[:, 0] = np.arange(6)
        np.save(folder / f"{name}.npy", rows)
    splits = load_quickdraw(
        tmp_path, quickdraw_format="numpy_bitmap", quickdraw_rows=5, download=False
    )
    assert [c.num_classes for _, c in splits.items()] == [207, 69, 69]
    name = splits.test.names[3]
    assert splits.test.images.shape == (69, 5, 28, 28)
    assert (splits.test.images[3, :, 0, 1] == CATEGORIES.index(name) % 256).all()
    np.testing.assert_array_equal(splits.test.images[3, :, 0, 0], np.arange(5))
    assert read_bitmap_file(folder / "airplane.npy", 7) is None  # too few rows
    with pytest.raises(DataError, match="quickdraw_rows=7"):
        load_quickdraw(tmp_path, quickdraw_format="numpy_bitmap", quickdraw_rows=7, download=False)
    with pytest.raises(ConfigError, match="quickdraw_format='png'.*npz"):
        load_quickdraw(tmp_path, quickdraw_format="png")


# ---- the Vinyals et al. split ---------------------------------------------------------------
def vinyals_lists(data_root) -> dict[str, list[str]]:
    """The class names each split file lists, read here independently of the loader."""
    lists = {}
    for split in ("train", "val", "test"):
        listing = json.loads(
            (data_root / "omniglot" / "vinyals_split" / f"{split}.json").read_text()
        )
        lists[split] = [
            f"{a}/{c}" for part in listing.values() for a, cs in part.items() for c in cs
        ]
    return lists


@pytest.fixture(scope="module")
def vinyals(data_root) -> Splits:
    return load_splits("omniglot", data_root, split="vinyals")


def test_vinyals_split_counts_and_names_match_the_files(data_root, vinyals, omniglot):
    assert [c.num_classes for _, c in vinyals.items()] == [1028, 172, 423]
    assert vinyals.class_names() == vinyals_lists(data_root)
    check_disjoint(vinyals)
    # the same images as the default split's classes of the same name (test: evaluation part)
    index = {name: i for i, name in enumerate(omniglot.test.names)}
    for i, name in enumerate(vinyals.test.names[:50]):
        assert np.array_equal(vinyals.test.images[i], omniglot.test.images[index[name]])
    # alphabets: train 25 background + 8 evaluation, val 5, test 13; the split cuts the list
    # of characters at 1200, inside Gurmukhi (41 characters in train, 4 in test)
    train, val, test = (set(c.groups) for _, c in vinyals.items())
    assert (len(train), len(val), len(test)) == (33, 5, 13)
    assert not train & val and not val & test and train & test == {"Gurmukhi"}
    assert vinyals.test.groups.count("Gurmukhi") == 4


def test_vinyals_split_with_rotations_quadruples_each_split(data_root, vinyals):
    rotated = load_splits("omniglot", data_root, split="vinyals", rotations=True)
    assert [c.num_classes for _, c in rotated.items()] == [4112, 688, 1692]
    check_disjoint(rotated)
    for split, classes in rotated.items():
        assert {n.split("/rot")[0] for n in classes.names} == set(getattr(vinyals, split).names)


def test_default_split_is_still_the_alphabet_split(data_root, omniglot):
    named = load_splits("omniglot", data_root, split="alphabets")
    assert named.class_names() == omniglot.class_names()
    assert [c.num_classes for _, c in omniglot.items()] == [799, 165, 659]
    with pytest.raises(ConfigError, match="data.split='random' is unknown.*vinyals"):
        load_splits("omniglot", data_root, split="random")


def vinyals_copy(tmp_path, data_root, damage=None):
    """data_root's omniglot npz files linked into tmp_path, the split files copied (and one
    of them damaged by ``damage(path)``)."""
    folder = tmp_path / "omniglot"
    (folder / "vinyals_split").mkdir(parents=True)
    for npz in (data_root / "omniglot").glob("*_28.npz"):
        (folder / npz.name).symlink_to(npz)
    for split in ("train", "val", "test"):
        src = data_root / "omniglot" / "vinyals_split" / f"{split}.json"
        (folder / "vinyals_split" / src.name).write_text(src.read_text())
    if damage:
        damage(folder / "vinyals_split" / "val.json")
    return tmp_path


def drop_one_character(path):
    listing = json.loads(path.read_text())
    listing["background"][next(iter(listing["background"]))].pop()
    path.write_text(json.dumps(listing))


def rename_one_character(path):
    listing = json.loads(path.read_text())
    listing["background"][next(iter(listing["background"]))][0] = "character99"
    path.write_text(json.dumps(listing))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.unlink(), r"needs .*val\.json: put the split file from http"),
        (lambda p: p.write_text('{"background": [1, 2'), r"val\.json is not a split file"),
        (drop_one_character, r"val\.json lists 171 distinct characters, expected 172"),
        (rename_one_character, r"val\.json lists 172 .* \(not found: \['\w+/character99'\]\)"),
    ],
    ids=["missing", "not-json", "short", "unknown-name"],
)
def test_missing_or_corrupt_vinyals_file_names_it(tmp_path, data_root, damage, message):
    root = vinyals_copy(tmp_path, data_root, damage)
    with pytest.raises(DataError, match=message):
        load_splits("omniglot", root, split="vinyals", download=False)
