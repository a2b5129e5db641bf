"""DDP gradient parity: two gloo processes with B tasks each == one process with all 2B tasks.

The DDP side is the real command line, ``python train.py -m algo=... trainer=ddp_cpu
trainer.devices=2`` (Lightning starts rank 1 by re-running the script; under ``-m`` that goes
through ``metalearn.distributed``'s relaunch of the job's own overrides). The reference runs
the same config in this process on one device, with a datamodule that puts rank 0's and
rank 1's tasks into one meta-batch of 2B. Parameters after a few outer steps must agree to
float32 round-off (outer SGD), and validation/test accuracies (episodes split unevenly across
ranks, then gathered) must equal the single-process ones over the same episodes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metalearn.errors import ConfigError
from tests.ddp_helpers import (
    EXTRA,
    SINUSOID,
    UnionOfSinusoidShards,
    compose,
    data_target,
    ddp_command,
    max_diff,
    parameters,
    reference,
    run_env,
    run_ok,
    same_weights,
)
from tests.helpers import REPO, patched_train

HAS_REPTILE = (REPO / "conf" / "algo" / "reptile.yaml").exists()
METRIC = ["matching", "relation", "siamese"]  # no inner loop: DDP splits their episodes too
ALGOS = ["maml", "fomaml", *METRIC] + (["reptile"] if HAS_REPTILE else [])


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, data_root) -> dict[str, Path]:
    """Every algorithm on 2 gloo processes: {algo: run dir}.

    MAML, FOMAML and the metric-based learners as one ``-m`` sweep (rank 1 relaunched per
    job by metalearn.distributed), Reptile as a single run (Lightning's own relaunch), so both
    command paths are covered.
    """
    sweep = tmp_path_factory.mktemp("ddp")
    # subdir: the default ${hydra.job.override_dirname} of this many overrides is too long
    run_ok(
        ddp_command(
            f"algo=maml,fomaml,{','.join(METRIC)}",
            f"hydra.sweep.dir={sweep}",
            "hydra.sweep.subdir=${hydra.job.num}",
            multirun=True,
        ),
        data_root,
    )
    if HAS_REPTILE:
        run_ok(
            ddp_command("algo=reptile", *EXTRA["reptile"], f"hydra.run.dir={sweep / 'reptile'}"),
            data_root,
        )
    runs = {}
    for metrics_file in sweep.glob("*/metrics.json"):
        metrics = json.loads(metrics_file.read_text())
        assert metrics["status"] == "ok", metrics.get("error")
        runs[metrics["algo"]] = metrics_file.parent
    assert sorted(runs) == sorted(ALGOS)
    # rank 1 ran in the job's directory as a single run (no nested sweep)
    for run_dir in runs.values():
        assert (run_dir / "train_ddp_process_1.log").exists()
    assert not list(sweep.glob("*/*/metrics.json"))
    return runs


NO_REPTILE = pytest.mark.skipif(not HAS_REPTILE, reason="conf/algo/reptile.yaml is not there yet")


@pytest.mark.parametrize(
    "algo", ["maml", "fomaml", *METRIC, pytest.param("reptile", marks=NO_REPTILE)]
)
def test_two_processes_equal_one_with_the_union_of_tasks(algo, ddp_runs, tmp_path):
    ddp, one = same_weights(ddp_runs[algo], reference(tmp_path, algo))
    # evaluation: 3 + 2 episodes on two ranks, gathered == all 5 in one process
    assert [c["val/acc"] for c in ddp["curve"]] == pytest.approx(
        [c["val/acc"] for c in one["curve"]], abs=1e-6
    )
    assert ddp["test/acc"] == pytest.approx(one["test/acc"], abs=1e-6)
    assert ddp["test/acc_ci95"] == pytest.approx(one["test/acc_ci95"], abs=1e-6)


def test_without_the_other_ranks_tasks_parameters_differ(ddp_runs, tmp_path):
    """The parity above has power: rank 0's tasks alone (no gradient sync) give other weights."""
    alone = reference(tmp_path, "maml", shards=1, meta_batch=2, extra=["test=false"])
    diff = max_diff(
        parameters(ddp_runs["maml"] / "checkpoints" / "last.ckpt"),
        parameters(alone / "checkpoints" / "last.ckpt"),
    )
    assert diff > 1e-4


def test_meta_batch_must_divide_over_ranks(tmp_path):
    from metalearn.distributed import split_meta_batch

    assert split_meta_batch(32, 4) == 8
    with pytest.raises(ConfigError, match="algo.meta_batch_size=6"):
        split_meta_batch(6, 4)
    cfg = compose(tmp_path, ["trainer=ddp_cpu", "trainer.devices=4", "algo.meta_batch_size=6"])
    from hydra.utils import instantiate

    with pytest.raises(Exception, match="divide evenly") as err:
        instantiate(cfg.trainer)
    assert isinstance(err.value, ConfigError) or isinstance(err.value.__cause__, ConfigError)


NAN_ON_RANK_1 = """
outer_step = EpisodicModule.outer_step


def nan_on_rank_1(self, objective):
    if self.global_rank == 1 and self.global_step == 2:
        objective = objective * float("nan")
    return outer_step(self, objective)


EpisodicModule.outer_step = nan_on_rank_1
"""

STOP_AT_STEP = """
def stop_at_step(self, *args):
    if self.global_step >= int(os.environ["STOP_AT_STEP"]):
        self.trainer.should_stop = True


EpisodicModule.on_train_batch_end = stop_at_step
"""


def patched_ddp_run(tmp_path, data_root, patch: str, *overrides: str, **env) -> int:
    """``train.py`` on 2 gloo processes with ``patch`` applied in each; its exit status."""
    script = patched_train(tmp_path / "patched_train.py", patch)
    cmd = [sys.executable, str(script), *ddp_command(*overrides)[2:]]
    proc = subprocess.run(
        cmd, cwd=REPO, env=run_env(data_root, **env), capture_output=True, text=True, timeout=300
    )
    return proc.returncode


@pytest.mark.parametrize("algo", ["maml", pytest.param("reptile", marks=NO_REPTILE)])
def test_nan_on_one_rank_stops_every_rank_before_the_step(algo, tmp_path, data_root):
    # Rank 1's loss turns NaN at step 2 (epoch 1); rank 0's stays finite. Both must stop with
    # NonFiniteLossError (no hang, no rank stepping with NaN-averaged gradients), and the
    # checkpoint of epoch 0 must stay as it was.
    run_dir = tmp_path / "run"
    overrides = (f"algo={algo}", *EXTRA.get(algo, []), f"hydra.run.dir={run_dir}")
    assert patched_ddp_run(tmp_path, data_root, NAN_ON_RANK_1, *overrides) != 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed"
    assert metrics["error"].startswith("NonFiniteLossError"), metrics["error"]
    assert "another DDP rank" in metrics["error"]  # rank 0 writes metrics.json
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


@NO_REPTILE
def test_reptile_ddp_inner_optimizer_state_resumes_and_evaluates(tmp_path, data_root, caplog):
    # Inner Adam carries its moments from step to step, and each rank's differ (other tasks):
    # 2 processes stopped after step 2 and resumed must end where a straight run ends. (A large
    # inner rate and 20 val episodes make the state's effect on val/acc visible below.)
    common = [
        "algo=reptile",
        "algo.inner_steps_test=3",
        "test=false",
        "algo.inner_lr=0.02",
        "data.val_episodes=20",
    ]
    straight, first = tmp_path / "straight", tmp_path / "first"
    for run_dir, stop in ((straight, 99), (first, 2)):
        overrides = (*common, f"hydra.run.dir={run_dir}")
        assert (
            patched_ddp_run(tmp_path, data_root, STOP_AT_STEP, *overrides, STOP_AT_STEP=str(stop))
            == 0
        )
    ckpt = torch.load(first / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    states = ckpt["reptile_inner_states"]
    assert len(states) == 2 and states[0].keys() == states[1].keys()
    assert max_diff(*({n: s["exp_avg_sq"] for n, s in st.items()} for st in states)) > 0
    resumed = tmp_path / "resumed"
    run_ok(
        ddp_command(
            *common, f"hydra.run.dir={resumed}", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"
        ),
        data_root,
    )
    a, b = (parameters(d / "checkpoints" / "last.ckpt") for d in (straight, resumed))
    assert max_diff(a, b) == 0
    # One process cannot resume both ranks' states: it says so and starts from rank 0's. DDP
    # evaluation starts from rank 0's on every rank, so one process validating the final
    # checkpoint (a fit with nothing left to train) gets the DDP run's last val/acc.
    from metalearn.train import run

    with caplog.at_level("WARNING", logger="metalearn.algorithms.reptile"):
        cfg = compose(
            tmp_path / "one", [*common, f"ckpt_path={straight / 'checkpoints' / 'last.ckpt'}"]
        )
        one = run(cfg)
    assert one["status"] == "ok" and one["steps"] == 4
    assert any("inner optimizer states of 2 processes" in r.getMessage() for r in caplog.records)
    ddp = json.loads((straight / "metrics.json").read_text())
    assert one["curve"][-1]["val/acc"] == pytest.approx(ddp["curve"][-1]["val/acc"], abs=1e-6)


# ---- regression: MAML on sinusoids ----------------------------------------------------------


def test_sinusoid_regression_two_processes_equal_one_with_the_union_of_tasks(tmp_path, data_root):
    """DDP serves regression as it serves classification: the same weights, and the val/test
    MSE gathered over unequal shares equals one process's over the same tasks."""
    from metalearn.train import run

    ddp_dir, one_dir = tmp_path / "ddp", tmp_path / "one"
    run_ok(ddp_command(f"hydra.run.dir={ddp_dir}", base=SINUSOID), data_root)
    target = data_target(UnionOfSinusoidShards)
    cfg = compose(one_dir, [f"data._target_={target}", "+data.shards=2"], base=SINUSOID)
    assert run(cfg)["status"] == "ok"
    two, one = same_weights(ddp_dir, one_dir)
    assert [c["val/mse"] for c in two["curve"]] == pytest.approx(
        [c["val/mse"] for c in one["curve"]], rel=1e-5
    )
    assert two["test/mse"] == pytest.approx(one["test/mse"], rel=1e-5)
