"""Loggers: W&B that never hangs without network or API key, one run per job; the loggers
of ``logger=[...]`` built and given the run's config; the last step of a fit always logged.

W&B, as its Hydra guide prescribes: the config is logged nested (``{"algo": {"inner_lr": 0.4}}``,
shown as ``algo.inner_lr`` in the UI), plus the Hydra job's number, overrides and directory
under ``job``. Each job of a sweep is its own run: ``group`` = the sweep directory (override with
``logger.wandb.group=NAME``), ``job_type`` = what the run does (``train``), tags = algo,
dataset, N-way, K-shot. The summary holds the last value of every logged metric
(``test/acc``, ``test/acc_ci95``, ``val/acc_best``; regression tasks: ``test/mse``,
``test/mse_ci95``, ``val/mse_best``). Offline, the run lands in
``<job dir>/wandb/offline-run-*`` (upload later with ``wandb sync <job dir>/wandb/offline-run-*``).
Checkpoints record the W&B run id, so resuming from one continues the same run.
"""

from __future__ import annotations

import logging
import math
import netrc
import os
from argparse import Namespace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def wandb_has_credentials() -> bool:
    """True when an API key is configured (env var or ~/.netrc, as ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
    except (OSError, netrc.NetrcParseError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
    return rc.authenticators(host) is not None


def wandb_offline(offline: bool | str = "auto") -> bool:
    if offline != "auto":
        return bool(offline)
    mode = os.environ.get("WANDB_MODE", "").lower()
    return mode in ("offline", "dryrun", "disabled") or not wandb_has_credentials()


def sweep_group() -> str | None:
    """The sweep directory when running under ``-m``, so a sweep's runs group together."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    return str(Path(hc.sweep.dir)).replace(os.sep, "/")


def job_info() -> dict:
    """The Hydra job behind this run: number, overrides, directory (empty outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return {}
    return {
        "num": hc.job.get("num"),
        "overrides": " ".join(hc.overrides.task),
        "dir": hc.runtime.output_dir,
    }


class RunWandbLogger(WandbLogger):
    """``WandbLogger`` that logs the run's config nested, as W&B's Hydra guide does
    (``wandb.config = OmegaConf.to_container(cfg, resolve=True)``), plus the Hydra job under
    ``job``. (The parameters are a resolved config, plain values already: none of the private
    Lightning helpers that sanitise arbitrary hparams is needed.)"""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._watched: dict = {}  # checkpoint callbacks whose files log_model uploads
        self._uploaded: dict = {}  # path -> modification time of the version uploaded

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        if isinstance(params, Namespace):
            params = vars(params)
        if OmegaConf.is_config(params):
            params = OmegaConf.to_container(params, resolve=True)
        params = dict(params)
        if job := job_info():
            params["job"] = job
        self.experiment.config.update(params, allow_val_change=True)

    # log_model: Lightning's own would label last.ckpt "best" (it is the best of its own
    # callback, which monitors nothing), so the checkpoints are logged here, by role.
    def after_save_checkpoint(self, checkpoint_callback) -> None:
        if not self._log_model:
            return
        self._watched[id(checkpoint_callback)] = checkpoint_callback
        if self._log_model == "all":
            self.log_checkpoints()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if status == "success" and self._log_model and self._experiment is not None:
            self.log_checkpoints()

    @rank_zero_only
    def log_checkpoints(self) -> None:
        """Each checkpoint written since the last call, as a version of the ``model-<run id>``
        artifact with alias ``best`` (by ``val/acc``) or ``last``, and ``latest``."""
        import wandb

        for callback in self._watched.values():
            path = callback.best_model_path
            written = Path(path).stat().st_mtime if path and Path(path).is_file() else None
            if written is None or self._uploaded.get(path) == written:
                continue
            role = "best" if callback.monitor else "last"
            artifact = wandb.Artifact(
                f"model-{self.experiment.id}",
                type="model",
                metadata={"file": Path(path).name, "role": role, "score": score(callback)},
            )
            artifact.add_file(path, name="model.ckpt")
            self.experiment.log_artifact(artifact, aliases=[role, "latest"])
            self._uploaded[path] = written


def score(callback) -> float | None:
    value = callback.best_model_score
    return None if value is None else float(value)


def wandb_logger(
    offline: bool | str = "auto",
    group: str | None = None,
    log_model: bool | str = False,
    **kwargs,
) -> WandbLogger:
    """A ``WandbLogger`` that runs offline when no credentials or ``WANDB_MODE=offline``.

    ``log_model`` works offline too: the checkpoints are stored in the offline run and
    uploaded by ``wandb sync`` (Lightning refuses ``offline=True`` with ``log_model``, so the
    offline mode is given to ``wandb.init`` directly)."""
    offline = wandb_offline(offline)
    if offline:
        os.environ.setdefault("WANDB_MODE", "offline")
        kwargs.setdefault("mode", "offline")
    Path(kwargs.get("save_dir", ".")).mkdir(parents=True, exist_ok=True)
    import wandb

    if wandb.run is not None:  # left open by an earlier job in this (joblib worker) process:
        wandb.finish()  # WandbLogger would log this job into it
    return RunWandbLogger(
        offline=offline and not log_model,
        log_model=log_model,
        group=group or sweep_group(),
        reinit="finish_previous",
        **kwargs,
    )


WANDB_TARGETS = ("metalearn.loggers.wandb_logger", "lightning.pytorch.loggers.WandbLogger")


def build_loggers(cfg: DictConfig, ckpt_path: str | None = None, build=None) -> list:
    """The loggers of ``cfg.logger`` (``logger=[wandb,csv]``: one per entry), each given the
    run's resolved config. Resuming from ``ckpt_path``, a W&B logger without an explicit
    ``id`` continues the run recorded in that checkpoint."""
    from hydra.utils import instantiate

    build = build or instantiate
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        # an entry without _target_ is a setting for a logger not selected
        # (logger.wandb.entity in conf/local/ with logger=csv): left out
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        extra = {}
        if node.get("_target_") in WANDB_TARGETS and not node.get("id") and ckpt_path:
            if run_id := wandb_run_in(ckpt_path):
                log.info("resuming from %s: continuing its W&B run %s", ckpt_path, run_id)
                extra["id"] = run_id
        loggers.append(build(node, **extra))
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    for logger in loggers:
        logger.log_hyperparams(config)
    return loggers


def logger_callbacks(loggers) -> list:
    """Callbacks the loggers need: the W&B run id in each checkpoint, the last step logged."""
    wandb_runs = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    return [
        LogLastStep(),
        StepAxisAfterResume(),
        *([WandbRunInCheckpoint(wandb_runs[0])] if wandb_runs else []),
    ]


class WandbRunInCheckpoint(L.Callback):
    """Records the W&B run in every checkpoint (``checkpoint["wandb"]["id"]``), so that
    ``ckpt_path=...`` (a resumed or requeued job) logs into the same run, not a new one."""

    def __init__(self, logger: WandbLogger) -> None:
        self.logger = logger

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.logger.version:
            checkpoint["wandb"] = {"id": self.logger.version}


def wandb_run_in(ckpt_path: str) -> str | None:
    """The W&B run id a checkpoint recorded (None: none, or not a readable checkpoint)."""
    try:
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # check_resume names an unreadable checkpoint; nothing to continue here
        return None
    return (saved.get("wandb") or {}).get("id")


class LogLastStep(L.Callback):
    """The last step of a fit always writes its train metrics.

    Lightning writes step metrics every ``trainer.log_every_n_steps`` steps only, so a fit
    whose length is not a multiple of it ends without its final ``train/*`` values, and one
    shorter than it (``trainer.max_steps=5`` with the default 10) logs none at all. For the
    final step, logging is made due (``log_every_n_steps = 1``; the module then computes its
    logging-step diagnostics too), and set back before validation and at the end."""

    def __init__(self) -> None:
        self._every: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        last = final_step(trainer)
        if last is not None and trainer.global_step + 1 == last and self._every is None:
            self._every, trainer.log_every_n_steps = trainer.log_every_n_steps, 1

    def _restore(self, trainer) -> None:
        if self._every is not None:
            trainer.log_every_n_steps, self._every = self._every, None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._restore(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore(trainer)


class StepAxisAfterResume(L.Callback):
    """A resumed fit logs its first step right after the checkpoint's last, not one later.

    A checkpoint written at an epoch's end is resumed by replaying that epoch's end, which
    counts one more logging step (Lightning's ``_batches_that_stepped``) than was trained: each
    resume shifted the CSV/TensorBoard/W&B step axis by one. The first batch after a restore
    puts back the count the checkpoint holds."""

    def __init__(self) -> None:
        self._restored: int | None = None

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
        self._restored = loop.get("_batches_that_stepped")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._restored is not None:
            trainer.fit_loop.epoch_loop._batches_that_stepped = self._restored
            self._restored = None


def final_step(trainer) -> int | None:
    """The outer step a fit ends at (``max_steps``, else the epochs' batches), None if endless."""
    if trainer.max_steps > 0:
        return int(trainer.max_steps)
    total = trainer.estimated_stepping_batches
    return int(total) if math.isfinite(total) else None
