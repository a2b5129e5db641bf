"""Logger factories: W&B that never hangs without network or API key, one run per sweep job.

Each job of a sweep is its own W&B run: ``group`` = the sweep directory (override with
``logger.wandb.group=NAME``), ``job_type`` = the algorithm, tags = algo, dataset, N-way, K-shot.
The config is logged flat (``"algo.inner_lr": 0.4``, the keys of the command line), plus the
job's number, overrides and directory, so W&B's parallel coordinates and group-by work on any
key. The summary holds the last value of every logged metric: ``test/acc``,
``test/acc_ci95``, ``val/acc_best`` (regression tasks: ``test/mse``, ``test/mse_ci95``,
``val/mse_best``). Offline, the run lands in ``<job dir>/wandb/offline-run-*``
(upload later with ``wandb sync <job dir>/wandb/offline-run-*``).
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only


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


def flatten(params: dict, prefix: str = "") -> dict:
    """``{"algo": {"inner_lr": 0.4}}`` -> ``{"algo.inner_lr": 0.4}`` (lists stay values)."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def job_info() -> dict:
    """The Hydra job behind this run: number, overrides, directory (empty outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return {}
    return {
        "job.num": hc.job.get("num"),
        "job.overrides": " ".join(hc.overrides.task),
        "job.dir": hc.runtime.output_dir,
    }


class SweepWandbLogger(WandbLogger):
    """``WandbLogger`` that logs the (nested) run config flat, plus the Hydra job's identity."""

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        from lightning.fabric.utilities.logger import (
            _convert_json_serializable,
            _convert_params,
            _sanitize_callable_params,
        )

        params = flatten(_convert_params(params))
        params = _convert_json_serializable(_sanitize_callable_params(params))
        self.experiment.config.update({**params, **job_info()}, allow_val_change=True)


def wandb_logger(offline: bool | str = "auto", group: str | None = None, **kwargs) -> WandbLogger:
    """A ``WandbLogger`` that runs offline when no credentials or ``WANDB_MODE=offline``."""
    offline = wandb_offline(offline)
    if offline:
        os.environ.setdefault("WANDB_MODE", "offline")
    Path(kwargs.get("save_dir", ".")).mkdir(parents=True, exist_ok=True)
    import wandb

    if wandb.run is not None:  # left open by an earlier job in this (joblib worker) process:
        wandb.finish()  # WandbLogger would log this job into it
    return SweepWandbLogger(
        offline=offline, group=group or sweep_group(), reinit="finish_previous", **kwargs
    )
