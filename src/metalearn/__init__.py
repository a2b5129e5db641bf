"""metalearn: meta-learning experiments on real few-shot data with Lightning + Hydra."""

__version__ = "0.1.0"
