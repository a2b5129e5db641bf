"""Episodes whose ways and shots vary (data.episodes=range|metadataset) and Omniglot's
within-alphabet episodes, on real Omniglot: the sampler's bounds, seeding and resumption,
fixed evaluation episodes, every algorithm on every engine it supports, and meta-gradients
that agree across engines on a meta-batch of unequal episodes."""

from __future__ import annotations

import csv
import json
from functools import partial

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from metalearn.algorithms.gbml import GBML
from metalearn.data.datamodule import EpisodeDataModule
from metalearn.data.episodes import Episodes, ragged, stacked_groups
from metalearn.data.loading import StepSampler
from metalearn.engines.func import FuncEngine
from metalearn.engines.higher import HigherEngine
from metalearn.engines.vmap import VmapEngine
from metalearn.errors import ConfigError
from metalearn.report import report, shape_bins
from metalearn.train import run
from tests.helpers import ALGOS, compose_cfg, random_episodes, tiny_net

SMALL = {"max_ways": 12, "max_support": 40, "max_queries": 4}


def omniglot(data_root, episodes="metadataset", seed=0, queries="auto", **kw):
    kw.setdefault("metadataset", SMALL)
    dm = EpisodeDataModule(
        "omniglot", str(data_root), 5, 1, queries, 6, seed=seed, episodes=episodes, **kw
    )
    dm.setup()
    return dm


def same(a: Episodes, b: Episodes) -> bool:
    return all(
        len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y, strict=True))
        for x, y in zip(a, b, strict=True)
    )


def per_class(y: torch.Tensor, ways: int) -> np.ndarray:
    return np.bincount(y.numpy(), minlength=ways)


# ---- the sampler -------------------------------------------------------------------------
def test_metadataset_episodes_follow_meta_datasets_procedure(data_root):
    dm = omniglot(data_root, metadataset={})  # Meta-Dataset's own bounds on Omniglot
    train = dm.train_dataset()
    ways, imbalanced = [], 0
    for step in range(6):
        batch = train[step]
        assert batch.ragged and batch.batch_size == 6
        for sx, sy, qx, qy in zip(*batch, strict=True):
            n = int(sy.max()) + 1
            ways.append(n)
            shots, queries = per_class(sy, n), per_class(qy, n)
            assert 5 <= n <= 50 and torch.equal(sy, torch.sort(sy).values)
            assert shots.min() >= 1 and shots.sum() <= 500  # at least one each, |S| bounded
            assert set(queries) == {10}  # min(10, 20 // 2): balanced
            assert (shots + queries <= 20).all()  # Omniglot's 20 drawers per character
            assert sx.shape == (len(sy), 1, 28, 28) and qx.shape == (len(qy), 1, 28, 28)
            imbalanced += shots.min() != shots.max()
    assert len(set(ways)) > 10 and max(ways) > 30  # uniform over 5..50
    assert imbalanced > len(ways) // 2  # the support sets are split in unequal shares


def test_range_episodes_draw_ways_and_shots_in_their_ranges(data_root):
    dm = omniglot(data_root, "range", ways_range=[3, 7], shots_range=[1, 4], queries=5)
    seen_ways, seen_shots = set(), set()
    for step in range(5):
        for _, sy, _, qy in zip(*dm.train_dataset()[step], strict=True):
            n = int(sy.max()) + 1
            shots = per_class(sy, n)
            assert 3 <= n <= 7 and len(set(shots)) == 1 and 1 <= shots[0] <= 4
            assert set(per_class(qy, n)) == {5}
            seen_ways.add(n)
            seen_shots.add(int(shots[0]))
    assert seen_ways == set(range(3, 8)) and seen_shots == {1, 2, 3, 4}


def test_an_episodes_images_are_distinct_and_its_labels_are_its_classes(data_root):
    dm = omniglot(data_root)
    drawn = dm.train_dataset().indices(0)
    for ep in drawn:
        assert len(set(ep.classes)) == ep.ways
        for ids, k in zip(ep.images, ep.shots, strict=True):
            assert len(set(ids)) == len(ids) == k + ep.queries
    train = dm.splits.train
    sx, sy = dm.train_dataset()[0][:2]
    first = drawn[0]
    for label, c in enumerate(first.classes):  # label i shows class classes[i]'s images
        pixels = torch.from_numpy(train.class_images(int(c))[first.images[label][0]]) / 255.0
        assert torch.equal(sx[0][sy[0] == label][0], pixels)


def test_varying_batches_are_seeded_and_resume_exactly(data_root):
    a, b = omniglot(data_root, seed=3).train_dataset(), omniglot(data_root, seed=3).train_dataset()
    assert same(a[7], b[7]) and not same(a[7], a[8])
    assert not same(a[7], omniglot(data_root, seed=4).train_dataset()[7])
    # resumed at step 7 (a fresh loader keyed by the step) = step 7 of an uninterrupted run
    resumed = DataLoader(a, batch_size=None, sampler=StepSampler(len(a), lambda: 7))
    assert same(next(iter(resumed)), b[7])


def test_varying_batches_are_the_same_for_any_number_of_workers(data_root):
    train = omniglot(data_root).train_dataset()
    loaders = [
        DataLoader(train, batch_size=None, sampler=StepSampler(3), num_workers=w) for w in (0, 2)
    ]
    for x, y in zip(*loaders, strict=True):
        assert same(x, y)


def test_fixed_eval_episodes_each_have_their_own_shape_whatever_the_run(data_root):
    a = omniglot(data_root, seed=1).eval_dataset("test")
    b = omniglot(data_root, seed=2, test_episodes=30).eval_dataset("test")
    shapes = a.shapes()
    assert len(shapes) == 600 and len(set(shapes)) > 20
    assert b.shapes() == shapes[:30]  # episode e is the same whatever the run seed and count
    assert same(a[0], b[0])
    assert a[0].ways() == [w for w, _ in shapes[:25]]
    val = omniglot(data_root).eval_dataset("val")
    assert val.shapes() != shapes[: len(val.shapes())]  # val and test: other episodes


def test_varying_episodes_never_leave_their_split(data_root):
    dm = omniglot(data_root)
    names = {split: set(c.names) for split, c in dm.splits.items()}
    assert not (names["train"] & names["test"]) and not (names["val"] & names["test"])
    for split in ("val", "test"):
        classes = getattr(dm.splits, split)
        for ep in dm.eval_dataset(split).index:
            assert {classes.names[c] for c in ep.classes} <= names[split]


def test_bad_varying_settings_name_the_fix(data_root):
    with pytest.raises(ConfigError, match="data.episodes=.*choose one of"):
        omniglot(data_root, "random")
    with pytest.raises(ConfigError, match=r"data.ways_range=\[6, 3\]"):
        omniglot(data_root, "range", ways_range=[6, 3])
    with pytest.raises(ConfigError, match="lower it"):
        omniglot(data_root, "range", ways_range=[200, 300])
    with pytest.raises(ConfigError, match="shots\\+queries"):
        omniglot(data_root, "range", shots_range=[1, 15], queries=10)
    with pytest.raises(ConfigError, match="data.train_ways"):
        omniglot(data_root, train_ways=20)


def test_head_init_trained_cannot_serve_varying_ways(tmp_path):
    cfg = compose_cfg(tmp_path, ["data.episodes=range", "algo.head_init=trained"])
    with pytest.raises(ConfigError, match="algo.head_init=prototypes or zeros"):
        run(cfg)


# ---- Omniglot within one alphabet --------------------------------------------------------
@pytest.mark.parametrize("episodes", ["fixed", "metadataset"])
def test_within_alphabet_episodes_take_every_class_from_one_alphabet(data_root, episodes):
    dm = omniglot(data_root, episodes, within_alphabet=True, test_episodes=100)
    train = dm.train_dataset()
    for split, drawn in (("train", train.indices(0)), ("test", dm.eval_dataset("test").index)):
        classes = getattr(dm.splits, split)
        alphabets = [{classes.groups[c] for c in ep.classes} for ep in drawn]
        assert all(len(a) == 1 for a in alphabets)
        assert len({a.pop() for a in alphabets}) > 1  # the alphabet changes between episodes
    assert train[0].ragged == (episodes != "fixed")  # fixed: still one N-way K-shot tensor


def test_episodes_mix_alphabets_without_within_alphabet(data_root):
    dm = omniglot(data_root, "fixed")
    test, index = dm.splits.test, dm.eval_dataset("test").index
    mixed = [len({test.groups[c] for c in row}) > 1 for row in index.classes]
    assert np.mean(mixed) > 0.9


# ---- algorithms and engines ----------------------------------------------------------------
ENGINES = {"higher": HigherEngine, "func": FuncEngine, "vmap": VmapEngine}
GBML_ALGOS = ["maml", "fomaml", "metasgd", "alpha_maml", "maml_pp", "anil"]
RUNS = [(a, e) for a in GBML_ALGOS for e in ENGINES] + [
    (a, "higher") for a in ALGOS if a not in GBML_ALGOS
]
TINY_SHAPES = [
    "data.metadataset.max_ways=8",
    "data.metadataset.max_support=20",
    "data.metadataset.max_queries=3",
]


@pytest.mark.parametrize(("algo", "engine"), RUNS)
def test_every_algorithm_trains_and_evaluates_on_varying_episodes(algo, engine, tmp_path):
    torch.set_num_threads(1)
    extra = ["algo.inner_steps_test=3"] if algo in ("reptile", "finetune") else []
    cfg = compose_cfg(
        tmp_path,
        [f"algo={algo}", f"engine={engine}", "data.episodes=metadataset", *TINY_SHAPES, *extra],
    )
    metrics = run(cfg)
    assert metrics["status"] == "ok" and metrics["steps"] >= 2
    table = metrics["test/by_episode"]
    assert len(table["acc"]) == 10 and len(set(table["ways"])) > 2
    assert all(5 <= w <= 8 for w in table["ways"]) and 0 <= metrics["test/acc"] <= 1
    if "head_init" in cfg.algo:
        assert cfg.algo.head_init == "prototypes"  # auto, with ways that vary


@pytest.mark.parametrize(
    ("init", "first_order", "rates"),
    [("prototypes", False, "metasgd"), ("prototypes", True, "fixed"), ("zeros", False, "fixed")],
)
def test_engines_agree_on_a_meta_batch_of_unequal_episodes(init, first_order, rates):
    """float64: two 3-way episodes of one shape (vmapped as one group) and a 4-way one."""
    episodes = ragged(
        [
            random_episodes(1, 3, 2, 2, seed=1),
            random_episodes(1, 4, 1, 3, seed=2),
            random_episodes(1, 3, 2, 2, seed=3),
        ]
    )
    assert [len(m) for m, _ in stacked_groups(episodes)] == [2, 1]
    grads = {}
    for name, engine in ENGINES.items():
        module = GBML(
            tiny_net(ways=5),
            engine(),
            partial(torch.optim.Adam, lr=1e-3),
            inner_steps=2,
            head_init=init,
            first_order=first_order,
            inner_rates=rates,
        ).double()
        out = module.run_engine(module.model, module.train_loop(), episodes, init)
        assert [tuple(z.shape) for z in out.logits] == [(6, 3), (12, 4), (6, 3)]
        out.objective.backward()
        grads[name] = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert "model.head.weight" not in grads["func"]  # the model's own head is unused
    assert "model.blocks.0.conv.weight" in grads["func"]  # the body gets its meta-gradient
    for name in ("higher", "vmap"):
        assert grads[name].keys() == grads["func"].keys()
        for n, g in grads[name].items():
            torch.testing.assert_close(g, grads["func"][n], rtol=1e-9, atol=1e-11)


def test_prototype_heads_meta_gradient_matches_finite_differences():
    """Proto-MAML's meta-gradient reaches the body through the prototype head's initial
    value and through the inner loop (float64, a ragged meta-batch, second order)."""
    episodes = ragged([random_episodes(1, 3, 2, 2, seed=4), random_episodes(1, 2, 1, 2, seed=5)])
    module = GBML(
        tiny_net(ways=5, channels=2),
        FuncEngine(),
        partial(torch.optim.Adam, lr=1e-3),
        inner_steps=1,
        inner_lr=0.3,
        head_init="prototypes",
    ).double()
    out = module.run_engine(module.model, module.train_loop(), episodes, "prototypes")
    out.objective.backward()
    body = [(n, p) for n, p in module.model.named_parameters() if not n.startswith("head.")]
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for _, p in body]
    analytic = sum((p.grad * d).sum() for (_, p), d in zip(body, v, strict=True)).item()

    def objective(scale: float) -> float:
        with torch.no_grad():
            for (_, p), d in zip(body, v, strict=True):
                p.add_(scale * d)
        try:
            loop = module.train_loop()
            return module.run_engine(module.model, loop, episodes, "prototypes").objective.item()
        finally:
            with torch.no_grad():
                for (_, p), d in zip(body, v, strict=True):
                    p.sub_(scale * d)

    h = 1e-6
    assert analytic == pytest.approx((objective(h) - objective(-h)) / (2 * h), rel=1e-5)


@pytest.mark.slow
def test_protonet_learns_on_varying_episodes(tmp_path, data_root):
    """Above each episode's chance (1 / its ways) after a short run on varying episodes."""
    torch.set_num_threads(1)
    cfg = compose_cfg(
        tmp_path,
        [
            "algo=protonet",
            "data.episodes=range",
            "data.ways_range=[5,15]",
            "data.shots_range=[1,5]",
            "queries=5",
            "trainer.max_steps=60",
            "data.batches_per_epoch=60",
            "data.test_episodes=100",
            "data.val_episodes=0",
        ],
    )
    metrics = run(cfg)
    table = metrics["test/by_episode"]
    chance = float(np.mean([1 / w for w in table["ways"]]))
    assert metrics["test/acc"] > chance + 0.4, (metrics["test/acc"], chance)


# ---- the report -----------------------------------------------------------------------------
def test_report_bins_a_varying_runs_accuracy_by_ways_and_by_shots(tmp_path):
    fixed = {"status": "ok", "algo": "protonet", "dataset": "omniglot", "ways": 5, "shots": 1}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.json").write_text(
        json.dumps({**fixed, "episodes": "fixed", "test/acc": 0.9, "test/acc_ci95": 0.01})
    )
    by_episode = {
        "acc": [1.0, 0.0, 0.5, 0.25, 0.75],
        "ways": [5, 9, 12, 25, 50],
        "shots": [1.0, 1.5, 3.0, 10.0, 3.9],
    }
    varying = {**fixed, "episodes": "metadataset", "test/acc": 0.5, "test/acc_ci95": 0.3}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.json").write_text(
        json.dumps({**varying, "test/by_episode": by_episode})
    )
    out = report(tmp_path, plot=False, echo=False)
    assert out["columns"] == [(0, 0, "metadataset"), (5, 1)]
    (row,) = out["rows"]
    assert out["cells"][(row, (0, 0, "metadataset"))].text() == "50.0 ± 30.0"
    bins = shape_bins(out["cells"][(row, (0, 0, "metadataset"))].runs[0])
    assert {k: (round(m, 4), n) for k, (m, _, n) in bins.items()} == {
        "ways 5-9": (0.5, 2),
        "ways 10-19": (0.5, 1),
        "ways 20-29": (0.25, 1),
        "ways 40+": (0.75, 1),
        "shots 1": (0.5, 2),
        "shots 2-3": (0.625, 2),
        "shots 10+": (0.25, 1),
    }
    text = (tmp_path / "results.md").read_text()
    assert "metadataset episodes" in text and "ways 5-9" in text and "50.0 ± 98.0 (2)" in text
    rows = list(csv.DictReader((tmp_path / "by_shape.csv").open()))
    assert len(rows) == 7 and rows[0]["bin"] == "ways 5-9" and rows[0]["episodes"] == "2"
