"""Leave-one-out: the split is exact and no held-out item leaks into training."""

import numpy as np
import pytest

from recjax.data import leave_one_out
from recjax.data.types import SequenceDataset


def _dataset(rng, num_users=60, num_items=80):
    # repeats allowed here on purpose: leakage must be ruled out by position, not by item identity
    seqs = tuple(
        rng.integers(1, num_items + 1, size=int(rng.integers(1, 40))).astype(np.int32)
        for _ in range(num_users)
    )
    return SequenceDataset("random", seqs, num_items)


def test_split_parts(rng):
    ds = _dataset(rng)
    split = leave_one_out(ds)
    assert len(split.train) == ds.num_users
    short = [u for u, s in enumerate(ds.sequences) if len(s) < 3]
    assert set(split.eval_users.tolist()) == set(range(ds.num_users)) - set(short)
    for u in short:  # short users train on everything and are never evaluated
        np.testing.assert_array_equal(split.train[u], ds.sequences[u])
    for i, u in enumerate(split.eval_users):
        s = ds.sequences[u]
        np.testing.assert_array_equal(split.train[u], s[:-2])
        np.testing.assert_array_equal(split.valid_inputs[i], s[:-2])
        assert split.valid_target[i] == s[-2]
        np.testing.assert_array_equal(split.test_inputs[i], s[:-1])
        assert split.test_target[i] == s[-1]


def test_no_leakage_into_training_examples(rng):
    ds = _dataset(rng)
    split = leave_one_out(ds)
    max_len = 50  # longer than any sequence: every training position is visible
    ex = split.train_examples(max_len)
    row_of = {int(u): r for r, u in enumerate(ex["user"])}
    for i, u in enumerate(split.eval_users):
        s = ds.sequences[u]
        n = len(s)
        if u not in row_of:  # train part has < 2 items: no training pair at all
            assert n - 2 < 2
            continue
        r = row_of[int(u)]
        inputs, targets = ex["inputs"][r], ex["targets"][r]
        # training sees exactly the occurrences s[0 .. n-3]; positions n-2 (valid) and n-1 (test) never
        assert int((inputs != 0).sum()) == n - 3 and int((targets != 0).sum()) == n - 3
        np.testing.assert_array_equal(targets[targets != 0], s[1 : n - 2])
        np.testing.assert_array_equal(inputs[inputs != 0], s[: n - 3])
        # the test target is predicted from position n-2 in evaluation; the last training target is s[n-3]
        assert targets[-1] == s[n - 3]
        # the evaluation rows do not feed back into training: their targets sit after the training window
        assert split.valid_target[i] == s[n - 2] and split.test_target[i] == s[n - 1]


def test_rejects_non_dataset():
    with pytest.raises(TypeError, match="dataset: expected a SequenceDataset"):
        leave_one_out([np.array([1, 2, 3])])
    with pytest.raises(ValueError, match="which: expected 'valid' or 'test'"):
        leave_one_out(SequenceDataset("x", (np.array([1, 2, 3], np.int32),), 3)).eval_examples("train", 4)
