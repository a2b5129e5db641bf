"""Do the engines give the same meta-gradient on this device? (benchmark-sized, not a test)

    python bench/agree.py --device cuda

For a benchmark setting, each engine's meta-gradient at the same init on the same meta-batch,
as ||g - g_loop|| / ||g_loop|| against the bare torch.func loop, in float64, in float32 and
(on CUDA) float32 with TF32 convolutions/matmuls allowed. Rounding differences between
kernels grow through the inner steps; float64 separates them from real disagreement.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import meta_step as ms  # noqa: E402


def grads(engine, setting, episodes, device, dtype, first_order):
    runner = ms.Runner(engine, setting, device, True, setting["steps"], first_order)
    runner.model.to(dtype)
    runner.opt.step = lambda: None  # keep the gradient, skip the update
    runner(ms.Episodes(episodes[0].to(dtype), episodes[1], episodes[2].to(dtype), episodes[3]))
    return torch.cat([p.grad.flatten().double() for p in runner.model.parameters()])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--setting", default="omniglot", choices=sorted(ms.SETTINGS))
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--engines", default="higher,func,vmap")
    args = p.parse_args(argv)
    setting = {**ms.SETTINGS[args.setting], "name": args.setting, "batch": args.meta_batch}
    episodes = ms.random_batches(setting, args.device, 1)[0]
    cuda = args.device.startswith("cuda")
    modes = [("float64", torch.float64, False), ("float32", torch.float32, False)]
    if cuda:
        modes.append(("float32+tf32", torch.float32, True))
    print(f"{args.setting} B={args.meta_batch}: ||g_engine - g_loop|| / ||g_loop||")
    for order in ("second", "first"):
        for label, dtype, tf32 in modes:
            if cuda:
                torch.backends.cudnn.allow_tf32 = tf32
                torch.backends.cuda.matmul.allow_tf32 = tf32
            ref = grads("loop", setting, episodes, args.device, dtype, order == "first")
            diffs = {
                e: (
                    (grads(e, setting, episodes, args.device, dtype, order == "first") - ref).norm()
                    / ref.norm()
                ).item()
                for e in args.engines.split(",")
            }
            print(f"  {order:6} {label:13} " + "  ".join(f"{e} {d:.1e}" for e, d in diffs.items()))


if __name__ == "__main__":
    main()
