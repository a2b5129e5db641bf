"""Meta-Learner LSTM's defining mechanisms (Ravi & Larochelle 2017), each against a hand
computation: the cell state update c_t = f_t * c_{t-1} - i_t * grad_t with its two gates,
Andrychowicz et al.'s input preprocessing (both branches), the start near plain SGD with a
small rate, meta-gradients reaching c_0 (the learner's initialisation) and the LSTM. Then a
run through train.py, metalearn.evaluate, a checkpoint round trip and adapt/predict, episodes
of other numbers of classes, and a short learning test on real Omniglot."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

import metalearn
from metalearn.algorithms.meta_lstm import MetaLSTM, MetaLSTMCell, preprocess
from metalearn.data.episodes import ragged
from metalearn.errors import ConfigError
from metalearn.train import run
from tests.helpers import adapted_accuracy, compose_cfg, random_episodes, tiny_net


def meta_lstm(ways=3, **kw) -> MetaLSTM:
    torch.manual_seed(0)
    kw.setdefault("inner_steps", 3)
    return MetaLSTM(tiny_net(ways=ways), partial(torch.optim.Adam, lr=1e-3), **kw).double()


# ---- the mechanism, against hand computations ------------------------------------------------
def test_the_cell_state_update_is_the_forget_gate_times_c_minus_the_input_gate_times_grad():
    torch.manual_seed(0)
    cell = MetaLSTMCell(input_size=3, forget_bias=1.5, input_bias=-2.0).double()
    with torch.no_grad():  # weights big enough that every input matters
        cell.W_F.copy_(torch.tensor([0.3, -0.2, 0.5, 0.7, -0.4]))
        cell.W_I.copy_(torch.tensor([-0.6, 0.1, 0.2, -0.3, 0.9]))
    h = torch.randn(4, 3, dtype=torch.float64)
    grad, c, f_prev, i_prev = torch.randn(4, 4, dtype=torch.float64).unbind(1)
    c_t, f_t, i_t = cell(h, grad, c, f_prev, i_prev)
    for k in range(4):  # coordinate by coordinate, the paper's eq. 2 with shared weights
        f = 1 / (1 + math.exp(-(sum(cell.W_F[j].item() * h[k, j].item() for j in range(3))
                                + cell.W_F[3].item() * c[k].item()
                                + cell.W_F[4].item() * f_prev[k].item() + 1.5)))  # fmt: skip
        i = 1 / (1 + math.exp(-(sum(cell.W_I[j].item() * h[k, j].item() for j in range(3))
                                + cell.W_I[3].item() * c[k].item()
                                + cell.W_I[4].item() * i_prev[k].item() - 2.0)))  # fmt: skip
        assert f_t[k].item() == pytest.approx(f, rel=1e-12)
        assert i_t[k].item() == pytest.approx(i, rel=1e-12)
        assert c_t[k].item() == pytest.approx(f * c[k].item() - i * grad[k].item(), rel=1e-12)


def test_preprocessing_is_log_magnitude_over_p_and_sign_above_e_to_the_minus_p():
    p = 10.0
    x = torch.tensor([3.0, -0.5, 1e-3, -2e-4], dtype=torch.float64)  # all >= e^-10 = 4.5e-5
    want = torch.tensor(
        [[math.log(abs(v)) / p, math.copysign(1.0, v)] for v in x.tolist()], dtype=torch.float64
    )
    torch.testing.assert_close(preprocess(x, p), want)


def test_preprocessing_of_tiny_values_is_minus_one_and_e_to_the_p_times_x():
    p = 10.0
    x = torch.tensor([1e-6, -3e-5, 0.0], dtype=torch.float64)  # below e^-10 = 4.5e-5
    want = torch.tensor([[-1.0, math.exp(p) * v] for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(preprocess(x, p), want)
    assert preprocess(x, p).isfinite().all()  # log(0) never reaches the output
    # the branch switches at e^-p: p = 2 puts 0.1 (< e^-2 = 0.135) in the small branch
    torch.testing.assert_close(
        preprocess(torch.tensor([0.1, 0.2]), 2.0),
        torch.tensor([[-1.0, math.exp(2) * 0.1], [math.log(0.2) / 2, 1.0]]),
    )


def test_training_starts_near_plain_sgd_with_a_small_rate_and_almost_no_decay():
    """forget_bias=5, input_bias=-4 (the defaults): f ~ sigmoid(5) = 0.993, i ~ sigmoid(-4) =
    0.018 on every coordinate (the gate weights start at +-0.01), so the first update is
    c_1 ~ 0.993 c_0 - 0.018 grad: the step c_1 - f c_0 is the negative gradient times a rate
    that least squares recovers."""
    module = meta_lstm(inner_steps=1)
    sx, sy = (t[0] for t in random_episodes(batch=1)[:2])
    c0, layout = module.initial(sx, sy, 3, "trained", meta=False)
    c1, i, f = module.inner_loop(c0, layout, sx, sy, meta=False)
    assert f.item() == pytest.approx(1 / (1 + math.exp(-5)), rel=1e-3)
    assert i.item() == pytest.approx(1 / (1 + math.exp(4)), rel=0.1)
    theta = c0.clone().requires_grad_()
    loss = torch.nn.functional.cross_entropy(module.learner(theta, layout, sx), sy)
    (grad,) = torch.autograd.grad(loss, theta)
    step = c1 - f * c0
    rate = -(step @ grad) / (grad @ grad)
    assert rate.item() == pytest.approx(1 / (1 + math.exp(4)), rel=0.1)
    assert torch.corrcoef(torch.stack([step, -grad]))[0, 1] > 0.99


def test_c0_and_every_meta_learner_weight_get_a_finite_meta_gradient():
    module = meta_lstm()
    out = module.run_episodes(random_episodes(), meta=True)
    out.objective.backward()
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{name} got no meta-gradient"
        assert p.grad.isfinite().all(), name
    # c_0 is the backbone's parameters: the query loss reaches the learner's initialisation
    assert any(p.grad.abs().sum() > 0 for p in module.model.parameters())
    assert module.meta_cell.b_I.grad.abs() > 0 and module.meta_cell.b_F.grad.abs() > 0


def test_the_learners_gradients_are_inputs_without_second_derivatives():
    """The paper's sec. 3.2: the meta-gradient of c_0 follows c_1 = f * c_0 - i * grad and the
    gates, with grad (and the loss) constants. Against a hand-built update from the same
    weights; differentiating through grad (second order) gives another gradient."""
    module = meta_lstm(inner_steps=1)
    sx, sy, qx, qy = (t[0] for t in random_episodes(batch=1))
    layout = [(n, p.shape) for n, p in module.model.named_parameters()]
    flat = torch.cat([p.flatten() for p in module.model.parameters()]).detach()
    ce = torch.nn.functional.cross_entropy

    def meta_gradient(second_order: bool) -> torch.Tensor:
        c0 = flat.clone().requires_grad_()
        if second_order:
            loss = ce(module.learner(c0, layout, sx), sy)
            (grad,) = torch.autograd.grad(loss, c0, create_graph=True)
        else:
            theta = c0.detach().requires_grad_()
            loss = ce(module.learner(theta, layout, sx), sy)
            (grad,) = torch.autograd.grad(loss, theta)
        inputs = torch.cat(
            [preprocess(loss.detach()).expand(len(c0), 2), preprocess(grad.detach())], 1
        )
        h, _ = module.lstm(inputs)
        zeros = torch.zeros_like(c0)
        c1, _, _ = module.meta_cell(h, grad, c0, zeros, zeros)
        return torch.autograd.grad(ce(module.learner(c1, layout, qx), qy), c0)[0]

    c0 = flat.clone().requires_grad_()
    c1, _, _ = module.inner_loop(c0, layout, sx, sy, meta=True)
    (ours,) = torch.autograd.grad(ce(module.learner(c1, layout, qx), qy), c0)
    torch.testing.assert_close(ours, meta_gradient(second_order=False))
    assert not torch.allclose(ours, meta_gradient(second_order=True), rtol=1e-3, atol=1e-9)


def test_evaluation_adapts_without_keeping_a_graph():
    module = meta_lstm()
    logits = module.query_logits(random_episodes())
    assert logits.shape == (2, 9, 3) and not logits.requires_grad


def test_episodes_of_other_numbers_of_classes_get_their_own_head_ragged_or_not():
    module = meta_lstm(ways=5)
    three = random_episodes(ways=3)
    assert module.query_logits(three).shape == (2, 9, 3)  # prototype heads (auto)
    mixed = ragged([random_episodes(batch=1, ways=w, seed=w) for w in (2, 4)])
    out = module.run_episodes(mixed, meta=True)
    assert [z.shape for z in out.logits] == [(6, 2), (12, 4)]
    out.objective.backward()  # Proto-MAML-style heads: the meta-gradient reaches the body
    body = [p for n, p in module.model.named_parameters() if not n.startswith("head.")]
    assert all(p.grad is not None for p in body) and body[0].grad.abs().sum() > 0


def test_bad_settings_are_refused_naming_the_fix():
    for kw, match in (
        (dict(inner_steps=0), "inner_steps"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(preprocess_p=0.0), "preprocess_p"),
        (dict(head_init="nope"), "head_init"),
    ):
        with pytest.raises(ConfigError, match=match):
            meta_lstm(**kw)


# ---- through train.py, metalearn.evaluate, a checkpoint and adapt/predict -------------------
def test_trains_through_train_run_evaluates_and_its_checkpoint_round_trips(tmp_path, data_root):
    from metalearn.evaluate import evaluate

    cfg = compose_cfg(tmp_path / "run", ["algo=meta_lstm", "algo.inner_steps=2"])
    metrics = run(cfg)
    assert metrics["status"] == "ok" and metrics["engine"] is None
    assert 0 <= metrics["test/acc"] <= 1
    learner = metalearn.load(metrics["best_checkpoint"])
    assert isinstance(learner, MetaLSTM) and learner.inner_steps == 2
    saved = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=False)
    for k, v in learner.state_dict().items():
        torch.testing.assert_close(v, saved["state_dict"][k])
    scored = evaluate(metrics["best_checkpoint"], output_dir=tmp_path / "eval")
    assert scored["algo"] == "meta_lstm" and scored["kind"] == "evaluation"
    assert scored["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)

    # adapt/predict runs the same test-time procedure: the run's own test accuracy
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.setup()
    data = dm.eval_dataset("test")
    assert adapted_accuracy(learner, data) == pytest.approx(metrics["test/acc"], abs=1e-6)


# ---- learning on real Omniglot ---------------------------------------------------------------
@pytest.mark.slow
def test_meta_lstm_learns_5_way_1_shot_omniglot_beyond_its_untrained_start(data_root):
    """90 outer steps of 2 episodes, a Conv4 of 16 channels (CPU-sized), the default 5
    inner updates, Adam at 3e-3 (the default 1e-3 moves the input gate from its small start
    too slowly for a test); scored on 100 fixed episodes of the held-out test alphabets.

    The untrained start is not chance: 5 small SGD-like steps from a random Conv4 already score
    0.394 (seed 0), as a nearest-prototype classifier on random features would; after training
    0.707 (seed 0; 0.768 after 120 steps). Required: above 0.5 and 0.1 above the untrained
    start. ~25 s of CPU time."""
    from metalearn.data.datamodule import EpisodeDataModule
    from metalearn.models.conv4 import Conv4

    torch.set_num_threads(1)
    dm = EpisodeDataModule(
        name="omniglot", root=str(data_root), ways=5, shots=1, queries=5,
        meta_batch_size=2, seed=0, batches_per_epoch=90, val_episodes=10,
        test_episodes=100, eval_batch_size=50, image_size=28, num_workers=0,
    )  # fmt: skip
    dm.setup()
    torch.manual_seed(0)
    module = MetaLSTM(Conv4(ways=5, channels=16, image_size=28), partial(torch.optim.Adam, lr=3e-3))
    data = dm.eval_dataset("test")

    def accuracy():
        return torch.cat([module.evaluate(data[i]) for i in range(len(data))]).mean().item()

    before = accuracy()
    opt = torch.optim.Adam(module.outer_parameters(), lr=3e-3)
    for episodes in dm.train_dataloader():
        out = module.run_episodes(episodes, meta=True)
        opt.zero_grad()
        out.objective.backward()
        torch.nn.utils.clip_grad_norm_(module.outer_parameters(), module.grad_clip)
        opt.step()
    after = accuracy()
    print(f"before {before:.3f} after {after:.3f}")
    assert after > 0.5 and after > before + 0.1, (before, after)


@pytest.mark.slow
def test_ddp_on_two_processes_equals_one_process_with_the_union_of_the_episodes(
    tmp_path, data_root
):
    """trainer=ddp_cpu splits the meta-batch (2 episodes per rank); the averaged meta-gradient
    (LSTM and c_0), clipped after the all-reduce, gives the weights of one process on all 4."""
    from tests.ddp_helpers import ddp_command, reference, run_ok, same_weights

    extra = ("algo.inner_steps=2",)
    run_ok(ddp_command("algo=meta_lstm", *extra, f"hydra.run.dir={tmp_path / 'ddp'}"), data_root)
    one = reference(tmp_path / "one", "meta_lstm", extra=extra)
    ddp, ref = same_weights(tmp_path / "ddp", one)
    assert ddp["test/acc"] == pytest.approx(ref["test/acc"], abs=1e-6)
