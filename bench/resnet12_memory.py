"""Peak CPU memory (max RSS) of one outer step with ResNet-12 (64-160-320-640) at 84x84x3.

    OMP_NUM_THREADS=1 python bench/resnet12_memory.py                    # the table below
    python bench/resnet12_memory.py --algos maml --tasks 2 --shots 5     # one point

Each point runs in a fresh subprocess: build the model, make random episodes (the memory does
not depend on the pixels), run one outer step (inner loop with engine=func, meta-objective's
backward, Adam step) and report the process's max RSS, and its growth over the RSS just
before the step. MAML/FOMAML/ANIL use ``inner_steps`` SGD steps (5, Finn et al.'s
mini-ImageNet setting); ProtoNet has no inner loop.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALGOS = ("maml", "fomaml", "anil", "protonet")


def rss_mb() -> float:
    """Current resident set size (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_point(algo: str, ways: int, shots: int, queries: int, tasks: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "src"))
    from metalearn.algorithms.protonet import prototypes
    from metalearn.data.episodes import Episodes
    from metalearn.engines.base import InnerLoop
    from metalearn.engines.func import FuncEngine
    from metalearn.models.resnet12 import ResNet12

    torch.manual_seed(0)
    net = ResNet12(ways=ways)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def images(n):
        return torch.rand(tasks, n, 3, 84, 84)

    def labels(k):
        return torch.arange(ways).repeat_interleave(k).repeat(tasks, 1)

    eps = Episodes(images(ways * shots), labels(shots), images(ways * queries), labels(queries))
    before = rss_mb()
    start = time.perf_counter()
    opt.zero_grad()
    if algo == "protonet":
        loss = 0.0
        for sx, sy, qx, qy in zip(*eps, strict=True):
            emb = net.features(torch.cat([sx, qx]))
            c = prototypes(emb[: len(sx)], sy, ways)
            loss = loss + F.cross_entropy(-torch.cdist(emb[len(sx) :], c).pow(2), qy)
        (loss / tasks).backward()
    elif algo == "anil":  # as GBML.run_engine: the body's features once per task
        from metalearn.algorithms.gbml import HeadOnly

        loop = InnerLoop(steps, lambda n, t: 0.01, ["head.weight", "head.bias"])
        fs = torch.stack([net.features(x) for x in eps.support_x])
        fq = torch.stack([net.features(x) for x in eps.query_x])
        feats = Episodes(fs, eps.support_y, fq, eps.query_y)
        FuncEngine()(HeadOnly(net.head), loop, feats).objective.backward()
    else:
        names = [n for n, _ in net.named_parameters()]
        loop = InnerLoop(steps, lambda n, t: 0.01, names, first_order=algo == "fomaml")
        FuncEngine()(net, loop, eps).objective.backward()
    opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(
        algo=algo,
        ways=ways,
        shots=shots,
        queries=queries,
        tasks=tasks,
        inner_steps=0 if algo == "protonet" else steps,
        peak_rss_mb=round(peak),
        step_growth_mb=round(peak - before),
        seconds=round(time.perf_counter() - start, 1),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algos", default=",".join(ALGOS))
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--queries", type=int, default=15)
    ap.add_argument("--tasks", type=int, default=1, help="meta-batch size")
    ap.add_argument("--inner-steps", type=int, default=5)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = [args.ways, args.shots, args.queries, args.tasks, args.inner_steps]
    if args.child:
        print(json.dumps(one_point(args.algos, *shape)))
        return
    for algo in args.algos.split(","):
        cmd = [sys.executable, __file__, "--child", "--algos", algo]
        flags = ("ways", "shots", "queries", "tasks", "inner-steps")
        for flag, value in zip(flags, shape, strict=True):
            cmd += [f"--{flag}", str(value)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        print(out.strip(), flush=True)


if __name__ == "__main__":
    main()
