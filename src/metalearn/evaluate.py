"""Score a checkpoint on fixed meta-test episodes without training: ``metalearn.evaluate``.

The episodes are those a training run tests on (seeded by ``data.eval_seed``), of the
checkpoint's own dataset and episode shape unless overridden: ``data=quickdraw`` measures
cross-domain transfer, ``ways=20`` another episode shape. Writes ``metrics.json`` marked
``kind: evaluation`` (with the checkpoint it scored and what it was trained on), so
``metalearn.report`` tabulates evaluations next to training runs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from metalearn.cli import default_output, main_of, parse
from metalearn.errors import ConfigError
from metalearn.tasks import KINDS

log = logging.getLogger(__name__)

USAGE = """\
metalearn.evaluate: test accuracy +- 95 % CI of a checkpoint on fixed meta-test episodes.

Usage:  python -m metalearn.evaluate ckpt=<file> [key=value ...]

  ckpt=         a checkpoint a training run wrote (best-*.ckpt, last.ckpt)
  output_dir=   where metrics.json goes (default outputs/evaluate/runs/<date>/<time>)
  head_init=    auto (default), prototypes or zeros: how a MAML/Reptile model's N-way head
                starts on episodes with another number of classes (docs/adapt.md)
  any training setting, without '+': the episodes default to the checkpoint's own dataset and
  shape; e.g. data=quickdraw, ways=20, shots=5, queries=15, data.test_episodes=1000,
  data.eval_seed=1, engine=vmap, trainer=gpu; logger=wandb (or csv, ...) logs the evaluation
  (no logger by default; W&B: a run of job_type evaluate)

Examples:
  python -m metalearn.evaluate ckpt=outputs/.../checkpoints/best-epoch005-step600.ckpt
  python -m metalearn.evaluate ckpt=... data=quickdraw        (trained on Omniglot)
  python -m metalearn.evaluate ckpt=... ways=20 head_init=zeros
"""

# Settings taken from the checkpoint unless given: the episode shape, and the data settings
# that define the images (paths, workers and batch sizes are this machine's).
EPISODE_KEYS = ("ways", "shots", "queries")
LOCAL_DATA_KEYS = ("root", "download", "num_workers", "meta_batch_size", "seed")


def overridden(overrides: list[str]) -> set[str]:
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


def model_option(settings: dict, conf_dir: Path) -> list[str]:
    """``model=<name>`` for the checkpoint's network (its group option whose ``_target_`` it
    has), so that the composed config resolves (the MLP takes no image channels)."""
    target = settings.get("model._target_")
    for path in sorted(Path(conf_dir, "model").glob("*.yaml")):
        if target and f"_target_: {target}\n" in path.read_text():
            return [f"model={path.stem}"]
    return []


def compose_for(settings: dict, overrides: list[str], output_dir: Path | None = None):
    """The training config for evaluating a checkpoint trained with ``settings`` (flat): the
    checkpoint's dataset and episode shape, then the user's ``overrides``; ``task_name``
    evaluate, so that its output goes to ``<paths.log_dir>/evaluate/runs/<date>/<time>``
    unless ``output_dir`` is given."""
    from hydra import compose, initialize_config_dir

    from metalearn.paths import conf_dir

    given = overridden(overrides)
    same_data = "data" not in given
    base = [] if not same_data else [f"data={settings.get('data.name', 'omniglot')}"]
    base += [] if "task_name" in given else ["task_name=evaluate"]
    base += model_option(settings, conf_dir())
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        try:
            # no logger unless asked for (logger=wandb: a W&B run of job_type evaluate)
            fixed = [] if "logger" in given else ["logger=none"]
            fixed += [f"output_dir={output_dir}"] if output_dir else []
            cfg = compose("train", overrides=[*base, *overrides, *fixed])
        except Exception as err:  # Hydra's own message names the bad override
            raise ConfigError(f"{err} (see --help)") from err
    from omegaconf import OmegaConf, open_dict

    if not output_dir:
        cfg.output_dir = str(default_output(cfg.task_name, cfg.paths.log_dir))
    wandb = (cfg.get("logger") or {}).get("wandb")
    if wandb is not None and "logger.wandb.job_type" not in given:
        wandb.job_type = "evaluate"  # what the run does (training runs: train)
    with open_dict(cfg):
        for key in EPISODE_KEYS:
            if key not in given and key in settings:
                cfg[key] = settings[key]
        for key, value in settings.items():
            name = key.removeprefix("data.")
            if not key.startswith("data.") or key in given or name in LOCAL_DATA_KEYS:
                continue
            if name in EPISODE_KEYS or name not in cfg.data:
                continue
            if same_data or name in ("image_size", "channels"):  # another dataset: the model's
                OmegaConf.update(cfg, key, value)
    return cfg


def model_normalisation(cfg, preprocessing: dict | None, overrides: list[str]) -> None:
    """Normalise the episodes with the statistics the model was trained with (not those of
    another dataset's meta-train split), unless ``data.normalize`` is given."""
    from omegaconf import OmegaConf

    if preprocessing is None:  # points (a regression task), not images
        return
    mean, std = preprocessing.get("mean"), preprocessing.get("std")
    if "data.normalize" not in overridden(overrides) and "normalize" in cfg.data:
        value = [list(mean), list(std)] if mean is not None and std is not None else None
        OmegaConf.update(cfg, "data.normalize", value)


def evaluate(ckpt, overrides=(), output_dir=None, head_init="auto") -> dict:
    """Test accuracy (regression: MSE) of ``ckpt`` on fixed meta-test episodes; writes and
    returns metrics."""
    import lightning as L
    from omegaconf import OmegaConf

    from metalearn.algorithms.heads import check_head_init
    from metalearn.instantiate import build
    from metalearn.learner import load
    from metalearn.loggers import build_loggers
    from metalearn.outcome import by_episode, run_info, write_metrics
    from metalearn.utils import finish_loggers

    start = time.time()
    check_head_init(head_init)
    learner = load(ckpt)
    settings = learner.run_config
    cfg = compose_for(settings, list(overrides), output_dir)
    out = Path(cfg.output_dir)
    model_normalisation(cfg, learner.preprocessing, list(overrides))
    datamodule = build(cfg.data)
    datamodule.setup()
    trained_size = int(settings.get("model.image_size") or settings.get("data.image_size", 0))
    if trained_size and datamodule.image_size != trained_size:
        raise ConfigError(
            f"the checkpoint's model takes {trained_size}x{trained_size} images, the episodes "
            f"are {datamodule.image_size}x{datamodule.image_size}: drop data.image_size"
        )
    own_engine = "engine" in overridden(list(overrides))
    if own_engine and learner.uses_engine:
        learner.engine = build(cfg.engine)
        learner.engine.check(learner.model, learner.eval_loop())
    learner.head_init = head_init
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    loggers = build_loggers(cfg, build=build)
    trainer = build(
        cfg.trainer,
        logger=loggers or False,
        enable_checkpointing=False,
        default_root_dir=str(out),
        enable_model_summary=False,
    )
    try:
        trainer.test(learner, datamodule=datamodule, verbose=False)
    finally:
        finish_loggers(loggers)
    logged = trainer.callback_metrics
    per_source = (f"test/{learner.task.metric}/", f"test/{learner.task.metric}_ci95/")
    metrics = {
        **run_info(cfg),
        "kind": "evaluation",
        "status": "ok",
        "algo": settings.get("algo.name"),
        "queries": datamodule.queries,
        "metric": learner.task.metric,
        f"test/{learner.task.metric}": float(logged[f"test/{learner.task.metric}"]),
        f"test/{learner.task.metric}_ci95": float(logged[f"test/{learner.task.metric}_ci95"]),
        **by_episode(learner),
        # several sources (data=mix): test/acc/<source> and test/acc_ci95/<source>
        **{k: float(v) for k, v in logged.items() if k.startswith(tuple(per_source))},
        # sequence learners (MANN): accuracy at the k-th presentation of a class
        **{k: float(v) for k, v in logged.items() if k.startswith("test/acc_instance_")},
        "test_episodes": datamodule.test_episodes,
        "head_init": head_init,
        "checkpoint": str(Path(ckpt).resolve()),
        "trained": {
            "dataset": settings.get("data.name"),
            "ways": settings.get("ways"),
            "shots": settings.get("shots"),
            "steps": learner.trained_steps,
        },
        "overrides": list(overrides),
        "wall_s": round(time.time() - start, 2),
    }
    engine = cfg.engine._target_ if own_engine else settings.get("engine._target_", "")
    metrics["engine"] = (
        engine.rsplit(".", 1)[-1].removesuffix("Engine").lower() if learner.uses_engine else None
    )
    write_metrics(out, metrics)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    return {**metrics, "output_dir": str(out)}


def run(argv: list[str]) -> int:
    opts, overrides = parse(argv, {"ckpt": None, "output_dir": "", "head_init": "auto"}, USAGE)
    metrics = evaluate(opts["ckpt"], overrides, opts["output_dir"] or None, opts["head_init"])
    m = metrics["metric"]
    task = next(kind for kind in KINDS.values() if kind.metric == m)
    print(
        f"{metrics['algo']} on {metrics['dataset']} {metrics['ways']}-way {metrics['shots']}-shot"
        f" ({metrics['test_episodes']} episodes): test/{m} {task.label(metrics[f'test/{m}'])} "
        f"± {task.label(metrics[f'test/{m}_ci95'])}"
    )
    print(f"wrote {Path(metrics['output_dir']) / 'metrics.json'}")
    return 0


main = main_of(run)

if __name__ == "__main__":
    main()
