"""Multi-task examples from MovieLens-100K ratings for the OverArch / heads / Value Model.

Split (per user, chronological, ``m = targets_per_window``): the last m interactions are the *test*
window; up to ``train_windows`` windows of m interactions right before it are *training* windows (a
window is used only if at least ``min_history`` interactions precede it). Each window has one *context*:
the user's interactions before the window (the user tower's input, the last ``max_len`` of them, left-
padded) and the window's items as positives. Nothing from a test window is in any training context.

Labels per example (tasks ``TASKS``):
- ``click`` (binary): 1 for an observed interaction of the window, 0 for a sampled negative;
- ``rating`` (regression): the observed rating (1..5); undefined (masked) for negatives;
- ``long_watch`` (binary): 1 if observed with rating >= ``LONG_WATCH_MIN_RATING`` (4), else 0 (negatives
  included: an item not watched is not a long watch). MovieLens has no watch time, so a high rating
  stands in for "watched to the end".
- value target: ``click * rating / 5`` (0 for negatives, 0.2..1 for watched items): the satisfaction a
  recommendation brings, what the learned Value Model regresses.
Without ratings (e.g. the SASRec-form MovieLens-1M) only ``click`` is labelled: ``rating`` and
``long_watch`` are masked out everywhere and the value target is ``click``.
Negatives: ``num_negatives`` per positive, uniform over items the user never rated (any time), so no
negative is a hidden positive. ``add_negatives`` adds more from a caller's pool (e.g. the tower's own top-K,
the candidates the OverArch must reorder at serving time).

Letters: C contexts, L max length, E examples, T tasks, M targets per context, H history width.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from recjax.data.movielens import FEATURE_SIZES
from recjax.data.types import SequenceDataset
from recjax.retrieval.overarch import TaskSpec

TASKS = (TaskSpec("click", "binary"), TaskSpec("rating", "regression"), TaskSpec("long_watch", "binary"))
LONG_WATCH_MIN_RATING = 4.0
MAX_RATING = 5.0


@dataclass(frozen=True)
class MultiTaskSplitConfig:
    targets_per_window: int = 5  # m
    train_windows: int = 3
    min_history: int = 5
    max_len: int = 50  # L
    num_negatives: int = 4
    num_test_negatives: int | None = None  # uniform negatives per test positive (None: num_negatives)
    seed: int = 0

    def __post_init__(self):
        for name in ("targets_per_window", "train_windows", "min_history", "max_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MultiTaskSplitConfig.{name}: expected > 0, got {getattr(self, name)}")
        if self.num_negatives < 0:
            raise ValueError(f"MultiTaskSplitConfig.num_negatives: expected >= 0, got {self.num_negatives}")


@dataclass(frozen=True)
class MultiTaskExamples:
    """Contexts (one per (user, window)) and examples pointing at them; numpy, host side."""

    inputs_CxL: np.ndarray  # int32 item ids, left-padded with 0
    mask_CxL: np.ndarray  # bool
    user_C: np.ndarray  # int32 row of the user in the dataset
    history_CxH: np.ndarray  # int32 every item before the window (for exclusion), 0-padded
    targets_CxM: np.ndarray  # int32 the window's items, 0-padded
    context_E: np.ndarray  # int32 index into the contexts
    items_E: np.ndarray  # int32 item ids
    labels_ExT: np.ndarray  # float32
    label_mask_ExT: np.ndarray  # bool
    value_target_E: np.ndarray  # float32

    @property
    def num_examples(self) -> int:
        return len(self.items_E)

    @property
    def num_contexts(self) -> int:
        return len(self.user_C)


def _labels(ratings_E: np.ndarray, positive_E: np.ndarray, has_ratings: bool = True):
    e = len(ratings_E)
    labels = np.zeros((e, len(TASKS)), np.float32)
    mask = np.ones((e, len(TASKS)), bool)
    labels[:, 0] = positive_E
    if not has_ratings:  # click only: rating and long-watch undefined, value = click
        mask[:, 1:] = False
        return labels, mask, positive_E.astype(np.float32)
    labels[:, 1] = np.where(positive_E, ratings_E, 0.0)
    mask[:, 1] = positive_E
    labels[:, 2] = positive_E & (ratings_E >= LONG_WATCH_MIN_RATING)
    value = np.where(positive_E, ratings_E / MAX_RATING, 0.0).astype(np.float32)
    return labels, mask, value


def _sample_unseen(rng: np.random.Generator, seen: np.ndarray, num_items: int, count: int) -> np.ndarray:
    """``count`` item ids in [1, num_items] not in ``seen`` (sorted), with replacement."""
    free = num_items - len(seen)
    if free <= 0 or count == 0:
        return np.zeros((0,), np.int32)
    r = rng.integers(0, free, size=count)
    # the r-th unseen id: shift r past every seen id <= it
    out = r + 1
    for s in seen:  # seen is sorted; small (user history)
        out = out + (out >= s)
    return out.astype(np.int32)


def _pad_rows(rows: list[np.ndarray], width: int | None = None, left: bool = False) -> np.ndarray:
    w = max([len(r) for r in rows] + [1]) if width is None else width
    out = np.zeros((len(rows), w), np.int32)
    for i, r in enumerate(rows):
        r = r[-w:] if left else r[:w]
        if len(r):
            if left:
                out[i, w - len(r) :] = r
            else:
                out[i, : len(r)] = r
    return out


def _build(dataset, cuts, cfg, rng) -> MultiTaskExamples:
    """``cuts``: (user, start, stop) windows."""
    inputs, hist, targets, users = [], [], [], []
    ctx, items, ratings, positive = [], [], [], []
    for c, (u, start, stop) in enumerate(cuts):
        seq = dataset.sequences[u]
        rat = np.zeros(len(seq), np.float32) if dataset.ratings is None else dataset.ratings[u]
        inputs.append(seq[:start])
        hist.append(seq[:start])
        targets.append(seq[start:stop])
        users.append(u)
        pos = seq[start:stop]
        neg = _sample_unseen(rng, np.sort(seq), dataset.num_items, cfg.num_negatives * len(pos))
        ctx.append(np.full(len(pos) + len(neg), c, np.int32))
        items.append(np.concatenate([pos, neg]))
        ratings.append(np.concatenate([rat[start:stop], np.zeros(len(neg), np.float32)]))
        positive.append(np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)]))
    inputs_CxL = _pad_rows(inputs, cfg.max_len, left=True)
    items_E = np.concatenate(items).astype(np.int32)
    labels, mask, value = _labels(
        np.concatenate(ratings).astype(np.float32), np.concatenate(positive), dataset.ratings is not None
    )
    return MultiTaskExamples(
        inputs_CxL=inputs_CxL,
        mask_CxL=inputs_CxL > 0,
        user_C=np.asarray(users, np.int32),
        history_CxH=_pad_rows(hist),
        targets_CxM=_pad_rows(targets, cfg.targets_per_window),
        context_E=np.concatenate(ctx),
        items_E=items_E,
        labels_ExT=labels,
        label_mask_ExT=mask,
        value_target_E=value,
    )


def build_multitask_split(
    dataset: SequenceDataset, config: MultiTaskSplitConfig = MultiTaskSplitConfig()
) -> tuple[MultiTaskExamples, MultiTaskExamples]:
    """(train, test) examples; see the module docstring. Users too short for a test window are skipped.
    A dataset without ratings gives click-only labels."""
    m = config.targets_per_window
    train_cuts, test_cuts = [], []
    for u, seq in enumerate(dataset.sequences):
        n = len(seq)
        if n - m < config.min_history:
            continue
        test_cuts.append((u, n - m, n))
        for w in range(1, config.train_windows + 1):
            start = n - m * (w + 1)
            if start < config.min_history:
                break
            train_cuts.append((u, start, start + m))
    if not test_cuts:
        raise ValueError(f"dataset: no user has more than min_history + {m} interactions")
    rng = np.random.default_rng(config.seed)
    test_cfg = config
    if config.num_test_negatives is not None:
        test_cfg = replace(config, num_negatives=config.num_test_negatives)
    return _build(dataset, train_cuts, config, rng), _build(dataset, test_cuts, test_cfg, rng)


def add_negatives(
    examples: MultiTaskExamples,
    dataset: SequenceDataset,
    pool_CxK: np.ndarray,
    per_context: int,
    *,
    seed: int = 0,
) -> MultiTaskExamples:
    """Adds ``per_context`` negatives per context drawn from ``pool_CxK`` (ids <= 0 ignored) without the
    user's rated items (so no hidden positive becomes a negative)."""
    if pool_CxK.shape[0] != examples.num_contexts:
        raise ValueError(f"pool_CxK: expected {examples.num_contexts} rows, got shape {pool_CxK.shape}")
    rng = np.random.default_rng(seed)
    ctx, items = [], []
    for c, u in enumerate(examples.user_C):
        pool = np.setdiff1d(pool_CxK[c][pool_CxK[c] > 0], dataset.sequences[u])
        if len(pool):
            pick = rng.choice(pool, size=min(per_context, len(pool)), replace=False)
            ctx.append(np.full(len(pick), c, np.int32))
            items.append(pick.astype(np.int32))
    if not items:
        return examples
    items_E = np.concatenate(items)
    has_ratings = bool(examples.label_mask_ExT[:, 2].any())  # long-watch is labelled iff ratings exist
    labels, mask, value = _labels(
        np.zeros(len(items_E), np.float32), np.zeros(len(items_E), bool), has_ratings
    )
    return replace(
        examples,
        context_E=np.concatenate([examples.context_E, *ctx]),
        items_E=np.concatenate([examples.items_E, items_E]),
        labels_ExT=np.concatenate([examples.labels_ExT, labels]),
        label_mask_ExT=np.concatenate([examples.label_mask_ExT, mask]),
        value_target_E=np.concatenate([examples.value_target_E, value]),
    )


def item_side_features(dataset: SequenceDataset) -> np.ndarray:
    """(num_items + 1, S) float32: genre multi-hot + one-hot release-year bucket (row 0 = padding)."""
    parts = []
    if "genres" in dataset.item_features:
        parts.append(dataset.item_features["genres"].astype(np.float32))
    if "year_bucket" in dataset.item_features:
        yb = dataset.item_features["year_bucket"][:, 0]
        parts.append(np.eye(FEATURE_SIZES["year_bucket"], dtype=np.float32)[yb])
    if not parts:
        return np.zeros((dataset.num_items + 1, 0), np.float32)
    return np.concatenate(parts, axis=1)


def user_side_features(dataset: SequenceDataset) -> np.ndarray:
    """(num_users, U) float32: one-hot gender, age group and occupation codes."""
    parts = [
        np.eye(FEATURE_SIZES[name], dtype=np.float32)[dataset.user_features[name][:, 0]]
        for name in ("gender", "age", "occupation")
        if name in dataset.user_features
    ]
    if not parts:
        return np.zeros((dataset.num_users, 0), np.float32)
    return np.concatenate(parts, axis=1)
