"""EpisodeDataModule: seeded meta-batches for training, fixed episode sets for val/test.

Training: item s = e * len + i is one whole meta-batch drawn from a Generator seeded by
(seed, rank, e, i) only. `StepSampler` (data/loading.py) yields s = the Trainer's global step
onwards, so the batch of each outer step is fixed by the step alone (it runs in the main
process, so the index reaches the dataset for any num_workers): batches are identical for any
num_workers, and a run resumed from any checkpoint, even one written mid-epoch, sees the same
batches.

Val/test: `val_episodes` / `test_episodes` fixed episodes seeded by (eval_seed, split, episode)
only, so every run and algorithm is scored on the same episodes; episode e is the same whatever
the total count. With DDP each rank gets a contiguous share (the shares partition all episodes).
Let the datamodule shard: run the Trainer with use_distributed_sampler=False. Under DDP the
rank and world size come from the attached Trainer, and `meta_batch_size` is the global
meta-batch: each rank draws meta_batch_size // world_size tasks (see metalearn.distributed).

``episodes`` (fixed | range | metadataset, data/shapes.py): with a varying mode every episode,
training or fixed, draws its own shape, and meta-batches are ragged ``Episodes`` (tuples of
per-episode tensors). A split with ``episode_groups`` (Omniglot's ``within_alphabet``) draws
each episode's classes from one group.

``unlabelled`` (data/unlabelled.py, off by default): each class's images are cut once into a
labelled part (support and query) and an unlabelled part, and every episode carries an
unlabelled set (``SemiEpisodes``) drawn from a Generator of its own.
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset

from metalearn.data.augment import Augment
from metalearn.data.episodes import (
    EpisodeIndices,
    Episodes,
    SemiEpisodes,
    as_indices,
    materialise,
    materialise_varying,
    sample_indices,
    seeded_rng,
)
from metalearn.data.loading import EpisodeLoaders, eval_share
from metalearn.data.shapes import EpisodeShapes, draw_episode
from metalearn.data.sources import check_source, files_of, load_splits
from metalearn.data.sources.base import ClassImages
from metalearn.data.splits import SPLIT_NAMES, Splits, check_disjoint, with_val_in_train
from metalearn.data.transforms import Preprocessing, normalise
from metalearn.data.unlabelled import (
    UNLABELLED_TAG,
    Unlabelled,
    check_fits,
    eval_unlabelled_indices,
    materialise_unlabelled,
    sample_unlabelled,
    split_labelled,
    with_unlabelled,
)
from metalearn.distributed import split_meta_batch
from metalearn.errors import ConfigError

EVAL_SPLIT_TAGS = {"val": 1, "test": 2}
AUTO_QUERIES = 15  # queries=auto: 15 per class, or what a class has left after the shots
AUGMENT_TAG = 7  # the augmentation's random stream: (seed, rank, epoch, i, AUGMENT_TAG)


class TrainMetaBatches(Dataset):
    """Item `epoch * length + i` is the meta-batch seeded by (seed, rank, epoch, i)."""

    def __init__(
        self,
        classes: ClassImages,
        length: int,
        meta_batch_size: int,
        ways,
        shots,
        queries,
        seed: int,
        rank: int = 0,
        norm: tuple | None = None,
        augment: Augment | None = None,
        shapes: EpisodeShapes | None = None,
        groups: np.ndarray | None = None,
        unlabelled: tuple[ClassImages, Unlabelled] | None = None,
    ):
        self.unlabelled = unlabelled  # (each class's unlabelled part, data.unlabelled) or None
        self.classes, self.length, self.meta_batch_size = classes, length, meta_batch_size
        self.ways, self.shots, self.queries, self.seed, self.rank = ways, shots, queries, seed, rank
        self.norm, self.augment = norm, augment
        self.shapes, self.groups = shapes, groups  # varying shapes / one group per episode

    def __len__(self) -> int:
        return self.length

    def indices(self, index: int) -> EpisodeIndices | list:
        epoch, i = divmod(int(index), self.length)
        rng = seeded_rng(self.seed, self.rank, epoch, i)
        c = self.classes
        if self.shapes is not None:
            return [
                draw_episode(rng, c.counts, self.shapes, self.groups)
                for _ in range(self.meta_batch_size)
            ]
        return sample_indices(
            rng, self.meta_batch_size, c.num_classes, c.counts, self.ways, self.shots, self.queries
        )

    def __getitem__(self, index: int) -> Episodes:
        drawn = self.indices(index)
        episodes = built(self.classes, drawn, self.shots)
        epoch, i = divmod(int(index), self.length)
        if self.augment is not None and self.augment.active:
            rng = seeded_rng(self.seed, self.rank, epoch, i, AUGMENT_TAG)
            episodes = episodes._replace(
                support_x=each(episodes.support_x, lambda x: self.augment(x, rng)),
                query_x=each(episodes.query_x, lambda x: self.augment(x, rng)),
            )
        episodes = normalised(episodes, self.norm)
        if self.unlabelled is None:
            return episodes
        images, spec = self.unlabelled
        rng = seeded_rng(self.seed, self.rank, epoch, i, UNLABELLED_TAG)
        x, y = materialise_unlabelled(
            images, sample_unlabelled(rng, drawn.classes, images.counts, spec), self.ways
        )
        if self.augment is not None and self.augment.active:
            x = self.augment(x, seeded_rng(self.seed, self.rank, epoch, i, AUGMENT_TAG,
                                           UNLABELLED_TAG))  # fmt: skip
        return with_unlabelled(episodes, normalise(x, self.norm), y)


def built(classes: ClassImages, drawn, shots: int) -> Episodes:
    """Episodes from ``EpisodeIndices`` or a list of ``shapes.Episode`` draws: regular when
    the draws share one N-way K-shot shape (fixed episodes from one group), else ragged."""
    if isinstance(drawn, EpisodeIndices):
        return materialise(classes, drawn, shots)
    if len({(ep.ways, *ep.shots, ep.queries) for ep in drawn}) == 1:
        return materialise(classes, as_indices(drawn), int(drawn[0].shots[0]))
    return materialise_varying(classes, drawn)


def each(x, fn):
    """``fn`` on a tensor, or on each tensor of a ragged field."""
    return fn(x) if torch.is_tensor(x) else tuple(fn(t) for t in x)


def normalised(episodes: Episodes, norm: tuple | None) -> Episodes:
    """Episodes with images normalised per channel by ``norm`` = (mean, std), if given."""
    if norm is None:
        return episodes
    return episodes._replace(
        support_x=each(episodes.support_x, lambda x: normalise(x, norm)),
        query_x=each(episodes.query_x, lambda x: normalise(x, norm)),
    )


def fixed_episode_indices(
    classes: ClassImages,
    episodes,
    ways,
    shots,
    queries,
    eval_seed: int,
    split: str,
    shapes: EpisodeShapes | None = None,
    groups: np.ndarray | None = None,
) -> EpisodeIndices | list:
    """Indices of episodes 0..episodes-1 of `split`; episode e seeded by (eval_seed, split, e).
    With ``shapes`` (varying) or ``groups``: a list of ``shapes.Episode``, each its own shape."""
    if shapes is not None:
        return [
            draw_episode(seeded_rng(eval_seed, EVAL_SPLIT_TAGS[split], e), classes.counts, shapes,
                         groups)
            for e in range(episodes)
        ]  # fmt: skip
    class_ids = np.zeros((episodes, ways), np.int64)
    image_ids = np.zeros((episodes, ways, shots + queries), np.int64)
    for e in range(episodes):
        rng = seeded_rng(eval_seed, EVAL_SPLIT_TAGS[split], e)
        drawn = sample_indices(rng, 1, classes.num_classes, classes.counts, ways, shots, queries)
        class_ids[e], image_ids[e] = drawn.classes[0], drawn.images[0]
    return EpisodeIndices(class_ids, image_ids)


class FixedEpisodes(Dataset):
    """Precomputed episode indices, served `batch_size` episodes per item, in a fixed order."""

    def __init__(
        self,
        classes: ClassImages,
        indices: EpisodeIndices | list,
        shots: int,
        batch_size: int,
        norm: tuple | None = None,
        unlabelled: tuple | None = None,
    ):
        self.unlabelled = unlabelled  # (unlabelled parts, UnlabelledIndices) or None
        self.classes, self.index, self.shots = classes, indices, shots
        self.batch_size, self.norm = batch_size, norm

    def __len__(self) -> int:
        return math.ceil(self.num_episodes / self.batch_size)

    @property
    def num_episodes(self) -> int:
        return len(self.index[0] if isinstance(self.index, EpisodeIndices) else self.index)

    def __getitem__(self, item: int) -> Episodes:
        if not 0 <= item < len(self):
            raise IndexError(item)
        part = slice(item * self.batch_size, (item + 1) * self.batch_size)
        if isinstance(self.index, EpisodeIndices):
            indices = EpisodeIndices(*(a[part] for a in self.index))
        else:
            indices = self.index[part]
        episodes = normalised(built(self.classes, indices, self.shots), self.norm)
        if self.unlabelled is None:
            return episodes
        images, drawn = self.unlabelled
        x, y = materialise_unlabelled(images, type(drawn)(*(a[part] for a in drawn)),
                                      indices.classes.shape[1])  # fmt: skip
        return with_unlabelled(episodes, normalise(x, self.norm), y)

    def shapes(self) -> list[tuple[int, float]]:
        """(ways, support images per class) of every episode, in order."""
        if isinstance(self.index, EpisodeIndices):
            ways = self.index.classes.shape[1]
            return [(ways, float(self.shots))] * len(self.index.classes)
        return [(ep.ways, float(ep.shots.mean())) for ep in self.index]


def at_least(minimum: int, **values) -> None:
    for key, value in values.items():
        if int(value) < minimum:
            raise ConfigError(f"data.{key}={value}: it must be at least {minimum}")


class EpisodeDataModule(EpisodeLoaders, L.LightningDataModule):
    """Few-shot episodes of dataset `name` (see `metalearn.data.sources.SOURCES`)."""

    def __init__(
        self,
        name: str,
        root: str,
        ways: int,
        shots: int,
        queries: int | str,
        meta_batch_size: int,
        batches_per_epoch: int = 100,
        val_episodes: int = 600,
        test_episodes: int = 600,
        eval_batch_size: int = 25,
        seed: int = 0,
        eval_seed: int = 0,
        num_workers: int | str = "auto",
        image_size: int | None = 28,
        rotations: bool = False,
        samples_per_class: int | None = None,
        split_seed: int = 0,
        download: bool = True,
        rank: int = 0,
        world_size: int = 1,
        channels: int | None = None,
        normalize=None,
        augment: dict | None = None,
        train_ways: int | None = None,
        train_queries: int | str | None = None,
        episodes: str = "fixed",
        ways_range: list | tuple = (5, 20),
        shots_range: list | tuple = (1, 5),
        metadataset: dict | None = None,
        unlabelled: dict | None = None,
        train_on_val: bool = False,
        **source_options,
    ):
        super().__init__()
        if train_on_val and val_episodes:
            raise ConfigError(
                f"data.train_on_val=true meta-trains on the validation classes, so validating "
                f"on them would score training classes: set data.val_episodes=0 (it is "
                f"{val_episodes}) and trainer.max_steps to the best step of a run with validation"
            )
        self.train_on_val = bool(train_on_val)
        # semi-supervised episodes (data/unlabelled.py); per_class=0: off, nothing changes
        self.unlabelled = Unlabelled(**dict(unlabelled or {}))
        if self.unlabelled.active and episodes != "fixed":
            raise ConfigError(
                f"data.unlabelled adds unlabelled sets to fixed N-way K-shot episodes only: set "
                f"data.episodes=fixed (it is {episodes}) or data.unlabelled.per_class=0"
            )
        self.unlabelled_splits: Splits | None = None  # each class's unlabelled part, in setup
        # the varying shapes' bounds are checked now; `queries` joins them in setup
        self.episode_spec = dict(
            mode=episodes,
            ways_range=tuple(int(v) for v in ways_range),
            shots_range=tuple(int(v) for v in shots_range),
            **dict(metadataset or {}),
        )
        EpisodeShapes(**self.episode_spec)
        if episodes != "fixed" and (train_ways is not None or train_queries is not None):
            raise ConfigError(
                f"data.episodes={episodes} draws every episode's shape: set data.train_ways"
                " and data.train_queries to null (they shape fixed training episodes only)"
            )
        check_source(name, source_options)
        # training episodes may have their own shape (ProtoNet: Snell et al. train 60-way with
        # 5 queries, test 5-way with 15); None: the evaluation episodes' ways / queries
        self.train_ways_key = "ways" if train_ways is None else "data.train_ways"
        train_ways = ways if train_ways is None else train_ways
        train_queries = queries if train_queries is None else train_queries
        at_least(
            1,
            ways=ways,
            shots=shots,
            queries=1 if queries == "auto" else queries,
            train_ways=train_ways,
            train_queries=1 if train_queries == "auto" else train_queries,
            meta_batch_size=meta_batch_size,
            batches_per_epoch=batches_per_epoch,
            eval_batch_size=eval_batch_size,
            image_size=image_size or 1,
            world_size=world_size,
        )
        if channels not in (None, 1, 3):
            raise ConfigError(f"data.channels={channels}: use 1 (grayscale), 3 (RGB) or null")
        at_least(
            0,
            seed=seed,
            eval_seed=eval_seed,
            split_seed=split_seed,
            val_episodes=val_episodes,
            test_episodes=test_episodes,
        )
        if num_workers != "auto" and (not str(num_workers).isdigit()):
            raise ConfigError(f"data.num_workers={num_workers}: use 'auto' or an integer >= 0")
        if not 0 <= rank < world_size:
            raise ConfigError(f"data.rank={rank} must be in 0..world_size-1 ({world_size - 1})")
        # no save_hyperparameters(): keys like `name`/`seed` would clash with the algorithm's
        self.name, self.root = name, str(root)
        self.ways, self.shots = int(ways), int(shots)
        self.queries: int | str = queries if queries == "auto" else int(queries)  # see setup
        self.train_ways = int(train_ways)
        self.train_queries = train_queries if train_queries == "auto" else int(train_queries)
        self.meta_batch_size, self.batches_per_epoch = int(meta_batch_size), int(batches_per_epoch)
        self.val_episodes, self.test_episodes = int(val_episodes), int(test_episodes)
        self.eval_batch_size, self.num_workers = int(eval_batch_size), num_workers
        self.seed, self.eval_seed, self.split_seed = int(seed), int(eval_seed), int(split_seed)
        self.image_size: int | None = None if image_size is None else int(image_size)
        self.rotations, self.download = rotations, download
        self.samples_per_class = samples_per_class
        self.rank, self.world_size = int(rank), int(world_size)
        self.channels: int | None = channels  # null: the source's (resolved in setup)
        self.normalize = normalize
        self.norm: tuple | None = None  # (mean, std) per channel, resolved in setup
        self.augment = Augment(**(augment or {}))
        self.source_options = source_options  # the source's own keys (conf/data/<name>.yaml)
        self._splits: Splits | None = None
        self.shapes: EpisodeShapes | None = None  # varying (or grouped) episodes, in setup
        self.train_shapes: EpisodeShapes | None = None

    # ----- data -----
    def setup(self, stage: str | None = None) -> None:
        """Load the splits once and check they can serve the configured episodes."""
        if self._splits is not None:
            return
        splits = load_splits(
            self.name,
            self.root,
            image_size=self.image_size,
            rotations=self.rotations,
            samples_per_class=self.samples_per_class,
            split_seed=self.split_seed,
            download=self.download,
            channels=self.channels,
            **self.source_options,
        )
        if self.train_on_val:
            splits = with_val_in_train(splits)
        full_train = splits.train  # normalize=auto: from all meta-train images
        if self.unlabelled.active:
            if splits.episode_groups:
                raise ConfigError(
                    "data.unlabelled does not draw episodes within one alphabet yet: set "
                    "data.within_alphabet=false or data.unlabelled.per_class=0"
                )
            splits, unlabelled = split_labelled(
                splits, self.unlabelled.labelled_fraction, self.split_seed
            )
            check_fits(unlabelled, self.unlabelled)
            self.unlabelled_splits = unlabelled
        self._check(splits)
        # train_on_val: val is inside train by design, and train/test covers val/test
        check_disjoint(splits, ("train", "test") if self.train_on_val else SPLIT_NAMES)
        self._resolve_shapes(splits)
        self.image_size, self.channels = splits.train.image_size, splits.train.channels
        self.norm = resolve_normalize(self.normalize, full_train)
        self._splits = splits

    def _resolve_shapes(self, splits: Splits) -> None:
        """The EpisodeShapes the samplers draw with: None for plain fixed episodes (the
        original sampler, unchanged), else the mode's bounds (or fixed episodes drawn from
        one group); checked against the data by drawing one episode per split."""
        spec = self.episode_spec
        if spec["mode"] == "fixed" and not splits.episode_groups:
            return
        common = dict(spec, ways=self.ways, shots=self.shots, queries=self.queries)
        self.shapes = EpisodeShapes(**common)
        self.train_shapes = EpisodeShapes(
            **{**common, "ways": self.train_ways, "queries": self.train_queries}
        )
        for name, classes in splits.items():
            shapes = self.train_shapes if name == "train" else self.shapes
            draw_episode(seeded_rng(0), classes.counts, shapes, self.groups(classes, splits))

    @staticmethod
    def groups(classes: ClassImages, splits: Splits) -> np.ndarray | None:
        return np.asarray(classes.groups) if splits.episode_groups else None

    def _check(self, splits: Splits) -> None:
        if self.episode_spec["mode"] != "fixed":
            return self._check_varying(splits)
        # ways must fit the smallest split it draws from; data.train_ways, when set, the train
        # split only (named as the user wrote it, so the message says which key to lower)
        own = self.train_ways_key == "data.train_ways"
        checks = [("ways", self.ways, [s for s in splits.items() if not (own and s[0] == "train")])]
        if own:
            checks.append(("data.train_ways", self.train_ways, [("train", splits.train)]))
        for key, ways, candidates in checks:
            split, classes = min(candidates, key=lambda item: item[1].num_classes)
            if ways > classes.num_classes:
                raise ConfigError(
                    f"data={self.name} {split} split has {classes.num_classes} classes but"
                    f" {key}={ways}: lower {key} to at most {classes.num_classes}"
                    + (" (or set data.rotations=true)" if not self.rotations else "")
                )
        self.queries = self._resolve_queries(self.queries, "queries", splits)
        self.train_queries = self._resolve_queries(self.train_queries, "data.train_queries", splits)

    def _check_varying(self, splits: Splits) -> None:
        """Range: the widest episode fits every split and the most shots + queries every class;
        metadataset: its own query rule needs two images per class."""
        spec = EpisodeShapes(**self.episode_spec)
        split, classes = min(splits.items(), key=lambda item: item[1].num_classes)
        key = "data.ways_range" if spec.mode == "range" else "data.metadataset.min_ways"
        if spec.fewest_ways() > classes.num_classes:
            raise ConfigError(
                f"data={self.name} {split} split has {classes.num_classes} classes but {key} "
                f"asks for at least {spec.fewest_ways()}: lower it"
            )
        if spec.mode == "metadataset":
            self.queries = self.train_queries = spec.max_queries  # a bound: q is drawn per episode
            least = min(c.images_per_class for _, c in splits.items())
            if least < 2:
                raise ConfigError(
                    f"data.episodes=metadataset needs 2 images per class (one support, one "
                    f"query); data={self.name} has a class of {least}"
                )
            return
        shots, self.shots = self.shots, spec.shots_range[1]  # queries must fit the most shots
        try:
            self.queries = self._resolve_queries(self.queries, "queries", splits)
        finally:
            self.shots = shots
        self.train_queries = self.queries

    def _resolve_queries(self, queries: int | str, key: str, splits: Splits) -> int:
        """``auto``: AUTO_QUERIES or what the smallest class has left after the shots; checked
        to fit every class (the too-small class is named when classes differ in size)."""
        split, classes = min(splits.items(), key=lambda item: item[1].images_per_class)
        per_class = classes.images_per_class
        smallest = classes.names[int(np.argmin(classes.counts))]
        has = (
            f"data={self.name}: class {smallest!r} of the {split} split has {per_class} images"
            if classes.ragged
            else f"data={self.name} has {per_class} images per class"
        )
        if queries == "auto":
            if self.shots >= per_class:
                raise ConfigError(
                    f"{has} but shots={self.shots}: lower shots, leaving images for the queries"
                )
            queries = min(AUTO_QUERIES, per_class - self.shots)
        if self.shots + queries > per_class:
            raise ConfigError(
                f"{has} but shots+{key} ="
                f" {self.shots}+{queries} = {self.shots + queries}: lower {key} or shots"
                + (", or raise data.samples_per_class" if self.samples_per_class else "")
                + (", or remove the classes smaller than that" if classes.ragged else "")
            )
        return queries

    @property
    def splits(self) -> Splits:
        self.setup()
        return self._splits

    def preprocessing(self) -> Preprocessing:
        """How this source's images become model inputs (saved in checkpoints)."""
        self.setup()
        mean, std = self.norm if self.norm is not None else (None, None)
        files = files_of(self.name, self.source_options)
        return Preprocessing(self.name, self.image_size, self.channels, **files, mean=mean, std=std)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        self.setup()
        return (self.channels, self.image_size, self.image_size)

    @property
    def num_classes(self) -> dict[str, int]:
        return {split: c.num_classes for split, c in self.splits.items()}

    # ----- datasets (served by EpisodeLoaders) -----
    def train_dataset(self) -> TrainMetaBatches:
        # meta_batch_size is global: each rank samples its share, seeded by (seed, rank, ...)
        rank, world_size = self.shard()
        return TrainMetaBatches(
            self.splits.train,
            self.batches_per_epoch,
            split_meta_batch(self.meta_batch_size, world_size),
            self.train_ways,
            self.shots,
            self.train_queries,
            self.seed,
            rank,
            self.norm,
            self.augment,
            self.train_shapes,
            self.groups(self.splits.train, self.splits),
            self._unlabelled_of("train"),
        )

    def _unlabelled_of(self, split: str) -> tuple[ClassImages, Unlabelled] | None:
        if not self.unlabelled.active:
            return None
        return getattr(self.unlabelled_splits, split), self.unlabelled

    def eval_dataset(self, split: str) -> FixedEpisodes:
        episodes = self.val_episodes if split == "val" else self.test_episodes
        indices = fixed_episode_indices(
            getattr(self.splits, split),
            episodes,
            self.ways,
            self.shots,
            self.queries,
            self.eval_seed,
            split,
            self.shapes,
            self.groups(getattr(self.splits, split), self.splits),
        )
        share = eval_share(split, episodes, *self.shard())
        unlabelled = self._unlabelled_of(split)
        if unlabelled is not None:
            images, spec = unlabelled
            drawn = eval_unlabelled_indices(
                images, indices.classes, spec, self.eval_seed, EVAL_SPLIT_TAGS[split]
            )
            unlabelled = (images, type(drawn)(*(a[share] for a in drawn)))
        if isinstance(indices, EpisodeIndices):
            indices = EpisodeIndices(*(a[share] for a in indices))
        else:
            indices = [indices[i] for i in share]
        classes = getattr(self.splits, split)
        return FixedEpisodes(
            classes, indices, self.shots, self.eval_batch_size, self.norm, unlabelled
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """An unlabelled set reaches only the algorithms that declare ``uses_unlabelled``;
        every other one gets the plain labelled ``Episodes`` it always had."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if isinstance(batch, SemiEpisodes) and not getattr(module, "uses_unlabelled", False):
            return batch.labelled()
        return batch


def resolve_normalize(normalize, train: ClassImages) -> tuple | None:
    """(mean, std) per channel: null = none; "auto" = the meta-train images' (so no val/test
    pixel informs training); or [[mean, ...], [std, ...]] as given."""
    if normalize in (None, False, "none"):
        return None
    if normalize == "auto":  # in chunks: mini-ImageNet's pixels in float64 would be 1 GB
        total = np.zeros(train.channels)
        squares = np.zeros(train.channels)
        for start in range(0, len(train.pixels), 1024):
            x = train.pixels[start : start + 1024].astype(np.float64) / 255.0
            total += x.sum(axis=(0, 2, 3))
            squares += (x**2).sum(axis=(0, 2, 3))
        n = len(train.pixels) * train.image_size * train.pixels.shape[2]
        mean = total / n
        std = np.sqrt(np.maximum(squares / n - mean**2, 1e-12))
        return tuple(round(float(m), 6) for m in mean), tuple(round(float(v), 6) for v in std)
    try:
        mean, std = ([float(v) for v in part] for part in normalize)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"data.normalize={normalize!r}: use null, auto, or [[mean per channel], [std per "
            "channel]]"
        ) from err
    if len(mean) != train.channels or len(std) != train.channels or min(std) <= 0:
        raise ConfigError(
            f"data.normalize: {train.channels} channel(s) need {train.channels} means and "
            f"{train.channels} positive stds, got {mean} and {std}"
        )
    return tuple(mean), tuple(std)
