"""Batching: left padding, truncation, exclude contents, static shapes, determinism, bad inputs."""

import numpy as np
import pytest

from recjax.data import batching, leave_one_out
from recjax.data.types import SequenceDataset


def _random_sequences(rng, num_users, num_items, low=1, high=30):
    return [
        rng.choice(np.arange(1, num_items + 1), size=int(rng.integers(low, high)), replace=False).astype(
            np.int32
        )
        for _ in range(num_users)
    ]


def test_train_examples_left_aligned_and_truncated(rng):
    seqs = _random_sequences(rng, 40, 200, low=1, high=25)
    max_len = 10
    ex = batching.make_train_examples(seqs, max_len, num_items=200)
    kept = [u for u, s in enumerate(seqs) if len(s) >= 2]
    np.testing.assert_array_equal(ex["user"], kept)
    assert ex["inputs"].shape == ex["targets"].shape == ex["mask"].shape == (len(kept), max_len)
    assert ex["inputs"].dtype == np.int32 and ex["mask"].dtype == bool
    for row, u in enumerate(kept):
        s = seqs[u]
        n = min(len(s) - 1, max_len)
        np.testing.assert_array_equal(ex["inputs"][row, max_len - n :], s[:-1][-n:])
        np.testing.assert_array_equal(ex["targets"][row, max_len - n :], s[1:][-n:])
        assert (ex["inputs"][row, : max_len - n] == 0).all() and (
            ex["targets"][row, : max_len - n] == 0
        ).all()
        np.testing.assert_array_equal(ex["mask"][row], ex["inputs"][row] != 0)
        # the next-item relation holds inside the row: target at position p is input at p + 1
        both = ex["mask"][row, :-1] & ex["mask"][row, 1:]
        np.testing.assert_array_equal(ex["targets"][row, :-1][both], ex["inputs"][row, 1:][both])
        assert ex["targets"][row, -1] == s[-1]


def test_eval_examples_exclude_is_whole_history(rng):
    seqs = _random_sequences(rng, 30, 500, low=3, high=150)
    split = leave_one_out(SequenceDataset("r", tuple(seqs), 500))
    ex = split.eval_examples("test", max_len=8, exclude_bucket=64)
    assert ex["exclude"].shape[1] in (64, 128, 256)
    for row, u in enumerate(split.eval_users):
        s = seqs[u]
        assert ex["target"][row] == s[-1]
        np.testing.assert_array_equal(ex["inputs"][row, -min(8, len(s) - 1) :], s[:-1][-8:])
        hist = ex["exclude"][row]
        np.testing.assert_array_equal(hist[: len(s) - 1], s[:-1])  # not truncated to max_len
        assert (hist[len(s) - 1 :] == 0).all()
        assert s[-1] not in hist


def test_eval_batches_static_shapes_and_padding(rng):
    seqs = _random_sequences(rng, 23, 300, low=3, high=140)
    split = leave_one_out(SequenceDataset("r", tuple(seqs), 300))
    ex = split.eval_examples("valid", max_len=16, exclude_bucket=32)
    out = list(batching.batches(ex, 10, exclude_bucket=32))
    assert len(out) == 3 == batching.num_batches(23, 10, drop_remainder=False)
    for i, b in enumerate(out):
        assert set(b) == {"inputs", "mask", "target", "exclude", "valid", "user"}
        assert b["inputs"].shape == (10, 16) and b["target"].shape == (10,) and b["valid"].shape == (10,)
        width = b["exclude"].shape[1]
        longest = max(len(seqs[u]) - 2 for u in ex["user"][i * 10 : (i + 1) * 10])
        assert width // 32 in (1, 2, 4, 8) and width % 32 == 0 and longest <= width < max(2 * longest, 33)
    last = out[-1]
    np.testing.assert_array_equal(last["valid"], [True] * 3 + [False] * 7)
    np.testing.assert_array_equal(last["inputs"][3:], np.repeat(last["inputs"][:1], 7, axis=0))
    got = np.concatenate([b["target"][b["valid"]] for b in out])
    np.testing.assert_array_equal(got, split.valid_target)


def test_train_batches_shuffle_deterministic_and_complete(rng):
    seqs = _random_sequences(rng, 37, 100, low=2, high=20)
    ex = batching.make_train_examples(seqs, 12)
    a = list(batching.batches(ex, 8, shuffle=True, seed=5, epoch=1, drop_remainder=False))
    b = list(batching.batches(ex, 8, shuffle=True, seed=5, epoch=1, drop_remainder=False))
    c = list(batching.batches(ex, 8, shuffle=True, seed=5, epoch=2, drop_remainder=False))
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert not all(np.array_equal(x["user"], y["user"]) for x, y in zip(a, c, strict=True))
    users = np.concatenate([x["user"][x["mask"].any(1)] for x in a])
    assert sorted(users.tolist()) == ex["user"].tolist()
    # last batch padded with all-zero rows (no loss); drop_remainder drops it instead
    assert (a[-1]["targets"][37 % 8 :] == 0).all() and not a[-1]["mask"][37 % 8 :].any()
    d = list(batching.batches(ex, 8, shuffle=True, seed=5, epoch=1, drop_remainder=True))
    assert len(d) == 37 // 8 and all(x["inputs"].shape == (8, 12) for x in d)


def test_bad_ids_name_user_and_id():
    seqs = [np.array([1, 2, 3]), np.array([4, 11, 2])]
    with pytest.raises(ValueError, match=r"user index 1 has item id 11"):
        batching.make_train_examples(seqs, 5, num_items=10)
    with pytest.raises(ValueError, match=r"user index 0 has item id 0"):
        batching.make_train_examples([np.array([3, 0, 2])], 5)
    with pytest.raises(ValueError, match=r"targets: user index 7 has target item id 12"):
        batching.make_eval_examples([np.array([1, 2])], [12], 4, num_items=10, users=[7])
    with pytest.raises(ValueError, match=r"targets: expected shape \(2,\)"):
        batching.make_eval_examples([np.array([1]), np.array([2])], [3], 4)
    with pytest.raises(TypeError, match="integer item ids"):
        batching.make_train_examples([np.array([1.0, 2.0])], 4)
    with pytest.raises(ValueError, match="max_len: expected > 0"):
        batching.make_train_examples(seqs, 0)
    with pytest.raises(ValueError, match="batch_size: expected > 0"):
        list(batching.batches(batching.make_train_examples(seqs, 4), 0))
    with pytest.raises(ValueError, match="same leading dimension"):
        list(batching.batches({"a": np.zeros(3), "b": np.zeros(4)}, 2))
