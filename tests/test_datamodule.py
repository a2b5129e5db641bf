"""EpisodeDataModule on real data: shapes, seeding, workers, epochs, fixed eval sets, DDP."""

from __future__ import annotations

import pickle

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from metalearn.data.datamodule import EpisodeDataModule
from metalearn.data.episodes import Episodes
from metalearn.errors import ConfigError
from tests.helpers import REPO

CONF = REPO / "conf"


def make(data_root, name="quickdraw", **kw) -> EpisodeDataModule:
    defaults = dict(ways=5, shots=1, queries=3, meta_batch_size=4, batches_per_epoch=3)
    defaults.update(val_episodes=30, test_episodes=60, eval_batch_size=25)
    dm = EpisodeDataModule(name, str(data_root), **{**defaults, **kw})
    dm.setup()
    return dm


def batches(loader, epoch=None) -> list[Episodes]:
    if epoch is not None:
        loader.sampler.set_epoch(epoch)
    return list(loader)


def same(a: list[Episodes], b: list[Episodes]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, y) for ea, eb in zip(a, b, strict=True) for x, y in zip(ea, eb, strict=True)
    )


@pytest.mark.parametrize("ways,shots,queries", [(5, 1, 15), (20, 5, 5)])
def test_train_batch_shapes_on_omniglot(data_root, ways, shots, queries):
    dm = make(data_root, "omniglot", ways=ways, shots=shots, queries=queries, meta_batch_size=3)
    ep = next(iter(dm.train_dataloader()))
    assert ep.support_x.shape == (3, ways * shots, 1, 28, 28)
    assert ep.query_x.shape == (3, ways * queries, 1, 28, 28)
    assert torch.equal(ep.query_y[1], torch.arange(ways).repeat_interleave(queries))
    assert dm.image_shape == (1, 28, 28)
    assert dm.num_classes == {"train": 799, "val": 165, "test": 659}


def test_same_seed_same_batches_other_seed_differs(data_root):
    a = batches(make(data_root, seed=1).train_dataloader())
    b = batches(make(data_root, seed=1).train_dataloader())
    c = batches(make(data_root, seed=2).train_dataloader())
    assert same(a, b) and not same(a, c)
    assert not torch.equal(a[0].support_x, a[1].support_x)


def test_epochs_differ_and_are_reproducible(data_root):
    loader = make(data_root).train_dataloader()
    e0, e1, e0_again = batches(loader, 0), batches(loader, 1), batches(loader, 0)
    assert not same(e0, e1) and same(e0, e0_again)
    # a fresh module starting at epoch 1 (an exactly resumed run) sees the same batches
    assert same(e1, batches(make(data_root).train_dataloader(), 1))


def test_workers_do_not_change_data(data_root):
    serial, parallel = make(data_root, num_workers=0), make(data_root, num_workers=2)
    for epoch in (0, 1):
        assert same(
            batches(serial.train_dataloader(), epoch), batches(parallel.train_dataloader(), epoch)
        )
    assert same(list(serial.val_dataloader()), list(parallel.val_dataloader()))
    assert same(list(serial.test_dataloader()), list(parallel.test_dataloader()))


def test_eval_episodes_ignore_run_seed_and_are_fixed(data_root):
    a, b = make(data_root, seed=1), make(data_root, seed=99)
    assert same(list(a.val_dataloader()), list(b.val_dataloader()))
    assert same(list(a.test_dataloader()), list(b.test_dataloader()))
    other = make(data_root, eval_seed=1)
    assert not same(list(a.test_dataloader()), list(other.test_dataloader()))
    sizes = [ep.batch_size for ep in a.test_dataloader()]
    assert sizes == [25, 25, 10]
    # episode e does not depend on how many episodes are drawn
    longer = make(data_root, test_episodes=100)
    assert same(list(a.test_dataloader())[:2], list(longer.test_dataloader())[:2])


def test_ddp_shares_partition_test_episodes(data_root):
    full = list(make(data_root, eval_batch_size=60).test_dataloader())[0]
    shares = [make(data_root, rank=r, world_size=2, eval_batch_size=60) for r in (0, 1)]
    parts = [list(dm.test_dataloader())[0] for dm in shares]
    assert [p.batch_size for p in parts] == [30, 30]
    for x_full, x0, x1 in zip(full, *parts, strict=True):
        assert torch.equal(x_full, torch.cat([x0, x1]))
    train0, train1 = (batches(dm.train_dataloader(), 0) for dm in shares)
    assert not same(train0, train1), "ranks must train on different episodes"


def test_auto_queries_fit_the_images_left_after_the_shots(data_root):
    # Omniglot has 20 images per class: the README's sweep shots=1,5,10 works by default
    assert [make(data_root, "omniglot", shots=k, queries="auto").queries for k in (1, 5, 10)] == [
        15,
        15,
        10,
    ]
    dm = make(data_root, "omniglot", shots=10, queries="auto")
    assert next(iter(dm.train_dataloader())).query_x.shape[1] == 5 * 10
    with pytest.raises(ConfigError, match="shots=20: lower shots"):
        make(data_root, "omniglot", shots=20, queries="auto")


def test_fewer_eval_episodes_than_ranks_is_a_clear_error(data_root):
    dm = make(data_root, rank=1, world_size=4, val_episodes=3)
    with pytest.raises(ConfigError, match="data.val_episodes=3 is fewer than the 4 DDP"):
        dm.val_dataloader()
    assert len(make(data_root, rank=3, world_size=4, val_episodes=4).val_dataloader()) == 1


def test_trainer_steps_key_the_batches(data_root):
    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[tuple[int, torch.Tensor]] = []

        def training_step(self, batch, batch_idx):
            assert isinstance(batch, Episodes)
            self.seen.append((self.current_epoch, batch.support_x.clone()))
            return (self.weight * batch.support_x.mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = EpisodeDataModule(
        "quickdraw", str(data_root), 5, 1, 2, meta_batch_size=2, batches_per_epoch=2, num_workers=2
    )
    model = Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model, datamodule=dm)
    reference = make(data_root, num_workers=0, meta_batch_size=2, queries=2, batches_per_epoch=2)
    expected = batches(reference.train_dataloader(), 0) + batches(reference.train_dataloader(), 1)
    assert [e for e, _ in model.seen] == [0, 0, 1, 1]
    assert not torch.equal(model.seen[0][1], model.seen[2][1]), "epoch 1 repeated epoch 0"
    for (_, got), want in zip(model.seen, expected, strict=True):
        assert torch.equal(got, want.support_x)


def test_too_many_ways_names_split_and_fix(data_root):
    dm = EpisodeDataModule("omniglot", str(data_root), 200, 1, 1, meta_batch_size=1)
    with pytest.raises(
        ConfigError, match=r"data=omniglot val split has 165 classes but ways=200: lower ways"
    ):
        dm.setup()


def test_too_many_shots_and_queries(data_root):
    with pytest.raises(
        ConfigError, match=r"20 images per class but shots\+queries = 5\+16 = 21: lower queries"
    ):
        make(data_root, "omniglot", shots=5, queries=16)
    with pytest.raises(ConfigError, match="raise data.samples_per_class"):
        make(data_root, samples_per_class=20, shots=5, queries=16)


def test_unknown_name_and_bad_values():
    with pytest.raises(
        ConfigError, match=r"'cifar'.*\['folder', 'miniimagenet', 'omniglot', 'quickdraw'\]"
    ):
        EpisodeDataModule("cifar", "x", 5, 1, 1, meta_batch_size=1)
    with pytest.raises(ConfigError, match="data.shots=0"):
        EpisodeDataModule("omniglot", "x", 5, 0, 1, meta_batch_size=1)
    with pytest.raises(ConfigError, match="data.rank=2"):
        EpisodeDataModule("omniglot", "x", 5, 1, 1, meta_batch_size=1, rank=2, world_size=2)


def test_picklable_and_setup_idempotent(data_root):
    dm = make(data_root, rotations=True, name="omniglot")
    splits = dm.splits
    dm.setup("fit")
    assert dm.splits is splits and dm.num_classes["train"] == 4 * 799
    for obj in (
        dm.train_dataloader().dataset,
        dm.val_dataloader().dataset,
        dm.train_dataloader().sampler,
    ):
        pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("dataset", ["omniglot", "quickdraw"])
def test_conf_yaml_instantiates(data_root, dataset):
    cfg = OmegaConf.create(
        {
            "ways": 5,
            "shots": 1,
            "queries": 15,
            "seed": 3,
            "algo": {"meta_batch_size": 2},
            "data": OmegaConf.load(CONF / "data" / f"{dataset}.yaml"),
        }
    )
    cfg.data.root = str(data_root)
    dm = instantiate(cfg.data)
    assert isinstance(dm, EpisodeDataModule) and dm.seed == 3 and dm.meta_batch_size == 2
    dm.setup()
    assert next(iter(dm.train_dataloader())).query_x.shape == (2, 75, 1, 28, 28)
    assert len(dm.val_dataloader()) == 8 and len(dm.test_dataloader()) == 24


@pytest.mark.parametrize("device,on_cuda", [("cpu", False), ("cuda", True)])
def test_auto_workers_and_pinning_only_when_training_on_cuda(data_root, device, on_cuda):
    from types import SimpleNamespace

    dm = make(data_root, num_workers="auto")
    loader = dm.train_dataloader()  # no trainer attached: main process, not pinned
    assert (loader.num_workers, loader.pin_memory) == (0, False)
    dm.trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device(device)),
        current_epoch=0,
        world_size=1,
    )
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        assert loader.pin_memory is on_cuda
        assert loader.num_workers == (2 if on_cuda else 0)
        assert loader.persistent_workers is on_cuda
    dm.num_workers = 1  # an explicit count wins
    assert dm.train_dataloader().num_workers == 1


def test_bad_num_workers_is_a_clear_error(data_root):
    with pytest.raises(ConfigError, match="num_workers"):
        make(data_root, num_workers="many")


def test_workers_survive_ctrl_c(data_root):
    # A terminal's Ctrl-C reaches the workers too; they must leave it to the main process,
    # which finishes the step and validates (metalearn.interrupt).
    import os
    import signal
    import time

    loader = make(data_root, num_workers=1, batches_per_epoch=4).train_dataloader()
    it = iter(loader)
    next(it)
    (worker,) = it._workers
    os.kill(worker.pid, signal.SIGINT)
    time.sleep(0.5)
    assert worker.is_alive()
    assert sum(1 for _ in it) == 3


def test_train_on_val_meta_trains_on_the_vinyals_1200_characters(data_root):
    """Snell et al. meta-train Omniglot on 1200 characters: the Vinyals train + val lists."""
    from metalearn.data.sources import load_splits

    dm = make(data_root, "omniglot", split="vinyals", train_on_val=True, val_episodes=0)
    plain = load_splits("omniglot", data_root, split="vinyals")
    train = dm._splits.train
    assert train.num_classes == 1200 and train.names == plain.train.names + plain.val.names
    assert set(train.names).isdisjoint(dm._splits.test.names)
    at = train.names.index(plain.val.names[3])
    assert (train.class_images(at) == plain.val.class_images(3)).all()
    assert dm.train_dataset()[0].support_x.shape[:2] == (4, 5)  # 4 episodes, 5-way 1-shot


def test_train_on_val_refuses_validation_on_the_classes_it_trains_on(data_root):
    with pytest.raises(ConfigError, match="data.train_on_val=true.*set data.val_episodes=0"):
        make(data_root, "omniglot", split="vinyals", train_on_val=True)
