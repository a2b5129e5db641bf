"""metalearn: meta-learning experiments on real few-shot data with Lightning + Hydra."""

__version__ = "0.1.0"

__all__ = ["load"]


def load(path, map_location="cpu"):
    """The trained learner in a checkpoint a run wrote: ``.adapt(images, labels).predict(...)``
    (see metalearn.learner)."""
    from metalearn.learner import load as load_learner

    return load_learner(path, map_location=map_location)
