"""One job per GPU for sweeps on one machine: ``hydra/launcher=gpu_pool``.

``conf/hydra/launcher/gpu_pool.yaml`` is Hydra's joblib launcher with
``n_jobs: ${gpu_pool_size:2}``: as many worker processes as there are visible GPUs (the
``CUDA_VISIBLE_DEVICES`` ones, if set), or 2 CPU worker processes when there is none.

Pinning happens in the job (``metalearn.train.main`` wraps ``run`` in ``pinned_device``):

* joblib runs jobs in a few long-lived worker processes and hands the next job to whichever
  worker is free, so "GPU = job number mod #GPUs" alone would put two jobs on one GPU as soon as
  jobs take unequal time (a 10-shot job outlives a 1-shot one). Each job therefore *claims* a GPU
  with an exclusive lock file (``filelock``: flock on Unix, msvcrt on Windows), trying
  ``job number mod #GPUs`` first, then any free one, and waiting if all are taken (another
  sweep of the same user on the same machine shares the same locks, in
  ``$METALEARN_GPU_LOCK_DIR`` or ``<tmp>/metalearn-gpu-locks-<user>``). The lock is released
  when the job ends, or by the OS if the worker dies.
* The job then runs on that GPU through ``trainer.devices=[index]`` (and
  ``torch.cuda.set_device``). ``CUDA_VISIBLE_DEVICES`` is deliberately *not* changed per job: a
  worker that has initialised CUDA keeps the device list it started with, so a second job in
  the same worker would not see a different GPU; selecting the device by index works for any job
  in any worker.
* With no GPU (or ``trainer=cpu``) jobs run as parallel CPU processes, each with
  ``#cores // n_jobs`` torch threads so that parallel jobs do not oversubscribe the cores.

A job that asks for several devices (DDP) cannot run inside a joblib worker (Lightning starts
ranks by re-running the script): run DDP sweeps with the default launcher (jobs one after the
other, each on all GPUs) or with ``hydra/launcher=slurm``.
"""

from __future__ import annotations

import getpass
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from metalearn.errors import ConfigError

log = logging.getLogger(__name__)

GPU_ACCELERATORS = ("gpu", "cuda", "auto")


def visible_gpus() -> list[str]:
    """Ids of the GPUs this process may use (``CUDA_VISIBLE_DEVICES`` entries, else 0..n-1)."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [x.strip() for x in env.split(",") if x.strip()]
        return ids[:n]
    return [str(i) for i in range(n)]


def pool_size(cpu_jobs: int = 2) -> int:
    """Parallel jobs: one per visible GPU, or ``cpu_jobs`` CPU processes without GPUs."""
    return len(visible_gpus()) or int(cpu_jobs)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("gpu_pool_size"):
        OmegaConf.register_new_resolver("gpu_pool_size", pool_size)


register_resolvers()


def lock_dir() -> Path:
    default = Path(tempfile.gettempdir()) / f"metalearn-gpu-locks-{getpass.getuser()}"
    path = Path(os.environ.get("METALEARN_GPU_LOCK_DIR", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


class GpuClaim:
    """An exclusive claim on one of ``gpus`` (ids), preferring index ``preferred``."""

    def __init__(self, gpus: list[str], preferred: int = 0, poll_s: float = 2.0):
        self.gpus, self.preferred, self.poll_s = gpus, preferred % len(gpus), poll_s
        self.index: int | None = None
        self._lock = None

    def try_claim(self) -> bool:
        from filelock import FileLock, Timeout

        order = [(self.preferred + k) % len(self.gpus) for k in range(len(self.gpus))]
        for index in order:
            lock = FileLock(lock_dir() / f"gpu-{self.gpus[index]}.lock")
            try:
                lock.acquire(timeout=0)  # taken by another job: try the next GPU
            except Timeout:
                continue
            self.index, self._lock = index, lock
            return True
        return False

    def __enter__(self) -> int:
        waited = False
        while not self.try_claim():
            if not waited:
                log.info("all %d GPUs are taken; waiting for one to free up", len(self.gpus))
                waited = True
            time.sleep(self.poll_s)
        return self.index

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def joblib_job() -> tuple[int, int] | None:
    """(job number, parallel jobs) when this is a job of a joblib sweep, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if hc.mode != RunMode.MULTIRUN or "Joblib" not in str(hc.launcher.get("_target_", "")):
        return None
    try:
        n_jobs = int(hc.launcher.n_jobs)
    except (TypeError, ValueError):
        n_jobs = 1
    return int(hc.job.num), max(1, n_jobs)


def device_count(devices) -> int | None:
    """How many devices ``trainer.devices`` asks for (None: an explicit list or "auto")."""
    if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        return int(devices)
    return None


@contextmanager
def sweep_job(cfg: DictConfig):
    """What ``metalearn.train.main`` wraps each job in: its own GPU under
    ``hydra/launcher=gpu_pool`` and, afterwards, no DDP state left for the next job."""
    from metalearn.distributed import fresh_distributed_state

    with fresh_distributed_state(), pinned_device(cfg) as device:
        yield device


@contextmanager
def pinned_device(cfg: DictConfig):
    """Run the body on this job's own GPU (or CPU share) when it is a joblib sweep job.

    Outside a joblib sweep it does nothing. Yields the GPU index (or None).
    """
    job = joblib_job()
    if job is None:
        yield None
        return
    job_num, n_jobs = job
    trainer = cfg.trainer
    count = device_count(trainer.get("devices", 1))
    if count != 1:  # several devices = DDP ranks, which Lightning starts by re-running the script
        raise ConfigError(
            f"hydra/launcher=gpu_pool runs single-device jobs in parallel, but this job asks for "
            f"trainer.devices={trainer.get('devices')}: use trainer.devices=1, or run DDP jobs "
            "with the default launcher (one job at a time on all GPUs) or hydra/launcher=slurm"
        )
    accelerator = str(trainer.get("accelerator", "cpu"))
    gpus = visible_gpus() if accelerator in GPU_ACCELERATORS else []
    if not gpus:
        import torch

        threads = max(1, (os.cpu_count() or 1) // n_jobs)
        torch.set_num_threads(threads)
        log.info("job %d: CPU process with %d threads (%d parallel jobs)", job_num, threads, n_jobs)
        yield None
        return
    with GpuClaim(gpus, preferred=job_num) as index:
        import torch

        with open_dict(trainer):
            trainer.accelerator = "gpu"
            trainer.devices = [index]
        torch.cuda.set_device(index)
        log.info("job %d pinned to GPU %s (cuda:%d)", job_num, gpus[index], index)
        yield index
