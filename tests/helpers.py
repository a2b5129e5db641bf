"""Small builders shared by tests: a tiny Conv4 and random episodes (float64)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from metalearn.data.episodes import Episodes
from metalearn.models.conv4 import Conv4


def tiny_net(ways=3, seed=0, **kw) -> Conv4:
    torch.manual_seed(seed)
    kw.setdefault("channels", 4)
    kw.setdefault("image_size", 16)
    return Conv4(ways=ways, **kw).double()


def random_episodes(batch=2, ways=3, shots=2, queries=3, size=16, seed=1) -> Episodes:
    g = torch.Generator().manual_seed(seed)

    def images(n):
        return torch.rand(batch, n, 1, size, size, generator=g, dtype=torch.float64)

    def labels(k):
        return torch.arange(ways).repeat_interleave(k).repeat(batch, 1)

    return Episodes(images(ways * shots), labels(shots), images(ways * queries), labels(queries))


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
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


def compose_cfg(output_dir, overrides=(), tiny=True):
    """Compose the real conf/train.yaml as train.py would (plus tiny settings)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "train", overrides=[*(TINY if tiny else []), f"output_dir={output_dir}", *overrides]
        )


def reference_objective(net, params, episodes, steps, lr=0.3, first_order=False):
    """Independent MAML objective: functional_call + autograd.grad(create_graph=True)."""
    total = 0.0
    for sx, sy, qx, qy in zip(*episodes, strict=True):
        fast = dict(params)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(net, fast, (sx,)), sy)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {n: w - lr * g for (n, w), g in zip(fast.items(), grads, strict=True)}
        total = total + F.cross_entropy(functional_call(net, fast, (qx,)), qy)
    return total / len(episodes.support_x)
