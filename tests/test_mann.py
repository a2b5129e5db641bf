"""MANN's defining mechanisms (Santoro et al. 2016), each against a hand computation: LRUA
writes to the least-used slot and, as the write gate opens, to the previously read slot; reads
are cosine-attention weighted sums; every step carries the previous step's label; the per-
instance accuracy bookkeeping of the paper's Table 1. Then a run through train.py (with the
per-instance metrics in metrics.json and the report's table), adapt/predict, and a short
learning test on real Omniglot."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch

import metalearn
from metalearn.algorithms.mann import (
    MANN,
    content_read,
    instance_numbers,
    least_used,
    lrua_write,
    offset_labels,
    per_instance_accuracy,
)
from metalearn.errors import ConfigError
from metalearn.report import report
from metalearn.train import run
from tests.helpers import adapted_accuracy, compose_cfg, random_episodes, tiny_net


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_lrua_writes_the_key_to_the_least_used_slot_after_zeroing_it():
    memory = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])  # [B=1, S=3, D=2]
    usage = torch.tensor([[0.9, 0.1, 0.5]])  # slot 1 is the least used
    read = torch.tensor([[[1.0, 0.0, 0.0]]])  # previously read: slot 0
    key = torch.tensor([[[10.0, 20.0]]])
    # gate closed (sigmoid(alpha) ~ 0): all of the write goes to the least-used slot, zeroed first
    new, weights = lrua_write(memory, read, usage, key, torch.tensor([[-30.0]]))
    torch.testing.assert_close(weights, torch.tensor([[[0.0, 1.0, 0.0]]]), atol=1e-12, rtol=0)
    expected = torch.tensor([[[1.0, 2.0], [10.0, 20.0], [5.0, 6.0]]])
    torch.testing.assert_close(new, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("gate", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_lrua_write_weights_mix_the_previous_read_and_the_least_used_slot_by_the_gate(gate):
    memory = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    usage = torch.tensor([[0.9, 0.1, 0.5]])
    read = torch.tensor([[[0.7, 0.1, 0.2]]])
    key = torch.tensor([[[10.0, 20.0]]])
    alpha = torch.tensor([[logit(gate) if 0 < gate < 1 else (50.0 if gate else -50.0)]])
    new, weights = lrua_write(memory, read, usage, key, alpha)
    # by hand: w^w = g * w^r_{t-1} + (1 - g) * w^lu (slot 1); slot 1 zeroed, then + w^w(i) k
    ww = [gate * 0.7, gate * 0.1 + (1 - gate), gate * 0.2]
    torch.testing.assert_close(weights[0, 0], torch.tensor(ww), atol=1e-6, rtol=0)
    rows = [[1.0, 2.0], [0.0, 0.0], [5.0, 6.0]]
    expected = [[r[0] + w * 10.0, r[1] + w * 20.0] for r, w in zip(rows, ww, strict=True)]
    torch.testing.assert_close(new[0], torch.tensor(expected), atol=1e-5, rtol=0)


def test_least_used_marks_as_many_slots_as_read_heads_lowest_index_on_ties():
    usage = torch.tensor([[0.3, 0.0, 0.2, 0.0]])
    torch.testing.assert_close(least_used(usage, 1), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    torch.testing.assert_close(least_used(usage, 2), torch.tensor([[0.0, 1.0, 0.0, 1.0]]))
    torch.testing.assert_close(least_used(usage, 3), torch.tensor([[0.0, 1.0, 1.0, 1.0]]))


def test_reads_are_softmax_of_cosine_similarities_weighted_sums_of_memory_rows():
    g = torch.Generator().manual_seed(0)
    memory = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    keys = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)  # 4 read heads
    weights, reads = content_read(memory, keys)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, dtype=torch.float64))
    for b in range(2):
        for h in range(4):
            k = keys[b, h]
            cos = torch.stack([k @ m / (k.norm() * m.norm()) for m in memory[b]])
            torch.testing.assert_close(weights[b, h], cos.exp() / cos.exp().sum())
            torch.testing.assert_close(reads[b, h], (weights[b, h, :, None] * memory[b]).sum(0))


def test_usage_decays_by_gamma_and_adds_the_read_and_write_weights():
    module = mann(gamma=0.5, read_heads=2, memory_slots=6)
    state = module.initial_state(3, torch.zeros(1, dtype=torch.float64))
    state = state._replace(usage=torch.rand(3, 6, dtype=torch.float64))
    x = torch.rand(3, 16 * 16, dtype=torch.float64)
    _, new = module.step(x, torch.zeros(3, 3, dtype=torch.float64), state)
    # w^w of this step, recomputed from the controller's outputs
    h = new.h
    adds = torch.tanh(module.add(h)).view(3, 2, -1)
    _, write = lrua_write(state.memory, state.read_weights, state.usage, adds, module.alpha(h))
    torch.testing.assert_close(
        new.usage, 0.5 * state.usage + new.read_weights.sum(1) + write.sum(1)
    )


@pytest.mark.parametrize("write", ["add", "key"])
def test_a_step_writes_its_write_vector_and_reads_with_its_key(write):
    """write=add: the least-used slot receives tanh(W_a h_t), a vector separate from the read key
    tanh(W_k h_t) (the reimplementations that learn, e.g. tristandeleu/ntm-one-shot); with the
    key written (write=key) the read after the write finds the step's own key at cosine 1."""
    module = mann(write=write, memory_slots=4)
    torch.nn.init.constant_(module.alpha.bias, -50.0)  # gate closed: all to the least-used slot
    torch.nn.init.zeros_(module.alpha.weight)
    state = module.initial_state(2, torch.zeros(1, dtype=torch.float64))
    x = torch.rand(2, 16 * 16, dtype=torch.float64)
    _, new = module.step(x, torch.zeros(2, 3, dtype=torch.float64), state)
    key = torch.tanh(module.key(new.h))
    written = key if write == "key" else torch.tanh(module.add(new.h))
    assert (write == "add") == (module.add is not None)
    # slot 0 (least used, ties: lowest index) zeroed, then + the write vector; the rest stay 1e-6
    torch.testing.assert_close(new.memory[:, 0], written)
    torch.testing.assert_close(new.memory[:, 1:], torch.full_like(new.memory[:, 1:], 1e-6))
    weights, _ = content_read(new.memory, key.unsqueeze(1))
    torch.testing.assert_close(new.read_weights, weights)
    if write == "add":
        assert not torch.allclose(written, key)


def test_each_step_carries_the_previous_steps_label_the_first_a_zero_vector():
    labels = torch.tensor([[2, 0, 2, 1]])
    prev = offset_labels(labels, 3)
    expected = torch.tensor([[[0, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 1]]]).float()
    torch.testing.assert_close(prev, expected)


def test_the_label_of_a_step_reaches_the_network_only_at_the_next_step():
    """The prediction at step t does not depend on y_t, but the one at t+1 does."""
    module = mann()
    eps = random_episodes(batch=1, ways=3, shots=2, queries=1)
    x, y = module.sequences(eps, torch.Generator().manual_seed(0))
    other = y.clone()
    other[0, 2] = (y[0, 2] + 1) % 3
    a, _ = module.run_sequence(x, y)
    b, _ = module.run_sequence(x, other)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3], b[:, 3])


def test_per_instance_accuracy_on_a_hand_made_sequence():
    labels = torch.tensor([[0, 1, 0, 0, 1, 1], [1, 1, 1, 0, 0, 1]])
    torch.testing.assert_close(
        instance_numbers(labels), torch.tensor([[1, 1, 2, 3, 2, 3], [1, 2, 3, 1, 2, 4]])
    )
    correct = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 1, 1, 0]]).bool()
    accs = per_instance_accuracy(correct, labels, instances=(1, 2, 3, 4, 5))
    torch.testing.assert_close(accs[1], torch.tensor([0.5, 0.5]))  # ep 2: steps 0 (x), 3 (v)
    torch.testing.assert_close(accs[2], torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(accs[3], torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(accs[4], torch.tensor([0.0]))  # only episode 2 has a 4th
    assert accs[5].numel() == 0


def test_sequences_hold_each_episodes_support_and_query_images_shuffled():
    module = mann()
    eps = random_episodes(batch=2, ways=3, shots=2, queries=3)
    x, y = module.sequences(eps, torch.Generator().manual_seed(0))
    assert x.shape[:2] == y.shape == (2, 15)
    for b in range(2):
        images = torch.cat([eps.support_x[b], eps.query_x[b]])
        labels = torch.cat([eps.support_y[b], eps.query_y[b]])
        assert not torch.equal(y[b], labels)  # shuffled
        for t in range(15):  # each step is one of the episode's images with its own label
            match = [i for i in range(15) if torch.equal(images[i], x[b, t])]
            assert len(match) == 1 and labels[match[0]] == y[b, t]


def test_validation_scores_the_later_presentations_of_the_same_seeded_sequences():
    """val/acc per episode: the accuracy at the 2nd and later presentations of the shuffled
    support + query sequence, the same sequences at every validation."""
    module = mann()
    eps = random_episodes(batch=2, ways=3, shots=2, queries=3)
    rows = []
    for _ in range(2):
        module.on_validation_epoch_start()
        module.validation_step(eps, 0)
        rows.append(torch.cat(module._eval_accs))
    torch.testing.assert_close(rows[0], rows[1])
    x, y = module.sequences(eps, torch.Generator().manual_seed(0))
    logits, _ = module.run_sequence(x, y)
    correct = (logits.argmax(-1) == y).tolist()
    numbers = instance_numbers(y).tolist()
    for b in range(2):
        later = [c for c, n in zip(correct[b], numbers[b], strict=True) if n > 1]
        assert len(later) == 15 - 3
        assert rows[0][b].tolist() == pytest.approx([sum(later) / len(later), 3, 2])


def test_bad_settings_are_refused_naming_the_fix():
    with pytest.raises(ConfigError, match="pixels"):
        mann(encoder="conv")
    with pytest.raises(ConfigError, match="separate write vector"):
        mann(write="both")
    with pytest.raises(ConfigError, match="fewer heads"):
        mann(read_heads=8, memory_slots=4)
    module = mann()
    eps = random_episodes(batch=1, ways=4)
    with pytest.raises(ConfigError, match="at most 3 classes"):
        module.query_logits(eps)


def mann(**kw) -> MANN:
    torch.manual_seed(0)
    opts = dict(image_size=16, controller_size=12, memory_slots=8, memory_size=5, read_heads=1)
    return MANN(tiny_net(), partial(torch.optim.Adam, lr=1e-3), **{**opts, **kw}).double()


# ---- through train.py, the report and adapt/predict ------------------------------------------
def test_train_logs_the_per_instance_table_and_the_report_shows_it(tmp_path, data_root):
    cfg = compose_cfg(
        tmp_path / "run",
        ["algo=mann", "algo.controller_size=16", "algo.memory_slots=16", "queries=9"],
    )
    metrics = run(cfg)
    assert metrics["status"] == "ok" and metrics["engine"] is None
    for k in (1, 2, 3, 4, 5, 10):
        assert 0 <= metrics[f"test/acc_instance_{k}"] <= 1
        assert metrics[f"test/acc_instance_{k}_ci95"] >= 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    out = report(tmp_path, plot=False, echo=False)
    text = out["files"]["markdown"].read_text()
    assert "per presentation of a class" in text
    row = next(
        line
        for line in text.splitlines()
        if line.startswith("| omniglot / all / mann 5-way 1-shot seed 42 |")
    )
    assert f"| {100 * metrics['test/acc_instance_10']:.1f} ± " in row

    # adapt/predict: the support sequence, then each query; the run's own test accuracy
    learner = metalearn.load(metrics["best_checkpoint"])
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.setup()
    data = dm.eval_dataset("test")
    assert adapted_accuracy(learner, data) == pytest.approx(metrics["test/acc"], abs=1e-6)
    images = dm.splits.test.images
    x = torch.from_numpy(images[:7, 0])
    with pytest.raises(ConfigError, match="at most 5 classes"):
        learner.adapt(x, list(range(7)), invert=False).predict(x, invert=False)


@pytest.mark.slow
def test_mann_runs_in_a_sweep_beside_protonet_and_the_report_tabulates_both(tmp_path, data_root):
    import os
    import subprocess
    import sys

    from tests.helpers import REPO, TINY

    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "algo=mann,protonet",
        "queries=4",
        f"hydra.sweep.dir={tmp_path}",
        *TINY,
    ]
    env = {**os.environ, "METALEARN_DATA_DIR": str(data_root), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    out = report(tmp_path, plot=False, echo=False)
    assert {r.get("algo"): r.get("status") for r in out["runs"]} == {
        "mann": "ok",
        "protonet": "ok",
    }
    text = out["files"]["markdown"].read_text()
    assert "| omniglot / all / mann |" in text and "| omniglot / all / protonet |" in text
    # the per-instance table lists the sequence learner only (instances up to 1 + 4 = 5)
    table = text.split("per presentation of a class")[1]
    assert "mann 5-way 1-shot" in table and "protonet" not in table
    assert "instance 5" in table and "instance 10" not in table


# ---- learning on real Omniglot ---------------------------------------------------------------
def sequence_accuracies(module, data, blank=False):
    """Per-instance accuracies over the fixed test episodes, pooled {k: acc}."""
    generator = torch.Generator().manual_seed(0)
    accs: dict[int, list] = {}
    with torch.no_grad():
        for i in range(len(data)):
            x, y = module.sequences(data[i], generator)
            logits, _ = module.run_sequence(torch.zeros_like(x) if blank else x, y)
            for k, v in per_instance_accuracy(logits.argmax(-1) == y, y, (1, 2, 3, 4, 5)).items():
                accs.setdefault(k, []).append(v)
    return {k: torch.cat(v).mean().item() for k, v in accs.items()}


@pytest.mark.slow
def test_mann_binds_images_to_labels_in_memory_on_omniglot_in_a_short_run(data_root):
    """1000 steps of 16 two-class sequences (5 presentations per class, 20x20 pixels, the CPU-
    sized defaults, Adam 0.01) on the meta-training alphabets; on 100 meta-test sequences the
    2nd and later presentations of a class are predicted clearly better than its 1st (a guess
    helped by the label statistics) and than the same sequences with blank images (the label
    statistics alone): the label was bound to the image in memory, the paper's behaviour.

    Observed (seed 0): 1st 0.62, 2nd-5th 0.87 0.88 0.82 0.82; blank images 0.23, 0.71 0.71
    0.72 0.60; untrained ~0.5 throughout."""
    from metalearn.data.datamodule import EpisodeDataModule

    torch.set_num_threads(1)
    dm = EpisodeDataModule(
        name="omniglot", root=str(data_root), ways=2, shots=1, queries=4,
        meta_batch_size=16, seed=0, batches_per_epoch=1000, val_episodes=10,
        test_episodes=100, eval_batch_size=50, image_size=20, num_workers=0,
    )  # fmt: skip
    dm.setup()
    torch.manual_seed(0)
    module = MANN(tiny_net(ways=2).float(), None, image_size=20)
    data = dm.eval_dataset("test")
    before = sequence_accuracies(module, data)
    opt = torch.optim.Adam(module.outer_parameters(), lr=1e-2)
    for episodes in dm.train_dataloader():
        x, y = module.sequences(episodes)
        logits, _ = module.run_sequence(x, y)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        module.before_outer_step()  # the gradient clipping of training
        opt.step()
    after = sequence_accuracies(module, data)
    blank = sequence_accuracies(module, data, blank=True)
    later = sum(after[k] for k in (2, 3, 4, 5)) / 4
    blank_later = sum(blank[k] for k in (2, 3, 4, 5)) / 4
    print(f"before {before} after {after} blank {blank}")
    assert all(abs(v - 0.5) < 0.1 for v in before.values()), before
    assert later > after[1] + 0.12, after
    assert later > blank_later + 0.08, (after, blank)
    assert after[2] > blank[2] + 0.08, (after, blank)


@pytest.mark.slow
def test_mann_trains_under_ddp_on_two_processes(tmp_path, data_root):
    """DDP splits MANN's meta-batch: each rank runs its own sequences (ordered by seed, rank and
    step) and DDP's reducer averages the gradients through manual_backward. A run, not a parity
    test: the union-of-shards reference of tests/ddp_helpers.py would need each rank's
    sequence orders."""
    from tests.ddp_helpers import ddp_command, run_ok

    run_ok(ddp_command("algo=mann", f"hydra.run.dir={tmp_path}"), data_root)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["steps"] == 4, metrics.get("error")
    assert 0 <= metrics["test/acc"] <= 1 and metrics["test_episodes"] == 5
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("mode", ["range", "metadataset"])
def test_varying_episodes_are_refused_before_training_naming_the_fix(tmp_path, mode):
    cfg = compose_cfg(tmp_path, ["algo=mann", f"data.episodes={mode}"])
    with pytest.raises(ConfigError, match="use data.episodes=fixed"):
        run(cfg)
    assert not (tmp_path / "checkpoints").exists()
