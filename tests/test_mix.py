"""data=mix on real data: episodes from several sources, each episode from one source in the
configured proportions, one image shape, fixed val/test episodes and metrics per source, the
cross-domain table of metalearn.report."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from metalearn.data.datamodule import EpisodeDataModule
from metalearn.data.mix import MixDataModule
from metalearn.errors import ConfigError
from metalearn.evaluate import evaluate
from metalearn.report import report
from metalearn.train import run
from tests.helpers import compose_cfg

THREE = ["omniglot", "quickdraw", "miniimagenet"]
ALL = {name: {} for name in THREE}


def make(data_root, **kw) -> MixDataModule:
    defaults = dict(sources=ALL, train_sources=THREE, root=str(data_root), ways=5, shots=1)
    defaults.update(queries=3, meta_batch_size=4, batches_per_epoch=5, val_episodes=12)
    defaults.update(test_episodes=20, eval_batch_size=8)
    dm = MixDataModule(**{**defaults, **kw})
    dm.setup()
    return dm


def digests(pixels: np.ndarray) -> set[bytes]:
    return {hashlib.blake2b(p.tobytes(), digest_size=16).digest() for p in pixels}


def image_digests(x: torch.Tensor) -> list[bytes]:
    """The uint8 images an episode's float images were made of (no normalisation here)."""
    pixels = (x * 255).round().to(torch.uint8).numpy()
    return [hashlib.blake2b(p.tobytes(), digest_size=16).digest() for p in pixels]


def test_each_source_is_drawn_in_the_configured_proportion(data_root):
    weights = [2.0, 1.0, 1.0]
    dm = make(data_root, weights=weights, batches_per_epoch=500)
    drawn = [s for i in range(500) for s in dm.train_dataset().sources_of(i)]  # 2000 episodes
    n = len(drawn)
    for name, w in zip(THREE, weights, strict=True):
        p = w / sum(weights)
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(drawn.count(name) - n * p) < 4.5 * sigma, (name, drawn.count(name), n * p)
    uniform = make(data_root, batches_per_epoch=500).train_dataset()
    assert np.allclose(uniform.probs, 1 / 3)  # weights=null: uniform, as Meta-Dataset draws
    counts = [sum(s == name for i in range(500) for s in uniform.sources_of(i)) for name in THREE]
    assert max(counts) - min(counts) < 4.5 * 2 * math.sqrt(n * (1 / 3) * (2 / 3))
    zero = make(data_root, weights=[1, 0, 1], batches_per_epoch=100).train_dataset()
    assert "quickdraw" not in {s for i in range(100) for s in zero.sources_of(i)}


def test_every_episode_comes_from_one_source_and_batches_are_seeded(data_root):
    dm = make(data_root)
    own = {name: digests(part.splits.train.pixels) for name, part in dm.parts.items()}
    dataset = dm.train_dataset()
    seen = set()
    for i in range(8):  # 32 episodes
        batch = dataset[i]
        for b, source in enumerate(dataset.sources_of(i)):
            seen.add(source)
            images = image_digests(torch.cat([batch.support_x[b], batch.query_x[b]]))
            assert all(d in own[source] for d in images), f"episode {i}/{b} left {source}"
    assert seen == set(THREE)
    again = make(data_root).train_dataset()
    assert all(torch.equal(x, y) for x, y in zip(dataset[3], again[3], strict=True))
    other = make(data_root, seed=1).train_dataset()
    assert not torch.equal(dataset[3].support_x, other[3].support_x)


@pytest.mark.parametrize("channels", [1, 3])
def test_images_come_out_in_one_size_and_channel_count(data_root, channels):
    dm = make(data_root, channels=channels)
    assert dm.image_shape == (channels, 28, 28)
    train = dm.train_dataset()
    batches = [train[i] for i in range(3)] + list(dm.eval_dataset("test"))
    for batch in batches:
        assert batch.support_x.shape[2:] == (channels, 28, 28)
        assert batch.query_x.shape[2:] == (channels, 28, 28)
    if channels == 3:  # grayscale sources replicated: their three channels are equal
        test = dm.eval_dataset("test")
        names = test.sources()
        first = test[0].support_x  # omniglot's first batch
        assert names[0] == "omniglot" and torch.equal(first[:, :, 0], first[:, :, 2])
        mini = test[len(test) - 1].support_x  # mini-ImageNet's last: colour photos
        assert names[-1] == "miniimagenet" and not torch.equal(mini[:, :, 0], mini[:, :, 2])


def test_val_and_test_episodes_are_fixed_per_source(data_root):
    dm = make(data_root, train_sources=["omniglot"], test_sources=["quickdraw", "omniglot"])
    test = dm.eval_dataset("test")
    assert test.sources() == ["quickdraw"] * 20 + ["omniglot"] * 20
    assert dm.episode_sources("test") == test.sources()
    assert dm.eval_dataset("val").sources() == ["omniglot"] * 12  # val: the train sources
    # each source's are the episodes data=<source> scores on (same size and channels) ...
    alone = EpisodeDataModule(
        "omniglot", str(data_root), ways=5, shots=1, queries=3, meta_batch_size=4,
        test_episodes=20, eval_batch_size=8, image_size=28, channels=3,
    )  # fmt: skip
    alone.setup()
    ours = torch.cat([b.query_x for b in test][-3:])  # omniglot's 3 batches
    theirs = torch.cat([b.query_x for b in alone.eval_dataset("test")])
    assert torch.equal(ours, theirs)
    # ... whatever the training mix, seed or weights
    other = make(data_root, train_sources=THREE, weights=[1, 2, 3], seed=5,
                 test_sources=["quickdraw", "omniglot"]).eval_dataset("test")  # fmt: skip
    assert all(torch.equal(a.query_x, b.query_x) for a, b in zip(test, other, strict=True))
    # DDP: two ranks' contiguous shares, gathered in rank order, are the same sequence
    shares = [
        make(data_root, train_sources=["omniglot"], test_sources=["quickdraw", "omniglot"],
             rank=r, world_size=2).eval_dataset("test")
        for r in range(2)
    ]  # fmt: skip
    assert shares[0].sources() + shares[1].sources() == test.sources()
    gathered = torch.cat([b.support_x for s in shares for b in s])
    assert torch.equal(gathered, torch.cat([b.support_x for b in test]))


def test_under_ddp_building_the_loaders_leaves_every_ranks_share_as_it_was(data_root):
    """The rank and world size come from the attached Trainer: building a loader must not hand
    that Trainer to a source's own module, which would then shard its episodes a second time."""
    from types import SimpleNamespace

    sources = dict(train_sources=["omniglot"], test_sources=["quickdraw", "omniglot"])
    whole = make(data_root, **sources).eval_dataset("test")
    shares = []
    for rank in range(2):
        dm = make(data_root, **sources, num_workers=0)
        dm.trainer = SimpleNamespace(
            world_size=2, global_rank=rank, global_step=0,
            strategy=SimpleNamespace(root_device=torch.device("cpu")),
        )  # fmt: skip
        dm.train_dataloader()
        shares.append(dm.test_dataloader().dataset)
    assert shares[0].sources() + shares[1].sources() == whole.sources()
    gathered = torch.cat([b.support_x for s in shares for b in s])
    assert torch.equal(gathered, torch.cat([b.support_x for b in whole]))


@pytest.mark.slow
def test_a_short_mixed_run_logs_per_source_metrics_into_metrics_json(tmp_path, data_root):
    out = tmp_path / "run"
    cfg = compose_cfg(
        out,
        [
            f"data.root={data_root}", "data=mix", "algo=protonet", "logger=csv",
            "data.train_sources=[omniglot,miniimagenet]", "data.weights=[3,1]",
            "data.test_sources=[quickdraw,miniimagenet]",
        ],
    )  # fmt: skip
    run(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["dataset"] == "mix"
    assert metrics["train_sources"] == ["omniglot", "miniimagenet"]
    assert metrics["test_sources"] == ["quickdraw", "miniimagenet"]
    assert metrics["source_weights"] == [3.0, 1.0]
    per = [metrics[f"test/acc/{s}"] for s in ("quickdraw", "miniimagenet")]
    assert all(0 <= v <= 1 and metrics[f"test/acc_ci95/{s}"] >= 0 for v, s in
               zip(per, ("quickdraw", "miniimagenet"), strict=True))  # fmt: skip
    assert metrics["test/acc"] == pytest.approx(sum(per) / 2, abs=1e-6)  # 10 episodes each
    logged = csv.DictReader((out / "csv" / "version_0" / "metrics.csv").open()).fieldnames
    assert {"val/acc/omniglot", "val/acc/miniimagenet"} <= set(logged)  # validated per source
    # its checkpoint scored on other sources by metalearn.evaluate: per-source numbers too
    scored = evaluate(metrics["best_checkpoint"], ["data.test_sources=[omniglot]"], out / "eval")
    assert scored["test/acc/omniglot"] == scored["test/acc"] and scored["test_episodes"] == 10
    table = list(
        csv.DictReader((report(out, plot=False, echo=False)["files"]["cross_domain"]).open())
    )
    assert [(r["trained_on"], r["test_source"]) for r in table if not r["variant"]] == [
        ("omniglot+miniimagenet (weights 3:1)", "quickdraw"),
        ("omniglot+miniimagenet (weights 3:1)", "miniimagenet"),
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.train_sources=[omniglot,imagenet]"], "unknown source 'imagenet': choose from"),
        (["data.test_sources=[omniglot,omniglot]"], "names a source twice"),
        (["data.weights=[1,2]"], "give one weight per training source"),
        (["data.weights=[1,-1,1]"], "must be >= 0"),
        (["data.weights=[0,0,0]"], "not all 0"),
        (["+data.sources.omniglot.image_size=32"], "set data.image_size instead"),
        (["+data.sources.photos={source: flickr}"], "set data.sources.photos.source"),
        (["data.normalize=auto"], "use null or"),
    ],
)
def test_bad_mix_config_gets_one_error_naming_the_fix(tmp_path, data_root, overrides, message):
    cfg = compose_cfg(tmp_path, [f"data.root={data_root}", "data=mix", *overrides])
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"


def fake_run(root: Path, name: str, dataset="mix", train=None, tests=None, seed=0, **values):
    """A metrics.json in the format train writes (only the keys the report reads)."""
    metrics = {"algo": "protonet", "dataset": dataset, "ways": 5, "shots": 1, "queries": 15,
               "episodes": "fixed", "seed": seed, "samples_per_class": None, "status": "ok",
               "metric": "acc", **values}  # fmt: skip
    if train:
        metrics.update(train_sources=train, test_sources=tests or train, source_weights=None)
    (root / name).mkdir(parents=True)
    (root / name / "metrics.json").write_text(json.dumps(metrics))


def per_source(**accs) -> dict:
    out = {}
    for source, acc in accs.items():
        out[f"test/acc/{source}"], out[f"test/acc_ci95/{source}"] = acc, 0.01
    out["test/acc"], out["test/acc_ci95"] = sum(accs.values()) / len(accs), 0.01
    return out


def test_report_has_a_cross_domain_row_per_training_mix_and_a_column_per_test_source(tmp_path):
    fake_run(tmp_path, "omni", train=["omniglot"], tests=THREE,
             **per_source(omniglot=0.9, quickdraw=0.5, miniimagenet=0.3))  # fmt: skip
    for seed, mini in ((0, 0.40), (1, 0.44)):
        accs = per_source(omniglot=0.8, quickdraw=0.5, miniimagenet=mini)
        fake_run(tmp_path, f"omni_mini_{seed}", train=["omniglot", "miniimagenet"], tests=THREE,
                 seed=seed, **accs)  # fmt: skip
    fake_run(tmp_path, "baseline", dataset="omniglot", **{"test/acc": 0.92, "test/acc_ci95": 0.02})
    result = report(tmp_path, plot=False, echo=False)
    rows = list(csv.DictReader(result["files"]["cross_domain"].open()))
    cells = {(r["trained_on"], r["test_source"]): r for r in rows}
    assert list(dict.fromkeys(r["test_source"] for r in rows)) == THREE  # the mixes' order
    assert set(cells) == {
        ("omniglot (data=omniglot)", "omniglot"),  # the single-source baseline, its own column
        *(("omniglot", s) for s in THREE),
        *(("omniglot+miniimagenet", s) for s in THREE),
    }
    assert cells[("omniglot+miniimagenet", "miniimagenet")]["runs"] == "2"  # two seeds
    assert float(cells[("omniglot+miniimagenet", "miniimagenet")]["acc"]) == pytest.approx(0.42)
    assert cells[("omniglot", "quickdraw")]["runs"] == "1"
    assert float(cells[("omniglot (data=omniglot)", "omniglot")]["acc"]) == pytest.approx(0.92)
    assert cells[("omniglot", "miniimagenet")]["cell"] == "30.0 ± 1.0"
    text = result["files"]["markdown"].read_text()
    header = "| trained on / algorithm / episodes | omniglot | quickdraw | miniimagenet |"
    assert header in text
    assert "| omniglot+miniimagenet / protonet / 5-way 1-shot | 80.0" in text
    # the main table keeps the mixes apart (their sources label the row)
    labels = {row[0] for row in result["rows"]}
    assert "mix omniglot+miniimagenet -> omniglot,quickdraw,miniimagenet" in labels
    assert "mix omniglot -> omniglot,quickdraw,miniimagenet" in labels


def test_report_without_mixed_runs_has_no_cross_domain_table(tmp_path):
    fake_run(tmp_path, "baseline", dataset="omniglot", **{"test/acc": 0.92, "test/acc_ci95": 0.02})
    result = report(tmp_path, plot=False, echo=False)
    assert "cross_domain" not in result["files"]
    assert "Cross-domain" not in result["files"]["markdown"].read_text()
