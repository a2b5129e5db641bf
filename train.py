"""Train a meta-learner: ``python train.py [overrides]``; sweeps with ``-m``.

Examples:
    python train.py                                   # MAML, Omniglot 5-way 1-shot
    python train.py algo=fomaml data=quickdraw shots=5
    python train.py -m algo=maml,fomaml shots=1,5     # four jobs under multirun/
"""

import hydra
from omegaconf import DictConfig

import metalearn.pool  # noqa: F401  registers ${gpu_pool_size:} for hydra/launcher=gpu_pool


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from metalearn.train import main as run_main

    return run_main(cfg)


if __name__ == "__main__":
    import sys

    from metalearn.cli import check_train_argv

    check_train_argv(sys.argv[1:])
    main()
