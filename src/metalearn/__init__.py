"""metalearn: meta-learning experiments on real few-shot data with Lightning + Hydra."""

import warnings

__version__ = "0.1.0"

# conf/train.yaml puts ./conf (a user's own configs) on Hydra's search path; most working
# directories have none, which is fine and not worth Hydra's warning on every run
warnings.filterwarnings("ignore", message=r"provider=hydra\.searchpath in main, path=conf is not")

__all__ = ["compose", "load", "train"]


def compose(overrides=(), config_name: str = "train"):
    """The training config as ``python train.py <overrides>`` composes it (a DictConfig):
    ``metalearn.compose(["algo=protonet", "shots=5"])``. Without ``output_dir=...`` the run
    goes to ``<paths.log_dir>/<task_name>/runs/<date>/<time>``, as from the command line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from metalearn.cli import default_output
    from metalearn.paths import conf_dir

    overrides = list(overrides)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=overrides)
    if not any(o.split("=", 1)[0].lstrip("+") == "output_dir" for o in overrides):
        cfg.output_dir = str(default_output(cfg.task_name, cfg.paths.log_dir))
    return cfg


def __getattr__(name: str):
    # metalearn.train is both the module that runs training and, called, the run itself:
    # metalearn.train(cfg) trains and tests cfg (see metalearn.train.CallableModule)
    if name == "train":
        import importlib

        return importlib.import_module("metalearn.train")
    raise AttributeError(f"module 'metalearn' has no attribute {name!r}")


def load(path, map_location="cpu"):
    """The trained learner in a checkpoint a run wrote: ``.adapt(images, labels).predict(...)``
    (see metalearn.learner)."""
    from metalearn.learner import load as load_learner

    return load_learner(path, map_location=map_location)
