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


def test_a_mistyped_key_names_the_close_ones_in_one_message(tmp_path):
    """Hydra's own message for a key the config lacks suggests adding it with ``+``; the
    command names the key meant instead, in a sweep too, before anything runs."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "-m", "algo=maml,reptile", "algo.inner_lrr=0.1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert "algo.inner_lrr is not in the config: did you mean algo.inner_lr" in done.stderr
    assert "+algo.inner_lrr" not in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "multirun").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algoo.inner_lr=0.1"], "algoo.inner_lr is not in the config: did you mean algo?"),
        (["shotz=5"], "shotz is not in the config: did you mean shots?"),
        (["algo=protonet", "trainer.max_stepz=3,4"], "did you mean trainer.max_steps"),
        # keys valid only with the group option chosen beside them, sweeps, additions: fine
        (["algo=reptile", "algo.inner_batch_size=5", "shots=1,5", "+extra=1"], None),
        (["data.augment.flip=true"], None),  # an open mapping takes new keys
        (["algo=mamll"], None),  # not a key: Hydra lists the options itself
    ],
)
def test_unknown_key_message(overrides, message):
    from metalearn.cli import first_values, unknown_key_message

    found = unknown_key_message(first_values(overrides))
    assert found == message if message is None else message in found
