"""The sinusoid figure of Finn et al. (2017, Fig. 2) and its numbers, from trained checkpoints.

    python -m metalearn.show_sinusoid ckpt=<maml run>/checkpoints/last.ckpt \\
        baseline=<pretrained run>/checkpoints/last.ckpt [task=0] [steps=1,10] [out=sinusoid.png]

One panel per checkpoint: a fixed test task's ground truth, its K support points, and the
model's prediction before adaptation and after each of ``steps`` inner steps (the model's own
test-time procedure with ``inner_steps_test`` set to that count). It also prints, and writes
beside the figure as ``sinusoid_mse.json``, each checkpoint's MSE ± 95 % CI over the run's
fixed test tasks at 0 steps and at each of ``steps``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from metalearn.algorithms.base import mean_ci95
from metalearn.cli import configured_log_dir, default_output, main_of, parse
from metalearn.data.episodes import Episodes
from metalearn.errors import ConfigError

USAGE = """\
metalearn.show_sinusoid: the sinusoid figure (Finn et al. 2017, Fig. 2) and MSE per step.

Usage:  python -m metalearn.show_sinusoid ckpt=<.ckpt> [baseline=<.ckpt>] [task=0]
                                          [steps=1,10] [out=<dir>]

  ckpt=      a checkpoint of a sinusoid run (experiment=maml_sinusoid)
  baseline=  a second one drawn beside it (experiment=pretrained_sinusoid)
  task=      which fixed test task to draw (default 0)
  steps=     the inner-step counts shown and scored besides 0 (default 1,10)
  out=       output folder (default outputs/show_sinusoid/<date>/<time>)
"""

GRID = 200  # points of the drawn curves


@contextmanager
def inner_steps(learner, steps: int):
    """``learner``'s test-time procedure with ``steps`` inner steps (0: the un-adapted model)."""
    if not hasattr(learner, "inner_steps_test"):
        raise ConfigError(f"{type(learner).__name__} has no inner steps to vary")
    before = learner.inner_steps_test
    learner.inner_steps_test = steps
    try:
        yield learner
    finally:
        learner.inner_steps_test = before


def mse_after(learner, episodes: Episodes, steps: int, batch: int = 100) -> tuple[float, float]:
    """MSE ± 95 % CI over ``episodes`` after ``steps`` inner steps on their support points."""
    values = []
    with inner_steps(learner, steps), torch.enable_grad():
        for start in range(0, episodes.batch_size, batch):
            part = Episodes(*(t[start : start + batch] for t in episodes))
            values.append(learner.evaluate(part).detach())
    return mean_ci95(torch.cat(values))


def predictions(learner, episode: Episodes, x: torch.Tensor, steps: int) -> np.ndarray:
    """The model's predictions at points ``x`` [n, 1] after adapting on ``episode``'s support."""
    one = Episodes(episode.support_x[:1], episode.support_y[:1], x[None], torch.zeros_like(x)[None])
    with inner_steps(learner, steps), torch.enable_grad():
        return learner.query_logits(one)[0, :, 0].detach().numpy()


def test_tasks(learner):
    """The fixed test tasks of the run that trained ``learner`` (its data settings)."""
    from omegaconf import OmegaConf

    from metalearn.learner import unflatten
    from metalearn.train import build

    cfg = OmegaConf.create(unflatten(learner.run_config))
    if cfg.data.get("name") != "sinusoid":
        raise ConfigError(
            f"{learner.checkpoint_path} was trained on data={cfg.data.get('name')}: "
            "show_sinusoid draws sinusoid runs (experiment=maml_sinusoid)"
        )
    return build(cfg.data).fixed("test")


def figure(panels: list[dict], steps: list[int]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, p in zip(axes[0], panels, strict=True):
        ax.plot(p["x"], p["truth"], color="red", lw=2, label="ground truth")
        ax.plot(p["x"], p["pred"][0], ":", color="lightgreen", lw=2, label="pre-update")
        styles = (("tab:green", "--"), ("black", "-."), ("tab:blue", ":"), ("gray", "--"))
        for s, (color, style) in zip(steps, styles, strict=False):
            ax.plot(p["x"], p["pred"][s], style, color=color, lw=1.5, label=f"{s} grad steps")
        ax.scatter(p["sx"], p["sy"], marker="^", color="purple", s=50, zorder=3,
                   label="used for grad")  # fmt: skip
        ax.set_title(f"{p['name']}, K={len(p['sx'])}", fontsize=10)
        ax.set_xlim(-5, 5)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def show(ckpts: dict[str, str], task: int, steps: list[int], out: Path) -> dict:
    """Draw ``task`` for each checkpoint (name -> path); score every step count; write the PNG
    and ``sinusoid_mse.json`` into ``out``. Returns the scores."""
    from metalearn.learner import load

    panels, scores = [], {}
    for name, path in ckpts.items():
        learner = load(path)
        episodes, params = test_tasks(learner)
        if not 0 <= task < episodes.batch_size:
            raise ConfigError(f"task={task}: the run has test tasks 0..{episodes.batch_size - 1}")
        scores[name] = {s: mse_after(learner, episodes, s) for s in [0, *steps]}
        x = torch.linspace(-5, 5, GRID)[:, None]
        one = Episodes(*(t[task : task + 1] for t in episodes))
        panels.append(
            {
                "name": f"{name} ({learner.algo_name})",
                "x": x[:, 0].numpy(),
                "truth": params[task, 0] * np.sin(x[:, 0].numpy() - params[task, 1]),
                "sx": one.support_x[0, :, 0].numpy(),
                "sy": one.support_y[0, :, 0].numpy(),
                "pred": {s: predictions(learner, one, x, s) for s in [0, *steps]},
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    fig = figure(panels, steps)
    fig.savefig(out / "sinusoid.png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    table = {
        name: {f"{s} steps": {"mse": m, "ci95": c} for s, (m, c) in by_step.items()}
        for name, by_step in scores.items()
    }
    (out / "sinusoid_mse.json").write_text(json.dumps(table, indent=2))
    return table


def run(argv: list[str]) -> int:
    opts, rest = parse(
        argv, {"ckpt": None, "baseline": "", "task": "0", "steps": "1,10", "out": ""}, USAGE
    )
    if rest:
        raise ConfigError(f"unknown options {rest} (see --help)")
    try:
        steps = [int(s) for s in opts["steps"].split(",") if s]
        task = int(opts["task"])
    except ValueError as err:
        raise ConfigError("steps=1,10 and task=0 take integers") from err
    ckpts = {"meta-learned": opts["ckpt"]}
    if opts["baseline"]:
        ckpts["baseline"] = opts["baseline"]
    out = Path(opts["out"] or default_output("show_sinusoid", configured_log_dir()))
    table = show(ckpts, task, steps, out)
    for name, by_step in table.items():
        cells = "  ".join(f"{k}: {v['mse']:.3f} ± {v['ci95']:.3f}" for k, v in by_step.items())
        print(f"{name}: test MSE  {cells}")
    print(f"wrote {out / 'sinusoid.png'} and {out / 'sinusoid_mse.json'}")
    return 0


main = main_of(run)

if __name__ == "__main__":
    main()
