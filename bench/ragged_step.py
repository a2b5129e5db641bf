"""What a meta-batch of unequal episodes costs each engine (issue 16, RESULTS.md).

``engine=vmap`` groups a ragged meta-batch by shape and vmaps each group (engines/vmap.py);
``func`` and ``higher`` loop over tasks anyway. This times one MAML meta-step (Proto-MAML
heads, second order, Conv4-64, real Omniglot episodes) for three kinds of meta-batch:

* ``fixed``: B episodes of one shape (5-way 1-shot, 5 queries): one vmap group;
* ``range``: ways in [5, 6] and shots in [1, 2] per episode: at most 4 shapes, a few groups;
* ``metadataset``: Meta-Dataset's sampler (max 10 ways, 50 support, 5 queries): nearly every
  episode its own shape, so vmap runs B groups of one.

Reported per kind: ms per step (median over interleaved repetitions), ms per 1000 images of
the batch, and the ratios vmap / func and (per image) kind / fixed. Ratios, not ms, are
comparable across machines.

    python bench/ragged_step.py --steps 5                 # CPU
    python bench/ragged_step.py --device cuda --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial

import torch

from metalearn.algorithms.gbml import GBML
from metalearn.data.datamodule import EpisodeDataModule
from metalearn.data.episodes import Episodes, stacked_groups
from metalearn.engines.func import FuncEngine
from metalearn.engines.vmap import VmapEngine
from metalearn.models.conv4 import Conv4

KINDS = {
    "fixed": {"episodes": "fixed"},
    "range": {"episodes": "range", "ways_range": [5, 6], "shots_range": [1, 2]},
    "metadataset": {
        "episodes": "metadataset",
        "metadataset": {"max_ways": 10, "max_support": 50, "max_queries": 5},
    },
}


def batch(kind: str, meta_batch: int, root: str, device) -> Episodes:
    dm = EpisodeDataModule("omniglot", root, 5, 1, 5, meta_batch, **KINDS[kind])
    dm.setup()
    return dm.train_dataset()[0].to(device)


def images(episodes: Episodes) -> int:
    return sum(len(x) for x in episodes.support_x) + sum(len(x) for x in episodes.query_x)


def step_ms(module: GBML, episodes: Episodes, device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    module.zero_grad()
    loop = module.train_loop()
    module.run_engine(module.model, loop, episodes, "prototypes").objective.backward()
    sync()
    return 1000 * (time.perf_counter() - start)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--meta-batch", type=int, default=16)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    root = os.environ.get("METALEARN_DATA_DIR", "data")
    engines = {"func": FuncEngine(), "vmap": VmapEngine()}
    modules = {}
    for name, engine in engines.items():
        torch.manual_seed(0)
        modules[name] = GBML(
            Conv4(ways=5),
            engine,
            partial(torch.optim.Adam, lr=1e-3),
            inner_steps=args.inner_steps,
            head_init="prototypes",
        ).to(device)
    batches = {k: batch(k, args.meta_batch, root, device) for k in KINDS}
    times = {(k, e): [] for k in KINDS for e in engines}
    order = [(k, e) for k in KINDS for e in engines]
    for rep in range(args.warmup + args.steps):
        for k, e in order[rep % len(order) :] + order[: rep % len(order)]:  # rotate the order
            ms = step_ms(modules[e], batches[k], device)
            if rep >= args.warmup:
                times[(k, e)].append(ms)
    result = {"device": str(device), "meta_batch": args.meta_batch, "kinds": {}}
    per_image = {}
    for k, episodes in batches.items():
        n = images(episodes)
        median = {e: statistics.median(times[(k, e)]) for e in engines}
        per_image[k] = {e: 1000 * median[e] / n for e in engines}
        result["kinds"][k] = {
            "groups": len(stacked_groups(episodes)),
            "images": n,
            "ms": median,
            "ms_per_1000_images": per_image[k],
            "vmap_over_func": median["vmap"] / median["func"],
        }
    for k in KINDS:
        result["kinds"][k]["per_image_over_fixed"] = {
            e: per_image[k][e] / per_image["fixed"][e] for e in engines
        }
    print("kind         groups images  func ms  vmap ms  vmap/func  vmap per image / fixed's",
          file=sys.stderr)  # fmt: skip
    for k, r in result["kinds"].items():
        print(
            f"{k:12s} {r['groups']:6d} {r['images']:6d} {r['ms']['func']:8.0f} "
            f"{r['ms']['vmap']:8.0f} {r['vmap_over_func']:10.2f} "
            f"{r['per_image_over_fixed']['vmap']:10.2f}",
            file=sys.stderr,
        )
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
