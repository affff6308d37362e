"""Surfaces on MovieLens for the Foundation–Expert system (arXiv 2508.02929), and the impressions and
requests its foundation model (FM) and experts train and evaluate on.

A *surface* is a slice of the product with its own labels:

- ``genre_surfaces`` (ML-1M, kind "next_item"): every item belongs to one genre group (the first group in
  ``ML1M_GENRE_GROUPS`` that holds one of its genres). Label: which item of the surface comes next. The
  request of a user at cut t is "the user is on the surface of item s[t]"; the candidates are that
  surface's items.
- ``occupation_surfaces`` (ML-100K, kind "rating"): every user belongs to one occupation group. Label:
  rating >= 4 of the item the user rates at cut t.

Split (the baselines' leave-one-out, ``recjax.data.splits``): users with >= 3 items; valid cut n - 2, test
cut n - 1; training uses s[:n - 2] only. The history of a cut t is s[:t] (the whole cross-surface history,
last ``max_len`` items).

Impressions (dicts of numpy arrays, E rows): ``user``, ``cut``, ``item``, ``label`` (float32 0/1),
``surface``, ``row`` (evaluation row, -1 in training), ``ne`` (bool: counted in NE). One (user, item) pair
appears at most once per impression set (MovieLens rates each item once; duplicates are dropped), so the
TAE store can key them by (user, item). Training impressions of a next-item surface: the positive at a
cut plus ``num_negatives`` items of the same surface the user never rated. Evaluation impressions of a
next-item surface: the target and every surface item not in the history (full-surface ranking; ``ne``
marks the target plus ``num_negatives`` of them, the training ratio, for NE).

Requests group impressions of one (user, cut) into fixed-width candidate rows (``requests``).

Letters: U users, N items, E impressions, R requests, L history, C candidates, H short history, S surfaces.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from recjax.data.movielens import GENRES
from recjax.data.types import SequenceDataset
from recjax.validation import check_positive

KINDS = ("next_item", "rating")

ML1M_GENRE_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("family", ("Animation", "Children's", "Musical", "Fantasy")),
    ("action", ("Action", "Adventure", "Sci-Fi", "War", "Western")),
    ("dark", ("Thriller", "Crime", "Horror", "Mystery", "Film-Noir")),
    ("comedy", ("Comedy", "Romance")),
    ("drama", ("Drama", "Documentary")),
)
# ML-100K u.occupation, in file order (the loader's user feature ``occupation`` is 1 + this index).
ML100K_OCCUPATIONS = (
    "administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive", "healthcare",
    "homemaker", "lawyer", "librarian", "marketing", "none", "other", "programmer", "retired", "salesman",
    "scientist", "student", "technician", "writer",
)  # fmt: skip
ML100K_OCCUPATION_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("student", ("student",)),
    ("tech", ("engineer", "programmer", "scientist", "technician")),
    ("arts_edu", ("educator", "librarian", "writer", "artist", "entertainment")),
    ("business", ("administrator", "executive", "marketing", "salesman", "lawyer", "doctor", "healthcare")),
    ("other", ("homemaker", "none", "other", "retired")),
)


@dataclasses.dataclass(frozen=True)
class Surfaces:
    """``item_surface`` (N + 1,) for "next_item" (-1 = padding row), ``user_surface`` (U,) for "rating"."""

    names: tuple[str, ...]
    kind: str
    item_surface: np.ndarray | None = None
    user_surface: np.ndarray | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        table = self.item_surface if self.kind == "next_item" else self.user_surface
        if table is None:
            raise ValueError(
                f"kind={self.kind!r}: needs {'item' if self.kind == 'next_item' else 'user'}_surface"
            )

    @property
    def num_surfaces(self) -> int:
        return len(self.names)


def genre_surfaces(dataset: SequenceDataset, groups=ML1M_GENRE_GROUPS) -> Surfaces:
    """ML-1M genre groups over the item feature ``genres`` (multi-hot in ``GENRES`` order)."""
    if "genres" not in dataset.item_features:
        raise ValueError(f"dataset: {dataset.name!r} has no item feature 'genres' (movies.dat)")
    genres = dataset.item_features["genres"]
    surface = np.full(dataset.num_items + 1, -1, np.int32)
    for s, (_, members) in reversed(list(enumerate(groups))):  # reversed: the first group wins
        unknown = [g for g in members if g not in GENRES]
        if unknown:
            raise ValueError(f"groups: unknown genres {unknown}; known: {GENRES}")
        cols = [GENRES.index(g) for g in members]
        surface[genres[:, cols].any(axis=1)] = s
    missing = np.flatnonzero(surface[1:] < 0) + 1
    if len(missing):
        raise ValueError(f"groups: item {int(missing[0])} ({len(missing)} items) has no genre in any group")
    return Surfaces(tuple(n for n, _ in groups), "next_item", item_surface=surface)


def occupation_surfaces(
    dataset: SequenceDataset, groups=ML100K_OCCUPATION_GROUPS, occupations=ML100K_OCCUPATIONS
) -> Surfaces:
    """ML-100K occupation groups over the user feature ``occupation`` (1 + index in ``occupations``)."""
    if "occupation" not in dataset.user_features:
        raise ValueError(f"dataset: {dataset.name!r} has no user feature 'occupation' (u.user)")
    code_to_group = np.full(len(occupations) + 1, -1, np.int32)
    for s, (_, members) in enumerate(groups):
        for m in members:
            if m not in occupations:
                raise ValueError(f"groups: unknown occupation {m!r}; known: {occupations}")
            code_to_group[1 + occupations.index(m)] = s
    codes = dataset.user_features["occupation"][:, 0]
    if codes.min() < 1 or codes.max() > len(occupations) or (code_to_group[codes] < 0).any():
        raise ValueError("groups: some users' occupation code is in no group (or out of range)")
    return Surfaces(tuple(n for n, _ in groups), "rating", user_surface=code_to_group[codes])


def item_group_surfaces(dataset: SequenceDataset, feature: str, num_groups: int) -> Surfaces:
    """Next-item surfaces from a categorical item feature (rows, 1), codes 1.. (e.g. the synthetic
    dataset's ``genre``): surface = (code - 1) % num_groups. For tiny runs and tests."""
    check_positive("num_groups", num_groups)
    if feature not in dataset.item_features or dataset.item_features[feature].shape[1] != 1:
        raise ValueError(
            f"feature: {feature!r} is not a categorical (rows, 1) item feature of {dataset.name!r}"
        )
    codes = dataset.item_features[feature][:, 0].astype(np.int64)
    if (codes[1:] < 1).any():
        raise ValueError(f"feature: {feature!r} has unknown (0) codes on real items")
    surface = np.where(np.arange(len(codes)) == 0, -1, (codes - 1) % num_groups).astype(np.int32)
    return Surfaces(tuple(f"{feature}{g}" for g in range(num_groups)), "next_item", item_surface=surface)


def _concat(parts: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class SurfaceData:
    """The dataset, its surfaces and the leave-one-out cuts; builds impressions, requests and features."""

    def __init__(self, dataset: SequenceDataset, surfaces: Surfaces, *, max_len: int, num_negatives: int = 4):
        check_positive("max_len", max_len)
        check_positive("num_negatives", num_negatives)
        if surfaces.kind == "rating" and dataset.ratings is None:
            raise ValueError(f"dataset: {dataset.name!r} has no ratings, a 'rating' surface needs them")
        if surfaces.kind == "rating" and len(surfaces.user_surface) != dataset.num_users:
            raise ValueError(
                f"surfaces.user_surface: {len(surfaces.user_surface)} users, "
                f"the dataset has {dataset.num_users}"
            )
        if surfaces.kind == "next_item" and len(surfaces.item_surface) != dataset.num_items + 1:
            raise ValueError(
                f"surfaces.item_surface: expected {dataset.num_items + 1} rows, "
                f"got {len(surfaces.item_surface)}"
            )
        self.dataset, self.surfaces = dataset, surfaces
        self.max_len, self.num_negatives = max_len, num_negatives
        self.num_items = dataset.num_items
        lengths = np.asarray([len(s) for s in dataset.sequences], np.int64)
        self.lengths, self.offsets = lengths, np.concatenate([[0], np.cumsum(lengths)])
        self.flat_items = np.concatenate([np.asarray(s, np.int32) for s in dataset.sequences])
        self.flat_users = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
        self.flat_pos = np.arange(len(self.flat_items)) - self.offsets[self.flat_users]
        keys = self._key(self.flat_users, self.flat_items)
        order = np.argsort(keys, kind="stable")
        self._keys_sorted, self._pos_sorted = keys[order], self.flat_pos[order]
        if len(np.unique(keys)) != len(keys):
            dup = int(order[np.flatnonzero(np.diff(self._keys_sorted) == 0)[0]])
            raise ValueError(
                f"dataset: user {int(self.flat_users[dup])} has item {int(self.flat_items[dup])} twice; "
                "(user, item) must be unique (one interaction per pair, as MovieLens ratings)"
            )
        if dataset.ratings is not None:
            self.flat_labels = (np.concatenate(dataset.ratings) >= 4).astype(np.float32)
        self.eval_users = np.flatnonzero(lengths >= 3).astype(np.int32)
        self.train_len = np.where(lengths >= 3, lengths - 2, lengths)
        if surfaces.kind == "next_item":
            self.surface_items = [
                np.flatnonzero(surfaces.item_surface == s).astype(np.int32)
                for s in range(surfaces.num_surfaces)
            ]

    def _key(self, users, items) -> np.ndarray:
        return np.asarray(users, np.int64) * (self.num_items + 1) + np.asarray(items, np.int64)

    def position_of(self, users, items) -> np.ndarray:
        """Position of each (user, item) in the user's sequence, -1 where the user never had the item."""
        keys = self._key(users, items)
        idx = np.minimum(np.searchsorted(self._keys_sorted, keys), len(self._keys_sorted) - 1)
        return np.where(self._keys_sorted[idx] == keys, self._pos_sorted[idx], -1)

    def item_at(self, users, cuts) -> np.ndarray:
        return self.flat_items[self.offsets[users] + cuts]

    def surface_of(self, users, items) -> np.ndarray:
        if self.surfaces.kind == "next_item":
            return self.surfaces.item_surface[items]
        return self.surfaces.user_surface[users]

    # -- impressions ------------------------------------------------------------------------------------
    def train_impressions(self, seed: int, positions_per_user: int | None = None) -> dict[str, np.ndarray]:
        """Training impressions at cuts 1..train_len-1 (all of them, or ``positions_per_user`` drawn per user
        with replacement), a pure function of ``seed``."""
        rng = np.random.default_rng(seed)
        users = np.arange(len(self.lengths), dtype=np.int32)
        n = self.train_len
        if positions_per_user is None:
            keep = (self.flat_pos >= 1) & (self.flat_pos < n[self.flat_users])
            u, t = self.flat_users[keep], self.flat_pos[keep]
        else:
            check_positive("positions_per_user", positions_per_user)
            u = np.repeat(users[n >= 2], positions_per_user)
            t = 1 + (rng.random(len(u)) * (n[u] - 1)).astype(np.int64)
        items = self.item_at(u, t)
        if self.surfaces.kind == "rating":
            labels = self.flat_labels[self.offsets[u] + t]
            return self._impressions(u, t, items, labels, dedupe=True)
        pos = self._impressions(u, t, items, np.ones(len(u), np.float32), dedupe=False)
        neg = self._negatives(pos, self.num_negatives, rng)
        return self._dedupe(_concat([pos, neg]))

    def _negatives(self, pos: dict, k: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """k items of each positive's surface per positive, none the user ever had."""
        u, t, s = (np.repeat(pos[key], k) for key in ("user", "cut", "surface"))
        sizes = np.asarray([len(x) for x in self.surface_items])
        starts = np.concatenate([[0], np.cumsum(sizes)])
        flat = np.concatenate(self.surface_items)
        items = flat[starts[s] + (rng.random(len(s)) * sizes[s]).astype(np.int64)]
        ok = self.position_of(u, items) < 0
        out = self._impressions(u[ok], t[ok], items[ok], np.zeros(int(ok.sum()), np.float32), dedupe=False)
        out["row"] = np.repeat(pos["row"], k)[ok]
        return out

    def _impressions(self, users, cuts, items, labels, *, dedupe: bool, row=None) -> dict[str, np.ndarray]:
        out = {
            "user": np.asarray(users, np.int32),
            "cut": np.asarray(cuts, np.int32),
            "item": np.asarray(items, np.int32),
            "label": np.asarray(labels, np.float32),
            "surface": self.surface_of(users, items).astype(np.int32),
            "row": np.full(len(users), -1, np.int32) if row is None else np.asarray(row, np.int32),
            "ne": np.ones(len(users), bool),
        }
        return self._dedupe(out) if dedupe else out

    def _dedupe(self, imp: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _, first = np.unique(self._key(imp["user"], imp["item"]), return_index=True)
        first = np.sort(first)
        return {k: v[first] for k, v in imp.items()}

    def eval_impressions(self, split: str, seed: int = 0) -> dict[str, np.ndarray]:
        """Impressions of ``split`` ("valid" or "test"); ``row`` indexes ``eval_users``."""
        if split not in ("valid", "test"):
            raise ValueError(f"split: expected 'valid' or 'test', got {split!r}")
        users = self.eval_users
        cuts = self.lengths[users] - (2 if split == "valid" else 1)
        rows = np.arange(len(users), dtype=np.int32)
        targets = self.item_at(users, cuts)
        if self.surfaces.kind == "rating":
            labels = self.flat_labels[self.offsets[users] + cuts]
            return self._impressions(users, cuts, targets, labels, dedupe=False, row=rows)
        parts = []
        rng = np.random.default_rng([seed, split == "test"])
        tsurf = self.surfaces.item_surface[targets]
        for s, items_s in enumerate(self.surface_items):
            r = rows[tsurf == s]
            if not len(r):
                continue
            u, t = np.repeat(users[r], len(items_s)), np.repeat(cuts[r], len(items_s))
            it = np.tile(items_s, len(r))
            pos = self.position_of(u, it)
            keep = (pos < 0) | (pos >= t)  # history items are excluded from the ranking
            imp = self._impressions(
                u[keep],
                t[keep],
                it[keep],
                (it[keep] == targets[np.repeat(r, len(items_s))[keep]]),
                dedupe=False,
                row=np.repeat(r, len(items_s))[keep],
            )
            # NE set: the target and num_negatives random other candidates of its row (the training ratio)
            noise = rng.random(len(imp["row"])) + (imp["label"] > 0) * -2.0
            order = np.lexsort((noise, imp["row"]))
            rank = np.empty(len(order), np.int64)
            starts = np.searchsorted(imp["row"][order], imp["row"][order], side="left")
            rank[order] = np.arange(len(order)) - starts
            imp["ne"] = rank <= self.num_negatives
            parts.append(imp)
        out = _concat(parts)
        order = np.argsort(out["row"], kind="stable")  # row-major: the store reads a batch of rows in order
        return {k: v[order] for k, v in out.items()}

    # -- requests and features ----------------------------------------------------------------------------
    def history(self, users, cuts, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(R, L) left-padded s[:cut] (last ``length``, default max_len) and its mask."""
        length = self.max_len if length is None else length
        users, cuts = np.asarray(users, np.int64), np.asarray(cuts, np.int64)
        idx_RxL = cuts[:, None] - length + np.arange(length)[None, :]
        valid_RxL = idx_RxL >= 0
        flat = self.offsets[users][:, None] + np.maximum(idx_RxL, 0)
        return np.where(valid_RxL, self.flat_items[flat], 0).astype(np.int32), valid_RxL

    def requests(self, imp: dict[str, np.ndarray], num_candidates: int) -> dict[str, np.ndarray]:
        """Impressions grouped by (user, cut) into rows of at most ``num_candidates`` candidates:
        ``history``/``history_mask`` (R, L), ``candidates``/``candidate_mask``/``labels``/``index`` (R, C)
        (``index`` = impression row, -1 = padding), ``surface`` (R,) (the surface of its impressions)."""
        check_positive("num_candidates", num_candidates)
        E = len(imp["user"])
        group_key = np.asarray(imp["user"], np.int64) * (int(self.lengths.max()) + 1) + imp["cut"]
        order = np.argsort(group_key, kind="stable")
        gk = group_key[order]
        start = np.searchsorted(gk, gk, side="left")
        rank = np.arange(E) - start
        req_key = gk * (E // num_candidates + 1) + rank // num_candidates
        uniq, req_of = np.unique(req_key, return_inverse=True)
        R, C = len(uniq), num_candidates
        index = np.full((R, C), -1, np.int64)
        index[req_of, rank % C] = order
        first = index[:, 0]
        hist, hmask = self.history(imp["user"][first], imp["cut"][first])
        safe = np.maximum(index, 0)
        mask = index >= 0
        return {
            "history": hist,
            "history_mask": hmask,
            "candidates": np.where(mask, imp["item"][safe], 0).astype(np.int32),
            "candidate_mask": mask,
            "labels": np.where(mask, imp["label"][safe], 0.0).astype(np.float32),
            "surface": imp["surface"][first].astype(np.int32),
            "index": index.astype(np.int32),
        }
