"""Each variant learns: a short run of the real config on Omniglot 5-way 1-shot reaches a test
accuracy on the meta-test classes (the evaluation alphabets) clearly above chance (20 %) and
above what the untrained network reaches with the same test-time adaptation.

Thresholds are calibrated per variant with margin (see the table below: untrained accuracy,
observed accuracy over two seeds). Runs are shrunk for a 2-core CPU: 32 channels, 5 queries
per class, small meta-batches, 100 fixed test episodes, one torch thread (on a busy 2-core
machine two threads per process were up to eight times slower).
"""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from metalearn.train import run
from tests.helpers import REPO

COMMON = [
    "model.channels=32",
    "queries=5",
    "data.test_episodes=100",
    "data.val_episodes=25",
    "data.eval_batch_size=25",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "print_config=false",
]
MAML_PP = [  # 150 steps: MSL annealed over the first 50, DA second order from step 50
    "algo.meta_batch_size=4",
    "algo.inner_steps=2",
    "algo.inner_steps_test=3",
    "algo.msl_fraction=0.3334",
    "algo.da_fraction=0.3334",
    "data.batches_per_epoch=25",
    "trainer.check_val_every_n_epoch=6",
]
MB4 = ["algo.meta_batch_size=4"]
# algo: (outer steps, overrides, threshold). Observed test/acc (seed 42, seed 1) and the
# untrained network's (same test-time adaptation) when calibrated:
CASES = {
    # 150 steps keep CI short (300 steps: 0.831, 0.815)
    "maml": (150, MB4, 0.50),  # 0.635, 0.612; untrained 0.329
    # first order learns slowly in short runs: 0.458, 0.471 (100 steps); 0.494, 0.460 (300)
    "fomaml": (100, MB4, 0.39),  # untrained 0.329
    "metasgd": (150, MB4, 0.52),  # 0.678, 0.654 (300 steps: 0.834, 0.837); untrained 0.329
    "alpha_maml": (100, MB4, 0.60),  # 0.770, 0.776; untrained 0.329
    "maml_pp": (150, MAML_PP, 0.70),  # 0.838, 0.834; untrained 0.586
    "anil": (100, MB4, 0.45),  # 0.646, 0.572; untrained 0.269
    # inner lr 0.003 (paper 0.001, for 100K steps) and 20 test steps keep the run short
    "reptile": (100, ["algo.inner_lr=0.003", "algo.inner_steps_test=20"], 0.70),  # 0.838
    # (seed 42; 0.765, 0.770 with a fresh inner Adam per task); untrained 0.639 (Adam
    # fine-tuning of a random Conv4 is already far above chance)
    "protonet": (150, MB4, 0.65),  # 0.819, 0.828; untrained 0.493
    "finetune": (300, [], 0.62),  # 0.760, 0.799; untrained 0.482
    "matching": (150, MB4, 0.62),  # 0.756, 0.708; untrained 0.483
    "relation": (100, MB4, 0.55),  # 0.732, 0.706; untrained 0.196
    "siamese": (150, MB4, 0.45),  # 0.644, 0.804; untrained 0.193
}


@pytest.mark.slow
@pytest.mark.parametrize("algo", CASES)
def test_variant_learns_omniglot_5way_1shot(algo, tmp_path, data_root):
    torch.set_num_threads(1)
    steps, overrides, threshold = CASES[algo]
    epoch = (
        []
        if any("batches_per_epoch" in o for o in overrides)
        else [f"data.batches_per_epoch={steps}"]
    )
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"algo={algo}",
                *COMMON,
                f"trainer.max_steps={steps}",
                *epoch,
                *overrides,
                f"output_dir={tmp_path}",
            ],
        )
    metrics = run(cfg)
    assert metrics["status"] == "ok" and metrics["steps"] == steps
    assert metrics["test/acc"] > threshold, (
        f"{algo}: test/acc {metrics['test/acc']:.3f} +- {metrics['test/acc_ci95']:.3f} "
        f"after {steps} steps, expected > {threshold}"
    )


@pytest.mark.slow
def test_protonet_learns_miniimagenet_84x84_rgb(tmp_path, data_root):
    """ProtoNet with Conv4-32 on mini-ImageNet (84x84 colour, meta-test classes), 5-way
    5-shot: 200 episodes lift test/acc from the untrained network's 0.360 (measured: the same
    100 test episodes after one step) to 0.418 (seed 42). TADAM's metric scaling (0.01) keeps
    the first steps' softmax out of saturation: with the paper's plain distance the same 200
    steps reach only 0.378 (losses of 20-60 at the start; docs/RESULTS.md)."""
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "data=miniimagenet",
                "algo=protonet",
                "algo.metric_scale=0.01",
                "algo.meta_batch_size=1",
                "shots=5",
                *COMMON,
                "trainer.max_steps=200",
                "data.batches_per_epoch=200",
                f"output_dir={tmp_path}",
            ],
        )
    metrics = run(cfg)
    assert metrics["status"] == "ok" and metrics["steps"] == 200
    assert metrics["test/acc"] > 0.40, (
        f"test/acc {metrics['test/acc']:.3f} +- {metrics['test/acc_ci95']:.3f}, expected > 0.40"
        " (untrained: 0.360)"
    )
