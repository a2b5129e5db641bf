"""Resuming a run: which checkpoint ``ckpt_path`` names, and whether this config can load it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from metalearn.errors import ConfigError

log = logging.getLogger(__name__)

# Keys that may change when resuming: where to read and write, how long to train, how to log,
# which engine computes the (same) inner loop.
FREE_TO_CHANGE = (
    "ckpt_path",
    "output_dir",
    "paths.",
    "task_name",
    "tags",
    "debug",
    "print_config",
    "test",
    "trainer.",
    "logger.",
    "callbacks.",
    "engine.",
    "data.root",
    "data.download",
    "data.num_workers",
)


def run_settings(cfg: DictConfig) -> dict:
    """The run's settings as flat ``key: value`` pairs (saved in checkpoints)."""
    flat: dict = {}

    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))
    return {k: v for k, v in flat.items() if not k.startswith("hydra.")}


def resume_path(ckpt_path: str | None, out: Path) -> str | None:
    """``ckpt_path`` as a file: ``last`` is this run directory's ``checkpoints/last.ckpt`` (an
    error when there is none); ``auto`` is the same when it exists, else a fresh start, so a
    preempted job rerun with the same command and output directory continues where it was."""
    if ckpt_path not in ("last", "auto"):
        return ckpt_path
    last = out / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("ckpt_path=%s: resuming from %s", ckpt_path, last)
        return str(last)
    if ckpt_path == "auto":
        return None
    raise ConfigError(
        f"ckpt_path=last: {out} has no checkpoints/last.ckpt yet: run in the directory of the "
        "run to resume (output_dir=<run dir> or hydra.run.dir=<run dir>), or use ckpt_path=auto "
        "to start fresh when there is none"
    )


def check_resume(ckpt_path: str, settings: dict) -> None:
    """Compare the settings a checkpoint was trained with to this run's, before resuming.

    Another network or algorithm (``model.*``, ``algo._target_``, ``ways``) cannot load the
    checkpoint: ConfigError listing the differences. Other changes (shots, data, learning
    rates, ...) are allowed, with a warning listing them: the curve will mix both settings.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path={ckpt_path}: no such file (e.g. <run dir>/checkpoints/last.ckpt)"
        )
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # any unpickling/zip problem: the file is not a checkpoint
        raise ConfigError(f"ckpt_path={ckpt_path} is not a readable checkpoint ({err})") from err
    before = (saved.get("metalearn") or {}).get("config")
    if not before:
        return  # written before checkpoints recorded their settings
    changed = {
        k: (before.get(k), settings.get(k))
        for k in sorted(set(before) | set(settings))
        if before.get(k) != settings.get(k) and not k.startswith(FREE_TO_CHANGE)
    }
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changed.items()))
    hard = [k for k in changed if k.startswith("model.") or k in ("algo._target_", "ways")]
    if hard:
        raise ConfigError(
            f"ckpt_path={ckpt_path} was trained with another network or algorithm ({listed}):"
            f" resume with its settings (see {path.parent.parent}/.hydra/overrides.yaml)"
        )
    if changed:
        log.warning("resuming %s with changed settings: %s", ckpt_path, listed)


def checked_resume_path(cfg: DictConfig, settings: dict) -> str | None:
    """The checkpoint this run continues from (None: a fresh start), checked against
    ``settings`` before anything is trained."""
    ckpt_path = resume_path(cfg.get("ckpt_path"), Path(cfg.output_dir))
    if ckpt_path:
        check_resume(ckpt_path, settings)
    return ckpt_path
