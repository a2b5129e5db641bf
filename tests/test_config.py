"""Every config-group option composes and runs a fast_dev_run on CPU through run(cfg)."""

from __future__ import annotations

import json

import pytest

from metalearn.train import run
from tests.helpers import REPO, TINY, compose_cfg

SKIP = {"trainer": {"gpu", "ddp", "ddp_cpu"}}  # GPU-only; ddp_cpu: tests/test_distributed.py


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


CASES = [
    (group, option)
    for group in ("data", "algo", "model", "engine", "trainer", "logger", "experiment")
    for option in options(group)
    if option not in SKIP.get(group, set())
]


# Regression options (points, not images) run together: the sinusoids, the MLP, ways=1.
POINTS = {"data": "sinusoid", "model": "mlp"}
POINT_PRESETS = ("maml_sinusoid", "pretrained_sinusoid")


def on_points(group: str, option: str) -> bool:
    return POINTS.get(group) == option or (group == "experiment" and option in POINT_PRESETS)


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_runs_fast_dev_run(group, option, tmp_path, data_root):
    root = data_root
    if (group, option) == ("data", "folder"):  # a folder of class folders: some real PNGs
        root = omniglot_png_folder(data_root, tmp_path / "photos")
    if on_points(group, option):
        points = [] if group == "experiment" else [f"{g}={o}" for g, o in POINTS.items()]
        # algo=maml's Omniglot inner rate (0.4) diverges on MSE: the sinusoid preset's
        points += [] if group == "experiment" else ["algo.inner_lr=0.01"]
        tiny = [o for o in TINY if not o.startswith("model.")]  # the MLP has no channels
        overrides = [*tiny, *points, "ways=1", f"{group}={option}", "+trainer.fast_dev_run=true"]
        cfg = compose_cfg(tmp_path, overrides, tiny=False)
    else:
        # a preset keeps its own validation setting (0 where it trains on the val classes)
        tiny = [o for o in TINY if group != "experiment" or not o.startswith("data.val_")]
        overrides = [*tiny, f"{group}={option}", "+trainer.fast_dev_run=true", f"data.root={root}"]
        cfg = compose_cfg(tmp_path, overrides, tiny=False)
    if group == "experiment":  # presets are long: keep their settings, shrink the run
        cfg.data.test_episodes = 10
        cfg.data.val_episodes = min(cfg.data.val_episodes, 10)
    metrics = run(cfg)
    assert metrics["status"] == "ok"
    if on_points(group, option):
        assert metrics["metric"] == "mse" and 0.0 < metrics["test/mse"] < 100
    else:
        assert 0.0 <= metrics["test/acc"] <= 1.0
    assert json.loads((tmp_path / "metrics.json").read_text())["algo"] == cfg.algo.name


def omniglot_png_folder(data_root, root, classes=40, per_class=20):
    """The first Omniglot evaluation characters as PNG files, one folder per class."""
    import numpy as np
    from PIL import Image

    with np.load(data_root / "omniglot" / "images_evaluation_28.npz") as f:
        images = f["images"]
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(images[20 * c + k]).save(root / f"class{c:02d}" / f"{k:02d}.png")
    return root


def test_top_level_shots_reach_data_and_model(tmp_path):
    cfg = compose_cfg(tmp_path, ["shots=5", "ways=10"])
    assert cfg.data.shots == 5 and cfg.data.ways == 10 and cfg.model.ways == 10


def test_every_group_has_options():
    groups = ("data", "algo", "model", "engine", "trainer", "logger", "callbacks", "paths", "debug")
    for group in groups:
        assert options(group), group
