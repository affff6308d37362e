"""Ranking requests from rated histories (e.g. MovieLens-100K): a request is (history, candidate items, labels
``rating >= threshold``), the form a ranking model (LIME, target-aware HSTU) scores.

Split per user, chronologically: the last ``holdout`` ratings are the test candidates, the ``holdout``
before them the validation candidates, the rest is training; a test request's history is everything before
its block (the validation block included, as in leave-one-out), a validation request's everything before
its own. Users with fewer than ``2 * holdout + min_train`` ratings only train.

Training requests: per user and epoch, ``requests_per_user`` cuts t drawn uniformly in [1, n_train - 1];
history = the training ratings before t, candidates = the next ``num_candidates`` training ratings (fewer
at the end, padded with id 0 and ``candidate_mask`` False). A pure function of (seed, epoch).

Request arrays (numpy; B requests, L = max_len, C candidates): ``inputs`` (B, L) int32 left-padded,
``mask`` (B, L) bool, ``candidates`` (B, C) int32, ``candidate_mask`` (B, C) bool, ``labels`` (B, C)
float32, ``user`` (B,) int32 (dataset row).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from recjax.data.batching import left_pad
from recjax.data.types import SequenceDataset
from recjax.validation import check_positive


@dataclasses.dataclass(frozen=True)
class RatingSplit:
    dataset: SequenceDataset
    holdout: int
    threshold: float
    train_len: np.ndarray  # (num_users,) ratings used for training per user
    eval_users: np.ndarray  # users with validation and test blocks

    def labels(self, u: int) -> np.ndarray:
        return (np.asarray(self.dataset.ratings[u]) >= self.threshold).astype(np.float32)


def rating_split(
    dataset: SequenceDataset, *, holdout: int = 10, threshold: float = 4.0, min_train: int = 5
) -> RatingSplit:
    check_positive("holdout", holdout)
    check_positive("min_train", min_train)
    if dataset.ratings is None:
        raise ValueError(f"dataset: {dataset.name!r} has no ratings (rating requests need them)")
    lengths = np.asarray([len(s) for s in dataset.sequences])
    has_eval = lengths >= 2 * holdout + min_train
    train_len = np.where(has_eval, lengths - 2 * holdout, lengths)
    if not has_eval.any():
        raise ValueError(f"holdout: no user has {2 * holdout + min_train} ratings for holdout={holdout}")
    return RatingSplit(
        dataset, holdout, float(threshold), train_len, np.flatnonzero(has_eval).astype(np.int32)
    )


def _requests(split: RatingSplit, users, starts, stops, max_len: int, width: int) -> dict[str, np.ndarray]:
    seqs = split.dataset.sequences
    hist = [np.asarray(seqs[u][:t], np.int32) for u, t in zip(users, starts)]
    inputs = left_pad(hist, max_len)
    cand = np.zeros((len(users), width), np.int32)
    labels = np.zeros((len(users), width), np.float32)
    for i, (u, t, e) in enumerate(zip(users, starts, stops)):
        n = e - t
        cand[i, :n] = seqs[u][t:e]
        labels[i, :n] = split.labels(u)[t:e]
    return {
        "inputs": inputs,
        "mask": inputs != 0,
        "candidates": cand,
        "candidate_mask": cand != 0,
        "labels": labels,
        "user": np.asarray(users, np.int32),
    }


def eval_requests(split: RatingSplit, which: str, max_len: int) -> dict[str, np.ndarray]:
    """One request per eval user: its validation or test block as candidates."""
    if which not in ("valid", "test"):
        raise ValueError(f"which: expected 'valid' or 'test', got {which!r}")
    users = split.eval_users
    starts = split.train_len[users] + (0 if which == "valid" else split.holdout)
    return _requests(split, users, starts, starts + split.holdout, max_len, split.holdout)


def train_requests(
    split: RatingSplit, max_len: int, num_candidates: int, requests_per_user: int, seed: int, epoch: int
) -> dict[str, np.ndarray]:
    check_positive("num_candidates", num_candidates)
    check_positive("requests_per_user", requests_per_user)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), 7]))
    n = split.train_len
    users = np.repeat(np.flatnonzero(n >= 2), requests_per_user).astype(np.int32)
    starts = 1 + (rng.random(len(users)) * (n[users] - 1)).astype(np.int64)
    stops = np.minimum(starts + num_candidates, n[users])
    return _requests(split, users, starts, stops, max_len, num_candidates)
