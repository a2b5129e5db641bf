"""Label your own images with a trained model: ``python -m metalearn.adapt``.

Adapts a checkpoint to the labelled images of ``support/`` (one sub-folder per class) and labels
the images of ``query/``; writes ``predictions.csv`` and ``predictions.png``.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from metalearn.cli import configured_log_dir, default_output, flag, main_of, parse
from metalearn.errors import ConfigError

USAGE = """\
metalearn.adapt: adapt a trained model to your own labelled images and label new ones.

Usage:  python -m metalearn.adapt ckpt=<file> support=<dir> query=<dir> [option=value ...]

  ckpt=       a checkpoint a training run wrote (<run>/checkpoints/best-*.ckpt or last.ckpt)
  support=    one sub-folder per class, holding its labelled images:
                support/cat/1.jpg  support/cat/2.jpg  support/dog/1.png ...
              any number of classes (>= 2) and of images per class
  query=      the images to label: directly in the folder (labels unknown), and/or in
              sub-folders named after support classes (labels known: accuracy is printed)
  out=        where predictions.csv and predictions.png go (default:
              outputs/adapt/runs/<date>/<time>)
  invert=     auto (default: the training data's own rule, e.g. Omniglot's black-on-white PNGs
              are inverted), true or false: override it for drawings made another way
  head_init=  auto (default), prototypes or zeros: how a MAML/Reptile model's N-way head
              starts when the support set has another number of classes (docs/adapt.md)

Images: PNG, JPEG, BMP, WebP, ... of any size, grayscale or colour, turned upright by their
EXIF orientation (as phones store photos); each is converted as the model's training data was
(size, channels, polarity). The queries are scored as one batch.

Example:
  python -m metalearn.adapt ckpt=outputs/train/runs/2026-11-30/12-00-00/checkpoints/last.ckpt \\
      support=my_photos/support query=my_photos/query
"""


def visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def class_images(folder: Path) -> list[Path]:
    """The images of one class folder; a folder inside it is refused, not skipped (its images
    would be silently left out). A broken link is kept: decoding names it."""
    entries = visible(folder)
    nested = [p for p in entries if p.is_dir()]
    if nested:
        raise ConfigError(
            f"{nested[0]} is a folder inside the class folder {folder}: classes are one level "
            f"deep, so move its images up into {folder}/ (or make it a class of its own)"
        )
    return entries


def support_set(folder: Path) -> tuple[list[Path], list[str]]:
    """(files, class names) of support/<class>/<image>."""
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "no such folder"
        raise ConfigError(f"support={folder}: {what} (support= holds one sub-folder per class)")
    entries = visible(folder)
    classes = [p for p in entries if p.is_dir()]
    loose = [p.name for p in entries if not p.is_dir()]
    if not classes:
        raise ConfigError(
            f"support={folder} has no class sub-folders: put each class's labelled images in "
            f"its own folder ({folder}/<class>/<image>)"
        )
    if loose:
        raise ConfigError(
            f"support={folder} holds files outside class folders ({', '.join(loose[:3])}): "
            "move each into the sub-folder of its class"
        )
    if len(classes) < 2:
        raise ConfigError(
            f"support={folder} has one class ({classes[0].name}): a few-shot problem needs at "
            "least 2 classes, each in its own sub-folder"
        )
    files, labels = [], []
    for c in classes:
        images = class_images(c)
        if not images:
            raise ConfigError(f"{c} is empty: put at least one labelled image of '{c.name}' in it")
        files += images
        labels += [c.name] * len(images)
    return files, labels


def query_set(folder: Path, classes: list[str]) -> tuple[list[Path], list[str | None]]:
    """(files, true class or None) of query/<image> and query/<class>/<image>."""
    if folder.is_file():
        raise ConfigError(
            f"query={folder} is a file: put the images to label in a folder and pass the folder"
        )
    if not folder.is_dir():
        raise ConfigError(f"query={folder}: no such folder")
    files: list[Path] = []
    labels: list[str | None] = []
    for p in visible(folder):
        if not p.is_dir():
            files.append(p)
            labels.append(None)
        else:
            if p.name not in classes:
                raise ConfigError(
                    f"query sub-folder {p} names a class the support set does not have (its "
                    f"classes: {', '.join(classes)}): rename it, or move its images up into "
                    f"{folder}/ if their labels are unknown"
                )
            inside = class_images(p)
            files += inside
            labels += [p.name] * len(inside)
    if not files:
        raise ConfigError(f"query={folder} holds no images: put the images to label in it")
    return files, labels


def write_csv(path: Path, files, truth, prediction) -> None:
    """predictions.csv: file, predicted class, its probability, then each class's (and the true
    class and whether it was right, when known)."""
    known = any(t is not None for t in truth)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        out = csv.writer(f)
        header = ["file", "predicted", "probability"]
        header += [f"p({c})" for c in prediction.classes]
        out.writerow(header + (["label", "correct"] if known else []))
        for file, label, probs, t in zip(
            files, prediction.labels, prediction.probs, truth, strict=True
        ):
            row = [str(file), label, f"{float(probs.max()):.4f}"]
            row += [f"{float(p):.4f}" for p in probs]
            if known:
                row += [t or "", "" if t is None else str(t == label).lower()]
            out.writerow(row)
    os.replace(tmp, path)


def thumbnail(path: Path):
    import numpy as np

    from metalearn.data.transforms import to_pil

    im = to_pil(path, str(path)).convert("RGB")  # upright, as the model saw it
    im.thumbnail((96, 96))
    return np.asarray(im)


MAX_QUERIES_DRAWN = 100


def short(name, width: int = 16) -> str:
    text = str(name)
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]  # keep both ends


COLUMNS = 10


def draw(path: Path, support_files, support_labels, query_files, truth, prediction) -> None:
    """predictions.png: a row of support images per class, then the queries with their
    predicted class (green when right, red when wrong, black when the label is unknown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = prediction.classes
    per_class = {c: [f for f, lab in zip(support_files, support_labels, strict=True) if lab == c]
                 for c in classes}  # fmt: skip
    shown = min(len(query_files), MAX_QUERIES_DRAWN)
    columns = max(min(COLUMNS, max(len(v) for v in per_class.values())), min(COLUMNS, shown))
    query_rows = math.ceil(shown / columns)
    fig, axes = plt.subplots(
        len(classes) + query_rows,
        columns,
        figsize=(1.3 * columns + 2, 1.4 * (len(classes) + query_rows)),
        squeeze=False,
    )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for row, c in enumerate(classes):
        axes[row, 0].set_ylabel(short(c, 24), rotation=0, ha="right", va="center")
        for k, f in enumerate(per_class[c][:columns]):
            axes[row, k].imshow(thumbnail(f))
    for m in range(shown):
        ax = axes[len(classes) + m // columns, m % columns]
        ax.imshow(thumbnail(query_files[m]))
        label, p = prediction.labels[m], float(prediction.probs[m].max())
        colour = "black" if truth[m] is None else ("green" if truth[m] == label else "red")
        mark = "" if truth[m] is None else (" ✓" if truth[m] == label else " ✗")
        ax.set_title(f"{short(label)}\n{p:.0%}{mark}", fontsize=7, color=colour)
    title = "support (one row per class), then the queries with their predicted class"
    if shown < len(query_files):
        title += f" (first {shown} of {len(query_files)})"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def print_table(files, truth, prediction, accuracy: float | None, root: Path) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"predictions for {root}")
    table.add_column("file")
    table.add_column("predicted")
    table.add_column("probability", justify="right")
    known = any(t is not None for t in truth)
    if known:
        table.add_column("label")
    for f, label, probs, t in zip(files, prediction.labels, prediction.probs, truth, strict=True):
        name = f.relative_to(root) if f.is_relative_to(root) else f
        row = [escape(str(name)), escape(str(label)), f"{float(probs.max()):.1%}"]
        if known:
            mark = "" if t is None else (" ✓" if t == label else " ✗")
            row.append(escape(f"{t or '?'}{mark}"))
        table.add_row(*row)
    console = Console()
    console.print(table)
    if accuracy is not None:
        n = sum(t is not None for t in truth)
        console.print(f"accuracy on the {n} labelled queries: {accuracy:.1%}")


def adapt_folders(ckpt, support, query, out=None, invert=None, head_init="auto", show=True) -> dict:
    """Adapt ``ckpt`` to ``support/`` and label ``query/``; returns what was written and the
    accuracy (None without labelled queries). Everything is read and checked before anything
    is written."""
    from metalearn.learner import load

    support, query = Path(support), Path(query)
    if out and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(
            f"out={out} is a file: out= names the folder predictions.csv and .png go to"
        )
    support_files, support_labels = support_set(support)
    query_files, truth = query_set(query, sorted(set(support_labels)))
    learner = load(ckpt)
    adapted = learner.adapt(support_files, support_labels, invert=invert, head_init=head_init)
    prediction = adapted.predict(query_files)
    labelled = [(t, p) for t, p in zip(truth, prediction.labels, strict=True) if t is not None]
    accuracy = sum(t == p for t, p in labelled) / len(labelled) if labelled else None
    out = Path(out) if out else default_output("adapt", configured_log_dir())
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "predictions.csv", query_files, truth, prediction)
    draw(out / "predictions.png", support_files, support_labels, query_files, truth, prediction)
    if show:
        print_table(query_files, truth, prediction, accuracy, query)
        print(f"wrote {out / 'predictions.csv'} and {out / 'predictions.png'}")
    return {"out": out, "accuracy": accuracy, "prediction": prediction, "files": query_files}


def run(argv: list[str]) -> int:
    options = {"ckpt": None, "support": None, "query": None, "out": "", "invert": "auto"}
    opts, rest = parse(argv, {**options, "head_init": "auto"}, USAGE)
    if rest:
        raise ConfigError(f"unknown option(s) {', '.join(rest)} (see --help)")
    adapt_folders(
        opts["ckpt"],
        opts["support"],
        opts["query"],
        opts["out"] or None,
        flag("invert", opts["invert"]),
        opts["head_init"],
    )
    return 0


main = main_of(run)

if __name__ == "__main__":
    main()
