"""Episode sampling and materialisation: shapes, labels, remapping, distinct images, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metalearn.data.episodes import (
    Episodes,
    materialise,
    sample_episodes,
    sample_indices,
    seeded_rng,
)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """30 classes x 25 images of 8x8 whose pixels encode (class, image) so we can decode them."""
    c, n = np.meshgrid(np.arange(30), np.arange(25), indexing="ij")
    out = np.zeros((30, 25, 8, 8), np.uint8)
    out[..., 0, 0], out[..., 0, 1], out[..., 1, 1] = c, n, 255
    return out


def decode(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(class ids, image ids) from materialised [..., 1, 8, 8] images."""
    pixels = (x[..., 0, 0, :2] * 255).round().long().numpy()
    return pixels[..., 0], pixels[..., 1]


@pytest.mark.parametrize("ways,shots,queries", [(5, 1, 15), (20, 5, 5)])
def test_shapes_and_labels(images, ways, shots, queries):
    ep = sample_episodes(images, seeded_rng(0), 4, ways, shots, queries)
    assert isinstance(ep, Episodes) and ep.batch_size == 4
    assert ep.support_x.shape == (4, ways * shots, 1, 8, 8)
    assert ep.query_x.shape == (4, ways * queries, 1, 8, 8)
    assert ep.support_x.dtype == torch.float32 and ep.support_y.dtype == torch.int64
    assert float(ep.support_x.max()) == 1.0 and float(ep.support_x.min()) == 0.0
    expected = torch.arange(ways).repeat_interleave(shots)
    assert torch.equal(ep.support_y, expected.expand(4, -1))
    assert torch.equal(ep.query_y, torch.arange(ways).repeat_interleave(queries).expand(4, -1))
    assert ep.to("cpu").support_x.shape == ep.support_x.shape


def test_labels_match_classes_and_images_are_distinct(images):
    ep = sample_episodes(images, seeded_rng(3), 8, 5, 2, 6)
    s_cls, s_img = decode(ep.support_x)
    q_cls, q_img = decode(ep.query_x)
    for b in range(8):
        for label in range(5):
            support_class = set(s_cls[b][ep.support_y[b].numpy() == label])
            query_class = set(q_cls[b][ep.query_y[b].numpy() == label])
            assert support_class == query_class and len(support_class) == 1
            ids = np.concatenate(
                [
                    s_img[b][ep.support_y[b].numpy() == label],
                    q_img[b][ep.query_y[b].numpy() == label],
                ]
            )
            assert len(set(ids)) == 8, "support and query images of a class must be distinct"
        assert len(set(s_cls[b])) == 5, "the N classes of an episode must be distinct"


def test_label_to_class_mapping_is_random(images):
    idx = sample_indices(seeded_rng(1), 200, 30, 25, 5, 1, 1)
    assert len(set(idx.classes[:, 0])) > 20, "label 0 should map to many different classes"
    # the same class set appears in different label orders
    assert len({tuple(row) for row in idx.classes}) == 200
    sorted_rows = np.sort(idx.classes, axis=1)
    assert not (idx.classes == sorted_rows).all()


def test_seeding(images):
    a = sample_episodes(images, seeded_rng(7, 0, 0, 0), 3, 5, 1, 2)
    b = sample_episodes(images, seeded_rng(7, 0, 0, 0), 3, 5, 1, 2)
    c = sample_episodes(images, seeded_rng(8, 0, 0, 0), 3, 5, 1, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.query_x, c.query_x)
    np.random.seed(0)
    torch.manual_seed(0)
    d = sample_episodes(images, seeded_rng(7, 0, 0, 0), 3, 5, 1, 2)
    assert torch.equal(a.query_x, d.query_x), "global RNG state must not matter"


def test_materialise_keeps_label_order(images):
    idx = sample_indices(seeded_rng(2), 1, 30, 25, 3, 2, 1)
    ep = materialise(images, idx, shots=2)
    s_cls, s_img = decode(ep.support_x)
    np.testing.assert_array_equal(s_cls[0], np.repeat(idx.classes[0], 2))
    np.testing.assert_array_equal(s_img[0], idx.images[0, :, :2].reshape(-1))


def test_impossible_episode_is_refused(images):
    with pytest.raises(ValueError, match="need 31 classes"):
        sample_indices(seeded_rng(0), 1, 30, 25, 31, 1, 1)
    with pytest.raises(ValueError, match="of 26 images"):
        sample_indices(seeded_rng(0), 1, 30, 25, 5, 1, 25)
