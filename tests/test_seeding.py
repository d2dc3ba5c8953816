"""A batch's item generators are numpy's default_rng([seed, epoch, index]) exactly: the seeding hash is run over
the batch at once (cliphand3d.data.seeding), so it must give every stream numpy's own seeding gives."""
from __future__ import annotations

import numpy as np
import pytest

from cliphand3d.data.seeding import item_generators, seed_words
from cliphand3d.data.synthetic import SyntheticHands
from cliphand3d.data.transforms import CropAugment, build_item


def _same_streams(rows) -> None:
    ours = item_generators(rows)
    assert len(ours) == len(rows)
    for row, rng in zip(rows, ours):
        ref = np.random.default_rng(row)
        assert np.array_equal(rng.random(5), ref.random(5)), row
        assert rng.integers(0, 2 ** 63, 3).tolist() == ref.integers(0, 2 ** 63, 3).tolist(), row


def test_streams_are_default_rngs_for_random_and_edge_entropy():
    draw = np.random.default_rng(0)
    rows = draw.integers(0, 2 ** 32, size=(500, 3), dtype=np.uint64).tolist()
    rows += [[0, 0, 0], [0, 0, 1], [2 ** 32 - 1] * 3, [7, 2 ** 32 - 1, 0]]
    _same_streams(rows)


def test_every_entropy_length_up_to_the_pool_and_longer_rows_fall_back():
    for k in (1, 2, 4):
        _same_streams([[3 * i + j for j in range(k)] for i in range(20)])
    # 5 words, or a seed needing two words, or a negative value: numpy's own SeedSequence (or its error)
    _same_streams([[1, 2, 3, 4, 5], [2 ** 32, 0, 1], [2 ** 40 + 5, 1, 2]])
    with pytest.raises(ValueError):
        item_generators([[-1, 0, 0]])  # numpy refuses negative entropy, and so must this


def test_the_words_are_seed_sequences_state():
    rows = np.array([[0, 3, 1234], [5, 0, 0]], dtype=np.uint32)
    got = seed_words(rows)
    for row, words in zip(rows.tolist(), got):
        assert np.array_equal(words, np.random.SeedSequence(row).generate_state(4, np.uint64))


def test_a_dataset_batch_is_built_from_each_items_rng_for():
    """__getitems__ seeds its items together; each item is the one its own rng_for(index, epoch) builds."""
    ds = SyntheticHands(length=6, img_size=32, augment=CropAugment(color_jitter=0.2, channel_noise=0.4), seed=3)
    keys = [(0, 5), (2, 1), (1, 3)]
    for (epoch, index), item in zip(keys, ds.__getitems__(keys)):
        alone = build_item(ds.load_raw(index), index=index, img_size=32, augment=ds.augment, prompts=None,
                           rng=ds.rng_for(index, epoch))
        for k in ("image", "joints_uvd", "verts_uvd", "K"):
            assert np.array_equal(item[k].numpy(), alone[k].numpy()), k
