"""bench/meta_step.py runs end to end (tiny sizes) and reports what RESULTS.md is built from."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tests.helpers import REPO


def run_bench(script: str, args: str, data_root) -> str:
    """``bench/<script>`` with ``args`` (split on spaces) on ``data_root``: its stdout, once it
    has exited 0."""
    proc = subprocess.run(
        [sys.executable, f"bench/{script}", *args.split()],
        cwd=REPO,
        env={**os.environ, "METALEARN_DATA_DIR": str(data_root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_meta_step_benchmark_smoke(data_root):
    args = "--steps 2 --warmup 0 --settings ff15 --meta-batch 2"
    args += " --engines loop,func,func:recompute,vmap"
    args += " --orders first,second --overhead-engines vmap --overhead-orders first"
    args += " --memory-engines vmap --memory-steps 1 --memory-settings ff15 --threads 1 --json"
    ff15 = json.loads(run_bench("meta_step.py", args, data_root))["settings"]["ff15"]
    for order in ("first", "second"):
        rows = ff15["time"][order]
        assert rows["loop"]["vs_loop"] == 1.0
        assert rows["func"]["grad_rel_diff"] < 1e-6  # the same computation as the loop
        assert rows["func:recompute"]["grad_rel_diff"] < 1e-6  # recomputed, not approximated
        assert rows["vmap"]["grad_rel_diff"] < 1e-3  # float32 rounding only
    (overhead,) = ff15["overhead"]
    assert overhead["overhead"] > 0
    for side in ("lightning", "bare"):
        phases = overhead["phases_ms"][side]
        assert set(phases) == {"between", "forward", "backward", "step"}
        assert all(math.isfinite(v) and v >= 0 for v in phases.values())
    assert {(m["order"], m["inner_steps"]) for m in ff15["memory"]} == {
        ("first", 1),
        ("second", 1),
    }
    assert all(m["peak_mb"] > 0 for m in ff15["memory"])
    assert ff15["data"]["produced_over_consumed"] > 1


def test_data_rate_benchmark_compares_production_with_a_real_fit(data_root, tmp_path):
    out = tmp_path / "rates.json"
    args = f"--datasets sinusoid,folder --batches 3 --steps 1 --warmup 0 --json {out}"
    args += " --per-class 4 --override algo.inner_steps=1 queries=2"
    run_bench("data_rate.py", args, data_root)
    rates = json.loads(out.read_text())
    assert set(rates) == {"sinusoid", "folder"}
    for rate in rates.values():
        assert rate["produced"] > 0 and rate["consumed"] > 0
        assert rate["ratio"] == rate["produced"] / rate["consumed"]


def test_bench_engine_names_select_the_engine_the_configs_build():
    """The overhead runs engines through the real config: ``vmap:compile`` must build the
    compiled vmap engine there, as ``make_engine`` does for the bare step."""
    import importlib.util

    from metalearn.instantiate import build

    spec = importlib.util.spec_from_file_location("meta_step", REPO / "bench" / "meta_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for name, compiled in (("vmap", False), ("vmap:compile", True), ("higher", None)):
        cfg = bench.compose(bench.SETTINGS["ff15"], "cpu", bench.engine_overrides(name))
        engine = build(cfg.engine)
        assert type(engine) is type(bench.make_engine(name, malloc=False))
        if compiled is not None:
            assert (engine.compiled is not None) == compiled, name
    assert bench.overhead_target("vmap:compile") == 1.05
