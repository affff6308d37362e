"""Multi-task examples for the unified model: windows, labels, negatives, side features (numpy only)."""

import numpy as np
import pytest

from recjax.data.types import SequenceDataset
from recjax.retrieval import multitask_data as mt


def _dataset(rng, num_users=6, num_items=60):
    seqs, rats = [], []
    for _ in range(num_users):
        n = int(rng.integers(12, 30))
        seqs.append(rng.choice(np.arange(1, num_items + 1), size=n, replace=False).astype(np.int32))
        rats.append(rng.integers(1, 6, size=n).astype(np.float32))
    seqs.append(np.arange(1, 6, dtype=np.int32))  # too short for a test window: skipped
    rats.append(np.full(5, 3.0, np.float32))
    genres = (rng.random((num_items + 1, 18)) < 0.2).astype(np.int32)
    year = rng.integers(0, 11, size=(num_items + 1, 1)).astype(np.int32)
    users = len(seqs)
    return SequenceDataset(
        "toy", tuple(seqs), num_items,
        item_features={"genres": genres, "year_bucket": year},
        user_features={"gender": rng.integers(1, 3, (users, 1)), "age": rng.integers(1, 8, (users, 1)),
                       "occupation": rng.integers(1, 22, (users, 1))},
        ratings=tuple(rats),
    )  # fmt: skip


def test_windows_labels_and_negatives(rng):
    ds = _dataset(rng)
    cfg = mt.MultiTaskSplitConfig(
        targets_per_window=3, train_windows=2, min_history=4, max_len=8, num_negatives=2
    )
    train, test = mt.build_multitask_split(ds, cfg)
    assert test.num_contexts == 6 and 6 <= train.num_contexts <= 12
    for ex, is_test in ((train, False), (test, True)):
        for c, u in enumerate(ex.user_C):
            seq, rat = ds.sequences[u], ds.ratings[u]
            targets = ex.targets_CxM[c]
            start = int(np.flatnonzero(seq == targets[0])[0])
            np.testing.assert_array_equal(targets, seq[start : start + 3])
            if is_test:
                assert start == len(seq) - 3
            else:
                assert start + 3 <= len(seq) - 3  # nothing from the test window
            hist = ex.history_CxH[c]
            np.testing.assert_array_equal(hist[hist > 0], seq[:start])
            real = ex.inputs_CxL[c][ex.mask_CxL[c]]
            np.testing.assert_array_equal(real, seq[:start][-8:])  # left-padded, last max_len
            rows = np.flatnonzero(ex.context_E == c)
            items, labels, lmask = ex.items_E[rows], ex.labels_ExT[rows], ex.label_mask_ExT[rows]
            pos = labels[:, 0] == 1
            np.testing.assert_array_equal(items[pos], targets)
            r = rat[start : start + 3]
            np.testing.assert_array_equal(labels[pos, 1], r)
            np.testing.assert_array_equal(labels[pos, 2], r >= mt.LONG_WATCH_MIN_RATING)
            np.testing.assert_allclose(ex.value_target_E[rows][pos], r / 5)
            assert (~pos).sum() == 2 * 3 and not np.isin(items[~pos], seq).any()  # unseen negatives
            assert (labels[~pos] == 0).all() and (ex.value_target_E[rows][~pos] == 0).all()
            assert lmask[pos].all() and not lmask[~pos, 1].any() and lmask[~pos][:, [0, 2]].all()


def test_separate_test_negatives(rng):
    ds = _dataset(rng)
    cfg = mt.MultiTaskSplitConfig(targets_per_window=3, min_history=4, num_negatives=0, num_test_negatives=3)
    train, test = mt.build_multitask_split(ds, cfg)
    assert (train.labels_ExT[:, 0] == 1).all()
    assert (test.labels_ExT[:, 0] == 0).sum() == 3 * (test.labels_ExT[:, 0] == 1).sum()


def test_add_negatives_from_pool_skips_rated_items(rng):
    ds = _dataset(rng)
    train, _ = mt.build_multitask_split(ds, mt.MultiTaskSplitConfig(targets_per_window=3, min_history=4))
    pool = rng.integers(0, ds.num_items + 1, size=(train.num_contexts, 20)).astype(np.int32)
    more = mt.add_negatives(train, ds, pool, 4, seed=1)
    added = slice(train.num_examples, more.num_examples)
    assert more.num_examples > train.num_examples
    for c, item in zip(more.context_E[added], more.items_E[added], strict=True):
        assert item in pool[c] and item > 0 and item not in ds.sequences[more.user_C[c]]
    assert (more.labels_ExT[added] == 0).all() and not more.label_mask_ExT[added, 1].any()


def test_side_features_and_errors(rng):
    ds = _dataset(rng)
    side = mt.item_side_features(ds)
    assert side.shape == (ds.num_items + 1, 18 + 11)
    np.testing.assert_array_equal(side[:, :18], ds.item_features["genres"])
    np.testing.assert_array_equal(side[:, 18:].argmax(1), ds.item_features["year_bucket"][:, 0])
    us = mt.user_side_features(ds)
    assert us.shape == (ds.num_users, 3 + 8 + 22) and (us.sum(1) == 3).all()
    # without ratings (SASRec-form ML-1M): click-only labels, value target = click
    train, _ = mt.build_multitask_split(SequenceDataset("x", ds.sequences, ds.num_items))
    train = mt.add_negatives(train, ds, np.tile(np.arange(1, 21), (train.num_contexts, 1)), 2)
    assert not train.label_mask_ExT[:, 1:].any() and train.label_mask_ExT[:, 0].all()
    np.testing.assert_array_equal(train.value_target_E, train.labels_ExT[:, 0])
    with pytest.raises(ValueError, match="targets_per_window"):
        mt.MultiTaskSplitConfig(targets_per_window=0)
    with pytest.raises(ValueError, match="pool_CxK"):
        train, _ = mt.build_multitask_split(ds)
        mt.add_negatives(train, ds, np.zeros((1, 3), np.int32), 2)
