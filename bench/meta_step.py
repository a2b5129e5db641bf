"""Speed and memory of one meta-step: engines x {second, first order} x two settings.

    python bench/meta_step.py                 # CPU, default repetitions
    python bench/meta_step.py --steps 5       # quick (a few minutes on 2 CPU cores)
    python bench/meta_step.py --device cuda   # on a GPU
    python bench/meta_step.py --json > r.json # machine-readable (tables go to stderr)

A meta-step is what one training step costs: zero_grad, the inner loops of a meta-batch,
the meta-objective's backward and the outer Adam step. Reported:

1. time per meta-step (median and min over ``--steps`` interleaved repetitions; engines take
   turns, in a rotating order, on the same meta-batches of real episodes; on CPU the
   meta-batch defaults to 8 tasks, ``--meta-batch 0`` runs the settings' own) for the engines
   higher, func and vmap and for ``loop``: a bare torch.func loop written here, the baseline
   of the ratios;
2. framework overhead: a Lightning training step of the real stack (conf/train.yaml composed
   with Hydra, EpisodeDataModule, GBML, logging, progress bar) over the bare loop, the two
   interleaved step by step on the identical meta-batch (target <= 1.10);
3. episodes/s the data module produces versus what training consumes;
4. peak memory of one meta-step for 1, 5, 10 and 20 inner steps (CPU: max RSS of a fresh
   subprocess per point, over its RSS just before the step; CUDA: max_memory_allocated), and
   each engine's growth: peak at the most steps over peak at the fewest (target for
   ``func:recompute``, second order: <= 1.2 from 1 to 10 steps).

On CPU the process calls ``tune_malloc()`` (glibc: no mmap'd chunks, no trimming; the same as
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge>``) first, as VmapEngine does by default;
``--no-malloc-tune`` measures without it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from metalearn.data.episodes import Episodes  # noqa: E402
from metalearn.engines.base import InnerLoop  # noqa: E402
from metalearn.engines.func import FuncEngine  # noqa: E402
from metalearn.engines.higher import HigherEngine  # noqa: E402
from metalearn.engines.vmap import VmapEngine, tune_malloc  # noqa: E402
from metalearn.models.conv4 import Conv4  # noqa: E402

SETTINGS = {
    "omniglot": dict(
        label="Omniglot 5w1s q15 Conv4-64 5 steps B=32",
        data="omniglot",
        ways=5,
        shots=1,
        queries=15,
        channels=64,
        steps=5,
        batch=32,
    ),
    "ff15": dict(
        label="FF15 QuickDraw 5w1s q15 Conv4-20 5 steps B=25",
        data="quickdraw",
        ways=5,
        shots=1,
        queries=15,
        channels=20,
        steps=5,
        batch=25,
    ),
    # not a paper setting: a step of ~20 ms on CPU, where the framework's fixed host costs
    # show as they do in a launch-bound GPU step (--settings tiny --overhead-orders first)
    "tiny": dict(
        label="tiny: Omniglot 5w1s q5 Conv4-8 1 step B=4 (host-overhead proxy)",
        data="omniglot",
        ways=5,
        shots=1,
        queries=5,
        channels=8,
        steps=1,
        batch=4,
    ),
}
ENGINES = ("loop", "higher", "func", "func:recompute", "vmap")
# also: vmap:compile (the meta-step as one torch.compile graph, inductor), vmap:cudagraph
# (the same, mode="reduce-overhead": a CUDA graph on a GPU), vmap:all, vmap:K (chunks of K)
CPU_META_BATCH = 8  # CPU default: per-task costs are what the ratios compare; 0 = full size
INNER_LR = 0.4
OUTER_LR = 1e-3


def say(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# ---- the baseline: a bare torch.func loop ----------------------------------------------------
def bare_meta_step(
    model, opt, episodes, steps: int, first_order: bool, lr: float = INNER_LR, marks=None
) -> float:
    """One meta-step of plain MAML, written out: the ratios' baseline. ``marks`` (a list)
    receives host-clock times after the forward and after the backward."""
    marks = [] if marks is None else marks
    params = dict(model.named_parameters())
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for sx, sy, qx, qy in zip(*episodes, strict=True):
        fast = params
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, fast, (sx,)), sy)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {n: w - lr * g for (n, w), g in zip(fast.items(), grads, strict=True)}
        total = total + F.cross_entropy(functional_call(model, fast, (qx,)), qy)
    objective = total / len(episodes.support_x)
    marks.append(time.perf_counter())
    objective.backward()
    marks.append(time.perf_counter())
    opt.step()
    return objective.item()


def engine_meta_step(
    engine, model, opt, episodes, steps: int, first_order: bool, marks=None
) -> float:
    marks = [] if marks is None else marks
    loop = InnerLoop(
        steps, lambda n, t: INNER_LR, [n for n, _ in model.named_parameters()], first_order
    )
    opt.zero_grad(set_to_none=True)
    out = engine(model, loop, episodes)
    marks.append(time.perf_counter())
    out.objective.backward()
    marks.append(time.perf_counter())
    opt.step()
    return out.objective.item()


def make_engine(name: str, malloc: bool):
    """``higher``, ``func``, ``func:recompute`` (inner steps recomputed in the backward),
    ``vmap`` (its default, chunk_size=auto), ``vmap:all`` (no chunks), ``vmap:K`` (chunks
    of K tasks), ``vmap:compile`` (engine.compile=default) or ``vmap:cudagraph``
    (engine.compile=reduce-overhead)."""
    if name == "func:recompute":
        return FuncEngine(recompute=True)
    if name in COMPILE_MODES:
        return VmapEngine(tune_malloc=malloc, compile=COMPILE_MODES[name])
    if name.startswith("vmap"):
        arg = name.split(":")[1] if ":" in name else "auto"
        chunk = {"auto": "auto", "all": None}.get(arg) or int(arg)
        return VmapEngine(chunk_size=chunk, tune_malloc=malloc)
    return {"higher": HigherEngine, "func": FuncEngine}[name]()


class Runner:
    """One engine, its own model copy (same init) and its own Adam state."""

    def __init__(self, name, setting, device, malloc, steps, first_order):
        self.name, self.steps, self.first_order = name, steps, first_order
        torch.manual_seed(0)
        self.model = Conv4(ways=setting["ways"], channels=setting["channels"]).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=OUTER_LR)
        self.engine = None if name == "loop" else make_engine(name, malloc)

    def __call__(self, episodes, marks=None) -> float:
        if self.engine is None:
            return bare_meta_step(
                self.model, self.opt, episodes, self.steps, self.first_order, marks=marks
            )
        return engine_meta_step(
            self.engine, self.model, self.opt, episodes, self.steps, self.first_order, marks
        )


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---- episodes ----------------------------------------------------------------------------
def compose(setting: dict, device: str, overrides=(), output_dir: str | None = None):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(
            "train",
            overrides=[
                f"data={setting['data']}",
                f"ways={setting['ways']}",
                f"shots={setting['shots']}",
                f"queries={setting['queries']}",
                f"model.channels={setting['channels']}",
                f"algo.meta_batch_size={setting['batch']}",
                f"algo.inner_steps={setting['steps']}",
                f"algo.inner_lr={INNER_LR}",
                f"algo.optimizer.lr={OUTER_LR}",
                "logger=none",
                "print_config=false",
                f"trainer={'gpu' if device.startswith('cuda') else 'cpu'}",
                f"output_dir={output_dir or tempfile.mkdtemp(prefix='bench-')}",
                *overrides,
            ],
        )


def datamodule(setting: dict, device: str):
    from metalearn.instantiate import build

    dm = build(compose(setting, device).data)
    dm.setup()
    return dm


def real_batches(setting: dict, device: str, count: int) -> list[Episodes]:
    loader = iter(datamodule(setting, device).train_dataloader())
    return [next(loader).to(device) for _ in range(count)]


def random_batches(setting: dict, device: str, count: int, seed: int = 0) -> list[Episodes]:
    g = torch.Generator().manual_seed(seed)
    b, n, k, q = setting["batch"], setting["ways"], setting["shots"], setting["queries"]
    out = []
    for _ in range(count):
        labels = torch.arange(n)
        out.append(
            Episodes(
                torch.rand(b, n * k, 1, 28, 28, generator=g),
                labels.repeat_interleave(k).expand(b, -1).contiguous(),
                torch.rand(b, n * q, 1, 28, 28, generator=g),
                labels.repeat_interleave(q).expand(b, -1).contiguous(),
            ).to(device)
        )
    return out


# ---- 1. time per meta-step ---------------------------------------------------------------
def time_engines(setting, batches, args) -> dict:
    results = {}
    for order in args.orders:
        first_order = order == "first"
        runners = [
            Runner(e, setting, args.device, not args.no_malloc_tune, setting["steps"], first_order)
            for e in args.engines
        ]
        times = {r.name: [] for r in runners}
        grad_diff = {}
        for rep in range(args.warmup + args.steps):
            shift = rep % len(runners)
            for r in runners[shift:] + runners[:shift]:  # rotate who goes first
                episodes = batches[rep % len(batches)]
                sync(args.device)
                t0 = time.perf_counter()
                r(episodes)
                sync(args.device)
                if rep >= args.warmup:
                    times[r.name].append(1e3 * (time.perf_counter() - t0))
            if rep == 0:  # same init, same batch: the meta-gradients must agree
                grad_diff = relative_grad_diffs(runners)
            say(
                f"  {setting['name']} {order}-order rep {rep + 1}/{args.warmup + args.steps}: "
                + ", ".join(f"{n} {t[-1]:.0f}" for n, t in times.items() if t)
            )
        base = statistics.median(times["loop"]) if "loop" in times else None
        say(
            f"  {setting['name']} {order}-order medians: "
            + ", ".join(f"{n} {statistics.median(t):.1f} ms" for n, t in times.items())
        )
        results[order] = {
            n: {
                "median_ms": statistics.median(t),
                "min_ms": min(t),
                "times_ms": t,
                "vs_loop": statistics.median(t) / base if base else None,
                "grad_rel_diff": grad_diff.get(n),
            }
            for n, t in times.items()
        }
    return results


def relative_grad_diffs(runners) -> dict:
    """||g - g_ref|| / ||g_ref|| of each runner's first meta-gradient, ref = the first."""
    flat = {r.name: torch.cat([p.grad.flatten() for p in r.model.parameters()]) for r in runners}
    ref = flat[runners[0].name]
    return {n: ((g - ref).norm() / ref.norm()).item() for n, g in flat.items()}


# ---- 2. framework overhead: Lightning step vs bare step, interleaved ------------------------
PHASES = ("between", "forward", "backward", "step")


def phases(marks: list[float]) -> dict:
    """ms per phase from 5 host-clock marks: step start (the previous step's end), forward
    start, backward start, backward end, step end (after a device sync). ``between`` is the
    loop's own work before the forward: fetching and moving the batch, hooks; ``step`` is
    the optimizer, logging and the wait for the device."""
    if len(marks) != 5:  # a hook did not fire (e.g. no backward): leave the step out
        return dict.fromkeys(PHASES, float("nan"))
    return {k: 1e3 * (b - a) for k, a, b in zip(PHASES, marks[:-1], marks[1:], strict=True)}


COMPILE_MODES = {"vmap:compile": "default", "vmap:cudagraph": "reduce-overhead"}


def engine_overrides(engine: str) -> list[str]:
    """The config overrides that select a bench engine name (``vmap:compile`` and
    ``vmap:cudagraph`` are ``engine=vmap`` with ``engine.compile``)."""
    if engine in COMPILE_MODES:
        return ["engine=vmap", f"engine.compile={COMPILE_MODES[engine]}"]
    return [f"engine={engine}"]


def overhead_target(engine: str) -> float:
    # the targets: the compiled step within 1.05x (its host work must shrink with
    # the device work), the eager engines within 1.10x
    return 1.05 if engine in COMPILE_MODES else 1.10


def lightning_overhead(setting, args, engine: str, first_order: bool) -> dict:
    import lightning as L

    from metalearn.instantiate import build, instantiate_callbacks

    steps = args.warmup + max(args.steps, 3)
    with tempfile.TemporaryDirectory(prefix="bench-") as out:
        cfg = compose(
            setting,
            args.device,
            [
                *engine_overrides(engine),
                f"algo.first_order={first_order}",
                f"trainer.max_steps={steps}",
                "trainer.enable_progress_bar=true",
                "trainer.enable_model_summary=false",
                "+trainer.limit_val_batches=0",
                "+trainer.enable_checkpointing=false",
            ],
            output_dir=out,
        )
        L.seed_everything(cfg.seed, workers=True)
        dm = build(cfg.data)
        dm.setup()
        algo = build(cfg.algo, model=build(cfg.model), engine=build(cfg.engine))
        if engine.startswith("vmap") and args.no_malloc_tune:
            algo.engine.tune_malloc = False
        if args.no_acc_pre:  # attribute the overhead: skip GBML's train/acc_pre forwards
            algo.query_acc_before = lambda episodes: torch.zeros(())
        bare_name = "loop" if engine == "func" else engine  # func's bare twin: the loop
        bare = Runner(
            bare_name, setting, args.device, not args.no_malloc_tune, setting["steps"], first_order
        )

        class Interleave(L.Callback):
            """After each Lightning step, a bare step on the same meta-batch; time both, and
            split each into phases by host-clock marks (no extra syncs): Lightning's at its
            hooks, the bare step's after its forward and its backward."""

            def __init__(self):
                self.mark, self.bare_ms, self.lightning_ms = None, [], []
                self.hooks: list[float] = []
                self.phases = {"lightning": [], "bare": []}

            def on_train_batch_start(self, *_):
                self.hooks = [time.perf_counter()]

            def on_before_backward(self, *_):
                self.hooks.append(time.perf_counter())

            on_after_backward = on_before_backward

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                sync(args.device)
                now = time.perf_counter()
                if self.mark is not None:  # previous bare step's end -> this Lightning step's end
                    self.lightning_ms.append(1e3 * (now - self.mark))
                    self.phases["lightning"].append(phases([self.mark, *self.hooks, now]))
                marks = [now]
                bare(batch, marks)
                sync(args.device)
                self.mark = time.perf_counter()
                self.bare_ms.append(1e3 * (self.mark - now))
                self.phases["bare"].append(phases([now, now, *marks[1:], self.mark]))

        timer = Interleave()
        bar = instantiate_callbacks(cfg).get("progress_bar")  # as train.py: its progress bar
        callbacks = [timer, *([bar] if bar else [])]
        trainer = build(cfg.trainer, logger=False, callbacks=callbacks, default_root_dir=out)
        trainer.fit(algo, datamodule=dm)
    skip = max(args.warmup, 1)
    light, bare_ms = timer.lightning_ms[skip - 1 :], timer.bare_ms[skip:]
    median_phases = {
        side: {k: statistics.median(p[k] for p in rows) for k in PHASES}
        for side, rows in (
            ("lightning", timer.phases["lightning"][skip - 1 :]),
            ("bare", timer.phases["bare"][skip:]),
        )
    }
    return {
        "phases_ms": median_phases,
        "engine": engine,
        "bare": bare_name,
        "order": "first" if first_order else "second",
        "lightning_median_ms": statistics.median(light),
        "bare_median_ms": statistics.median(bare_ms),
        "overhead": statistics.median(light) / statistics.median(bare_ms),
        # the mean counts the logging steps too (every trainer.log_every_n_steps-th step logs
        # and runs train/acc_pre's forward passes): what the throughput of a run sees
        "overhead_mean": statistics.fmean(light) / statistics.fmean(bare_ms),
        "lightning_ms": light,
        "bare_ms": bare_ms,
    }


# ---- 3. data module throughput -------------------------------------------------------------
def data_rate(setting, args, count: int = 20) -> dict:
    dm = datamodule(setting, args.device)
    loader = iter(dm.train_dataloader())
    next(loader)
    t0 = time.perf_counter()
    for _ in range(count):
        batch = next(loader)
    if args.device.startswith("cuda"):
        batch.to(args.device)
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {
        "episodes_per_s": count * setting["batch"] / seconds,
        "ms_per_meta_batch": 1e3 * seconds / count,
        "num_workers": getattr(dm, "num_workers", None),
    }


# ---- 4. peak memory ------------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so VmHWM measures from here on."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_point(setting, engine, steps, first_order, device, malloc) -> dict:
    """Peak memory of one meta-step (runs in a fresh process on CPU)."""
    if malloc and device == "cpu":
        tune_malloc()
    batches = random_batches(setting, device, 1)
    runner = Runner(engine, setting, device, malloc, steps, first_order)
    if device.startswith("cuda"):
        runner(batches[0])  # warm-up (cuDNN workspaces, allocator)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        runner(batches[0])
        torch.cuda.synchronize()
        return {"peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}
    if not reset_peak_rss():  # without it the peak may be the import's, not the step's
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
    base = rss_bytes()
    runner(batches[0])
    peak = peak_rss_bytes()
    return {
        "peak_mb": (peak - base) / 2**20,
        "rss_before_mb": base / 2**20,
        "max_rss_mb": peak / 2**20,
    }


def memory_table(setting, args) -> list[dict]:
    rows = []
    for engine in args.memory_engines:
        for order in args.orders:
            for steps in args.memory_steps:
                point = dict(engine=engine, order=order, inner_steps=steps)
                spec = json.dumps(
                    {
                        **point,
                        "setting": setting["name"],
                        "batch": setting["batch"],
                        "device": args.device,
                        "malloc": not args.no_malloc_tune,
                    }
                )
                if args.device.startswith("cuda"):
                    res = memory_point(
                        setting,
                        engine,
                        steps,
                        order == "first",
                        args.device,
                        not args.no_malloc_tune,
                    )
                else:
                    proc = subprocess.run(
                        [sys.executable, __file__, "--memory-child", spec],
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                    if proc.returncode:
                        raise RuntimeError(f"memory child {spec} failed:\n{proc.stderr}")
                    res = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append({**point, **res})
                say(
                    f"  memory {setting['name']} {engine} {order} {steps} steps: "
                    f"{res['peak_mb']:.0f} MB"
                )
    return rows


# ---- 5. FLOPs per meta-step: the arithmetic lower bound ---------------------------------
def step_flops(setting, batches, args) -> dict:
    """FLOPs of one meta-step per order (torch.utils.flop_counter over engine=func, eager: the
    same arithmetic every engine does) and, given ``--peak-tflops``, the time the device
    would take at its peak rate: a lower bound for ms/step."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for order in args.orders:
        runner = Runner("func", setting, args.device, False, setting["steps"], order == "first")
        with FlopCounterMode(display=False) as counter:
            runner(batches[0])
        flops = counter.get_total_flops()
        bound = 1e3 * flops / (args.peak_tflops * 1e12) if args.peak_tflops else None
        out[order] = {"flops": flops, "lower_bound_ms": bound}
        say(
            f"  {setting['name']} {order}-order: {flops / 1e9:.1f} GFLOP per meta-step"
            + (f", >= {bound:.2f} ms at {args.peak_tflops} TFLOP/s" if bound else "")
        )
    return out


# ---- output ------------------------------------------------------------------------------
def machine(device: str) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    else:
        try:
            info["cpu"] = next(
                line.split(":", 1)[1].strip()
                for line in open("/proc/cpuinfo")
                if "model name" in line
            )
        except (OSError, StopIteration):
            info["cpu"] = platform.processor()
    return info


def overhead_line(o: dict) -> str:
    bare = "bare torch.func loop" if o["bare"] == "loop" else f"bare {o['bare']} engine step"
    ph = o["phases_ms"]
    split = ", ".join(f"{k} {ph['lightning'][k]:.1f}/{ph['bare'][k]:.1f}" for k in PHASES)
    return (
        f"overhead ({o['order']}-order, engine={o['engine']}): Lightning step "
        f"{o['lightning_median_ms']:.1f} ms / {bare} {o['bare_median_ms']:.1f} ms = "
        f"{o['overhead']:.3f} (target <= {overhead_target(o['engine']):.2f}); "
        f"means: {o['overhead_mean']:.3f}\n"
        f"    phases, median ms Lightning/bare: {split}"
    )


def report(res: dict) -> str:
    lines = [f"machine: {res['machine']}", ""]
    for s in res["settings"].values():
        lines.append(f"## {s['label']}")
        lines.append(
            f"{'order':7} {'engine':14} {'median ms':>10} {'min ms':>9} {'x loop':>7}"
            f" {'grad diff':>10}"
        )
        for order, table in s.get("time", {}).items():
            for engine, row in table.items():
                ratio = f"{row['vs_loop']:.2f}" if row["vs_loop"] else "-"
                diff = "-" if row["grad_rel_diff"] is None else f"{row['grad_rel_diff']:.1e}"
                lines.append(
                    f"{order:7} {engine:14} {row['median_ms']:10.1f} "
                    f"{row['min_ms']:9.1f} {ratio:>7} {diff:>10}"
                )
        for o in s.get("overhead", []):
            lines.append(overhead_line(o))
        if "data" in s:
            d = s["data"]
            lines.append(
                f"data module: {d['episodes_per_s']:.0f} episodes/s produced "
                f"({d['ms_per_meta_batch']:.1f} ms per meta-batch); consumed: "
                + ", ".join(f"{k} {v:.0f}/s" for k, v in d["consumed"].items())
            )
        if s.get("memory"):
            lines.append("peak memory of one meta-step, MB (inner steps: MB), growth = last/first:")
            keys = sorted({(r["engine"], r["order"]) for r in s["memory"]})
            for engine, order in keys:
                pts = [r for r in s["memory"] if (r["engine"], r["order"]) == (engine, order)]
                growth = pts[-1]["peak_mb"] / max(pts[0]["peak_mb"], 1e-9)
                lines.append(
                    f"  {engine:14} {order:7} "
                    + "  ".join(f"{r['inner_steps']:>2}: {r['peak_mb']:7.0f}" for r in pts)
                    + f"  growth {growth:.2f}x"
                )
        for order, f in s.get("flops", {}).items():
            bound = f["lower_bound_ms"]
            line = f"FLOPs {order}-order: {f['flops'] / 1e9:.1f} GFLOP per meta-step"
            if bound:
                line += f"; lower bound {bound:.2f} ms at peak"
                for engine, row in s.get("time", {}).get(order, {}).items():
                    line += f"; {engine} {row['median_ms'] / bound:.0f}x it"
            lines.append(line)
        lines += [f"ERROR {e}" for e in s.get("errors", [])]
        lines.append("")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed repetitions per engine")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--json", action="store_true", help="print JSON on stdout (tables: stderr)")
    p.add_argument("--settings", default="omniglot,ff15")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--orders", default="second,first")
    p.add_argument(
        "--meta-batch",
        type=int,
        default=None,
        help=f"tasks per meta-step; default: {CPU_META_BATCH} on CPU (so that --steps 5 takes "
        "minutes), the setting's own (32, 25) on CUDA; 0: the setting's own",
    )
    p.add_argument("--pool", type=int, default=4, help="distinct meta-batches cycled through")
    p.add_argument(
        "--overhead-engines",
        default="func",
        help="engines run through the Lightning loop ('' skips the overhead)",
    )
    p.add_argument("--overhead-orders", default="second", help="orders run through Lightning")
    p.add_argument(
        "--no-acc-pre",
        action="store_true",
        help="overhead run without GBML's train/acc_pre forward passes (attribution)",
    )
    p.add_argument("--memory-engines", default="func,func:recompute,vmap", help="'' skips memory")
    p.add_argument("--memory-steps", default="1,5,10,20")
    p.add_argument("--memory-settings", default="omniglot")
    p.add_argument("--no-data", action="store_true", help="skip the data-module throughput")
    p.add_argument("--synthetic", action="store_true", help="random episodes (no data files)")
    p.add_argument("--no-malloc-tune", action="store_true", help="CPU: leave glibc malloc be")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--flops", action="store_true", help="count FLOPs per meta-step")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak (TFLOP/s, of the precision used) for the FLOPs' lower bound in ms",
    )
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    args.settings, args.engines, args.orders = (
        split(args.settings),
        split(args.engines),
        split(args.orders),
    )
    args.overhead_engines, args.memory_engines = (
        split(args.overhead_engines),
        split(args.memory_engines),
    )
    args.overhead_orders = split(args.overhead_orders)
    args.memory_steps = [int(x) for x in split(args.memory_steps)]
    args.memory_settings = split(args.memory_settings)
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        spec = json.loads(args.memory_child)
        setting = {**SETTINGS[spec["setting"]], "name": spec["setting"], "batch": spec["batch"]}
        print(
            json.dumps(
                memory_point(
                    setting,
                    spec["engine"],
                    spec["inner_steps"],
                    spec["order"] == "first",
                    spec["device"],
                    spec["malloc"],
                )
            )
        )
        return {}
    if args.device == "cpu" and not args.no_malloc_tune:
        tune_malloc()
    if args.json:  # keep stdout for the JSON document (Lightning's progress bar prints)
        with contextlib.redirect_stdout(sys.stderr):
            res = run_all(args)
        say(report(res))
        print(json.dumps(res, indent=1, default=str))
    else:
        res = run_all(args)
        print(report(res))
    return res


def run_all(args) -> dict:
    res = {"machine": machine(args.device), "args": vars(args), "settings": {}}
    for name in args.settings:
        setting = {**SETTINGS[name], "name": name}
        batch = args.meta_batch
        if batch is None and not args.device.startswith("cuda"):
            batch = min(CPU_META_BATCH, setting["batch"])
        if batch:
            setting["batch"] = batch
            setting["label"] = setting["label"].rsplit("B=", 1)[0] + f"B={batch}"
        say(f"== {setting['label']}")
        out = res["settings"][name] = {"label": setting["label"]}
        make = random_batches if args.synthetic else real_batches
        batches = make(setting, args.device, args.pool)
        out["time"] = time_engines(setting, batches, args) if args.engines else {}
        if args.flops:
            out["flops"] = step_flops(setting, batches, args)
        if not args.synthetic:
            out["overhead"] = []
            for e in args.overhead_engines:
                for o in args.overhead_orders:
                    try:
                        out["overhead"].append(lightning_overhead(setting, args, e, o == "first"))
                        say("  " + overhead_line(out["overhead"][-1]))
                    except Exception as err:  # report, go on with the other sections
                        out.setdefault("errors", []).append(f"overhead {e} {o}: {err!r}")
                        say(f"  overhead {e} {o} failed: {err!r}")
            if not args.no_data and args.engines:
                out["data"] = data_rate(setting, args)
                fastest = {
                    f"{o}-order {e}": setting["batch"] / (row["median_ms"] / 1e3)
                    for o, t in out["time"].items()
                    for e, row in t.items()
                }
                best = max(fastest, key=fastest.get)
                out["data"]["consumed"] = {best: fastest[best]}
                out["data"]["produced_over_consumed"] = (
                    out["data"]["episodes_per_s"] / fastest[best]
                )
                say(
                    f"  data: {out['data']['episodes_per_s']:.0f} episodes/s produced, "
                    f"{fastest[best]:.0f}/s consumed by {best}"
                )
        if name in args.memory_settings and args.memory_engines:
            try:
                out["memory"] = memory_table(setting, args)
            except Exception as err:
                out.setdefault("errors", []).append(f"memory: {err!r}")
                say(f"  memory failed: {err!r}")
    res["machine"]["load_avg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return res


if __name__ == "__main__":
    main()
