"""``python -m metalearn``: the commands metalearn offers."""

# console script -> (its `python -m` twin in a checkout, arguments, what it does); the
# console scripts themselves are declared in pyproject.toml's [project.scripts]
COMMANDS = {
    "metalearn-train": ("python train.py", "[key=value ...]", "train and test (a sweep with -m)"),
    "metalearn-report": ("python -m metalearn.report", "<dir>", "results table and curves"),
    "metalearn-adapt": (
        "python -m metalearn.adapt",
        "ckpt= support= query=",
        "label your own images with a model",
    ),
    "metalearn-evaluate": (
        "python -m metalearn.evaluate",
        "ckpt= [key=value ...]",
        "score a checkpoint without training",
    ),
    "metalearn-episode": (
        "python -m metalearn.show_episode",
        "[key=value ...]",
        "draw one episode to a PNG",
    ),
    "metalearn-sinusoid": (
        "python -m metalearn.show_sinusoid",
        "ckpt= [baseline=]",
        "the sinusoid regression figure",
    ),
}

PYTHON_API = """\
Your own configs: a conf/ folder in the working directory adds options to the packaged ones
  (conf/experiment/mine.yaml -> metalearn-train experiment=mine).

Python:
  import metalearn
  metrics = metalearn.train(metalearn.compose(["algo=protonet", "shots=5"]))
  learner = metalearn.load("outputs/.../checkpoints/last.ckpt")
  learner.adapt(images, labels).predict(more_images)
  from metalearn.report import frame
  runs = frame("multirun/")         (a pandas DataFrame: one row per run, for your own analysis)
"""


def usage() -> str:
    lines = [
        "metalearn: meta-learning on real few-shot data (Lightning + Hydra).",
        "",
        "Commands (each has --help; in a checkout, the second form runs the same):",
    ]
    for script, (twin, args, what) in COMMANDS.items():
        lines.append(f"  {script} {args}".ljust(48) + what)
        lines.append(f"      {twin} {args}")
    return "\n".join(lines) + "\n\n" + PYTHON_API


def main() -> None:
    print(usage())


if __name__ == "__main__":
    main()
