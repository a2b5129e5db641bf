"""``metalearn-train``: ``python train.py`` of an installed package (console script).

The same Hydra app as the checkout's ``train.py`` (same config tree, overrides, ``-m`` sweeps,
``--help``), composed from ``metalearn.paths.conf_dir()``: the configs shipped in the wheel, or
a checkout's ``conf/``. A ``conf/`` folder in the working directory adds the user's own options
(``conf/experiment/mine.yaml`` -> ``experiment=mine``; ``hydra.searchpath`` in conf/train.yaml).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import metalearn.pool  # noqa: F401  registers ${gpu_pool_size:} for hydra/launcher=gpu_pool
from metalearn.cli import check_train_argv
from metalearn.paths import conf_dir


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")
def train_job(cfg: DictConfig) -> float | None:
    from metalearn.train import main as run_main

    return run_main(cfg)


# Hydra names a job (hydra.job.name, its <name>.log) after the module of its function: "train",
# as for `python train.py`, not "commands".
train_job.__wrapped__.__module__ = "metalearn.train"


def train() -> None:
    check_train_argv(sys.argv[1:])
    train_job()
