"""DDP parity runs shared by the tests: the real ``train.py`` on 2 gloo processes, and the
reference that trains in this process on one device with the union of the ranks' tasks
(tests/test_distributed.py explains the comparison)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

from metalearn.data.datamodule import EpisodeDataModule, TrainMetaBatches
from metalearn.data.episodes import Episodes
from metalearn.data.sinusoid import SinusoidDataModule
from tests.helpers import REPO

# Reptile: the whole task per inner step (its minibatches are seeded by the rank-local task
# index, which differs between the ranks and the union run) and inner SGD (inner Adam, like
# outer Adam below, blows float32 round-off in ~zero gradients up to lr-sized steps)
EXTRA = {
    "reptile": [
        "algo.inner_batch_size=null",
        "algo.inner_optimizer=sgd",
        "algo.inner_lr=0.1",
        "algo.inner_steps_test=5",
    ]
}
# both parity runs: 4 outer steps, validation after each of the 2 epochs, plain SGD (Adam
# divides by sqrt(v), which turns float32 round-off in near-zero meta-gradients, e.g. conv
# biases under BatchNorm, into lr-sized steps and hides the parity)
SCHEDULE = [
    "algo.meta_batch_size=4",  # global: 2 tasks per rank
    "data.batches_per_epoch=2",
    "trainer.max_steps=4",
    "data.val_episodes=5",  # odd: shares of 3 and 2 episodes (2 and 1 batches)
    "data.test_episodes=5",
    "data.eval_batch_size=2",
    "logger=none",
    "print_config=false",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "algo.optimizer._target_=torch.optim.SGD",
]
TINY = ["model.channels=8", "queries=5", *SCHEDULE, "algo.optimizer.lr=0.1"]
SINUSOID = ["experiment=maml_sinusoid", *SCHEDULE, "algo.optimizer.lr=0.01"]


class _ConcatTasks(Dataset):
    """Item i = the tasks of item i of every part, concatenated (rank 0's first)."""

    def __init__(self, parts: list[TrainMetaBatches]):
        self.parts = parts

    def __len__(self) -> int:
        return len(self.parts[0])

    def __getitem__(self, index: int) -> Episodes:
        items = [part[index] for part in self.parts]
        return Episodes(*(torch.cat(xs) for xs in zip(*items, strict=True)))


class _UnionOfShards:
    """One process that trains on the union of the tasks `shards` DDP ranks would draw: each
    rank's own ``train_dataset()`` (the data module's, as that rank builds it), concatenated."""

    def __init__(self, shards: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.shards = shards

    def train_dataset(self) -> Dataset:
        parts = []
        for rank in range(self.shards):
            self.rank, self.world_size = rank, self.shards  # what shard() reports on that rank
            parts.append(super().train_dataset())
        self.rank, self.world_size = 0, 1
        return _ConcatTasks(parts)


class UnionOfShards(_UnionOfShards, EpisodeDataModule):
    """The union of the ranks' image episodes."""


class UnionOfSinusoidShards(_UnionOfShards, SinusoidDataModule):
    """The union of the ranks' sinusoid tasks."""


def data_target(cls: type) -> str:
    """``data._target_`` of a data module class defined here."""
    return f"{cls.__module__}.{cls.__qualname__}"


def compose(output_dir: Path, overrides: list[str], base: list[str] = TINY):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=[*base, f"output_dir={output_dir}", *overrides])


def parameters(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    return {
        k: v for k, v in state.items() if "running_" not in k and "num_batches_tracked" not in k
    }


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def ddp_command(*overrides: str, multirun: bool = False, base: list[str] = TINY) -> list[str]:
    return [
        sys.executable,
        "train.py",
        *(["-m"] if multirun else []),
        "trainer=ddp_cpu",
        "trainer.devices=2",
        *base,
        *overrides,
    ]


def run_env(data_root: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "METALEARN_DATA_DIR": str(data_root), "WANDB_MODE": "offline", **extra}


def run_ok(cmd: list[str], data_root: Path) -> None:
    proc = subprocess.run(
        cmd, cwd=REPO, env=run_env(data_root), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def reference(
    tmp_path: Path, algo: str, shards: int = 2, meta_batch: int = 4, extra: tuple = ()
) -> Path:
    """``algo`` trained in this process on the union of ``shards`` ranks' tasks: its run dir."""
    from metalearn.train import run

    cfg = compose(
        tmp_path,
        [
            f"algo={algo}",
            *EXTRA.get(algo, []),
            f"data._target_={data_target(UnionOfShards)}",
            f"+data.shards={shards}",
            f"algo.meta_batch_size={meta_batch}",
            *extra,
        ],
    )
    assert run(cfg)["status"] == "ok"
    return tmp_path


def same_weights(ddp_dir: Path, one_dir: Path) -> tuple[dict, dict]:
    """The DDP run and the one-process run end with the same weights (to float32 round-off)
    after the same 4 steps; their metrics.json, for the caller's metric checks."""
    last = Path("checkpoints") / "last.ckpt"
    assert max_diff(parameters(ddp_dir / last), parameters(one_dir / last)) < 1e-5
    ddp, one = (json.loads((d / "metrics.json").read_text()) for d in (ddp_dir, one_dir))
    assert ddp["steps"] == one["steps"] == 4
    return ddp, one
