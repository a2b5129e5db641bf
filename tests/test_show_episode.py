"""show_episode renders one episode to a readable PNG."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
from omegaconf import OmegaConf

from metalearn.show_episode import render_episode
from tests.helpers import REPO

CONF = REPO / "conf"


def minimal_cfg(data_root, dataset: str, out: Path, **top):
    cfg = {"ways": 5, "shots": 1, "queries": 3, "seed": 0, "algo": {"meta_batch_size": 1}}
    cfg.update(top, out=str(out), data=OmegaConf.load(CONF / "data" / f"{dataset}.yaml"))
    cfg = OmegaConf.create(cfg)
    cfg.data.root = str(data_root)
    return cfg


@pytest.mark.parametrize("dataset,split", [("quickdraw", "val"), ("omniglot", "train")])
def test_render_episode_writes_png(data_root, tmp_path, dataset, split):
    out = tmp_path / f"{dataset}.png"
    path = render_episode(minimal_cfg(data_root, dataset, out, shots=2, split=split))
    assert path == out.resolve() and out.stat().st_size > 1024
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0.05


@pytest.mark.parametrize("mode,split", [("range", "val"), ("metadataset", "train")])
def test_render_episode_draws_episodes_of_varying_shape(data_root, tmp_path, mode, split):
    cfg = minimal_cfg(data_root, "omniglot", tmp_path / f"{mode}.png", split=split)
    cfg.data.episodes = mode
    path = render_episode(cfg)
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0.05


def test_episode_figure_shows_unequal_classes_and_caps_large_episodes():
    import numpy as np

    from metalearn.show_episode import MAX_QUERIES, SUPPORT_COLUMNS, episode_figure

    support = [np.random.rand(k, 8, 8) for k in (1, 3, 25)]
    queries = np.random.rand(80, 8, 8)
    fig = episode_figure(support, queries, np.zeros(80, int), ["a", "b", "c"])
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == 1 + 3 + SUPPORT_COLUMNS + MAX_QUERIES
    assert fig._suptitle.get_text() == (
        f"3-way 1-25-shot episode (support rows, then first {MAX_QUERIES} of 80 queries)"
    )
    assert fig.axes[2 * SUPPORT_COLUMNS].get_ylabel() == f"2: c (+{25 - SUPPORT_COLUMNS})"


def test_unknown_split_is_a_clear_error(data_root, tmp_path):
    from metalearn.errors import ConfigError

    with pytest.raises(ConfigError, match="choose one of val, test, train"):
        render_episode(minimal_cfg(data_root, "quickdraw", tmp_path / "x.png", split="tset"))


@pytest.mark.skipif(not (CONF / "train.yaml").exists(), reason="conf/train.yaml not written yet")
def test_cli(data_root, tmp_path):
    out = tmp_path / "cli.png"
    env = dict(os.environ, METALEARN_DATA_DIR=str(data_root))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "metalearn.show_episode",
            "data=quickdraw",
            "ways=5",
            "shots=1",
            f"out={out}",  # no '+' needed
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == str(out.resolve())
    assert out.stat().st_size > 1024


def test_cli_bad_input_is_one_message(data_root, tmp_path):
    env = dict(os.environ, METALEARN_DATA_DIR=str(data_root))
    env.pop("HYDRA_FULL_ERROR", None)
    run = subprocess.run(
        [sys.executable, "-m", "metalearn.show_episode", "split=tset", f"out={tmp_path / 'x.png'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "Error (ConfigError): split='tset': choose one of val, test, train" in run.stderr
    assert not (tmp_path / "x.png").exists()


def test_cli_help_is_its_own():
    run = subprocess.run(
        [sys.executable, "-m", "metalearn.show_episode", "--help"], capture_output=True, text=True
    )
    assert run.returncode == 0 and "metalearn.show_episode: draw one" in run.stdout
