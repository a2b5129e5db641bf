"""Draw one episode to a PNG: `python -m metalearn.show_episode data=quickdraw ways=5 shots=1`.

Rows 1..N: the K support images of label 0..N-1 (class name on the left); below them the query
images titled with their labels. Options: `out=path.png` (default: episode.png in the run
directory, outputs/show_episode/runs/<date>/<time>: `task_name=show_episode`, so that
`metalearn.report outputs/` does not take it for a training job) and `split=val|test|train`
(default val: the first fixed val episode, seeded by data.eval_seed; train: the first
episode of the first training meta-batch).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import hydra
import matplotlib
from omegaconf import DictConfig

from metalearn.cli import full_error, print_error
from metalearn.data.episodes import EpisodeIndices, materialise, materialise_varying
from metalearn.errors import ConfigError, MetalearnError
from metalearn.paths import conf_dir

QUERY_COLUMNS = 10
SUPPORT_COLUMNS = 10  # varying episodes can have 100 images a class
MAX_QUERIES = 50
SPLITS = ("val", "test", "train")
TASK_NAME = "show_episode"


def episode_figure(support: list, query_x, query_y, class_names: list[str]):
    """A matplotlib Figure of one episode: ``support[i]`` the images of class i [K_i, H, W(, 3)]
    (K_i may differ per class), query [M, H, W(, 3)] with labels. Large varying episodes are
    shown in part (at most SUPPORT_COLUMNS images a class, MAX_QUERIES queries), and say so."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ways, shots = len(support), [len(s) for s in support]
    shown = min(len(query_x), MAX_QUERIES)
    columns = max(min(max(shots), SUPPORT_COLUMNS), min(QUERY_COLUMNS, shown))
    query_rows = math.ceil(shown / columns)
    fig, axes = plt.subplots(
        ways + query_rows,
        columns,
        figsize=(1.2 * columns + 2, 1.2 * (ways + query_rows)),
        squeeze=False,
    )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for label, images in enumerate(support):
        more = f" (+{len(images) - columns})" if len(images) > columns else ""
        axes[label, 0].set_ylabel(f"{label}: {class_names[label]}{more}", rotation=0, ha="right")
        for k, image in enumerate(images[:columns]):
            show(axes[label, k], image)
    for m, (image, label) in enumerate(zip(query_x[:shown], query_y[:shown], strict=True)):
        ax = axes[ways + m // columns, m % columns]
        show(ax, image)
        ax.set_title(f"query: {int(label)}", fontsize=8)
    k = f"{shots[0]}-shot" if len(set(shots)) == 1 else f"{min(shots)}-{max(shots)}-shot"
    queries = f"first {shown} of {len(query_x)} queries" if shown < len(query_x) else "queries"
    fig.suptitle(f"{ways}-way {k} episode (support rows, then {queries})")
    fig.tight_layout()
    return fig


def displayable(x):
    """[n, C, H, W] in [0, 1] -> [n, H, W] (grayscale) or [n, H, W, 3] (colour) for imshow."""
    return x[:, 0].numpy() if x.shape[1] == 1 else x.permute(0, 2, 3, 1).numpy()


def show(ax, image) -> None:
    """Grayscale drawings ink-dark on white paper (they are stored ink-high); colour as is."""
    if image.ndim == 2:
        ax.imshow(image, cmap="gray_r", vmin=0, vmax=1)
    else:
        ax.imshow(image.clip(0, 1))


def render_episode(cfg: DictConfig) -> Path:
    """Instantiate cfg.data, draw one episode of `split`, save the PNG; returns its path."""
    split = cfg.get("split", "val")
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: choose one of {', '.join(SPLITS)}")
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup()
    if split == "train":  # the first episode of the first training meta-batch
        drawn = datamodule.train_dataset().indices(0)
    else:  # the first fixed val/test episode
        drawn = datamodule.eval_dataset(split).index
    classes = getattr(datamodule.splits, split)
    if isinstance(drawn, EpisodeIndices):  # every episode N-way K-shot
        indices = EpisodeIndices(*(a[:1] for a in drawn))
        episode, ids = materialise(classes, indices, datamodule.shots), indices.classes[0]
    else:  # data.episodes=range|metadataset: each episode its own shape
        episode, ids = materialise_varying(classes, drawn[:1]), drawn[0].classes
    # raw pixels in [0, 1], not normalised
    support_x, support_y, query_x, query_y = (field[0] for field in episode)
    support = [displayable(support_x[support_y == label]) for label in range(len(ids))]
    names = [classes.names[c] for c in ids]
    fig = episode_figure(support, displayable(query_x), query_y.numpy(), names)
    out = Path(cfg.get("out") or Path(_run_dir()) / "episode.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    matplotlib.pyplot.close(fig)
    return out.resolve()


def _run_dir() -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except ValueError:  # not running under @hydra.main
        return "."


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        print(render_episode(cfg))
    except MetalearnError as err:  # one message naming the fix, as the other commands give
        if full_error():
            raise
        print_error(err)
        raise SystemExit(1) from None


USAGE = """\
metalearn.show_episode: draw one few-shot episode to a PNG.

Usage:  python -m metalearn.show_episode [out=episode.png] [split=val|test|train] [key=value ...]

  out=     the PNG to write (default: episode.png in outputs/show_episode/runs/<date>/<time>/)
  split=   val (default: the first fixed validation episode), test, or train (the first
           episode of the first training meta-batch)
  any training setting: data=quickdraw, data=folder data.root=<your images>, ways=, shots=, ...
"""


def cli() -> None:
    """``--help`` of its own; ``out=``/``split=`` without Hydra's ``+``."""
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(USAGE)
        return
    args = ["+" + a if a.split("=", 1)[0] in ("out", "split") else a for a in sys.argv[1:]]
    if not any(a.split("=", 1)[0] == "task_name" for a in args):
        args.insert(0, f"task_name={TASK_NAME}")  # its own tree of run directories
    sys.argv[1:] = args
    main()


if __name__ == "__main__":
    cli()
