"""How every data module serves its episodes: the DDP shard, DataLoaders keyed by the outer
step for training and fixed for val/test, workers and pinning.

``EpisodeLoaders`` is mixed into the episode, sinusoid and mix data modules; each provides
``train_dataset()``, ``eval_dataset(split)`` (cut with ``eval_share``), ``rank``,
``world_size`` and ``num_workers``.
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from metalearn.errors import ConfigError
from metalearn.interrupt import ignore_sigint

AUTO_CUDA_WORKERS = 2  # data.num_workers=auto on a CUDA device


class StepSampler(Sampler[int]):
    """Yields start, start + 1, ... (``length`` indices): item s is the batch of outer step s.

    ``start`` is ``step_fn()`` (the Trainer's ``global_step``: one outer step per training
    batch) when iteration starts, else ``epoch * length`` from ``set_epoch``. Keyed by the step,
    an epoch resumed mid-way (Lightning restarts the loader) continues with the very batches
    an uninterrupted run would have drawn; Lightning stops the epoch after its own count.
    """

    def __init__(self, length: int, step_fn=None):
        self.length, self.epoch, self.step_fn = length, 0, step_fn

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        start = self.step_fn() if self.step_fn is not None else None
        start = self.epoch * self.length if start is None else int(start)
        return iter(range(start, start + self.length))


class StepKeyedLoader(DataLoader):
    """The training loader, resumable in Lightning's sense with nothing to restore: its
    ``StepSampler`` starts from the Trainer's global step, which the checkpoint holds. (A
    loader without ``state_dict`` makes Lightning warn, on every mid-epoch resume, that the
    resume "can cause unreliable results".)"""

    def state_dict(self) -> dict:
        return {"batches_keyed_by": "global_step"}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def eval_share(
    split: str, episodes: int, rank: int, world_size: int, sources: int | None = None
) -> np.ndarray:
    """Positions of this rank's contiguous share of the fixed ``split`` episodes (the shares
    partition them in rank order, so a gather restores the sequence); ``sources``: a mix of
    that many sources with ``episodes`` each."""
    total = episodes * (sources or 1)
    if 0 < total < world_size:  # a rank without episodes would hang the others' gather
        per_source = "" if sources is None else " per source"
        raise ConfigError(
            f"data.{split}_episodes={episodes}{per_source} is fewer than the {world_size} DDP"
            f" processes: use at least {math.ceil(world_size / (sources or 1))} (every process"
            " scores a share of the episodes)"
        )
    return np.array_split(np.arange(total), world_size)[rank]


class EpisodeLoaders:
    """The loader half of a LightningDataModule (list it before ``L.LightningDataModule``)."""

    def shard(self) -> tuple[int, int]:
        """(rank, world_size): the attached Trainer's under DDP, else the constructor's."""
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            return trainer.global_rank, trainer.world_size
        return self.rank, self.world_size

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        return self._loader(dataset, StepSampler(len(dataset), self._trainer_step), StepKeyedLoader)

    def _trainer_step(self) -> int | None:
        trainer = getattr(self, "trainer", None)
        return trainer.global_step if trainer is not None else None

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_dataset("test"))

    def _loader(
        self, dataset: Dataset, sampler: Sampler | None = None, loader=DataLoader
    ) -> DataLoader:
        workers = self.workers()
        return loader(
            dataset,
            batch_size=None,
            sampler=sampler,
            shuffle=False,
            num_workers=workers,
            persistent_workers=workers > 0,  # items are keyed by step: workers keep no state
            pin_memory=self._on_cuda(),
            worker_init_fn=ignore_sigint if workers > 0 else None,
        )

    def workers(self) -> int:
        """DataLoader workers. ``auto``: 2 when training on CUDA, where building batches in the
        main process stalls the (launch-bound) meta-step; 0 on CPU, where workers would only
        compete with training for the cores."""
        if self.num_workers == "auto":
            return AUTO_CUDA_WORKERS if self._on_cuda() else 0
        return int(self.num_workers)

    def _on_cuda(self) -> bool:
        """Training on a CUDA device: batches are also pinned, so their copy is asynchronous."""
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.strategy.root_device.type == "cuda"
