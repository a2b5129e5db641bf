"""Where metalearn's own files are."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from metalearn.errors import ConfigError


def conf_dir() -> Path:
    """The Hydra config tree: ``metalearn/conf`` inside an installed wheel (package data), else
    ``conf/`` of the checkout this module runs from (an editable install, ``PYTHONPATH=src``).
    Every command and ``metalearn.compose`` composes from here, never from the working directory
    (a user's own ``./conf`` only *extends* it: ``hydra.searchpath`` in conf/train.yaml)."""
    packaged = Path(str(resources.files("metalearn") / "conf"))
    if (packaged / "train.yaml").is_file():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if (checkout / "train.yaml").is_file():
        return checkout
    raise ConfigError(
        f"metalearn's configs are missing (neither {packaged} nor {checkout} holds train.yaml): "
        "reinstall it, pip install metalearn (or pip install -e . in a checkout)"
    )


def __getattr__(name: str):
    if name == "CONF_DIR":  # the old constant, for code written before conf_dir()
        return conf_dir()
    raise AttributeError(f"module 'metalearn.paths' has no attribute {name!r}")
