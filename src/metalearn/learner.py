"""A checkpoint as a usable few-shot model: load it, adapt it to a support set, predict.

    learner = metalearn.load("outputs/.../checkpoints/best-epoch005-step600.ckpt")
    adapted = learner.adapt(["cat1.jpg", "cat2.jpg", "dog1.jpg", "dog2.jpg"],
                            ["cat", "cat", "dog", "dog"])
    result = adapted.predict(["unknown1.jpg", "unknown2.jpg"])
    result.labels, result.probs          # ['dog', 'cat'], tensor [2, 2]

``load`` rebuilds the algorithm from the settings the checkpoint holds (no config needed) and
reads it with ``torch.load(weights_only=True)``: a checkpoint someone sent cannot run code.
``adapt`` runs the algorithm's own test-time procedure (``EpisodicModule.query_logits``, the
very function its test accuracy came from) on the support set, with any number of classes
and of images per class; images go through the training source's preprocessing
(``metalearn.data.transforms.prepare``).
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metalearn.algorithms import heads
from metalearn.algorithms.base import CHECKPOINT_FORMAT, EpisodicModule
from metalearn.data.episodes import Episodes
from metalearn.data.transforms import Preprocessing, prepare
from metalearn.errors import ConfigError, MetalearnError

log = logging.getLogger(__name__)


class CheckpointError(MetalearnError, ValueError):
    """A file that cannot be loaded as a metalearn model."""


# ---- loading ---------------------------------------------------------------------------------
def read_checkpoint(path, map_location="cpu") -> dict:
    """The checkpoint's contents, read without running code (``weights_only=True``)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(folder_message(path))
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no such checkpoint (a run writes them to <run dir>/checkpoints/, e.g. "
            "best-*.ckpt or last.ckpt)"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(path):  # torch.save writes a zip: this is another file
            raise CheckpointError(
                f"{path} is not a torch checkpoint: load a best-*.ckpt or last.ckpt from a "
                "run's checkpoints/ folder"
            ) from err
        raise CheckpointError(
            f"{path} was refused: it holds Python objects beyond tensors and plain data, which "
            "could run code when loaded. A metalearn checkpoint holds none; if you trust its "
            f"author, ask them for the checkpoint as the run wrote it ({err})"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or not a torch file: {err}): copy "
            "it again from the run's checkpoints/ folder"
        ) from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("metalearn"), dict):
        raise CheckpointError(
            f"{path} is not a metalearn checkpoint (no 'metalearn' entry): load a best-*.ckpt or "
            "last.ckpt that `python train.py` wrote"
        )
    return ckpt


def folder_message(folder: Path) -> str:
    """What to pass instead of a run directory (or its checkpoints/ folder)."""
    found = sorted(folder.glob("*.ckpt")) or sorted(folder.glob("checkpoints/*.ckpt"))
    if not found:
        return (
            f"{folder} is a folder without checkpoints: pass a checkpoint file, "
            "<run dir>/checkpoints/best-*.ckpt or last.ckpt"
        )
    return f"{folder} is a folder: pass one of its checkpoints, e.g. " + " or ".join(
        str(f) for f in found[:3]
    )


def unflatten(flat: dict) -> dict:
    """{'algo.inner_lr': 0.4, ...} -> {'algo': {'inner_lr': 0.4}, ...}."""
    nested: dict = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def settings_of(ckpt: dict, path) -> dict:
    state = ckpt["metalearn"]
    version = state.get("format", 1)
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} was written by a newer metalearn (checkpoint format {version}; this one "
            f"reads up to {CHECKPOINT_FORMAT}): upgrade metalearn (pip install -U metalearn)"
        )
    config = state.get("config")
    if not config or "algo._target_" not in config or "model._target_" not in config:
        raise CheckpointError(
            f"{path} was written by a metalearn too old to record its settings: retrain it, or "
            "resume it once with `python train.py ckpt_path=...` and the run's own settings"
        )
    return config


def preprocessing_of(ckpt: dict, config: dict) -> Preprocessing | None:
    """The checkpoint's preprocessing; for checkpoints written before it was saved, the
    source's own (they were all grayscale Omniglot or Quick Draw); None for a model of points
    (a regression task such as data=sinusoid), which has no image preprocessing."""
    saved = ckpt["metalearn"].get("preprocessing")
    if saved:
        return Preprocessing.from_dict(saved)
    if ckpt["metalearn"].get("task", "classification") != "classification":
        return None
    from metalearn.data.sources import FILES

    name = config.get("data.name", "omniglot")
    return Preprocessing(name, int(config.get("data.image_size", 28)), 1, **FILES[name])


def load(path, map_location="cpu", expect: type | None = None) -> EpisodicModule:
    """The trained learner in ``path`` (any checkpoint a run wrote), in eval mode.

    ``expect``: the algorithm class the caller wants (``<AlgoClass>.load_from_checkpoint``).
    """
    from omegaconf import OmegaConf

    from metalearn.instantiate import build

    ckpt = read_checkpoint(path, map_location)
    config = settings_of(ckpt, path)
    cfg = OmegaConf.create(unflatten(config))
    try:
        learner = build(cfg.algo, model=build(cfg.model), engine=build(cfg.engine))
    except MetalearnError:
        raise
    except Exception as err:  # e.g. a class this version no longer has
        raise CheckpointError(
            f"{path} cannot be rebuilt by this metalearn ({type(err).__name__}: {err}): use the "
            "metalearn version that trained it"
        ) from err
    if expect is not None and not isinstance(learner, expect):
        raise CheckpointError(
            f"{path} holds a {type(learner).__name__} (algo={config.get('algo.name')}), not a "
            f"{expect.__name__}: use metalearn.load(path), which loads any algorithm"
        )
    learner.on_load_checkpoint(ckpt)
    try:
        learner.load_state_dict(ckpt["state_dict"])
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(
            f"{path}: its weights do not fit the network its settings describe ({err}): the "
            "file was edited or written by an incompatible metalearn"
        ) from err
    learner.run_config = config
    preprocessing = preprocessing_of(ckpt, config)
    learner.preprocessing = preprocessing and preprocessing.to_dict()
    learner.checkpoint_path = str(path)
    learner.trained_steps = ckpt.get("global_step")
    if map_location is not None:
        learner.to(map_location)
    return learner.eval()


# ---- adapting and predicting -----------------------------------------------------------------
@dataclass
class Prediction:
    """Predictions for n query images over the adapted classes."""

    probs: torch.Tensor  # [n, N] class probabilities (softmax of the logits)
    indices: torch.Tensor  # [n] the most probable class index
    labels: list  # [n] its class name (from ``classes``)
    classes: list  # N class names, index order

    def __len__(self) -> int:
        return len(self.labels)


class Adaptation:
    """A learner adapted to a support set. ``predict(images)`` labels query images.

    The algorithm's test-time procedure (inner-loop steps, prototypes, a fitted head) runs on
    the support set and the query batch together, exactly as in evaluation; it is deterministic,
    so every call gives the same result for the same images. With transductive BatchNorm (the
    MAML default) the query images are normalised as one batch, as in training and testing:
    predict the images of one problem together.
    """

    def __init__(self, learner, support_x, support_y, classes: list, head_init: str, invert):
        self.learner, self.support_x, self.support_y = learner, support_x, support_y
        self.classes, self.head_init, self.invert = classes, head_init, invert
        self.said: set = set()  # conversion notes logged already (each is said once)

    @property
    def ways(self) -> int:
        return len(self.classes)

    def logits(self, query_x: torch.Tensor) -> torch.Tensor:
        learner = self.learner
        episode = Episodes(
            self.support_x[None],
            self.support_y[None],
            query_x[None],
            torch.zeros(1, len(query_x), dtype=torch.int64, device=query_x.device),
        )
        before, learner.head_init = learner.head_init, self.head_init
        was_training = learner.training
        learner.eval()
        try:
            with torch.enable_grad():  # the inner loops differentiate, even under no_grad
                return learner.query_logits(episode)[0]
        finally:
            learner.head_init = before
            learner.train(was_training)

    def predict(self, images, invert: bool | None = None) -> Prediction:
        """Class probabilities and labels of query ``images`` (paths, PIL images, arrays or
        tensors, as for ``adapt``)."""
        notes: set = set()
        x = inputs(self.learner, images, self.invert if invert is None else invert, notes)
        say(notes - self.said)
        self.said |= notes
        probs = self.logits(x).float().softmax(-1).cpu()
        indices = probs.argmax(-1)
        labels = [self.classes[int(i)] for i in indices]
        return Prediction(probs, indices, labels, list(self.classes))


def inputs(learner, images, invert, notes: set) -> torch.Tensor:
    spec = Preprocessing.from_dict(learner.preprocessing)
    x = prepare(images, spec, invert, notes)
    param = next(learner.parameters())
    return x.to(param.device, param.dtype)


def say(notes: set) -> None:
    for note in sorted(notes):
        log.warning("%s", note)


def adapt(
    learner: EpisodicModule,
    images,
    labels: Sequence,
    *,
    invert: bool | None = None,
    head_init: str = "auto",
) -> Adaptation:
    """Adapt ``learner`` to a support set: ``images[i]`` is an example of class ``labels[i]``.

    Any number of classes (>= 2) and of images per class. Class names may be any sortable
    values, in a list or a 1-D tensor/array (an episode's ``support_y``); their sorted order
    is the index order of ``Prediction.probs``. ``invert`` overrides the training source's
    polarity rule (see ``metalearn.data.transforms.prepare``).
    ``head_init``: how an N-way head starts for another number of classes
    (``metalearn.algorithms.heads``: auto, prototypes, zeros, trained).
    """
    heads.check_head_init(head_init)
    # a tensor's elements hash by identity (each its own class); plain values compare
    labels = labels.tolist() if isinstance(labels, torch.Tensor | np.ndarray) else list(labels)
    notes: set = set()
    x = inputs(learner, images, invert, notes)
    if len(x) != len(labels):
        raise ConfigError(f"{len(x)} support images but {len(labels)} labels: give one per image")
    try:
        classes = sorted(set(labels))
    except TypeError as err:
        raise ConfigError(f"labels must be mutually sortable (all str or all int): {err}") from err
    if len(classes) < 2:
        raise ConfigError(
            f"the support set has {len(classes)} class ({classes}): a few-shot problem needs at "
            "least 2 classes, each with at least one labelled image"
        )
    say(notes)
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[label] for label in labels], dtype=torch.int64, device=x.device)
    adaptation = Adaptation(learner, x, y, classes, head_init, invert)
    adaptation.said = notes
    if learner.trained_head:  # head_init=trained needs the trained number of classes
        heads.resolved(head_init, learner.model, len(classes))
    return adaptation
