"""Tiny MovieLens-like datasets for the Foundation–Expert tests (not a test module)."""

import numpy as np

from recjax.data.movielens import GENRES
from recjax.data.types import SequenceDataset


def tiny_dataset(num_users=24, num_items=40, seed=0) -> SequenceDataset:
    rng = np.random.default_rng(seed)
    seqs = tuple(
        (rng.permutation(num_items)[: rng.integers(6, 14)] + 1).astype(np.int32) for _ in range(num_users)
    )
    genres = np.zeros((num_items + 1, len(GENRES)), np.int32)
    genres[np.arange(1, num_items + 1), rng.integers(0, len(GENRES), num_items)] = 1
    ratings = tuple(rng.integers(1, 6, len(s)).astype(np.float32) for s in seqs)
    return SequenceDataset(
        name="tiny",
        sequences=seqs,
        num_items=num_items,
        item_features={
            "genres": genres,
            "year_bucket": rng.integers(1, 5, (num_items + 1, 1)).astype(np.int32),
        },
        user_features={
            "occupation": rng.integers(1, 22, (num_users, 1)).astype(np.int32),
            "gender": rng.integers(1, 3, (num_users, 1)).astype(np.int32),
        },
        ratings=ratings,
        timestamps=tuple(np.arange(len(s), dtype=np.int64) for s in seqs),
    )
