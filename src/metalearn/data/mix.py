"""Episodes from several data sources at once (``data=mix``), Meta-Dataset style.

Every source is an ``EpisodeDataModule`` of its own (its splits, checks, fixed val/test
episodes), all built with one ``image_size`` and one ``channels``, so their images stack:
grayscale sources are replicated to 3 channels by default (``channels: 3``, as Meta-Dataset
feeds Omniglot and Quick Draw to colour networks), or colour converted to gray with 1.

Training: each episode of a meta-batch comes from ONE source, drawn with probabilities
``weights`` (uniform by default, as Meta-Dataset's sampler draws its sources). Item
``epoch * len + i`` draws its sources from a Generator seeded by (seed, rank, epoch, i,
MIX_TAG), then source k's episodes from one seeded by (seed, rank, epoch, i, MIX_TAG, k):
a pure function of those numbers, as for one source (resume and workers see the same batches).

Val/test: each source's fixed episodes, exactly those ``data=<source>`` draws at this size
(seeded by (eval_seed, split, episode)), ``val_episodes`` / ``test_episodes`` of them per
source, served source after source (a batch never spans two sources). The algorithm logs
``test/acc`` over all of them and ``test/acc/<source>`` (``episode_sources``) per source.

Cross-domain: ``train_sources`` train (and, unless ``val_sources`` says otherwise, validate);
``test_sources`` test, e.g. ``data.train_sources=[omniglot,miniimagenet]
data.test_sources=[quickdraw]``.
"""

from __future__ import annotations

import math
from collections import Counter

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset

from metalearn.data.datamodule import (
    AUGMENT_TAG,
    EpisodeDataModule,
    FixedEpisodes,
    TrainMetaBatches,
    built,
    each,
    normalised,
)
from metalearn.data.episodes import EpisodeIndices, Episodes, sample_indices, seeded_rng
from metalearn.data.loading import EpisodeLoaders, eval_share
from metalearn.data.shapes import draw_episode
from metalearn.data.sources import SOURCES
from metalearn.data.transforms import Preprocessing
from metalearn.distributed import split_meta_batch
from metalearn.errors import ConfigError

MIX_TAG = 11  # the source draws' random stream: (seed, rank, epoch, i, MIX_TAG[, source])

# Settings every source shares (one image shape, one episode shape, one schedule): set as
# data.<key>, never per source.
SHARED = (
    "image_size", "channels", "ways", "shots", "queries", "train_ways", "train_queries",
    "episodes", "ways_range", "shots_range", "metadataset", "meta_batch_size", "seed",
    "batches_per_epoch", "val_episodes", "test_episodes", "eval_batch_size", "eval_seed",
    "num_workers", "normalize", "augment", "rank", "world_size",
)  # fmt: skip


def source_weights(weights, sources: list[str]) -> np.ndarray:
    """Probabilities of drawing each training source: ``weights`` normalised (null: uniform)."""
    if weights is None:
        return np.full(len(sources), 1.0 / len(sources))
    values = [float(w) for w in weights]
    if len(values) != len(sources):
        raise ConfigError(
            f"data.weights has {len(values)} entries but data.train_sources has {len(sources)}"
            f" ({', '.join(sources)}): give one weight per training source, in that order, or"
            " data.weights=null for uniform"
        )
    if min(values) < 0 or not math.isfinite(sum(values)) or sum(values) <= 0:
        raise ConfigError(
            f"data.weights={values}: weights must be >= 0 and not all 0 (they are normalised"
            " to sum to 1), or data.weights=null for uniform"
        )
    return np.asarray(values) / sum(values)


def source_list(key: str, names, known: dict) -> list[str]:
    """``names`` checked against the configured sources (one clear error naming the fix)."""
    names = [str(n) for n in ([names] if isinstance(names, str) else list(names or []))]
    if not names:
        raise ConfigError(f"data.{key} is empty: name at least one of {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"data.{key}={names} names a source twice: list each once")
    for name in names:
        if name not in known:
            raise ConfigError(
                f"data.{key}: unknown source {name!r}: choose from {', '.join(known)}, or add"
                f" it as data.sources.{name}={{source: folder, root: <folder>}} (loaders:"
                f" {', '.join(sorted(SOURCES))})"
            )
    return names


def check_entry(name: str, options: dict) -> None:
    """A ``data.sources`` entry: a known loader, and none of the keys all sources share."""
    for key in options:
        if key in SHARED:
            raise ConfigError(
                f"data.sources.{name}.{key}: every source shares it; set data.{key} instead"
            )
    loader = str(options.get("source", name))
    if loader not in SOURCES:
        raise ConfigError(
            f"data.sources.{name}: {loader!r} is no loader; set data.sources.{name}.source"
            f" to one of {', '.join(sorted(SOURCES))}"
        )


class MixTrainMetaBatches(Dataset):
    """Item ``epoch * length + i``: a meta-batch whose episodes each come from one source,
    the sources drawn by ``probs``; ``parts[k]`` is source k's own (unbatched) sampler."""

    def __init__(self, names, parts, probs, length, meta_batch_size, seed, rank=0):
        self.names, self.parts, self.probs = list(names), list(parts), np.asarray(probs)
        self.length, self.meta_batch_size, self.seed, self.rank = (
            length, meta_batch_size, seed, rank,
        )  # fmt: skip

    def __len__(self) -> int:
        return self.length

    def choices(self, index: int) -> np.ndarray:
        """Source index of each episode of item ``index``."""
        epoch, i = divmod(int(index), self.length)
        rng = seeded_rng(self.seed, self.rank, epoch, i, MIX_TAG)
        return rng.choice(len(self.parts), size=self.meta_batch_size, p=self.probs)

    def sources_of(self, index: int) -> list[str]:
        """The source name of each episode of item ``index``, in order."""
        return [self.names[k] for k in self.choices(index)]

    def __getitem__(self, index: int) -> Episodes:
        epoch, i = divmod(int(index), self.length)
        choices = self.choices(index)
        tasks: list = [None] * len(choices)
        for k in np.unique(choices):
            where = np.flatnonzero(choices == k)
            part = self.parts[k]
            rng = seeded_rng(self.seed, self.rank, epoch, i, MIX_TAG, int(k))
            episodes = drawn_episodes(part, rng, len(where))
            if part.augment is not None and part.augment.active:
                aug = seeded_rng(self.seed, self.rank, epoch, i, MIX_TAG, int(k), AUGMENT_TAG)
                episodes = augmented(episodes, part.augment, aug)
            episodes = normalised(episodes, part.norm)
            for b, task in zip(where, zip(*episodes, strict=True), strict=True):
                tasks[b] = task
        return joined(tasks)


def drawn_episodes(part: TrainMetaBatches, rng: np.random.Generator, count: int) -> Episodes:
    """``count`` training episodes of one source, drawn as its own sampler draws them."""
    c = part.classes
    if part.shapes is not None:
        drawn = [draw_episode(rng, c.counts, part.shapes, part.groups) for _ in range(count)]
    else:
        drawn = sample_indices(
            rng, count, c.num_classes, c.counts, part.ways, part.shots, part.queries
        )
    return built(c, drawn, part.shots)


def augmented(episodes: Episodes, augment, rng: np.random.Generator) -> Episodes:
    return episodes._replace(
        support_x=each(episodes.support_x, lambda x: augment(x, rng)),
        query_x=each(episodes.query_x, lambda x: augment(x, rng)),
    )


def joined(tasks: list) -> Episodes:
    """One meta-batch from per-episode (support_x, support_y, query_x, query_y) tuples:
    stacked when they share a shape, else ragged."""
    if len({tuple(t.shape for t in task) for task in tasks}) == 1:
        return Episodes(*(torch.stack([task[f] for task in tasks]) for f in range(4)))
    return Episodes(*(tuple(task[f] for task in tasks) for f in range(4)))


class MixFixedEpisodes(Dataset):
    """Fixed episodes of several sources, source after source: item j is a batch of one
    source's episodes."""

    def __init__(self, parts: list[tuple[str, FixedEpisodes]]):
        self.parts = [(name, part) for name, part in parts if part.num_episodes]
        self.items = [(k, j) for k, (_, part) in enumerate(self.parts) for j in range(len(part))]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_episodes(self) -> int:
        return sum(part.num_episodes for _, part in self.parts)

    def __getitem__(self, item: int) -> Episodes:
        if not 0 <= item < len(self):
            raise IndexError(item)
        k, j = self.items[item]
        return self.parts[k][1][j]

    def sources(self) -> list[str]:
        """The source name of each episode, in the order they are served."""
        return [name for name, part in self.parts for _ in range(part.num_episodes)]

    def shapes(self) -> list[tuple[int, float]]:
        return [s for _, part in self.parts for s in part.shapes()]


class MixDataModule(EpisodeLoaders, L.LightningDataModule):
    """Episodes of several sources (conf/data/mix.yaml); each episode from one source."""

    def __init__(
        self,
        sources: dict,
        train_sources,
        root: str,
        ways: int,
        shots: int,
        queries: int | str,
        meta_batch_size: int,
        weights=None,
        val_sources=None,
        test_sources=None,
        name: str = "mix",
        image_size: int = 28,
        channels: int = 3,
        normalize=None,
        download: bool = False,
        rank: int = 0,
        world_size: int = 1,
        batches_per_epoch: int = 100,
        val_episodes: int = 200,
        test_episodes: int = 600,
        eval_batch_size: int = 25,
        seed: int = 0,
        eval_seed: int = 0,
        num_workers: int | str = "auto",
        train_ways: int | None = None,
        train_queries: int | str | None = None,
        episodes: str = "fixed",
        ways_range: list | tuple = (5, 20),
        shots_range: list | tuple = (1, 5),
        metadataset: dict | None = None,
        augment: dict | None = None,
    ):
        super().__init__()
        known = {str(k): dict(v or {}) for k, v in dict(sources or {}).items()}
        if not known:
            raise ConfigError("data.sources is empty: give e.g. {omniglot: {}, quickdraw: {}}")
        for entry, options in known.items():
            check_entry(entry, options)
        self.train_sources = source_list("train_sources", train_sources, known)
        self.val_sources = source_list("val_sources", val_sources or self.train_sources, known)
        self.test_sources = source_list("test_sources", test_sources or self.train_sources, known)
        self.probs = source_weights(weights, self.train_sources)
        if image_size is None or channels not in (1, 3):
            raise ConfigError(
                f"data=mix needs one image shape for all sources: set data.image_size (e.g. 28)"
                f" and data.channels to 1 or 3 (got {image_size}, {channels})"
            )
        if normalize == "auto":
            raise ConfigError(
                "data=mix: data.normalize=auto would normalise each source by its own "
                "statistics (a test source's too): use null or [[means], [stds]]"
            )
        self.name, self.root = name, str(root)
        common = dict(
            ways=ways, shots=shots, queries=queries, meta_batch_size=meta_batch_size,
            image_size=image_size, channels=channels, normalize=normalize,
            batches_per_epoch=batches_per_epoch,
            val_episodes=val_episodes, test_episodes=test_episodes,
            eval_batch_size=eval_batch_size, seed=seed, eval_seed=eval_seed,
            num_workers=num_workers, train_ways=train_ways, train_queries=train_queries,
            episodes=episodes, ways_range=ways_range, shots_range=shots_range,
            metadataset=metadataset, augment=augment,
        )  # fmt: skip
        used = list(dict.fromkeys(self.train_sources + self.val_sources + self.test_sources))
        self.parts = {n: self._source(n, known[n], common, download) for n in used}
        first = self.parts[used[0]]
        self.ways, self.shots, self.queries = first.ways, first.shots, first.queries
        self.meta_batch_size, self.batches_per_epoch = (
            first.meta_batch_size,
            first.batches_per_epoch,
        )
        self.val_episodes, self.test_episodes = first.val_episodes, first.test_episodes
        # a source's module serves all its episodes (rank 0 of 1): the mix shards them
        if not 0 <= int(rank) < int(world_size):
            raise ConfigError(f"data.rank={rank} must be in 0..world_size-1 ({world_size - 1})")
        self.seed, self.rank, self.world_size = first.seed, int(rank), int(world_size)
        self.image_size, self.channels, self.num_workers = first.image_size, channels, num_workers
        self._ready = False

    def _source(self, name: str, options: dict, common: dict, download: bool):
        options = dict(options)
        loader = str(options.pop("source", name))
        options.setdefault("root", self.root)
        options.setdefault("download", download)
        return EpisodeDataModule(name=loader, **common, **options)

    # ----- data -----
    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        for part in self.parts.values():
            part.setup()
        first = next(iter(self.parts.values()))
        self.queries = first.queries  # queries=auto: resolved per source; the first's reported
        self._ready = True

    def preprocessing(self) -> Preprocessing:
        """One recipe for all sources (saved in checkpoints): their shared size and channels."""
        self.setup()
        first = next(iter(self.parts.values()))
        mean, std = first.norm if first.norm is not None else (None, None)
        return Preprocessing(
            self.name, self.image_size, self.channels, resize="lanczos", mean=mean, std=std
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    @property
    def num_classes(self) -> dict[str, int]:
        self.setup()
        lists = {"train": self.train_sources, "val": self.val_sources, "test": self.test_sources}
        return {
            split: sum(getattr(self.parts[n].splits, split).num_classes for n in names)
            for split, names in lists.items()
        }

    @property
    def splits(self):
        raise ConfigError(
            "data=mix has no single class list (algo=finetune pre-trains on one): train it on"
            " one source (data=<source>)"
        )

    # ----- datasets (served by EpisodeLoaders) -----
    def train_dataset(self) -> MixTrainMetaBatches:
        self.setup()
        rank, world_size = self.shard()
        parts = [self.parts[n].train_dataset() for n in self.train_sources]
        return MixTrainMetaBatches(
            self.train_sources,
            parts,
            self.probs,
            self.batches_per_epoch,
            split_meta_batch(self.meta_batch_size, world_size),
            self.seed,
            rank,
        )

    def eval_dataset(self, split: str) -> MixFixedEpisodes:
        """Every source's fixed episodes of ``split``, source after source; under DDP each
        rank a contiguous share of that sequence (so the gathered order is the same)."""
        self.setup()
        names = self.val_sources if split == "val" else self.test_sources
        episodes = self.val_episodes if split == "val" else self.test_episodes
        share = eval_share(split, episodes, *self.shard(), sources=len(names))
        parts = []
        for k, name in enumerate(names):
            full = self.parts[name].eval_dataset(split)  # all its episodes (its world_size 1)
            mine = [int(g) - k * episodes for g in share if k * episodes <= g < (k + 1) * episodes]
            if isinstance(full.index, EpisodeIndices):
                index = EpisodeIndices(*(a[mine] for a in full.index))
            else:
                index = [full.index[e] for e in mine]
            parts.append((name, FixedEpisodes(full.classes, index, full.shots, full.batch_size,
                                              full.norm)))  # fmt: skip
        return MixFixedEpisodes(parts)

    def episode_sources(self, stage: str) -> list[str]:
        """The source of each ``stage`` (val | test) episode, in the order all ranks' results
        are gathered: the algorithm's per-source metrics (``<stage>/acc/<source>``)."""
        names = self.val_sources if stage == "val" else self.test_sources
        episodes = self.val_episodes if stage == "val" else self.test_episodes
        return [name for name in names for _ in range(episodes)]


def by_source(values: torch.Tensor, sources: list[str], prefix: str) -> dict[str, float]:
    """``<prefix>/<source>`` and ``<prefix>_ci95/<source>``: the mean and 95 % CI of each
    source's episodes (``values`` in the order of ``sources``)."""
    from metalearn.algorithms.base import mean_ci95

    if len(sources) != len(values):
        return {}  # not the datamodule's episodes (e.g. a limit_test_batches run): no split
    out = {}
    for name in Counter(sources):
        mask = torch.tensor([s == name for s in sources], device=values.device)
        mean, ci = mean_ci95(values[mask])
        out[f"{prefix}/{name}"], out[f"{prefix}_ci95/{name}"] = mean, ci
    return out


def mix_info(data_cfg) -> dict:
    """What metrics.json says of a mixed run: its training, validation and test sources and
    weights (the report's cross-domain table is keyed by them); {} for one source."""
    if "train_sources" not in data_cfg:
        return {}
    train = [str(s) for s in data_cfg.train_sources]
    weights = data_cfg.get("weights")
    return {
        "train_sources": train,
        "test_sources": [str(s) for s in (data_cfg.get("test_sources") or train)],
        "source_weights": None if weights is None else [float(w) for w in weights],
    }
