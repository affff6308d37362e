"""Leave-one-out split for sequential recommendation (SASRec / BERT4Rec / HSTU protocol).

For a user with chronological items s (len(s) >= 3):
- train:      s[:-2]                 (training pairs are made from it: inputs s[:-3], targets s[1:-2])
- validation: inputs s[:-2], target s[-2]
- test:       inputs s[:-1], target s[-1]   (the validation item is part of the test history, as in SASRec)

Users with fewer than 3 items keep their whole sequence for training and get no validation/test row, as in
SASRec's ``data_partition`` (so no user's held-out item can be learnt from).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from recjax.data import batching
from recjax.data.types import SequenceDataset


@dataclasses.dataclass(frozen=True)
class LeaveOneOut:
    """Per-user training sequences and the validation/test rows of the users with >= 3 items.

    Attributes:
      dataset: the source dataset (side features, num_items).
      train: one int32 array per dataset user (all users), the training part of the sequence.
      eval_users: (E,) dataset rows of the users that have validation and test rows.
      valid_inputs / valid_target: per eval user, history s[:-2] and target s[-2].
      test_inputs / test_target: per eval user, history s[:-1] and target s[-1].
    """

    dataset: SequenceDataset
    train: tuple[np.ndarray, ...]
    eval_users: np.ndarray
    valid_inputs: tuple[np.ndarray, ...]
    valid_target: np.ndarray
    test_inputs: tuple[np.ndarray, ...]
    test_target: np.ndarray

    @property
    def num_items(self) -> int:
        return self.dataset.num_items

    def train_examples(self, max_len: int) -> batching.Examples:
        return batching.make_train_examples(self.train, max_len, num_items=self.num_items)

    def eval_examples(self, which: str, max_len: int, *, exclude_bucket: int = 64) -> batching.Examples:
        """``which`` = "valid" or "test"."""
        if which not in ("valid", "test"):
            raise ValueError(f"which: expected 'valid' or 'test', got {which!r}")
        inputs = self.valid_inputs if which == "valid" else self.test_inputs
        target = self.valid_target if which == "valid" else self.test_target
        return batching.make_eval_examples(
            inputs,
            target,
            max_len,
            num_items=self.num_items,
            users=self.eval_users,
            exclude_bucket=exclude_bucket,
        )


def leave_one_out(dataset: SequenceDataset) -> LeaveOneOut:
    """Split every user's sequence: last item = test target, the one before = validation target."""
    if not isinstance(dataset, SequenceDataset):
        raise TypeError(f"dataset: expected a SequenceDataset, got {type(dataset).__name__}")
    train, users, v_in, v_t, t_in, t_t = [], [], [], [], [], []
    for u, seq in enumerate(dataset.sequences):
        s = np.asarray(seq, np.int32)
        if len(s) < 3:
            train.append(s)
            continue
        train.append(s[:-2])
        users.append(u)
        v_in.append(s[:-2])
        v_t.append(s[-2])
        t_in.append(s[:-1])
        t_t.append(s[-1])
    return LeaveOneOut(
        dataset=dataset,
        train=tuple(train),
        eval_users=np.asarray(users, np.int32),
        valid_inputs=tuple(v_in),
        valid_target=np.asarray(v_t, np.int32),
        test_inputs=tuple(t_in),
        test_target=np.asarray(t_t, np.int32),
    )
