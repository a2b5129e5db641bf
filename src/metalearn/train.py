"""``run(cfg)``: validate → instantiate → fit → test → metrics.json. Returns the metrics.

The same path serves ``train.py``, Hydra sweepers (Optuna maximises the returned
``val/acc_best``) and the tests, which compose the real config.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import os
import re
import sys
import time
import types
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from metalearn import checks
from metalearn.errors import ConfigError, MetalearnError, NonFiniteLossError
from metalearn.interrupt import StopOnInterrupt
from metalearn.utils import finish_loggers, log_through_hydra, print_config_tree

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


def build_loggers(cfg: DictConfig) -> list:
    loggers = [build(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    flat = OmegaConf.to_container(cfg, resolve=True)
    flat.pop("hydra", None)
    for logger in loggers:
        logger.log_hyperparams(flat)
    return loggers


def run(cfg: DictConfig) -> dict:
    """Train and test one configuration; write ``metrics.json`` into ``cfg.output_dir``."""
    start = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics, loggers = {"status": "running"}, []
    trainer, stopper, fitted = None, None, False
    try:
        checks.validate_config(cfg)
        metrics = {**run_info(cfg), **metrics}
        if cfg.get("print_config", True):
            print_config_tree(cfg)
        L.seed_everything(cfg.seed, workers=True)
        datamodule = build(cfg.data)
        datamodule.setup()  # raises ConfigError/DataError before anything is trained
        resolve_data_shape(cfg, datamodule)
        metrics["queries"] = datamodule.queries  # queries=auto resolved
        algo = build(cfg.algo, model=build(cfg.model), engine=build(cfg.engine))
        algo.run_config = run_settings(cfg)
        algo.preprocessing = datamodule.preprocessing().to_dict()
        if not algo.uses_engine:
            log.info("algo=%s has no differentiable inner loop: engine is unused", cfg.algo.name)
            metrics["engine"] = None
        ckpt_path = resume_path(cfg.get("ckpt_path"), out)
        if ckpt_path:
            check_resume(ckpt_path, algo.run_config)
        checkpoint, last = checkpoint_callbacks(out / "checkpoints")
        stopper = StopOnInterrupt(last_path=out / "checkpoints" / "last.ckpt")
        loggers = build_loggers(cfg)
        trainer = build(
            cfg.trainer,
            logger=loggers or False,
            callbacks=[checkpoint, last, stopper, *progress_bar(cfg)],
            plugins=[AtomicCheckpointIO()],
            default_root_dir=str(out),
        )
        try:
            trainer.fit(algo, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:
            if not stopper.terminated:  # DDP: Lightning's handling, nothing written here
                raise
        except NonFiniteLossError as err:
            kept = last.best_model_path or checkpoint.best_model_path or "none yet"
            raise NonFiniteLossError(
                f"{err} Last checkpoint, written before the failure (finite weights; check its"
                f" val/acc before resuming from it): {kept}"
            ) from err
        best, fitted = checkpoint.best_model_path or None, True
        if stopper.requested or stopper.terminated:  # checkpointed where it stopped; no test
            by = "SIGTERM" if stopper.terminated else "Ctrl-C"
            done = outcome(cfg, trainer, algo, best, time.time() - start)
            error = f"interrupted ({by}) at step {trainer.global_step}"
            metrics = {**metrics, **interrupted_outcome(done, error, stopper)}
            return metrics
        if not algo.validated and datamodule.val_episodes and trainer.limit_val_batches:
            log.warning(
                "no validation ran in this fit (it stopped before an epoch's end: "
                "trainer.max_steps=%s, data.batches_per_epoch=%s): validating the final weights",
                cfg.trainer.max_steps,
                datamodule.batches_per_epoch,
            )
            trainer.validate(algo, datamodule=datamodule, verbose=False)
            best = last.best_model_path or None  # last.ckpt: the weights just validated
        if cfg.get("test", True):
            trainer.test(algo, datamodule=datamodule, ckpt_path=best, weights_only=False)
        metrics = {**metrics, **outcome(cfg, trainer, algo, best, time.time() - start)}
    except BaseException as err:
        stopped = interrupted(err, trainer)
        if stopped and fitted:  # while testing: keep the training
            done = outcome(cfg, trainer, algo, best, time.time() - start)
            error = (
                "interrupted while testing; the same command with ckpt_path="
                f"{stopper.resume_from()} tests it"
            )
            metrics = {**metrics, **interrupted_outcome(done, error, stopper)}
        elif stopped:
            by = "SIGTERM" if isinstance(err, SIGTERMException) else "Ctrl-C"
            metrics = {**metrics, "status": "interrupted", "error": f"aborted ({by})"}
        else:
            metrics = {**metrics, "status": "failed", "error": f"{type(err).__name__}: {err}"}
        raise
    finally:
        write_metrics(out, metrics)
        finish_loggers(loggers, failed=metrics.get("status") != "ok")
    return metrics


def resolve_data_shape(cfg: DictConfig, datamodule) -> None:
    """``data.image_size`` / ``data.channels`` left null (a folder's own size, colour if any
    image is) become what the data has, so the model and the saved settings agree with it."""
    for key in ("image_size", "channels"):
        if cfg.data.get(key, "missing") is None:
            cfg.data[key] = getattr(datamodule, key)


def interrupted_outcome(done: dict, error: str, stopper: StopOnInterrupt) -> dict:
    """``outcome`` of a run stopped by a signal: status, what stopped it, where to resume."""
    return {**done, "status": "interrupted", "error": error, "resume_from": stopper.resume_from()}


def interrupted(err: BaseException, trainer) -> bool:
    """Whether ``err`` ends a run that was interrupted: Ctrl-C outside a fit, Lightning's exit
    after its own KeyboardInterrupt handling (e.g. a second Ctrl-C), or its SIGTERM stop."""
    if isinstance(err, KeyboardInterrupt | SIGTERMException):
        return True
    return isinstance(err, SystemExit) and trainer is not None and trainer.interrupted


# Keys that may change when resuming: where to read and write, how long to train, how to log,
# which engine computes the (same) inner loop.
FREE_TO_CHANGE = (
    "ckpt_path",
    "output_dir",
    "print_config",
    "test",
    "trainer.",
    "logger.",
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``<file>.tmp`` beside the checkpoint, then renames it into place: a run killed
    while writing leaves the previous ``last.ckpt`` whole. (Lightning's own save goes through
    a file in the system temp folder, copied over when that is another file system: not
    atomic on a cluster's shared disk.) Remote URLs keep Lightning's way."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that remembers the best score when a run resumes in a new directory.

    ``python train.py ckpt_path=<old run>/checkpoints/last.ckpt`` writes to a new run directory;
    Lightning would then forget the best score, and the first validation after resuming would
    become "best" however bad it is. Here the earlier best (score and file) stays the one to
    beat and, if nothing beats it, the one tested. Lightning never deletes checkpoints outside
    its own directory, so the earlier run's files stay as they are.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        best = state_dict.get("best_model_path")
        if best and Path(best).is_file():
            state_dict = {**state_dict, "dirpath": self.dirpath}
        super().load_state_dict(state_dict)


def progress_bar(cfg: DictConfig) -> list:
    """The Rich bar on a terminal; plain lines every ``trainer.log_every_n_steps * 5`` steps
    when stdout is not one (a SLURM job, nohup, CI), where the bar would print nothing."""
    from metalearn.progress import LineProgress, MetaProgressBar

    if not cfg.trainer.get("enable_progress_bar", True):
        return []
    if sys.stdout.isatty():
        return [MetaProgressBar()]
    return [LineProgress(every=5 * int(cfg.trainer.get("log_every_n_steps", 10)))]


def checkpoint_callbacks(dirpath: Path) -> tuple[ModelCheckpoint, ModelCheckpoint]:
    """The best checkpoint by ``val/acc`` and ``last.ckpt``, rewritten after every epoch."""
    best = BestCheckpoint(
        dirpath=dirpath,
        monitor="val/acc",
        mode="max",
        save_top_k=1,
        filename="best-epoch{epoch:03d}-step{step}",
        auto_insert_metric_name=False,
    )
    last = ModelCheckpoint(
        dirpath=dirpath, filename="last", save_top_k=1, enable_version_counter=False
    )
    return best, last


def run_info(cfg: DictConfig) -> dict:
    return {
        "algo": cfg.algo.name,
        "dataset": cfg.data.name,
        "ways": cfg.ways,
        "shots": cfg.shots,
        "queries": cfg.queries,
        "seed": cfg.seed,
        "engine": cfg.engine._target_.rsplit(".", 1)[-1].removesuffix("Engine").lower(),
        "samples_per_class": cfg.data.get("samples_per_class"),
    }


def outcome(cfg, trainer, algo, best: str | None, wall_s: float) -> dict:
    """What a finished run adds to the metrics it started with (``run_info`` and the rest)."""
    logged = {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if isinstance(v, (int, float, torch.Tensor)) and torch.as_tensor(v).numel() == 1
    }
    return {
        "status": "ok",
        **{k: logged[k] for k in ("test/acc", "test/acc_ci95") if k in logged},
        # sequence learners (MANN): accuracy at the k-th presentation of a class
        **{k: v for k, v in logged.items() if k.startswith("test/acc_instance_")},
        "val/acc_best": algo.val_best,
        "test_episodes": cfg.data.test_episodes,
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "wall_s": round(wall_s, 2),
        "best_checkpoint": best or "",
        "curve": algo.history,
    }


def write_metrics(out: Path, metrics: dict) -> None:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank != 0:  # DDP: all ranks hold the same (gathered) metrics; rank 0 writes
        return
    name = "metrics.json"
    if metrics.get("status") in ("failed", "interrupted") and previous_status(out / name) == "ok":
        name = "metrics.failed.json"  # e.g. a typo when resuming in place: keep the results
        log.warning(
            "this run %s (%s); metrics.json keeps the earlier completed run's results",
            metrics["status"],
            out / name,
        )
    tmp = out / f"{name}.tmp"
    tmp.write_text(json.dumps(metrics, indent=2, default=str))
    tmp.replace(out / name)


def previous_status(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def main(cfg: DictConfig) -> float | None:
    """Entry point of ``train.py``: returns ``val/acc_best`` for Hydra sweepers.

    In a sweep (``-m``) a failing job is recorded in its metrics.json and logged, and the
    sweep goes on with the next job. A single run prints the error's message (no traceback:
    it names the fix; ``HYDRA_FULL_ERROR=1`` shows the traceback) and exits with status 1.
    Ctrl-C (SIGTERM) stops the run after the current step (``metalearn.interrupt``), prints
    the ``ckpt_path=`` to resume from and exits with status 130 (143), also ending a sweep.
    """
    from metalearn.pool import sweep_job

    log_through_hydra()
    try:
        with sweep_job(cfg):  # own GPU under hydra/launcher=gpu_pool; no DDP state left after
            metrics = run(cfg)
    except MetalearnError as err:
        if in_multirun():
            log.error("job failed, sweep continues: %s", err)
            return None
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"\nError ({type(err).__name__}): {err}", file=sys.stderr)
        print("(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr)
        if configured_world_size(cfg) > 1:
            exit_without_finalizers(1)
        raise SystemExit(1) from None
    if metrics["status"] == "interrupted":  # Ctrl-C or SIGTERM: stop a sweep too
        resume = metrics["resume_from"]
        print(
            f"\nInterrupted at step {metrics['steps']}. "
            + (
                f"Resume: add ckpt_path={resume} to the same command"
                if resume
                else "No checkpoint was written yet."
            ),
            file=sys.stderr,
        )
        raise SystemExit(143 if "SIGTERM" in metrics["error"] else 130)
    return metrics.get("val/acc_best")


def configured_world_size(cfg: DictConfig) -> int:
    """Processes of a DDP run as configured (trainer=ddp/ddp_cpu: devices x num_nodes), else 1."""
    trainer = cfg.trainer
    devices = trainer.get("devices", 1)
    if trainer.get("strategy") is None or not isinstance(devices, int):
        return 1
    return devices * int(trainer.get("num_nodes", 1))


def exit_without_finalizers(status: int) -> None:
    """Leave a failed DDP rank without interpreter shutdown: after a failed step, rank 0's
    shutdown once hung for minutes in native code, its peer already gone (seen on a loaded
    machine). By now metrics.json, the loggers and the checkpoints are written."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status)


class CallableModule(types.ModuleType):
    """``metalearn.train(cfg)``: this module, called, is ``run(cfg)`` (trains and tests ``cfg``
    from ``metalearn.compose`` and returns the metrics written to ``metrics.json``). A package
    attribute ``train`` would be replaced by this submodule as soon as it is imported."""

    def __call__(self, cfg: DictConfig) -> dict:
        return run(cfg)


sys.modules[__name__].__class__ = CallableModule
