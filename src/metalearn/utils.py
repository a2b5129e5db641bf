"""Small helpers for the command line: config tree, logger shutdown."""

from __future__ import annotations

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
        if isinstance(logger, WandbLogger):  # incl. metalearn.loggers.SweepWandbLogger
            import wandb

            logger.finalize("failed" if failed else "success")
            wandb.finish(exit_code=1 if failed else 0)
