"""A checkpoint is a usable model: metalearn.load, learner.adapt(...).predict(...), for every
algorithm, on real Omniglot episodes; checkpoints are read without running code."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

import metalearn
from metalearn.algorithms.gbml import GBML
from metalearn.algorithms.protonet import ProtoNet
from metalearn.data.sources import files_of
from metalearn.data.sources.omniglot import load_omniglot
from metalearn.data.transforms import Preprocessing, prepare
from metalearn.errors import ConfigError
from metalearn.learner import CheckpointError, load
from metalearn.train import run
from tests.helpers import ALGOS, compose_cfg

# fine-tuning's 100 Adam steps per episode at test (its default) only slow this test down
FAST = {"finetune": ["algo.inner_steps_test=10"]}


def trained(tmp_path: Path, algo: str, *overrides: str):
    """A tiny real training run of ``algo``; returns (metrics, config)."""
    cfg = compose_cfg(tmp_path, [f"algo={algo}", *FAST.get(algo, []), *overrides])
    metrics = run(cfg)
    assert metrics["status"] == "ok"
    return metrics, cfg


def meta_test_episodes(cfg):
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    data = datamodule.eval_dataset("test")
    return [data[i] for i in range(len(data))], datamodule


def as_uint8(x: torch.Tensor) -> torch.Tensor:
    """Episode images back to the uint8 ink-high pixels they were made from."""
    return (x * 255).round().to(torch.uint8)


@pytest.mark.parametrize("algo", ALGOS)
def test_loaded_checkpoint_reproduces_the_runs_test_accuracy_and_adapts_to_any_shape(
    algo, tmp_path, data_root
):
    metrics, cfg = trained(tmp_path, algo)
    learner = metalearn.load(metrics["best_checkpoint"])
    assert learner.algo_name == algo and not learner.training
    assert learner.preprocessing["source"] == "omniglot" and learner.preprocessing["paper_white"]
    same = type(learner).load_from_checkpoint(metrics["best_checkpoint"])
    assert type(same) is type(learner)

    # the run's test accuracy, through adapt/predict on the same episodes (pixels as stored:
    # ink-high, so invert=False)
    batches, datamodule = meta_test_episodes(cfg)
    accs = []
    for batch in batches:
        for sx, sy, qx, qy in zip(*batch, strict=True):
            adapted = learner.adapt(as_uint8(sx), sy.tolist(), invert=False)
            prediction = adapted.predict(as_uint8(qx), invert=False)
            accs.append((prediction.indices == qy).float().mean())
    assert torch.stack(accs).mean().item() == pytest.approx(metrics["test/acc"], abs=1e-6)

    # other numbers of classes and of shots than the 5-way 1-shot it was trained with
    images = datamodule.splits.test.images  # uint8 [C, 20, 28, 28], ink-high
    shapes = {"3-way 2-shot": [2, 2, 2], "20-way 1-shot": [1] * 20, "unequal": [1, 7, 3]}
    for name, shots in shapes.items():
        x = torch.cat([torch.from_numpy(images[c, :k]) for c, k in enumerate(shots)])
        y = [f"class{c:02d}" for c, k in enumerate(shots) for _ in range(k)]
        q = torch.from_numpy(images[: len(shots), 15:18].reshape(-1, 28, 28))
        for head in ("auto", "zeros") if learner.trained_head else ("auto",):
            prediction = learner.adapt(x, y, invert=False, head_init=head).predict(q, invert=False)
            assert prediction.probs.shape == (len(q), len(shots)), (name, head)
            torch.testing.assert_close(prediction.probs.sum(-1), torch.ones(len(q)))
            assert set(prediction.labels) <= set(y) and prediction.classes == sorted(set(y))
    if learner.trained_head:
        with pytest.raises(ConfigError, match="head_init=trained"):
            learner.adapt(x, y, invert=False, head_init="trained")


def test_load_refuses_a_checkpoint_that_would_run_code(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.ckpt"
    torch.save({"metalearn": {"config": {}}, "state_dict": {}, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="could run code"):
        metalearn.load(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: plain unpickling runs it
    assert marker.exists()


def test_load_names_what_is_wrong_with_a_file(tmp_path, data_root):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load(tmp_path / "missing.ckpt")
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(CheckpointError, match="not a metalearn checkpoint"):
        load(other)
    metrics, _ = trained(tmp_path / "run", "protonet")
    good = Path(metrics["best_checkpoint"]).read_bytes()
    cut = tmp_path / "truncated.ckpt"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load(cut)
    # the run's own files that are not checkpoints: named as such, with the file to pass
    run_dir = Path(metrics["best_checkpoint"]).parents[1]
    with pytest.raises(CheckpointError, match="metrics.json is not a torch checkpoint"):
        load(run_dir / "metrics.json")
    best = Path(metrics["best_checkpoint"]).name
    for folder in (run_dir, run_dir / "checkpoints"):
        with pytest.raises(CheckpointError, match=f"is a folder: pass one of .*{best}"):
            load(folder)
    newer = torch.load(metrics["best_checkpoint"], weights_only=True)
    newer["metalearn"]["format"] = 99
    torch.save(newer, tmp_path / "newer.ckpt")
    with pytest.raises(CheckpointError, match="newer metalearn"):
        load(tmp_path / "newer.ckpt")
    with pytest.raises(CheckpointError, match="holds a ProtoNet"):
        GBML.load_from_checkpoint(metrics["best_checkpoint"])
    assert isinstance(ProtoNet.load_from_checkpoint(metrics["best_checkpoint"]), ProtoNet)


def test_adapt_rejects_bad_support_sets(tmp_path, data_root):
    metrics, _ = trained(tmp_path, "protonet")
    learner = load(metrics["best_checkpoint"])
    x = torch.zeros(3, 28, 28, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        learner.adapt(x, ["a", "a", "a"])
    with pytest.raises(ConfigError, match="3 support images but 2 labels"):
        learner.adapt(x, ["a", "b"])


def test_adapt_takes_an_episodes_label_tensor_as_its_values(tmp_path, data_root):
    """support_y as a tensor (or array): 3 classes, as with the same labels in a list (a
    tensor's elements hash by identity, so each image would be a class of its own)."""
    metrics, _ = trained(tmp_path, "protonet")
    learner = load(metrics["best_checkpoint"])
    with np.load(data_root / "omniglot" / "images_evaluation_28.npz") as f:
        images, labels = f["images"], f["labels"]
    x = np.concatenate([images[labels == c][:2] for c in range(3)])
    q = np.concatenate([images[labels == c][5:7] for c in range(3)])
    expected = learner.adapt(x, [0, 0, 1, 1, 2, 2]).predict(q)
    for y in (torch.tensor([0, 0, 1, 1, 2, 2]), np.array([0, 0, 1, 1, 2, 2])):
        prediction = learner.adapt(x, y).predict(q)
        assert prediction.classes == [0, 1, 2] and prediction.labels == expected.labels
        assert all(type(c) is int for c in prediction.classes)
        torch.testing.assert_close(prediction.probs, expected.probs, rtol=0, atol=0)


def test_a_conversion_is_said_once_for_the_support_and_queries_together(
    tmp_path, data_root, caplog
):
    metrics, _ = trained(tmp_path, "protonet")
    learner = load(metrics["best_checkpoint"])
    with np.load(data_root / "omniglot" / "images_evaluation_28.npz") as f:
        images, labels = f["images"], f["labels"]
    rgb = np.repeat(np.concatenate([images[labels == c][:2] for c in range(2)])[..., None], 3, -1)
    caplog.set_level(logging.WARNING, logger="metalearn")
    learner.adapt(rgb, [0, 0, 1, 1]).predict(rgb)
    assert caplog.text.count("colour images converted to grayscale") == 1


def test_omniglot_pngs_as_released_become_the_training_pixels(data_root):
    """A user's image in the source's own file format (105x105, black on white paper) gets
    exactly the conversion the source applies: the result is the 28x28 training data."""
    with np.load(data_root / "omniglot" / "images_evaluation.npz") as f:
        originals = f["images"][:40]  # paper = 255
    with np.load(data_root / "omniglot" / "images_evaluation_28.npz") as f:
        small = f["images"][:40]
    spec = Preprocessing("omniglot", 28, 1, paper_white=True, resize="lanczos")

    pils = [Image.fromarray(a).convert("1") for a in originals]  # as the PNGs are stored
    x = prepare(pils, spec)
    expected = torch.from_numpy(255 - small).float().div(255).unsqueeze(1)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


def test_16_bit_and_float_grayscale_files_become_the_8_bit_pixels(data_root, tmp_path):
    """A scanner's 16-bit PNG (Pillow mode I;16) or a float TIFF of a drawing is the same
    drawing: scaled to 8 bits, not clipped at 255 (which made it a white page)."""
    with np.load(data_root / "omniglot" / "images_evaluation_28.npz") as f:
        originals = f["images"][:4]  # grey levels at the strokes' edges, paper = 255
    spec = Preprocessing("omniglot", 28, 1, paper_white=True, resize="lanczos")
    expected = prepare(list(originals), spec)
    deep = []
    for k, a in enumerate(originals):
        Image.fromarray(a.astype(np.uint16) * 257).save(tmp_path / f"{k}.png")
        Image.fromarray(a.astype(np.float32) / 255).save(tmp_path / f"{k}.tiff")
        deep += [tmp_path / f"{k}.png", tmp_path / f"{k}.tiff"]
    assert Image.open(deep[0]).mode == "I;16" and Image.open(deep[1]).mode == "F"
    x = prepare(deep, spec)
    torch.testing.assert_close(x[0::2], expected, rtol=0, atol=0)
    torch.testing.assert_close(x[1::2], expected, rtol=0, atol=0)
    arrays = prepare([a.astype(np.uint16) * 257 for a in originals], spec)  # the API's arrays
    torch.testing.assert_close(arrays, expected, rtol=0, atol=0)


def test_a_binary_resize_model_binarises_a_users_drawings_as_its_training_data(data_root):
    """A model trained with data.resize=binary (the reference codes' Omniglot) records it in
    its checkpoint, and a user's released PNGs then become exactly its training pixels."""
    binary = load_omniglot(data_root, resize="binary").test.images[0]
    with np.load(data_root / "omniglot" / "images_evaluation.npz") as f:
        originals = f["images"][f["labels"] == 0]
    spec = Preprocessing("omniglot", 28, 1, **files_of("omniglot", {"resize": "binary"}))
    assert spec.resize == "binary" and spec.paper_white
    x = prepare([Image.fromarray(a).convert("1") for a in originals], spec)
    expected = torch.from_numpy(binary).float().div(255).unsqueeze(1)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    grey = prepare([Image.fromarray(a).convert("L") for a in originals], spec)
    torch.testing.assert_close(grey, expected, rtol=0, atol=0)


def test_colour_images_for_a_grayscale_model_are_converted_and_said_once(data_root):
    spec = Preprocessing("omniglot", 28, 1, paper_white=True, resize="lanczos")
    rgb = np.full((50, 60, 3), 255, np.uint8)
    rgb[10:40, 20:25] = (200, 0, 0)  # a red stroke on white
    notes: set = set()
    x = prepare([rgb, rgb], spec, notes=notes)
    assert x.shape == (2, 1, 28, 28) and x.max() > 0.2 and x[0, 0, 0, 0] == 0
    assert notes == {"colour images converted to grayscale"}


def test_grayscale_images_for_a_colour_model_are_converted_and_said_once():
    spec = Preprocessing("miniimagenet", 84, 3, paper_white=False, resize="lanczos")
    gray = np.tile(np.linspace(0, 255, 84, dtype=np.uint8), (84, 1))
    notes: set = set()
    x = prepare([gray, Image.fromarray(gray)], spec, notes=notes)
    assert x.shape == (2, 3, 84, 84) and x[:, 0].equal(x[:, 2])
    assert notes == {"grayscale images converted to RGB"}
