"""MFLI rebalancing (arXiv 2602.16124): clusters of one facet from its code keys, split above an upper size
bound, merged below a lower one, and the balance statistics. Host numpy, index build time; the index that
uses it is ``recjax.retrieval.mfli_index`` (whose docstring states the method).

Letters: N items, S members of one cluster, C clusters, D dim, P (code key, cluster) pairs.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RebalanceConfig:
    upper_bound: int | None = None  # max items per cluster after splits; None = no split
    lower_bound: int = 0  # min items per cluster after merges; 0 = no merge
    kmeans_iterations: int = 10
    seed: int = 0

    def __post_init__(self):
        if self.upper_bound is not None and self.upper_bound < 1:
            raise ValueError(f"upper_bound: expected >= 1 or None, got {self.upper_bound}")
        if self.lower_bound < 0:
            raise ValueError(f"lower_bound: expected >= 0, got {self.lower_bound}")
        if self.upper_bound is not None and self.lower_bound > self.upper_bound:
            raise ValueError(
                f"lower_bound: expected <= upper_bound={self.upper_bound}, got {self.lower_bound}"
            )
        if self.kmeans_iterations < 1:
            raise ValueError(f"kmeans_iterations: expected >= 1, got {self.kmeans_iterations}")


@dataclass(frozen=True)
class BalanceStats:
    num_clusters: int
    min_size: int
    max_size: int
    mean_size: float
    max_over_mean: float
    gini: float


def balance_stats(sizes) -> BalanceStats:
    """Stats of the non-empty cluster sizes. Gini = sum_i (2i - n - 1) s_(i) / (n sum s), i = 1..n sorted."""
    s = np.sort(np.asarray(sizes, np.float64)[np.asarray(sizes) > 0])
    if not len(s):
        return BalanceStats(0, 0, 0, 0.0, 0.0, 0.0)
    n, mean = len(s), float(s.mean())
    gini = float(np.sum((2 * np.arange(1, n + 1) - n - 1) * s) / (n * s.sum()))
    return BalanceStats(n, int(s[0]), int(s[-1]), mean, float(s[-1] / mean), gini)


def _kmeans(x_SxD: np.ndarray, parts: int, iterations: int, rng: np.random.Generator) -> np.ndarray:
    """Labels of k-means++ seeding + Lloyd (L2). Host numpy: each split has its own size, jit would
    recompile per cluster."""
    s = x_SxD.shape[0]
    cents = [x_SxD[rng.integers(s)]]
    dist = np.sum((x_SxD - cents[0]) ** 2, axis=1)
    for _ in range(1, parts):
        p = dist / dist.sum() if dist.sum() > 0 else None
        cents.append(x_SxD[rng.choice(s, p=p)])
        dist = np.minimum(dist, np.sum((x_SxD - cents[-1]) ** 2, axis=1))
    c = np.stack(cents)
    sq = np.sum(x_SxD * x_SxD, axis=1, keepdims=True)
    for _ in range(iterations):
        labels = np.argmin(sq - 2 * x_SxD @ c.T + np.sum(c * c, axis=1), axis=1)
        for j in range(parts):
            members = labels == j
            if members.any():
                c[j] = x_SxD[members].mean(axis=0)
    return np.argmin(sq - 2 * x_SxD @ c.T + np.sum(c * c, axis=1), axis=1)


def _split(x_SxD: np.ndarray, upper: int, iterations: int, rng) -> list[np.ndarray]:
    """Member positions of parts of size <= upper."""
    s = x_SxD.shape[0]
    if s <= upper:
        return [np.arange(s)]
    parts = -(-s // upper)
    r = x_SxD - x_SxD.mean(axis=0)
    labels = _kmeans(r, parts, iterations, rng)
    groups = [np.flatnonzero(labels == j) for j in range(parts)]
    groups = [g for g in groups if len(g)]
    if len(groups) == 1:  # degenerate (identical residuals): equal chunks along the first PC
        direction = np.linalg.svd(r, full_matrices=False)[2][0] if np.abs(r).sum() else np.zeros(r.shape[1])
        order = np.argsort(r @ direction, kind="stable")
        return list(np.array_split(order, parts))
    out = []
    for g in groups:
        out += [g[sub] for sub in _split(x_SxD[g], upper, iterations, rng)]
    return out


def _merge(sizes, centroids_CxD, lower: int, upper: int | None) -> np.ndarray:
    """Final cluster of each cluster after merging small ones (an identity map where nothing merges)."""
    c = len(sizes)
    sizes = np.asarray(sizes, np.int64).copy()
    cents = centroids_CxD.astype(np.float64).copy()
    parent = np.arange(c)
    alive = sizes > 0
    heap = [(int(sizes[i]), i) for i in range(c) if 0 < sizes[i] < lower]
    heapq.heapify(heap)
    while heap:
        s, i = heapq.heappop(heap)
        if not alive[i] or sizes[i] != s or s >= lower:
            continue  # stale entry
        ok = alive.copy()
        ok[i] = False
        if upper is not None:
            ok &= sizes + s <= upper
        if not ok.any():
            continue  # no admissible target: stays small
        dist = np.where(ok, np.sum((cents - cents[i]) ** 2, axis=1), np.inf)
        t = int(np.argmin(dist))
        cents[t] = (cents[t] * sizes[t] + cents[i] * s) / (sizes[t] + s)
        sizes[t] += s
        sizes[i], alive[i], parent[i] = 0, False, t
        if sizes[t] < lower:
            heapq.heappush(heap, (int(sizes[t]), t))
    for i in range(c):  # resolve chains (a target merged later)
        root = i
        while parent[root] != root:
            root = parent[root]
        parent[i] = root
    return parent


def _segment_mean(x_NxD, seg_N, num):
    """Mean row per segment (zeros for empty ones); sorted reduceat, np.add.at is ~50x slower at 1M rows."""
    counts = np.bincount(seg_N, minlength=num)
    order = np.argsort(seg_N, kind="stable")
    starts = np.cumsum(counts) - counts
    sums = np.zeros((num, x_NxD.shape[1]), np.float64)
    full = counts > 0
    sums[full] = np.add.reduceat(x_NxD[order].astype(np.float64), starts[full], axis=0)
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)


def cluster_facet(emb_NxD, keys_N, config: RebalanceConfig, rng: np.random.Generator):
    """One facet: clusters from the code keys, split and merged by ``config`` -> (cluster_N int32,
    centroids_CxD, pair_key_P int64, pair_cluster_P int32, stats before, stats after); the (key, cluster)
    pairs are sorted by key."""
    uniq, cluster = np.unique(keys_N, return_inverse=True)
    cluster = cluster.astype(np.int64)
    before = balance_stats(np.bincount(cluster))
    key_of = list(uniq)
    if config.upper_bound is not None:
        counts = np.bincount(cluster, minlength=len(uniq))
        order = np.argsort(cluster, kind="stable")
        starts = np.cumsum(counts) - counts
        for c in np.flatnonzero(counts > config.upper_bound):
            members = order[starts[c] : starts[c] + counts[c]]
            parts = _split(emb_NxD[members], config.upper_bound, config.kmeans_iterations, rng)
            for part in parts[1:]:  # the first part keeps id c
                cluster[members[part]] = len(key_of)
                key_of.append(uniq[c])
    key_of = np.asarray(key_of, np.int64)
    num = len(key_of)
    final = np.arange(num)
    if config.lower_bound > 0:
        cents = _segment_mean(emb_NxD, cluster, num)
        final = _merge(np.bincount(cluster, minlength=num), cents, config.lower_bound, config.upper_bound)
    used, renumber = np.unique(final, return_inverse=True)  # compact ids in order of first cluster id
    cluster_N = renumber[cluster].astype(np.int32)
    pairs = np.unique(np.stack([key_of, renumber]), axis=1)
    centroids = _segment_mean(emb_NxD, cluster_N, len(used))
    after = balance_stats(np.bincount(cluster_N))
    return cluster_N, centroids, pairs[0].astype(np.int64), pairs[1].astype(np.int32), before, after
