"""The data contract shared by loaders, pipelines, models and evaluation.

Item ids are 1-based; 0 is the padding id everywhere. A sequence batch is left-padded (most recent item in
the last column) so causal models read the user state at position -1.

Batch dicts (numpy on the host, jax arrays inside jit), B = batch, L = max sequence length:
- training:   ``inputs`` (B, L) int32, ``targets`` (B, L) int32 (next item per position, 0 = none),
              ``mask`` (B, L) bool (True where ``inputs`` holds a real item).
- evaluation: ``inputs`` (B, L) int32, ``mask`` (B, L) bool, ``target`` (B,) int32,
              ``exclude`` (B, H) int32 ids to remove from the ranking (the user's whole history before the
              target, 0-padded; H = longest history in the batch, bucketed), ``valid`` (B,) bool
              (False for rows that only pad the last batch).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SequenceDataset:
    """Chronological item sequences per user, plus optional side features.

    Attributes:
      name: human-readable dataset name (e.g. "ml-1m").
      sequences: one int32 array per user, item ids in [1, num_items], oldest first.
      num_items: largest item id (ids are 1..num_items; 0 is padding).
      item_features: name -> (num_items + 1, F) int32 multi-hot or categorical codes (row 0 = padding).
      user_features: name -> (num_users, F) int32.
      timestamps: optional, one int64 array per user aligned with ``sequences``.
      ratings: optional, one float32 array per user aligned with ``sequences``.
      raw_item_ids: optional, the source's id of each item: ``raw_item_ids[i]`` for item i (entry 0 = ""
        for padding), so length num_items + 1. Set by loaders that renumber arbitrary ids (interactions.py).
      raw_user_ids: optional, the source's id of each user, aligned with ``sequences``.
    """

    name: str
    sequences: tuple[np.ndarray, ...]
    num_items: int
    item_features: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    user_features: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    timestamps: tuple[np.ndarray, ...] | None = None
    ratings: tuple[np.ndarray, ...] | None = None
    raw_item_ids: tuple[str, ...] | None = None
    raw_user_ids: tuple[str, ...] | None = None

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))
