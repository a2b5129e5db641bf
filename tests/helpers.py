"""Small builders shared by tests: a tiny Conv4 and random episodes (float64)."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metalearn.data.episodes import Episodes
from metalearn.models.conv4 import Conv4


def scores(curve: list[dict]) -> list[dict]:
    """A metrics.json curve without its timings (``train_s``): what must be identical."""
    return [{k: v for k, v in point.items() if k != "train_s"} for point in curve]


def tiny_net(ways=3, seed=0, **kw) -> Conv4:
    torch.manual_seed(seed)
    kw.setdefault("channels", 4)
    kw.setdefault("image_size", 16)
    return Conv4(ways=ways, **kw).double()


def random_episodes(batch=2, ways=3, shots=2, queries=3, size=16, seed=1, channels=1) -> Episodes:
    g = torch.Generator().manual_seed(seed)

    def images(n):
        return torch.rand(batch, n, channels, size, size, generator=g, dtype=torch.float64)

    def labels(k):
        return torch.arange(ways).repeat_interleave(k).repeat(batch, 1)

    return Episodes(images(ways * shots), labels(shots), images(ways * queries), labels(queries))


def adapted_accuracy(learner, data) -> float:
    """Mean query accuracy of ``learner.adapt(support).predict(queries)`` over the fixed
    episodes ``data``, each image given as a user gives it (uint8 pixels): the test-time
    procedure of a run, so it should reproduce the run's own ``test/acc``."""
    accs = []
    for i in range(len(data)):
        for sx, sy, qx, qy in zip(*data[i], strict=True):
            pixels = (sx * 255).round().to(torch.uint8)
            adapted = learner.adapt(pixels, sy.tolist(), invert=False)
            pred = adapted.predict((qx * 255).round().to(torch.uint8), invert=False)
            accs.append((pred.indices == qy).float().mean())
    return torch.stack(accs).mean().item()


REPO = Path(__file__).resolve().parents[1]

PATCHED_TRAIN = """
import os
import signal
import sys
import hydra
sys.path.insert(0, {repo!r})
import metalearn.pool  # noqa: F401
from metalearn.algorithms.base import EpisodicModule

{patch}

@hydra.main(version_base="1.3", config_path={conf!r}, config_name="train")
def main(cfg):
    from metalearn.train import main as run_main

    return run_main(cfg)


if __name__ == "__main__":
    main()
"""


def patched_train(path: Path, patch: str) -> Path:
    """Write a ``train.py`` twin at ``path`` that runs ``patch`` (code that may replace
    ``EpisodicModule`` methods; ``os`` and ``signal`` imported) before Hydra's main."""
    path.write_text(PATCHED_TRAIN.format(repo=str(REPO), conf=str(REPO / "conf"), patch=patch))
    return path


# every algorithm (conf/algo/*.yaml), in the README's order
ALGOS = [
    "maml",
    "fomaml",
    "reptile",
    "metasgd",
    "alpha_maml",
    "maml_pp",
    "anil",
    "protonet",
    "matching",
    "relation",
    "siamese",
    "finetune",
]

TINY = [
    "model.channels=8",
    "algo.meta_batch_size=2",
    "data.batches_per_epoch=2",
    "data.val_episodes=10",
    "data.test_episodes=10",
    "data.eval_batch_size=5",
    "trainer.max_steps=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=none",
    "print_config=false",
]


def compose_cfg(output_dir, overrides=(), tiny=True, **kwargs):
    """Compose the real conf/train.yaml as train.py would (plus tiny settings)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "train",
            overrides=[*(TINY if tiny else []), f"output_dir={output_dir}", *overrides],
            **kwargs,
        )


def reference_objective(net, params, episodes, steps, lr=0.3, first_order=False, loss=None):
    """Independent MAML objective: functional_call + autograd.grad(create_graph=True);
    ``loss`` cross-entropy (classes) unless given (``F.mse_loss`` for regression)."""
    loss = loss or F.cross_entropy
    total = 0.0
    for sx, sy, qx, qy in zip(*episodes, strict=True):
        fast = dict(params)
        for _ in range(steps):
            support = loss(functional_call(net, fast, (sx,)), sy)
            grads = torch.autograd.grad(support, list(fast.values()), create_graph=not first_order)
            fast = {n: w - lr * g for (n, w), g in zip(fast.items(), grads, strict=True)}
        total = total + loss(functional_call(net, fast, (qx,)), qy)
    return total / len(episodes.support_x)


def assert_matches_finite_differences(grads, net, objective, directions=3, h=1e-6) -> None:
    """``grads`` (one per parameter of ``net``) against central differences of
    ``objective(params) -> scalar`` along random directions."""
    params = {n: p.detach() for n, p in net.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    for _ in range(directions):
        v = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}

        def f(s, v=v):
            return objective({n: (p + s * v[n]).requires_grad_() for n, p in params.items()}).item()

        fd = (f(h) - f(-h)) / (2 * h)
        analytic = sum((g * v[n]).sum() for g, n in zip(grads, params, strict=True)).item()
        assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-8)


# ---- W&B offline runs, read back from the run's transaction log ---------------------------
def wandb_records(path: Path):
    """Records of a ``run-*.wandb`` file (LevelDB log format: 32 KiB blocks of chunks with a
    7-byte header crc32/length/type, after a 7-byte ':W&B' file header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding to the end of the block
            pos += left - 7 - length
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def read_offline_run(run_dir: Path, timeout: float = 60.0) -> dict:
    """The records of an offline W&B run. ``wandb.finish()`` can return before W&B's writer
    process has flushed the file, so wait (up to ``timeout`` s) for its exit record."""
    (log,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout

    def complete() -> list | None:
        try:
            records = list(wandb_records(log))
        except Exception:  # a file still being written: header or last record incomplete
            return None
        return records if any(r.WhichOneof("record_type") == "exit" for r in records) else None

    while (records := complete()) is None:
        assert time.monotonic() < deadline, f"{log} has no exit record after {timeout} s"
        time.sleep(0.2)
    run, config, summary, exit_code, artifacts, steps = None, {}, {}, None, [], []
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "artifact":
            artifacts.append(
                {
                    "name": rec.artifact.name,
                    "aliases": set(rec.artifact.aliases),
                    "metadata": json.loads(rec.artifact.metadata or "{}"),
                    "digests": {e.path: e.digest for e in rec.artifact.manifest.contents},
                }
            )
        elif kind == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item
            }
            steps.append(row.get("trainer/global_step"))
        elif kind == "run":
            run = rec.run
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "exit":
            exit_code = rec.exit.exit_code
        elif kind == "summary":
            summary.update(
                {
                    "/".join(i.nested_key) or i.key: json.loads(i.value_json)
                    for i in rec.summary.update
                }
            )
    return {
        "id": run.run_id,
        "entity": run.entity,
        "group": run.run_group,
        "job_type": run.job_type,
        "tags": list(run.tags),
        "name": run.display_name,
        "config": config,
        "summary": summary,
        "exit_code": exit_code,
        "artifacts": artifacts,
        "global_steps": steps,  # trainer/global_step of each history row
    }
