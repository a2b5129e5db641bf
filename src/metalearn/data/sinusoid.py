"""The sinusoid regression benchmark (Finn, Abbeel & Levine 2017, sec. 5.1).

Each task is y = A sin(x - phi) with amplitude A ~ U[0.1, 5.0] and phase phi ~ U[0, pi];
its points have x ~ U[-5, 5]. An episode holds K support points (``shots``) and a query set
of the same function; support/query x and y are float32 ``[B, K, 1]`` (``Episodes``, as the
image episodes but with targets for labels).

Seeding follows the image episodes (data/datamodule.py): the meta-batch of outer step s is
drawn from a Generator seeded by (seed, rank, epoch, i) only, served through the same
``StepSampler``, so a resumed run sees the very batches an uninterrupted one would; the
``val_episodes`` / ``test_episodes`` tasks are fixed, task e seeded by (eval_seed, split, e),
so every run and algorithm is scored on the same functions and points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset

from metalearn.data.datamodule import EVAL_SPLIT_TAGS, at_least
from metalearn.data.episodes import Episodes, seeded_rng
from metalearn.data.loading import EpisodeLoaders, eval_share
from metalearn.distributed import split_meta_batch
from metalearn.errors import ConfigError


@dataclass(frozen=True)
class SinusoidFamily:
    """The task distribution: ranges of amplitude, phase and x (the paper's by default)."""

    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)

    def tasks(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """[n, 2] (amplitude, phase) of n random tasks."""
        return np.stack([rng.uniform(*self.amplitude, size=n), rng.uniform(*self.phase, size=n)], 1)

    @staticmethod
    def curve(task: np.ndarray, x: np.ndarray) -> np.ndarray:
        """y = A sin(x - phi) for tasks [..., 2] and points x broadcasting against them."""
        return task[..., 0:1] * np.sin(x - task[..., 1:2])

    def episodes(
        self, rng: np.random.Generator, n: int, shots: int, queries: int
    ) -> tuple[Episodes, np.ndarray]:
        """``n`` episodes of random tasks, and the tasks [n, 2] (amplitude, phase)."""
        task = self.tasks(rng, n)
        x = rng.uniform(*self.x_range, size=(n, shots + queries))
        y = self.curve(task, x)

        def part(a: np.ndarray, s: slice) -> torch.Tensor:
            return torch.from_numpy(a[:, s, None].astype(np.float32))

        support, query = slice(0, shots), slice(shots, None)
        return Episodes(part(x, support), part(y, support), part(x, query), part(y, query)), task


class SinusoidMetaBatches(Dataset):
    """Item ``epoch * length + i`` is the meta-batch seeded by (seed, rank, epoch, i)."""

    def __init__(self, family, length, meta_batch_size, shots, queries, seed, rank=0):
        self.family, self.length, self.meta_batch_size = family, length, meta_batch_size
        self.shots, self.queries, self.seed, self.rank = shots, queries, seed, rank

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Episodes:
        epoch, i = divmod(int(index), self.length)
        rng = seeded_rng(self.seed, self.rank, epoch, i)
        return self.family.episodes(rng, self.meta_batch_size, self.shots, self.queries)[0]


def fixed_tasks(family, episodes, shots, queries, eval_seed, split) -> tuple[Episodes, np.ndarray]:
    """Tasks 0..episodes-1 of ``split``; task e seeded by (eval_seed, split, e) only, so it is
    the same whatever the total count."""
    drawn = [
        family.episodes(seeded_rng(eval_seed, EVAL_SPLIT_TAGS[split], e), 1, shots, queries)
        for e in range(episodes)
    ]
    if not drawn:
        empty = (torch.zeros(0, n, 1) for n in (shots, shots, queries, queries))
        return Episodes(*empty), np.zeros((0, 2))
    parts = zip(*(episode for episode, _ in drawn), strict=True)
    return Episodes(*(torch.cat(p) for p in parts)), np.concatenate([t for _, t in drawn])


class FixedSinusoidTasks(Dataset):
    """Fixed episodes, served ``batch_size`` per item, in order."""

    def __init__(self, episodes: Episodes, batch_size: int):
        self.episodes, self.batch_size = episodes, batch_size

    def __len__(self) -> int:
        return math.ceil(self.episodes.batch_size / self.batch_size)

    def __getitem__(self, item: int) -> Episodes:
        if not 0 <= item < len(self):
            raise IndexError(item)
        part = slice(item * self.batch_size, (item + 1) * self.batch_size)
        return Episodes(*(t[part] for t in self.episodes))


class SinusoidDataModule(EpisodeLoaders, L.LightningDataModule):
    """Sinusoid regression tasks (see the module doc and conf/data/sinusoid.yaml)."""

    task = "regression"  # the kind of task (metalearn/tasks.py): MSE loss and metric

    def __init__(
        self,
        name: str = "sinusoid",
        ways: int = 1,
        shots: int = 5,
        queries: int | str = "auto",
        eval_queries: int | None = None,
        meta_batch_size: int = 25,
        batches_per_epoch: int = 100,
        val_episodes: int = 100,
        test_episodes: int = 600,
        eval_batch_size: int = 100,
        seed: int = 0,
        eval_seed: int = 0,
        num_workers: int | str = "auto",
        amplitude=(0.1, 5.0),
        phase=(0.0, math.pi),
        x_range=(-5.0, 5.0),
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        if ways != 1:
            raise ConfigError(
                f"data=sinusoid: each task is one function, so ways must be 1, got ways={ways}: "
                "add ways=1 (experiment=maml_sinusoid sets it)"
            )
        queries = shots if queries == "auto" else queries  # Finn et al.'s code: K and K
        eval_queries = queries if eval_queries is None else eval_queries
        at_least(
            1,
            shots=shots,
            queries=queries,
            eval_queries=eval_queries,
            meta_batch_size=meta_batch_size,
            batches_per_epoch=batches_per_epoch,
            eval_batch_size=eval_batch_size,
        )
        at_least(0, seed=seed, eval_seed=eval_seed, val_episodes=val_episodes,
                 test_episodes=test_episodes)  # fmt: skip
        for key, (low, high) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not low <= high:
                raise ConfigError(f"data.{key}=[{low}, {high}]: the low end must come first")
        self.name, self.ways, self.shots = name, 1, int(shots)
        self.queries, self.eval_queries = int(queries), int(eval_queries)
        self.meta_batch_size, self.batches_per_epoch = int(meta_batch_size), int(batches_per_epoch)
        self.val_episodes, self.test_episodes = int(val_episodes), int(test_episodes)
        self.eval_batch_size, self.num_workers = int(eval_batch_size), num_workers
        self.seed, self.eval_seed = int(seed), int(eval_seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.family = SinusoidFamily(
            tuple(map(float, amplitude)), tuple(map(float, phase)), tuple(map(float, x_range))
        )
        self.norm = None  # points are not normalised

    def setup(self, stage: str | None = None) -> None:
        """Nothing to load: tasks are drawn on demand."""

    def preprocessing(self) -> None:
        """Points go to the model as they are (no image preprocessing to save)."""
        return None

    # ---- batches ------------------------------------------------------------------------
    def pooled_batch(self, rng: np.random.Generator, size: int) -> tuple[torch.Tensor, ...]:
        """``size`` points, each of its own random task: (x [size, 1], y [size, 1]). The
        "pretrained on all tasks" baseline regresses on these (algo=finetune)."""
        task = self.family.tasks(rng, size)
        x = rng.uniform(*self.family.x_range, size=(size, 1))
        y = self.family.curve(task, x)
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32))

    def fixed(self, split: str) -> tuple[Episodes, np.ndarray]:
        """All fixed episodes of ``split`` (val/test) and their tasks [n, 2] (amplitude,
        phase)."""
        count = self.val_episodes if split == "val" else self.test_episodes
        return fixed_tasks(self.family, count, self.shots, self.eval_queries, self.eval_seed, split)

    def train_dataset(self) -> SinusoidMetaBatches:
        rank, world_size = self.shard()
        return SinusoidMetaBatches(
            self.family,
            self.batches_per_epoch,
            split_meta_batch(self.meta_batch_size, world_size),
            self.shots,
            self.queries,
            self.seed,
            rank,
        )

    def eval_dataset(self, split: str) -> FixedSinusoidTasks:
        episodes, _ = self.fixed(split)
        share = torch.from_numpy(eval_share(split, episodes.batch_size, *self.shard()))
        return FixedSinusoidTasks(Episodes(*(t[share] for t in episodes)), self.eval_batch_size)
