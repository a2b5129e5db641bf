"""The user's commands on real files: metalearn.adapt labels a folder of Omniglot PNGs as the
original release stores them, metalearn.evaluate scores a checkpoint without training, and
every bad input gets one message naming the fix, with nothing written."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from metalearn.adapt import adapt_folders
from metalearn.errors import ConfigError, DataError
from metalearn.evaluate import evaluate
from metalearn.learner import load
from metalearn.report import collect, table
from metalearn.train import run
from tests.helpers import REPO, compose_cfg

LEARN = [  # ProtoNet learns Omniglot in a CI-sized run (tests/test_algorithm_learning.py)
    "algo=protonet",
    "algo.meta_batch_size=4",
    "model.channels=32",
    "queries=5",
    "trainer.max_steps=150",
    "data.batches_per_epoch=150",
    "data.val_episodes=25",
    "data.test_episodes=100",
    "data.eval_batch_size=25",
]
CLASSES = [3, 40, 77, 150, 222]  # evaluation characters of different alphabets


@pytest.fixture(scope="module")
def protonet_run(tmp_path_factory, data_root):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("protonet")
    metrics = run(compose_cfg(out, LEARN))
    assert metrics["status"] == "ok"
    return metrics


def release_pngs(data_root: Path, root: Path, shots=1, queries=5, unlabelled=2) -> Path:
    """Omniglot evaluation characters as the original release stores them (105x105 1-bit
    PNGs, black strokes on white paper): support/<class>/, query/<class>/ and a few loose
    query images."""
    with np.load(data_root / "omniglot" / "images_evaluation.npz") as f:
        images, labels, names = f["images"], f["labels"], f["class_names"]
    for c in CLASSES:
        name = str(names[c]).replace("/", "_")
        files = images[labels == c]
        for part, picked in (("support", files[:shots]), ("query", files[shots:][:queries])):
            folder = root / part / name
            folder.mkdir(parents=True)
            for k, image in enumerate(picked):
                Image.fromarray(image).convert("1").save(folder / f"{k:02d}.png")
        for k, image in enumerate(files[-unlabelled:] if unlabelled else []):
            Image.fromarray(image).convert("1").save(root / "query" / f"loose_{c}_{k}.png")
    return root


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=REPO,
    )


@pytest.mark.slow
def test_adapt_labels_release_pngs_above_chance_as_the_python_api_does(
    protonet_run, tmp_path, data_root
):
    root = release_pngs(data_root, tmp_path / "photos")
    out = tmp_path / "out"
    ckpt = protonet_run["best_checkpoint"]
    done = cli(
        "metalearn.adapt",
        f"ckpt={ckpt}",
        f"support={root / 'support'}",
        f"query={root / 'query'}",
        f"out={out}",
    )
    assert done.returncode == 0, done.stderr
    assert "accuracy on the 25 labelled queries" in done.stdout
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 25 + 10 and (out / "predictions.png").stat().st_size > 10_000
    labelled = [r for r in rows if r["label"]]
    accuracy = sum(r["correct"] == "true" for r in labelled) / len(labelled)
    assert accuracy > 0.6, accuracy  # chance: 0.2
    for r in rows:
        probs = [float(v) for k, v in r.items() if k.startswith("p(")]
        assert len(probs) == 5 and abs(sum(probs) - 1) < 1e-3

    # the same images through the Python API, as arrays: the same predictions
    learner = load(ckpt)
    support = sorted((root / "support").glob("*/*.png"))
    queries = [Path(r["file"]) for r in rows]
    arrays = [np.asarray(Image.open(p).convert("L")) for p in support]
    adapted = learner.adapt(arrays, [p.parent.name for p in support])
    prediction = adapted.predict([np.asarray(Image.open(p).convert("L")) for p in queries])
    assert prediction.labels == [r["predicted"] for r in rows]
    api_accuracy = np.mean(
        [p == r["label"] for p, r in zip(prediction.labels, rows, strict=True) if r["label"]]
    )
    assert api_accuracy == pytest.approx(accuracy)


@pytest.mark.slow
def test_evaluate_equals_the_runs_test_accuracy_and_scores_other_datasets(
    protonet_run, tmp_path, data_root
):
    ckpt = protonet_run["best_checkpoint"]
    same = evaluate(ckpt, ["trainer.enable_progress_bar=false"], tmp_path / "same")
    assert same["test/acc"] == pytest.approx(protonet_run["test/acc"], abs=1e-7)
    assert same["test_episodes"] == 100 and same["queries"] == 5  # the run's own episodes
    saved = json.loads((tmp_path / "same" / "metrics.json").read_text())
    assert saved["kind"] == "evaluation" and saved["checkpoint"] == str(Path(ckpt).resolve())

    other = evaluate(
        ckpt,
        ["data=quickdraw", "ways=10", "data.test_episodes=50", "trainer.enable_progress_bar=false"],
        tmp_path / "quickdraw",
    )
    assert other["dataset"] == "quickdraw" and other["ways"] == 10
    assert 0.1 < other["test/acc"] < 1.0 and other["trained"]["dataset"] == "omniglot"

    # the report tabulates evaluations next to training runs
    rows, cols, cells = table(collect(tmp_path))
    labels = {r[0]: r[3] for r in rows}
    assert labels["quickdraw"] == "evaluation of omniglot 5w1s" and (10, 1) in cols


def test_tools_have_their_own_help():
    for module, words in (("metalearn.adapt", "support="), ("metalearn.evaluate", "ckpt=")):
        done = cli(module, "--help")
        assert done.returncode == 0 and module in done.stdout and words in done.stdout


@pytest.fixture
def tiny_ckpt(tmp_path_factory, data_root) -> str:
    metrics = run(compose_cfg(tmp_path_factory.mktemp("tiny"), ["algo=protonet"]))
    return metrics["best_checkpoint"]


def test_bad_folders_get_one_message_and_nothing_is_written(tiny_ckpt, tmp_path, data_root):
    root = release_pngs(data_root, tmp_path / "ok", queries=1, unlabelled=0)
    out = tmp_path / "out"

    def fails(error, match, support=root / "support", query=root / "query"):
        with pytest.raises(error, match=match):
            adapt_folders(tiny_ckpt, support, query, out, show=False)
        assert not out.exists()

    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes((root / "query").joinpath(next(iter(
        sorted(os.listdir(root / "query")))), "00.png").read_bytes())  # fmt: skip
    fails(ConfigError, "no class sub-folders", support=flat)
    single = tmp_path / "single"
    (single / "cat").mkdir(parents=True)
    (single / "cat" / "1.png").write_bytes((flat / "a.png").read_bytes())
    fails(ConfigError, "one class", support=single)
    (single / "dog").mkdir()
    fails(ConfigError, "dog is empty", support=single)
    (single / "dog" / "notes.png").write_text("not an image")
    fails(DataError, "notes.png is not an image", support=single, query=flat)
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(ConfigError, "holds no images", query=empty)
    (empty / "giraffe").mkdir()
    (empty / "giraffe" / "1.png").write_bytes((flat / "a.png").read_bytes())
    fails(ConfigError, "giraffe names a class the support set does not have", query=empty)
    fails(ConfigError, "a.png: is a file, not a folder", support=flat / "a.png")
    fails(ConfigError, "a.png is a file: put the images to label in a folder", query=flat / "a.png")
    # images one level too deep, or a broken link, are named, not silently left out
    deep = tmp_path / "deep"
    shutil.copytree(root / "support", deep)
    first = sorted(deep.iterdir())[0]
    (first / "more").mkdir()
    (first / "00.png").rename(first / "more" / "00.png")
    fails(ConfigError, "more is a folder inside the class folder", support=deep)
    fails(ConfigError, "more is a folder inside the class folder", query=deep)
    (first / "more" / "00.png").rename(first / "00.png")
    (first / "more").rmdir()
    (first / "gone.png").symlink_to(tmp_path / "moved_away.png")
    fails(DataError, "gone.png: no such image file", support=deep)
    taken = tmp_path / "taken"  # out= a file: refused before the model runs, the file kept
    taken.write_text("kept")
    with pytest.raises(ConfigError, match="out=.*taken is a file: out= names the folder"):
        adapt_folders(tiny_ckpt, root / "support", root / "query", taken, show=False)
    assert taken.read_text() == "kept"

    done = cli("metalearn.adapt", f"ckpt={tiny_ckpt}", f"support={flat}", f"query={root / 'query'}")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "no class sub-folders" in done.stderr


def test_python_api_composes_and_trains_and_lists_commands(tmp_path, data_root):
    import metalearn
    from tests.helpers import TINY

    cfg = metalearn.compose(["algo=protonet", *TINY, f"output_dir={tmp_path}"])
    assert cfg.algo.name == "protonet" and cfg.output_dir == str(tmp_path)
    metrics = metalearn.train(cfg)
    assert metrics["status"] == "ok" and (tmp_path / "metrics.json").exists()
    assert metalearn.load(metrics["best_checkpoint"]).algo_name == "protonet"
    done = cli("metalearn")
    assert done.returncode == 0 and "metalearn.adapt" in done.stdout


def test_evaluate_uses_the_models_normalisation_on_colour_data(tmp_path, data_root):
    """mini-ImageNet is normalised with its meta-train statistics, saved in the checkpoint:
    evaluating the checkpoint gives the run's own test accuracy, bit for bit."""
    metrics = run(compose_cfg(tmp_path / "run", ["algo=protonet", "data=miniimagenet"]))
    learner = load(metrics["best_checkpoint"])
    assert learner.preprocessing["channels"] == 3 and len(learner.preprocessing["mean"]) == 3
    again = evaluate(
        metrics["best_checkpoint"], ["trainer.enable_progress_bar=false"], tmp_path / "eval"
    )
    assert again["test/acc"] == metrics["test/acc"]
    # another dataset is normalised with the model's statistics, not its own
    photos = tmp_path / "photos"
    for c in sorted({p.name[:9] for p in (data_root / "miniimagenet" / "images").glob("*.jpg")})[
        -30:
    ]:
        (photos / c).mkdir(parents=True)
        for f in sorted((data_root / "miniimagenet" / "images").glob(f"{c}*.jpg"))[:6]:
            (photos / c / f.name).write_bytes(f.read_bytes())
    evaluate(
        metrics["best_checkpoint"],
        ["data=folder", f"data.root={photos}", "queries=5", "trainer.enable_progress_bar=false"],
        tmp_path / "folder",
    )
    saved = OmegaConf.load(tmp_path / "folder" / "config.yaml")
    want = [learner.preprocessing["mean"], learner.preprocessing["std"]]
    assert [list(v) for v in saved.data.normalize] == [list(v) for v in want]
