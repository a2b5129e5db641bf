"""Configuration checks that run before anything is built; messages name the fix."""

from __future__ import annotations

from omegaconf import DictConfig

from metalearn.errors import ConfigError


def validate_config(cfg: DictConfig) -> None:
    check_preset_rows(cfg)
    for key in ("ways", "shots", "queries"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]!r} must be a positive integer, e.g. {key}=5")
    if cfg.ways < 2:
        raise ConfigError(f"ways={cfg.ways}: a classification episode needs ways >= 2")
    mbs = cfg.algo.get("meta_batch_size", 1)
    if not isinstance(mbs, int) or mbs < 1:
        raise ConfigError(f"algo.meta_batch_size={mbs!r} must be a positive integer")
    if cfg.trainer.get("inference_mode", True):
        raise ConfigError(
            "trainer.inference_mode must be false: adaptation at validation/test needs "
            "gradients (set trainer.inference_mode=false)"
        )


def check_preset_rows(cfg: DictConfig) -> None:
    """experiment=ff15_quickdraw picks its rates by data.samples_per_class from a table; any
    other value would surface as an interpolation error deep in the config."""
    table = cfg.get("ff15")
    if table is None:
        return
    rows = [k for k in table if k != "selected"]
    value = cfg.data.get("samples_per_class")
    if str(value) not in rows:
        raise ConfigError(
            f"experiment=ff15_quickdraw has settings for data.samples_per_class in "
            f"{{{', '.join(rows)}}}, not {value}: set data.samples_per_class="
            f"{' or '.join(rows)} (the report's two settings)"
        )
