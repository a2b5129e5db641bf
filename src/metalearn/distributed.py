"""Distributed training of one run: ``trainer=ddp`` (GPUs, NCCL) and ``trainer=ddp_cpu`` (gloo).

How a meta-batch is spread over ``world_size`` processes (Lightning DDP, nothing home-made):

* ``algo.meta_batch_size`` is the *global* number of tasks per outer step; each rank draws
  ``meta_batch_size // world_size`` tasks from its own sampler, seeded by ``(seed, rank, epoch,
  batch)`` (``EpisodeDataModule`` reads rank and world size from the attached Trainer). A
  meta-batch that does not divide evenly is a ``ConfigError`` raised when the Trainer is built.
* The inner loop runs on the unwrapped network (``self.model`` of the LightningModule), never
  through the DDP wrapper, so no ``create_graph`` backward goes through DDP's hooks; the
  meta-objective (mean over the rank's tasks) goes through ``self.manual_backward``, where
  Lightning prepares DDP's reducer, which then averages the meta-gradients over ranks: the
  update equals one process with the whole meta-batch (``tests/test_distributed.py``).
* ``find_unused_parameters=True``: some variants leave parameters without a meta-gradient in
  some steps (e.g. MAML++'s per-step BatchNorm weights during its first-order phase); DDP
  finds them from the objective handed to ``manual_backward``.
* ``sync_batchnorm`` stays off: BatchNorm statistics are per task (transductive) or per rank.
* Validation/test episodes are split across ranks (shares may differ by one episode) and the
  per-episode accuracies gathered (``EpisodicModule._gathered_accs``), so the reported accuracy
  is over exactly ``data.val_episodes`` / ``data.test_episodes`` episodes.

Hydra sweeps: Lightning starts ranks 1..N-1 by re-running the script with ``sys.argv``. Under
``-m`` that would start a whole new sweep in each child, so ``EpisodicDDPStrategy`` relaunches
a child as a single run of the *job's* overrides in the job's output directory instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from unittest import mock

from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import subprocess_script

from metalearn.errors import ConfigError


def split_meta_batch(meta_batch_size: int, world_size: int) -> int:
    """Tasks per rank; a clear error when the global meta-batch does not divide evenly."""
    if world_size < 1 or meta_batch_size % world_size:
        raise ConfigError(
            f"algo.meta_batch_size={meta_batch_size} is the global meta-batch and must divide "
            f"evenly over the {world_size} DDP processes (trainer.devices x trainer.num_nodes):"
            f" use a multiple of {world_size}, e.g. algo.meta_batch_size="
            f"{max(world_size, meta_batch_size // world_size * world_size)}"
        )
    return meta_batch_size // world_size


def hydra_child_command(local_rank: int) -> tuple[Sequence[str], str]:
    """The command that starts DDP rank ``local_rank`` of the current Hydra job.

    A single run keeps Lightning's own command (the script's argv plus the run directory). In a
    multirun job the child runs the job's own overrides as a single run (``hydra.mode=RUN``) in
    the job's output directory, without writing a second ``.hydra/`` there.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from hydra.utils import get_original_cwd, to_absolute_path

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return _lightning_hydra_command(local_rank)
    import __main__

    if getattr(__main__, "__spec__", None) is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += list(hc.overrides.task)
    command += [
        f'hydra.run.dir="{hc.runtime.output_dir}"',
        f"hydra.job.name=train_ddp_process_{local_rank}",
        "hydra.output_subdir=null",
        "hydra.mode=RUN",
    ]
    return command, get_original_cwd()


_lightning_hydra_command = subprocess_script._hydra_subprocess_cmd

# what Lightning's launcher leaves in the environment of rank 0 (LOCAL_RANK makes the next
# Trainer believe its processes were started externally and skip launching them)
DDP_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "GROUP_RANK",
    "PL_GLOBAL_SEED",
)


@contextmanager
def fresh_distributed_state() -> Iterator[None]:
    """Leave no DDP state behind for the next job of a sweep in this process.

    A sweep runs its jobs one after the other in one process; Lightning keeps the process
    group and the DDP environment variables of a finished run alive (its test stage reuses
    them), so the next DDP job would talk to the exited ranks of the previous one.
    """
    saved = {k: os.environ.get(k) for k in DDP_ENV}
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _HydraJobLauncher(subprocess_script._SubprocessScriptLauncher):
    """Lightning's script launcher, with children started by ``hydra_child_command``."""

    def launch(self, function, *args: Any, trainer=None, **kwargs: Any) -> Any:
        with mock.patch.object(subprocess_script, "_hydra_subprocess_cmd", hydra_child_command):
            return super().launch(function, *args, trainer=trainer, **kwargs)


class EpisodicDDPStrategy(DDPStrategy):
    """``DDPStrategy`` for episodic meta-learning (see the module docstring).

    Args:
        meta_batch_size: the global meta-batch (``${algo.meta_batch_size}``), checked against
            the world size as soon as the Trainer knows it.
        **kwargs: ``DDPStrategy`` arguments (``find_unused_parameters``, ``process_group_backend``,
            ``start_method``, ...).
    """

    def __init__(self, meta_batch_size: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.meta_batch_size = meta_batch_size

    def _configure_launcher(self) -> None:
        # called by the Trainer once devices and nodes are known: fail before anything starts
        if self.meta_batch_size is not None:
            split_meta_batch(int(self.meta_batch_size), self.num_processes * self.num_nodes)
        super()._configure_launcher()
        if isinstance(self._launcher, subprocess_script._SubprocessScriptLauncher):
            self._launcher = _HydraJobLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes
            )
