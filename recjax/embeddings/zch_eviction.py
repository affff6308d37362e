"""MPZCH eviction and row reset: victim choice inside an ID's probe window(s), active TTL eviction, and the
reset of embedding rows and their optimizer state when a slot changes owner.

Policies (``EvictionPolicy.kind``):
- ``"none"``: a full window leaves the ID without a slot (fallback row or -1, counted).
- ``"ttl"``: only slots whose expiry step has passed may be taken (earliest expiry first); ``evict_expired``
  frees them all at once (active eviction). The TTL is global (``ttl``) or per feature (``feature_ttl``).
- ``"lru"``: the least recently seen slot of the window (smallest last-seen step).
- ``"lfu"``: the least frequently seen slot of the window (smallest count since insertion; ties: LRU).
Slots touched by the current batch are never victims, so nothing used in this step is overwritten. With
two-choice probing an ID may live in either of its two windows, so its victim is the policy's best slot of the
union of both (a new ID taking it stays findable: lookups scan both windows).

Letters: N IDs, S managed slots, K windows per ID, L slots per window.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

INT_MAX = np.iinfo(np.int32).max
KINDS = ("none", "ttl", "lru", "lfu")


@dataclasses.dataclass(frozen=True)
class EvictionPolicy:
    kind: str = "none"
    ttl: int = 0  # steps an ID stays after its last access (ttl policy, and active eviction when > 0)
    feature_ttl: tuple[tuple[str, int], ...] = ()  # per-feature TTL overriding ``ttl``

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"EvictionPolicy.kind: expected one of {KINDS}, got {self.kind!r}")
        if self.ttl < 0 or any(t < 0 for _, t in self.feature_ttl):
            raise ValueError(f"EvictionPolicy.ttl: expected >= 0, got {self.ttl} / {self.feature_ttl}")
        if self.kind == "ttl" and self.ttl <= 0 and not self.feature_ttl:
            raise ValueError("EvictionPolicy: kind 'ttl' needs ttl > 0 or feature_ttl")

    def ttl_for(self, feature: str) -> int:
        return dict(self.feature_ttl).get(feature, self.ttl)


def choose_victims(
    policy: EvictionPolicy,
    meta: dict,
    base_N,
    start_N,
    want_N,
    touched_S,
    step,
    *,
    bucket_size: int,
    max_probe: int,
    window_len: int | None = None,
):
    """Per lane wanting a slot: the policy's victim slot in its window(s), -1 if none is eligible.

    ``start_N``: the linear window's start offset (N,) (window of ``max_probe`` slots), or the windows' starts
    (N, K) with ``window_len`` slots each (``recjax.ops.zch.probe_windows``); offsets are inside the bucket
    that begins at slot ``base_N``."""
    if policy.kind == "none":
        return jnp.full(base_N.shape, -1, jnp.int32)
    big = jnp.full(base_N.shape, INT_MAX, jnp.int32)
    starts_NxK = start_N[:, None] if start_N.ndim == 1 else start_N
    length = max_probe if start_N.ndim == 1 else window_len
    if length is None:
        raise ValueError("choose_victims: window_len is needed with (N, K) window starts")
    starts_KxN = starts_NxK.T

    def body(p, carry):
        best, k1, k2 = carry
        s = base_N + (starts_KxN[p // length] + p % length) % bucket_size
        ok = want_N & ~touched_S[s] & (meta["last_seen"][s] >= 0)
        if policy.kind == "ttl":
            ok &= meta["expiry"][s] <= step
            a, b = meta["expiry"][s], meta["last_seen"][s]
        elif policy.kind == "lru":
            a, b = meta["last_seen"][s], jnp.zeros_like(s)
        else:
            a, b = meta["count"][s], meta["last_seen"][s]
        better = ok & ((a < k1) | ((a == k1) & (b < k2)))
        return jnp.where(better, s, best), jnp.where(better, a, k1), jnp.where(better, b, k2)

    n_probe = starts_KxN.shape[0] * length
    best, _, _ = jax.lax.fori_loop(0, n_probe, body, (jnp.full(base_N.shape, -1, jnp.int32), big, big))
    return best


def resolve_conflicts(victim_N):
    """Several lanes (distinct IDs) may pick one victim: the lowest lane wins, the others get -1."""
    n = victim_N.shape[0]
    key = jnp.where(victim_N >= 0, victim_N, INT_MAX)
    key_s, lane_s = jax.lax.sort((key, jnp.arange(n, dtype=jnp.int32)), num_keys=2)
    head = (key_s != INT_MAX) & jnp.concatenate([jnp.ones((1,), bool), key_s[1:] != key_s[:-1]])
    win = jnp.zeros((n,), bool).at[lane_s].set(head)
    return jnp.where(win, victim_N, -1)


def expired_mask(meta: dict, step) -> jax.Array:
    """Live slots whose expiry step has passed (expiry INT_MAX = never)."""
    return (meta["last_seen"] >= 0) & (meta["expiry"] <= step)


def reset_rows(
    params_table, opt_state: Any, mask_R, init_fn: Callable, key, *, table_name: str | None = None
):
    """Rows where ``mask_R`` get ``init_fn(key, (R, D), dtype)`` (a fresh init) and every optimizer-state leaf
    shaped like the table (e.g. Adam mu and nu; under the key ``table_name`` when given) gets those rows
    zeroed. Jit-friendly; returns (params_table, opt_state)."""
    fresh = init_fn(key, params_table.shape, params_table.dtype)
    params_table = jnp.where(mask_R[:, None], fresh, params_table)

    def zero(path, leaf):
        if not hasattr(leaf, "shape") or leaf.shape != params_table.shape:
            return leaf
        if table_name is not None and not any(getattr(k, "key", None) == table_name for k in path):
            return leaf
        return jnp.where(mask_R[:, None], jnp.zeros_like(leaf), leaf)

    return params_table, jax.tree_util.tree_map_with_path(zero, opt_state)
