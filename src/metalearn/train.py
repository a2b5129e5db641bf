"""``run(cfg)``: train and test one configuration, top to bottom; returns the metrics.

instantiate data, algorithm (network, engine), callbacks (``conf/callbacks``), loggers,
trainer; fit; validate the final weights if no epoch ended; test the best checkpoint; the
metrics (``metrics.json``, written however the run ends: ``metalearn.outcome``). The same
path serves ``train.py``, Hydra sweepers (Optuna maximises the returned ``val/acc_best``), the
Python API (``metalearn.train(cfg)``) and the tests, which compose the real config.
"""

from __future__ import annotations

import logging
import os
import sys
import types
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from metalearn import checks
from metalearn.cli import full_error, print_error
from metalearn.errors import MetalearnError, NonFiniteLossError
from metalearn.instantiate import (
    build,
    instantiate_algorithm,
    instantiate_callbacks,
    instantiate_datamodule,
    instantiate_trainer,
)
from metalearn.interrupt import StopOnInterrupt, sigint_kept
from metalearn.loggers import build_loggers
from metalearn.outcome import RunRecord, run_info
from metalearn.resume import checked_resume_path, run_settings
from metalearn.utils import log_through_hydra, print_config_tree

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Train and test one configuration; write ``metrics.json`` into ``cfg.output_dir``."""
    with sigint_kept(), RunRecord(cfg) as record:
        checks.validate_config(cfg)
        record.started(**run_info(cfg))
        if cfg.get("print_config", True):
            print_config_tree(cfg)
        L.seed_everything(cfg.seed, workers=True)

        datamodule = instantiate_datamodule(cfg)
        record.update(queries=datamodule.queries)  # queries=auto resolved
        settings = run_settings(cfg)
        algo = record.algo = instantiate_algorithm(cfg, datamodule, settings)
        if not algo.uses_engine:
            record.update(engine=None)
        ckpt_path = checked_resume_path(cfg, settings)
        if ckpt_path:  # the report leaves out the unfinished run this one continues
            record.update(resumed_from=str(Path(ckpt_path).resolve()))
        validates = datamodule.val_episodes > 0
        callbacks = instantiate_callbacks(cfg, algo.task, validates)
        record.stopper = interrupt_handler(cfg, callbacks)
        loggers = record.loggers = build_loggers(cfg, ckpt_path, build=build)
        trainer = record.trainer = instantiate_trainer(
            cfg, callbacks, loggers, record.stopper.last_path, validates
        )

        fit(trainer, algo, datamodule, ckpt_path, record.stopper, callbacks)
        record.best, record.fitted = best_checkpoint(callbacks), True
        if record.stopper.requested or record.stopper.terminated:  # saved where it stopped
            by = "SIGTERM" if record.stopper.terminated else "Ctrl-C"
            return record.stopped(f"interrupted ({by}) at step {trainer.global_step}")
        # 0 when nothing validates; a finished run resumed trains nothing: its best stands
        if not algo.validated and trainer.limit_val_batches and (algo.trained or not algo.history):
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
            f" val/{algo.task.metric} before resuming from it): {kept}"
        ) from err


def validate_final_weights(cfg, trainer, algo, datamodule) -> None:
    log.warning(
        "no validation ran in this fit (it stopped before an epoch's end: "
        "trainer.max_steps=%s, data.batches_per_epoch=%s): validating the final weights",
        cfg.trainer.max_steps,
        datamodule.batches_per_epoch,
    )
    trainer.validate(algo, datamodule=datamodule, verbose=False)


def interrupt_handler(cfg: DictConfig, callbacks: dict) -> StopOnInterrupt:
    """The run's ``StopOnInterrupt`` callback; without one (``~callbacks.stop_on_interrupt``),
    an unregistered stand-in that never stops but still finds ``last.ckpt`` to resume from."""
    for callback in callbacks.values():
        if isinstance(callback, StopOnInterrupt):
            return callback
    return StopOnInterrupt(last_path=f"{cfg.output_dir}/checkpoints/last.ckpt")


def best_checkpoint(callbacks: dict) -> str | None:
    """The file of ``callbacks.model_checkpoint`` (the best by val/acc): the one tested."""
    best = callbacks.get("model_checkpoint")
    return getattr(best, "best_model_path", None) or None


def last_checkpoint(callbacks: dict) -> str | None:
    last = callbacks.get("last_checkpoint")
    return getattr(last, "best_model_path", None) or None


def in_multirun() -> bool:
    return sweep_dir() is not None


def sweep_dir() -> str | None:
    """The sweep's directory when this run is a job of one (``-m``), else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except ValueError:
        return None
    return str(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None


def resume_advice(resume: str) -> str:
    """How to continue an interrupted run. A sweep resumes as a whole, each job from its own
    last.ckpt: one ``ckpt_path=`` added to the sweep's command would start every job from
    this job's checkpoint, over the finished jobs' results."""
    sweep = sweep_dir()
    if sweep is not None:
        return (
            f"Resume the sweep: add hydra.sweep.dir={sweep} ckpt_path=auto to the same command"
            " (each job continues from its own last.ckpt; finished jobs are only tested again)"
        )
    if resume:
        return f"Resume: add ckpt_path={resume} to the same command"
    return "No checkpoint was written yet."


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
        if full_error():
            raise
        print_error(err)
        if configured_world_size(cfg) > 1:
            exit_without_finalizers(1)
        raise SystemExit(1) from None
    if metrics["status"] == "interrupted":  # Ctrl-C or SIGTERM: stop a sweep too
        advice = resume_advice(metrics["resume_from"])
        print(f"\nInterrupted at step {metrics['steps']}. {advice}", file=sys.stderr)
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
