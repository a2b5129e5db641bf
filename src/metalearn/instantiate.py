"""Objects from config nodes (``hydra.utils.instantiate``), with errors that name the fix."""

from __future__ import annotations

import difflib
import inspect
import logging
import re

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from metalearn.checkpointing import AtomicCheckpointIO
from metalearn.errors import ConfigError, MetalearnError
from metalearn.loggers import logger_callbacks
from metalearn.requeue import cluster_plugins, requeue_callbacks
from metalearn.tasks import CLASSIFICATION, TaskKind

log = logging.getLogger(__name__)


def build(node, **kwargs):
    """``instantiate`` that surfaces our own errors (Hydra wraps them) unchanged, and names
    the closest valid keys for a key the target does not take (e.g. ``+algo.inner_lrr``)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, MetalearnError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(err.__cause__))
        if unknown:
            raise unknown_key_error(node, unknown.group(1)) from err
        raise


def unknown_key_error(node, key: str) -> ConfigError:
    """ConfigError for a key that ``node._target_`` does not take, naming the close ones."""
    from hydra.utils import get_object

    where = node._get_full_key(None)
    params = inspect.signature(get_object(node._target_)).parameters
    valid = [p for p in params if p not in ("self", "args", "kwargs")]
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f"did you mean {' or '.join(f'{where}.{c}' for c in close)}? " if close else ""
    return ConfigError(
        f"{where}.{key} is not a setting of {node._target_}: {hint}"
        f"(its settings: {', '.join(valid)})"
    )


def instantiate_datamodule(cfg: DictConfig):
    """``cfg.data``, set up: a missing file or an impossible episode shape is raised here,
    before anything is trained. Settings left to the data (``data.image_size``/``channels``
    null: a folder's own size, colour if any image is) become what it has, so the model and
    the saved settings agree with it."""
    datamodule = build(cfg.data)
    datamodule.setup()
    for key in ("image_size", "channels"):
        if cfg.data.get(key, "missing") is None:
            cfg.data[key] = getattr(datamodule, key)
    return datamodule


def instantiate_algorithm(cfg: DictConfig, datamodule, settings: dict):
    """``cfg.algo`` with its network and engine; it carries the run's ``settings`` and the
    data's preprocessing into its checkpoints (for resume checks and ``metalearn.load``)."""
    algo = build(cfg.algo, model=build(cfg.model), engine=build(cfg.engine))
    algo.task = getattr(datamodule, "task", "classification")  # its loss and metric
    algo.run_config = settings
    preprocessing = datamodule.preprocessing()  # None: points, not images
    algo.preprocessing = preprocessing and preprocessing.to_dict()
    if not algo.uses_engine:
        log.info("algo=%s has no differentiable inner loop: engine is unused", cfg.algo.name)
    return algo


def instantiate_callbacks(
    cfg: DictConfig, task: TaskKind = CLASSIFICATION, validates: bool = True
) -> dict[str, L.Callback]:
    """``cfg.callbacks``: name -> callback; a null entry or a factory returning None (the
    progress bar with ``trainer.enable_progress_bar=false``) is left out. A callback watching
    ``val/acc`` (the best checkpoint, early stopping) watches the task's metric instead on
    other tasks (regression: the lowest ``val/mse``). In a run that validates nothing
    (``data.val_episodes=0``) the best checkpoint has nothing to rank by and is left out (the
    final weights are tested; last.ckpt holds them); any other val-watching callback is an
    error."""
    callbacks = {}
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(
                f"callbacks.{name} is not a callback: give it a _target_ (e.g. "
                f"+callbacks.{name}._target_=lightning.pytorch.callbacks.EarlyStopping; "
                "conf/callbacks/ has examples)"
            )
        if not validates and str(node.get("monitor") or "").startswith("val/"):
            if name == "model_checkpoint":
                log.info("no validation (data.val_episodes=0): no best checkpoint to keep")
                continue
            raise ConfigError(
                f"callbacks.{name} watches {node.monitor}, but data.val_episodes=0 validates "
                f"nothing: remove it (~callbacks.{name}) or set data.val_episodes"
            )
        follow = node.get("monitor") == "val/acc" and task.metric != "acc"
        extra = {"monitor": f"val/{task.metric}", "mode": task.mode} if follow else {}
        callback = build(node, **extra)
        if callback is not None:
            callbacks[name] = callback
    return callbacks


def instantiate_trainer(
    cfg: DictConfig, callbacks: dict, loggers: list, last_ckpt, validates: bool = True
) -> L.Trainer:
    """``cfg.trainer`` with the callbacks, the loggers (and the callbacks they need: the W&B
    run id in checkpoints, the last step logged), atomic checkpoint writes, and in a SLURM job
    of ``hydra/launcher=slurm`` the requeue at its time limit (resuming from ``last_ckpt``).
    ``validates=False``: no validation loop (not an empty one each epoch)."""
    return build(
        cfg.trainer,
        **({} if validates else {"limit_val_batches": 0}),
        logger=loggers or False,
        callbacks=[
            *callbacks.values(),
            *logger_callbacks(loggers),
            *requeue_callbacks(last_ckpt),
        ],
        plugins=[AtomicCheckpointIO(), *cluster_plugins()],
        default_root_dir=str(cfg.output_dir),
    )
