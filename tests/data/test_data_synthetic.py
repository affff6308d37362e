"""Synthetic generator: deterministic, valid, Zipf-like popularity and a real sequential signal."""

import numpy as np
import pytest

from recjax.data import leave_one_out, make_synthetic

SMALL = dict(num_users=400, num_items=300, min_len=20, max_len=60)


@pytest.fixture(scope="module")
def small():
    return make_synthetic(seed=3, **SMALL)


def test_deterministic_given_seed(small):
    again = make_synthetic(seed=3, **SMALL)
    other = make_synthetic(seed=4, **SMALL)
    assert all(np.array_equal(a, b) for a, b in zip(small.sequences, again.sequences, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(small.ratings, again.ratings, strict=True))
    for k, v in small.item_features.items():
        np.testing.assert_array_equal(v, again.item_features[k])
    assert not all(np.array_equal(a, b) for a, b in zip(small.sequences, other.sequences, strict=True))


def test_valid_dataset(small):
    assert small.num_users == 400 and small.num_items == 300
    for s, r, t in zip(small.sequences, small.ratings, small.timestamps, strict=True):
        assert 20 <= len(s) <= 60 and s.dtype == np.int32
        assert s.min() >= 1 and s.max() <= 300 and len(np.unique(s)) == len(s)  # no repeats
        assert len(r) == len(t) == len(s) and r.min() >= 1 and r.max() <= 5 and (np.diff(t) > 0).all()
    for feats, rows in ((small.item_features, 301), (small.user_features, 400)):
        for name, v in feats.items():
            assert v.shape == (rows, 1) and v.dtype == np.int32 and v[-1, 0] >= 1, name
    assert small.item_features["genre"][0, 0] == 0 and small.item_features["popularity_bucket"][0, 0] == 0
    split = leave_one_out(small)
    assert len(split.eval_users) == 400  # every user has >= 3 items


def test_zipf_popularity(small):
    counts = np.bincount(np.concatenate(small.sequences), minlength=301)[1:]
    top = np.sort(counts)[::-1]
    share = top[: len(top) // 10].sum() / top.sum()
    assert share > 0.3, share  # uniform popularity would give ~0.1 (+ sampling noise)
    # the popularity-bucket feature follows the realised counts: bucket 1 is consumed most
    bucket = small.item_features["popularity_bucket"][1:, 0]
    per_bucket = [counts[bucket == b].mean() for b in range(1, 11)]
    assert per_bucket[0] > 2 * per_bucket[-1]


def test_sequential_drift(small):
    """The next item shares the genre of the previous item far more than that of an item 15 steps back."""
    genre = small.item_features["genre"][:, 0]
    rng = np.random.default_rng(0)
    prev, far, rand = [], [], []
    for s in small.sequences:
        g = genre[s]
        prev.append((g[1:] == g[:-1]).mean())
        far.append((g[15:] == g[:-15]).mean())
        rand.append((g == genre[rng.integers(1, 301, size=len(s))]).mean())
    prev, far, rand = np.mean(prev), np.mean(far), np.mean(rand)
    assert prev > far + 0.15 and far > rand + 0.05, (prev, far, rand)


def test_default_size_and_speed():
    ds = make_synthetic(seed=0)
    assert ds.num_users == 2000 and ds.num_items == 1000 and 100_000 < ds.num_interactions < 140_000


def test_bad_arguments():
    with pytest.raises(ValueError, match="min_len/max_len"):
        make_synthetic(min_len=50, max_len=10)
    with pytest.raises(ValueError, match="temperature: expected > 0"):
        make_synthetic(temperature=0.0)
    with pytest.raises(ValueError, match=r"recency: expected a value in \[0, 1\]"):
        make_synthetic(recency=1.5)
    with pytest.raises(TypeError, match=r"unknown arguments \['users'\]"):
        make_synthetic(users=10)
