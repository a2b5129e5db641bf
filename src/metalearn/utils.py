"""Small helpers for the command line: config tree, logger shutdown."""

from __future__ import annotations

import logging
import warnings

from omegaconf import DictConfig, OmegaConf

ORDER = ("data", "algo", "model", "engine", "trainer", "logger")


def print_config_tree(cfg: DictConfig) -> None:
    """Print the composed config as a rich tree, one branch per config group."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("config", style="bold")
    keys = [k for k in ORDER if k in cfg] + [k for k in cfg if k not in ORDER and k != "hydra"]
    for key in keys:
        value = cfg[key]
        text = (
            OmegaConf.to_yaml(value, resolve=True)
            if isinstance(value, DictConfig)
            else str(OmegaConf.select(cfg, key))
        )
        tree.add(str(key), style="cyan").add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)


def finish_loggers(loggers, failed: bool = False) -> None:
    """Close W&B runs so the next job of a sweep starts a fresh run; a failed job's run is
    marked failed (exit code 1), so W&B's run table shows it."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers or []:
        if isinstance(logger, WandbLogger):  # incl. metalearn.loggers.RunWandbLogger
            import wandb

            logger.finalize("failed" if failed else "success")
            wandb.finish(exit_code=1 if failed else 0)


def log_through_hydra() -> None:
    """Lightning adds its own console handlers when it is imported before Hydra configures
    logging; under Hydra its lines then print twice. Drop those handlers, so Lightning's lines
    go through Hydra's (console and the job's log file) once."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.addFilter(lambda record: not str(record.msg).startswith("💡 Tip"))  # an advert
    # lightning 2.6 with torch 2.13: a deprecation inside Lightning itself, on every run
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
