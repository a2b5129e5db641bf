"""Logger factories: W&B that never hangs without network or API key."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger


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


def wandb_logger(offline: bool | str = "auto", group: str | None = None, **kwargs) -> WandbLogger:
    """A ``WandbLogger`` that runs offline when no credentials or ``WANDB_MODE=offline``."""
    offline = wandb_offline(offline)
    if offline:
        os.environ.setdefault("WANDB_MODE", "offline")
    Path(kwargs.get("save_dir", ".")).mkdir(parents=True, exist_ok=True)
    return WandbLogger(offline=offline, group=group or sweep_group(), reinit="finish_previous",
                       **kwargs)
