"""Episodes per second each data module produces against what training consumes (issue 17).

For every dataset (Omniglot, Quick Draw, mini-ImageNet's decoded JPEGs at 84x84 colour, a
user's image folder, sinusoid tasks) at its preset's episode shape, two numbers in one run:

* **produced**: meta-batches drawn from ``train_dataloader()`` (the configured
  ``num_workers``) per second, times the meta-batch size;
* **consumed**: episodes per second of a real Lightning fit of the same config with the
  fastest CPU engine (``engine=vmap``; MAML, second order, the preset's inner steps), timed
  per step after a warm-up.

Their ratio says how far the data pipeline is from being the bottleneck (it should be far
above 1). Images are decoded once and cached (data/sources/cache.py), so the first run of a
JPEG dataset also pays the decoding, outside the timing.

    python bench/data_rate.py                    # CPU, every dataset
    python bench/data_rate.py --datasets miniimagenet,folder --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# dataset: (overrides, what it is); meta-batch and episode shape as the presets train them
DATASETS = {
    "omniglot": (["data=omniglot", "algo.meta_batch_size=32"], "npz, 28x28 gray, 5w1s15q"),
    "quickdraw": (["experiment=ff15_quickdraw"], "npz, 28x28 gray, 5w1s15q, B=25"),
    "miniimagenet": (["experiment=maml_miniimagenet"], "JPEG (decoded, cached), 84x84 RGB"),
    "folder": (["data=folder", "algo.meta_batch_size=4"], "a folder of JPEGs, 84x84 RGB"),
    "sinusoid": (["experiment=maml_sinusoid"], "points, K=5, B=25"),
}


def image_folder(data_root: Path, per_class: int = 20) -> Path:
    """A user's folder (class sub-folders of images): links to mini-ImageNet's JPEGs."""
    import csv

    folder = Path(tempfile.mkdtemp(prefix="bench-folder-"))
    images = data_root / "miniimagenet" / "images"
    for split in ("train", "val", "test"):
        with open(data_root / "miniimagenet" / f"{split}.csv") as f:
            rows = list(csv.reader(f))[1:]
        taken: dict[str, int] = {}
        for name, label in rows:
            if taken.get(label, 0) < per_class:
                (folder / label).mkdir(exist_ok=True)
                (folder / label / name).symlink_to(images / name)
                taken[label] = taken.get(label, 0) + 1
    return folder


def compose(overrides: list[str], device: str, out: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(
            "train",
            overrides=[
                *overrides,
                "engine=vmap",
                "logger=none",
                "print_config=false",
                f"trainer={'gpu' if device.startswith('cuda') else 'cpu'}",
                "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
                "++trainer.enable_checkpointing=false",
                "++trainer.limit_val_batches=0",
                f"output_dir={out}",
            ],
        )


def produced(datamodule, count: int) -> float:
    """Episodes/s drawn from the training loader (after its first batch)."""
    loader = iter(datamodule.train_dataloader())
    next(loader)
    start = time.perf_counter()
    for _ in range(count):
        next(loader)
    return count * datamodule.meta_batch_size / (time.perf_counter() - start)


class StepTimer:
    """Seconds per training step after ``warmup`` steps (Lightning callback hooks)."""

    def __init__(self, warmup: int, device: str):
        import lightning as L

        timer = self

        class _Callback(L.Callback):
            def on_train_batch_start(self, trainer, module, batch, index):
                timer.start = time.perf_counter()

            def on_train_batch_end(self, trainer, module, outputs, batch, index):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if index >= warmup:
                    timer.seconds.append(time.perf_counter() - timer.start)

        self.callback, self.seconds, self.start = _Callback(), [], 0.0


def consumed(cfg, steps: int, warmup: int, device: str) -> float:
    """Episodes/s a real fit of ``cfg`` trains on (median step)."""
    from metalearn.instantiate import build, instantiate_algorithm, instantiate_datamodule
    from metalearn.resume import run_settings

    cfg.trainer.max_steps = steps + warmup
    datamodule = instantiate_datamodule(cfg)
    algo = instantiate_algorithm(cfg, datamodule, run_settings(cfg))
    timer = StepTimer(warmup, device)
    trainer = build(cfg.trainer, logger=False, callbacks=[timer.callback])
    trainer.fit(algo, datamodule=datamodule)
    return datamodule.meta_batch_size / statistics.median(timer.seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", type=int, default=50, help="meta-batches drawn per dataset")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per dataset")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--per-class", type=int, default=20, help="images a class in the folder")
    p.add_argument("--override", nargs="*", default=[], help="extra config overrides (tests)")
    args = p.parse_args()
    from metalearn.instantiate import instantiate_datamodule

    data_root = Path(os.environ.get("METALEARN_DATA_DIR", ROOT.parent / "shared" / "data"))
    print(f"torch {torch.__version__}, {args.device}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    results = {}
    for name in args.datasets.split(","):
        overrides, what = DATASETS[name]
        if name == "folder":
            overrides = [*overrides, f"data.root={image_folder(data_root, args.per_class)}"]
        out = tempfile.mkdtemp(prefix="bench-data-")
        cfg = compose([*overrides, *args.override], args.device, out)
        made = produced(instantiate_datamodule(cfg), args.batches)
        used = consumed(cfg, args.steps, args.warmup, args.device)
        results[name] = {"what": what, "produced": made, "consumed": used, "ratio": made / used}
        print(f"{name:13s} {what:36s} produced {made:9.0f} episodes/s, "
              f"consumed {used:7.1f}/s: {made / used:8.0f}x", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
