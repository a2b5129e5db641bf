"""What a run leaves behind: ``metrics.json``, written however the run ends (ok, failed,
interrupted), and its loggers closed."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from metalearn.data.mix import mix_info
from metalearn.utils import finish_loggers

log = logging.getLogger(__name__)


def run_info(cfg: DictConfig) -> dict:
    """What the run is (the report's rows and columns), known before anything is built."""
    info = {
        "algo": cfg.algo.name,
        "dataset": cfg.data.name,
        "ways": cfg.ways,
        "shots": cfg.shots,
        "queries": cfg.queries,
        "episodes": cfg.data.get("episodes", "fixed"),
        "seed": cfg.seed,
        "engine": cfg.engine._target_.rsplit(".", 1)[-1].removesuffix("Engine").lower(),
        "samples_per_class": cfg.data.get("samples_per_class"),
    }
    info.update(mix_info(cfg.data))  # data=mix: its training and test sources
    if cfg.get("tags"):
        info["tags"] = list(cfg.tags)
    if debug_mode(cfg):
        info["debug"] = debug_mode(cfg)
    return info


def debug_mode(cfg: DictConfig) -> str | None:
    """``debug=<option>``, or a Lightning debugging switch set by hand (``fast_dev_run``,
    ``overfit_batches``): its accuracy is no result, and ``metalearn.report`` leaves it out."""
    if cfg.get("debug"):
        return str(cfg.debug)
    for switch in ("fast_dev_run", "overfit_batches"):
        if cfg.trainer.get(switch):
            return switch
    return None


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
        # several sources (data=mix): test/acc/<source> and test/acc_ci95/<source>
        **{k: v for k, v in logged.items() if k.startswith((f"test/{m}/", f"test/{m}_ci95/"))},
        **by_episode(algo),
        # sequence learners (MANN): accuracy at the k-th presentation of a class
        **{k: v for k, v in logged.items() if k.startswith("test/acc_instance_")},
        # None when nothing was validated (data.val_episodes=0), not accuracy's starting 0.0
        f"val/{m}_best": algo.val_best if algo.history and math.isfinite(algo.val_best) else None,
        "test_episodes": cfg.data.test_episodes,
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "wall_s": round(wall_s, 2),  # this process
        "train_s": round(algo.fit_clock.seconds(), 2),  # in fit, over all resumes
        "best_checkpoint": best or "",
        "curve": algo.history,
    }


def by_episode(algo) -> dict:
    """Test episodes of varying shapes: each one's ways, shots and accuracy (the report bins
    them by ways and by shots)."""
    table = getattr(algo, "test_by_episode", None)
    return {"test/by_episode": table} if table else {}


def interrupted(err: BaseException, trainer) -> bool:
    """Whether ``err`` ends a run that was interrupted: Ctrl-C outside a fit, Lightning's exit
    after its own KeyboardInterrupt handling (e.g. a second Ctrl-C), or its SIGTERM stop."""
    if isinstance(err, KeyboardInterrupt | SIGTERMException):
        return True
    return isinstance(err, SystemExit) and trainer is not None and trainer.interrupted


class RunRecord:
    """``with RunRecord(cfg) as record:`` around a run: ``record.metrics`` is written to
    ``<output_dir>/metrics.json`` when the block ends, however it ends, and the loggers are
    closed (a failed run's W&B run marked failed). The run fills in what it has built."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg, self.out, self.start = cfg, Path(cfg.output_dir), time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics: dict = {"status": "running"}
        self.loggers: list = []
        self.trainer = self.algo = self.stopper = None
        self.best: str | None = None
        self.fitted = False

    def __enter__(self) -> RunRecord:
        return self

    def started(self, **info) -> None:
        self.metrics = {**info, **self.metrics}

    def update(self, **values) -> None:
        self.metrics.update(values)

    def finished(self) -> dict:
        """The run's ``outcome``: status ok, test accuracy, curve, ..."""
        self.metrics = {**self.metrics, **self._outcome()}
        return self.metrics

    def stopped(self, error: str) -> dict:
        """A run stopped by a signal: its training so far, what stopped it, where to resume."""
        resume = self.stopper.resume_from() if self.stopper else ""
        done = self._outcome()
        self.metrics = {
            **self.metrics,
            **done,
            "status": "interrupted",
            "error": error,
            "resume_from": resume,
        }
        return self.metrics

    def _outcome(self) -> dict:
        return outcome(self.cfg, self.trainer, self.algo, self.best, time.time() - self.start)

    def __exit__(self, kind, err, traceback) -> bool:
        try:
            if err is not None:
                self._failed(err)
        finally:
            write_metrics(self.out, self.metrics)
            finish_loggers(self.loggers, failed=self.metrics.get("status") != "ok")
        return False  # the error goes on

    def _failed(self, err: BaseException) -> None:
        if interrupted(err, self.trainer) and self.fitted:  # while testing: keep the training
            resume = self.stopper.resume_from() if self.stopper else ""
            self.stopped(
                f"interrupted while testing; the same command with ckpt_path={resume} tests it"
            )
        elif interrupted(err, self.trainer):
            by = "SIGTERM" if isinstance(err, SIGTERMException) else "Ctrl-C"
            self.metrics = {**self.metrics, "status": "interrupted", "error": f"aborted ({by})"}
        else:
            error = f"{type(err).__name__}: {err}"
            self.metrics = {**self.metrics, "status": "failed", "error": error}


def write_metrics(out: Path, metrics: dict) -> None:
    """``metrics.json`` (rank 0 only), written atomically; a failed or interrupted run in the
    directory of a finished one writes ``metrics.failed.json`` instead."""
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
