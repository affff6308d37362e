"""An embedded synthetic sequential dataset: no files, deterministic given the seed, generated in seconds.

Letters: U = users, N = items, D = latent dimension, G = genres.

Model (each user consumes each item at most once, like MovieLens ratings):
- G genre centres on the unit sphere; item i has a genre g_i and a unit factor v_i near its centre;
  a user has a home genre and a unit factor u near that centre.
- Popularity: Zipf, log p_i = -zipf_exponent * log(rank_i) over a random ranking of the items.
- Sequential drift: a recent-taste vector r starts at u and after each item moves toward it,
  r <- recency * r + (1 - recency) * v_item. The user state is h = normalize(user_weight * u +
  (1 - user_weight) * r), so the next item depends on the last few items (a sequential model can exploit it,
  a static one cannot).
- Choice: item ~ softmax(h . v / temperature + log p) over the items not consumed yet (Gumbel-max, all users
  at once per step).
- Side features: item ``genre`` (1 + g_i) and ``popularity_bucket`` (1 + popularity decile, 1 = most
  popular); user ``segment`` (1 + home genre) and ``activity_bucket`` (1 + quartile of sequence length).
  All (rows, 1) int32, 0 = padding. Ratings in 1..5 from the static affinity u . v plus noise, and
  increasing timestamps, for multi-task / value-model experiments.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from recjax.data.types import SequenceDataset
from recjax.validation import check_positive


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    num_users: int = 2000
    num_items: int = 1000
    min_len: int = 20
    max_len: int = 100
    num_genres: int = 10
    dim: int = 16
    zipf_exponent: float = 1.0
    temperature: float = 0.2
    user_weight: float = 0.3  # weight of the static user factor in the state (the rest is recent taste)
    recency: float = 0.5  # decay of the recent-taste vector per consumed item (smaller = shorter memory)
    item_spread: float = 0.6  # item scatter around the genre centre
    user_spread: float = 0.6

    def validate(self) -> None:
        for name in ("num_users", "num_items", "min_len", "num_genres", "dim", "temperature"):
            check_positive(name, getattr(self, name))
        if not self.min_len <= self.max_len <= self.num_items:
            raise ValueError(
                f"min_len/max_len: expected min_len <= max_len <= num_items ({self.num_items}), "
                f"got {self.min_len}, {self.max_len}"
            )
        for name in ("user_weight", "recency"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: expected a value in [0, 1], got {getattr(self, name)}")
        check_positive("zipf_exponent", self.zipf_exponent, allow_zero=True)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def make_synthetic(seed: int = 0, **overrides) -> SequenceDataset:
    """Generate the dataset; keyword overrides are ``SyntheticConfig`` fields (e.g. num_users=500).

    The defaults (2000 users, 1000 items, lengths 20..100, ~120k interactions) are sized so a small SASRec
    trains on CPU in about a minute.
    """
    unknown = set(overrides) - {f.name for f in dataclasses.fields(SyntheticConfig)}
    if unknown:
        raise TypeError(f"make_synthetic: unknown arguments {sorted(unknown)}")
    cfg = SyntheticConfig(**overrides)
    cfg.validate()
    rng = np.random.default_rng(seed)
    U, N, G, D = cfg.num_users, cfg.num_items, cfg.num_genres, cfg.dim

    centres_GxD = _unit(rng.standard_normal((G, D)))
    genre_N = rng.integers(G, size=N)
    items_NxD = _unit(centres_GxD[genre_N] + cfg.item_spread * rng.standard_normal((N, D)) / np.sqrt(D))
    items_NxD = items_NxD.astype(np.float32)
    rank_N = rng.permutation(N) + 1
    log_pop_N = (-cfg.zipf_exponent * np.log(rank_N)).astype(np.float32)
    home_U = rng.integers(G, size=U)
    users_UxD = _unit(centres_GxD[home_U] + cfg.user_spread * rng.standard_normal((U, D)) / np.sqrt(D))
    users_UxD = users_UxD.astype(np.float32)
    lengths_U = rng.integers(cfg.min_len, cfg.max_len + 1, size=U)

    recent_UxD = users_UxD.copy()
    consumed_UxN = np.zeros((U, N), bool)
    seq_UxT = np.zeros((U, cfg.max_len), np.int32)
    for t in range(cfg.max_len):
        active = np.flatnonzero(lengths_U > t)  # users still consuming (lengths are per user)
        state = _unit(cfg.user_weight * users_UxD[active] + (1 - cfg.user_weight) * recent_UxD[active])
        logits = state @ items_NxD.T / np.float32(cfg.temperature) + log_pop_N
        logits[consumed_UxN[active]] = -np.inf
        u01 = rng.random((len(active), N), dtype=np.float32)
        gumbel = -np.log(-np.log(np.clip(u01, 1e-12, 1 - 1e-7)))
        choice = np.argmax(logits + gumbel, axis=1)
        seq_UxT[active, t] = choice + 1
        consumed_UxN[active, choice] = True
        recent_UxD[active] = cfg.recency * recent_UxD[active] + (1 - cfg.recency) * items_NxD[choice]

    sequences = tuple(seq_UxT[u, : lengths_U[u]].copy() for u in range(U))
    affinity = [users_UxD[u] @ items_NxD[s - 1].T for u, s in enumerate(sequences)]
    noise = rng.standard_normal(int(lengths_U.sum())).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths_U)])
    ratings = tuple(
        np.clip(np.round(3.0 + 2.5 * a + 0.7 * noise[offsets[u] : offsets[u + 1]]), 1, 5).astype(np.float32)
        for u, a in enumerate(affinity)
    )
    gaps = rng.exponential(3600.0, size=int(lengths_U.sum())).astype(np.int64) + 1
    start_U = 946_684_800 + rng.integers(0, 86400 * 365, size=U)  # 2000-01-01 + up to a year
    timestamps = tuple(start_U[u] + np.cumsum(gaps[offsets[u] : offsets[u + 1]]) for u in range(U))

    pop_decile_N = (rank_N - 1) * 10 // N  # rank 1 = most popular -> bucket 1
    activity_U = np.searchsorted(np.quantile(lengths_U, [0.25, 0.5, 0.75]), lengths_U, side="right")
    pad = np.zeros((1, 1), np.int32)
    return SequenceDataset(
        name=f"synthetic-u{U}-i{N}-s{seed}",
        sequences=sequences,
        num_items=N,
        item_features={
            "genre": np.concatenate([pad, 1 + genre_N[:, None]]).astype(np.int32),
            "popularity_bucket": np.concatenate([pad, 1 + pop_decile_N[:, None]]).astype(np.int32),
        },
        user_features={
            "segment": (1 + home_U[:, None]).astype(np.int32),
            "activity_bucket": (1 + activity_U[:, None]).astype(np.int32),
        },
        timestamps=timestamps,
        ratings=ratings,
    )
