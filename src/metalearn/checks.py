"""Configuration checks that run before anything is built; messages name the fix."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from metalearn.errors import ConfigError
from metalearn.tasks import TaskKind, task_kind


def validate_config(cfg: DictConfig) -> None:
    check_preset_rows(cfg)
    for key in ("ways", "shots", "queries"):
        if key == "queries" and cfg[key] == "auto":
            continue
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]!r} must be a positive integer, e.g. {key}=5")
    task = task_of(cfg)
    if task.episode_labels and cfg.ways < 2:
        raise ConfigError(f"ways={cfg.ways}: a classification episode needs ways >= 2")
    check_task(cfg, task)
    mbs = cfg.algo.get("meta_batch_size", 1)
    if not isinstance(mbs, int) or mbs < 1:
        raise ConfigError(f"algo.meta_batch_size={mbs!r} must be a positive integer")
    check_train_ways(cfg)
    check_episode_heads(cfg)
    if cfg.trainer.get("inference_mode", True):
        raise ConfigError(
            "trainer.inference_mode must be false: adaptation at validation/test needs "
            "gradients (set trainer.inference_mode=false)"
        )
    check_sweep_objective(cfg, sweeper_target())


def sweeper_target() -> str | None:
    """The Hydra sweeper's _target_ of this job (None outside a Hydra run)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().sweeper.get("_target_")
    except ValueError:
        return None


def check_sweep_objective(cfg: DictConfig, sweeper: str | None) -> None:
    """An optimising sweeper (Optuna) ranks trials by the validation metric: a trial that
    validates nothing would return no value and fail every time."""
    if sweeper and "optuna" in sweeper.lower() and cfg.data.get("val_episodes", 1) == 0:
        raise ConfigError(
            "hparams_search ranks trials by their best validation score, but data.val_episodes=0 "
            "validates nothing: set data.val_episodes (e.g. 200)"
        )


# Presets that pick settings from a table by a key: (table in the config, the key, its name).
PRESET_TABLES = {
    "experiment=ff15_quickdraw": ("ff15", "data.samples_per_class"),
    "experiment=maml_omniglot": ("maml_omniglot", "ways"),
}


def check_preset_rows(cfg: DictConfig) -> None:
    """Presets such as experiment=ff15_quickdraw pick their settings from a table by a key;
    any other value would surface as an interpolation error deep in the config."""
    for preset, (table_key, key) in PRESET_TABLES.items():
        table = cfg.get(table_key)
        if table is None:
            continue
        rows = [k for k in table if k != "selected"]
        value = OmegaConf.select(cfg, key)
        if str(value) not in rows:
            raise ConfigError(
                f"{preset} has settings for {key} in {{{', '.join(rows)}}}, not {value}: set "
                f"{key}={' or '.join(rows)}"
            )


def check_train_ways(cfg: DictConfig) -> None:
    """Training episodes wider than the test's suit an algorithm without a classification
    head (ProtoNet, Matching, Relation, Siamese); the others' head has ``ways`` outputs, so
    other labels would crash it."""
    train_ways = cfg.data.get("train_ways")
    if train_ways is None or train_ways == cfg.ways:
        return
    from hydra.utils import get_object

    if not getattr(get_object(cfg.algo._target_), "any_train_ways", False):
        raise ConfigError(
            f"data.train_ways={train_ways} differs from ways={cfg.ways}, but algo={cfg.algo.name}"
            f" classifies with a {cfg.ways}-way head: set data.train_ways=null (or use an algo"
            " without a head: protonet, matching, relation, siamese)"
        )


def check_episode_heads(cfg: DictConfig) -> None:
    """Episodes whose number of classes varies need a head built per episode: an algorithm
    with a head and ``algo.head_init=auto`` gets Proto-MAML's prototype heads; ``trained``
    (one fixed-width head) cannot serve them."""
    mode = cfg.data.get("episodes", "fixed")
    init = cfg.algo.get("head_init")
    if mode == "fixed":
        return
    from hydra.utils import get_object

    if not getattr(get_object(cfg.algo._target_), "varying_episodes", True):
        raise ConfigError(
            f"data.episodes={mode} varies the number of classes and images per episode, but "
            f"algo={cfg.algo.name} reads fixed-shape episodes only: use data.episodes=fixed"
        )
    if init is None:
        return
    if init == "trained":
        raise ConfigError(
            f"data.episodes={mode} varies the number of classes, but algo.head_init=trained "
            "keeps one fixed-width head: use algo.head_init=prototypes or zeros (or auto)"
        )
    if init == "auto":
        cfg.algo.head_init = "prototypes"


def task_of(cfg: DictConfig) -> TaskKind:
    """The kind of task the data gives (its data module's ``task``; classification if none)."""
    from hydra.utils import get_object

    try:
        target = get_object(cfg.data._target_)
    except Exception:  # an unimportable target fails later, with the builder's own message
        return task_kind("classification")
    return task_kind(getattr(target, "task", "classification"))


def check_task(cfg: DictConfig, task: TaskKind) -> None:
    """Regression data (data=sinusoid) needs ways=1, an algorithm that learns regression and a
    network that takes points; one message naming the fix for each."""
    if task.episode_labels:
        return
    from hydra.utils import get_object

    data = cfg.data.name
    if cfg.ways != 1:
        raise ConfigError(
            f"data={data} is a regression task (one function per task): set ways=1 "
            f"(experiment=maml_sinusoid sets it), not ways={cfg.ways}"
        )
    kinds = getattr(get_object(cfg.algo._target_), "task_kinds", ("classification",))
    if task.name not in kinds:
        raise ConfigError(
            f"algo={cfg.algo.name} learns {' and '.join(kinds)} tasks only, and data={data} is "
            f"{task.name}: use a gradient-based algorithm (algo=maml, fomaml, metasgd, "
            "alpha_maml, maml_pp, anil, reptile) or algo=finetune"
        )
    if cfg.model.get("in_features") is None:
        name = cfg.model._target_.rsplit(".", 1)[-1]
        raise ConfigError(
            f"data={data} gives points x, and the model ({name}) takes images: use model=mlp"
        )
