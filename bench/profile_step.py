"""Profile one meta-step per engine with torch.profiler (where does the time go?).

    python bench/profile_step.py --device cuda --setting omniglot --engines loop,vmap
    python bench/profile_step.py --trace-dir /tmp/traces   # also Chrome traces

Prints, per engine and order: wall time, CPU-side operator time, device (kernel) time, the
number of kernel launches, and the top operators by self device time (CPU: by self CPU time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import meta_step as ms  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--setting", default="omniglot", choices=sorted(ms.SETTINGS))
    p.add_argument("--engines", default="loop,func,vmap")
    p.add_argument("--orders", default="second,first")
    p.add_argument("--meta-batch", type=int, default=None)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--trace-dir", default=None)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    setting = {**ms.SETTINGS[args.setting], "name": args.setting}
    if args.meta_batch:
        setting["batch"] = args.meta_batch
    if not cuda:
        ms.tune_malloc()
    episodes = ms.random_batches(setting, args.device, 1)[0]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    for order in args.orders.split(","):
        for engine in args.engines.split(","):
            runner = ms.Runner(
                engine, setting, args.device, True, setting["steps"], order == "first"
            )
            for _ in range(2):  # warm-up
                runner(episodes)
            ms.sync(args.device)
            t0 = time.perf_counter()
            with profile(activities=activities) as prof:
                runner(episodes)
                ms.sync(args.device)
            wall = 1e3 * (time.perf_counter() - t0)
            events = prof.key_averages()
            cpu_ms = sum(e.self_cpu_time_total for e in events) / 1e3
            line = (
                f"### {engine} {order}-order B={setting['batch']}: wall {wall:.1f} ms "
                f"(profiled), CPU op time {cpu_ms:.1f} ms"
            )
            if cuda:
                kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
                dev_ms = sum(e.device_time for e in kernels) / 1e3 if kernels else 0.0
                line += f", kernel time {dev_ms:.1f} ms in {len(kernels)} kernels"
            print(line)
            print(events.table(sort_by=sort, row_limit=args.top, max_name_column_width=60))
            if args.trace_dir:
                Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
                prof.export_chrome_trace(f"{args.trace_dir}/{args.setting}_{engine}_{order}.json")


if __name__ == "__main__":
    main()
