"""``run(cfg)``: train and test one configuration, top to bottom; returns the metrics.

instantiate data, algorithm (network, engine), callbacks (``conf/callbacks``), loggers,
trainer; fit; validate the final weights if no epoch ended; test the best checkpoint; the
metrics (``metrics.json``, written however the run ends: ``metalearn.outcome``). The same
path serves ``train.py``, Hydra sweepers (Optuna maximises the returned ``val/acc_best``), the
Python API (``metalearn.train(cfg)``) and the tests, which compose the real config.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import types

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from metalearn import checks
from metalearn.errors import MetalearnError, NonFiniteLossError
from metalearn.instantiate import (
    build,
    instantiate_algorithm,
    instantiate_callbacks,
    instantiate_datamodule,
    instantiate_trainer,
)
from metalearn.interrupt import StopOnInterrupt
<<<<<<< HEAD
from metalearn.loggers import build_loggers
from metalearn.outcome import RunRecord, run_info
from metalearn.resume import checked_resume_path, run_settings
from metalearn.utils import log_through_hydra, print_config_tree
=======
from metalearn.tasks import CLASSIFICATION, TaskKind
from metalearn.utils import finish_loggers, log_through_hydra, print_config_tree
>>>>>>> sinusoid

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Train and test one configuration; write ``metrics.json`` into ``cfg.output_dir``."""
    with RunRecord(cfg) as record:
        checks.validate_config(cfg)
        record.started(**run_info(cfg))
        if cfg.get("print_config", True):
            print_config_tree(cfg)
        L.seed_everything(cfg.seed, workers=True)
<<<<<<< HEAD

        datamodule = instantiate_datamodule(cfg)
        record.update(queries=datamodule.queries)  # queries=auto resolved
        settings = run_settings(cfg)
        algo = record.algo = instantiate_algorithm(cfg, datamodule, settings)
        if not algo.uses_engine:
            record.update(engine=None)
        ckpt_path = checked_resume_path(cfg, settings)
        callbacks = instantiate_callbacks(cfg)
        record.stopper = interrupt_handler(cfg, callbacks)
        loggers = record.loggers = build_loggers(cfg, ckpt_path, build=build)
        trainer = record.trainer = instantiate_trainer(
            cfg, callbacks, loggers, record.stopper.last_path
        )

        fit(trainer, algo, datamodule, ckpt_path, record.stopper, callbacks)
        record.best, record.fitted = best_checkpoint(callbacks), True
        if record.stopper.requested or record.stopper.terminated:  # saved where it stopped
            by = "SIGTERM" if record.stopper.terminated else "Ctrl-C"
            return record.stopped(f"interrupted ({by}) at step {trainer.global_step}")
=======
        datamodule = build(cfg.data)
        datamodule.setup()  # raises ConfigError/DataError before anything is trained
        resolve_data_shape(cfg, datamodule)
        metrics["queries"] = datamodule.queries  # queries=auto resolved
        algo = build(cfg.algo, model=build(cfg.model), engine=build(cfg.engine))
        algo.task = getattr(datamodule, "task", "classification")  # its loss and metric
        algo.run_config = run_settings(cfg)
        preprocessing = datamodule.preprocessing()  # None: points, not images
        algo.preprocessing = preprocessing and preprocessing.to_dict()
        if not algo.uses_engine:
            log.info("algo=%s has no differentiable inner loop: engine is unused", cfg.algo.name)
            metrics["engine"] = None
        ckpt_path = resume_path(cfg.get("ckpt_path"), out)
        if ckpt_path:
            check_resume(ckpt_path, algo.run_config)
        checkpoint, last = checkpoint_callbacks(out / "checkpoints", algo.task)
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
                f" val/{algo.task.metric} before resuming from it): {kept}"
            ) from err
        best, fitted = checkpoint.best_model_path or None, True
        if stopper.requested or stopper.terminated:  # checkpointed where it stopped; no test
            by = "SIGTERM" if stopper.terminated else "Ctrl-C"
            done = outcome(cfg, trainer, algo, best, time.time() - start)
            error = f"interrupted ({by}) at step {trainer.global_step}"
            metrics = {**metrics, **interrupted_outcome(done, error, stopper)}
            return metrics
>>>>>>> sinusoid
        if not algo.validated and datamodule.val_episodes and trainer.limit_val_batches:
            validate_final_weights(cfg, trainer, algo, datamodule)
            record.best = last_checkpoint(callbacks) or record.best  # the weights just validated
        if cfg.get("test", True):
            trainer.test(algo, datamodule=datamodule, ckpt_path=record.best, weights_only=False)
        return record.finished()


def fit(trainer, algo, datamodule, ckpt_path, stopper, callbacks) -> None:
    """``trainer.fit``; a SIGTERM stop (last.ckpt written) returns, a NaN loss names the last
    finite checkpoint."""
    try:
        trainer.fit(algo, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        if not stopper.terminated:  # DDP: Lightning's handling, nothing written here
            raise
    except NonFiniteLossError as err:
        kept = last_checkpoint(callbacks) or best_checkpoint(callbacks) or "none yet"
        raise NonFiniteLossError(
            f"{err} Last checkpoint, written before the failure (finite weights; check its"
            f" val/acc before resuming from it): {kept}"
        ) from err


<<<<<<< HEAD
def validate_final_weights(cfg, trainer, algo, datamodule) -> None:
    log.warning(
        "no validation ran in this fit (it stopped before an epoch's end: "
        "trainer.max_steps=%s, data.batches_per_epoch=%s): validating the final weights",
        cfg.trainer.max_steps,
        datamodule.batches_per_epoch,
=======
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


def checkpoint_callbacks(
    dirpath: Path, task: TaskKind = CLASSIFICATION
) -> tuple[ModelCheckpoint, ModelCheckpoint]:
    """The best checkpoint by the task's validation metric (the highest ``val/acc``, the
    lowest ``val/mse``) and ``last.ckpt``, rewritten after every epoch."""
    best = BestCheckpoint(
        dirpath=dirpath,
        monitor=f"val/{task.metric}",
        mode=task.mode,
        save_top_k=1,
        filename="best-epoch{epoch:03d}-step{step}",
        auto_insert_metric_name=False,
>>>>>>> sinusoid
    )
    trainer.validate(algo, datamodule=datamodule, verbose=False)


def interrupt_handler(cfg: DictConfig, callbacks: dict) -> StopOnInterrupt:
    """The run's ``StopOnInterrupt`` callback; without one (``~callbacks.stop_on_interrupt``),
    an unregistered stand-in that never stops but still finds ``last.ckpt`` to resume from."""
    for callback in callbacks.values():
        if isinstance(callback, StopOnInterrupt):
            return callback
    return StopOnInterrupt(last_path=f"{cfg.output_dir}/checkpoints/last.ckpt")


<<<<<<< HEAD
def best_checkpoint(callbacks: dict) -> str | None:
    """The file of ``callbacks.model_checkpoint`` (the best by val/acc): the one tested."""
    best = callbacks.get("model_checkpoint")
    return getattr(best, "best_model_path", None) or None
=======
def outcome(cfg, trainer, algo, best: str | None, wall_s: float) -> dict:
    """What a finished run adds to the metrics it started with (``run_info`` and the rest)."""
    logged = {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if isinstance(v, (int, float, torch.Tensor)) and torch.as_tensor(v).numel() == 1
    }
    m = algo.task.metric
    return {
        "status": "ok",
        "metric": m,  # the task's: acc (higher is better) or mse (lower is better)
        **{k: logged[k] for k in (f"test/{m}", f"test/{m}_ci95") if k in logged},
        f"val/{m}_best": algo.val_best if math.isfinite(algo.val_best) else None,
        "test_episodes": cfg.data.test_episodes,
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "wall_s": round(wall_s, 2),
        "best_checkpoint": best or "",
        "curve": algo.history,
    }
>>>>>>> sinusoid


def last_checkpoint(callbacks: dict) -> str | None:
    last = callbacks.get("last_checkpoint")
    return getattr(last, "best_model_path", None) or None


def in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def main(cfg: DictConfig) -> float | None:
    """Entry point of ``train.py``: returns ``val/acc_best`` (``val/mse_best``) for Hydra
    sweepers.

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
    return metrics.get(f"val/{metrics.get('metric', 'acc')}_best")


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
