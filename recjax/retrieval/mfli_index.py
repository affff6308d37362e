"""MFLI index (arXiv 2602.16124): item -> cluster table, cluster -> items CSR, split/merge rebalancing
(``recjax.retrieval.mfli_rebalance``), full and delta snapshots. Host-side numpy at build time;
``serving_arrays`` hands the jnp arrays to ``recjax.retrieval.mfli_serving``.

Letters: N items, A added items, F facets, L code levels, M codes per level, D dim, C clusters (per facet,
padded to the largest facet), R row capacity, V external id capacity, S members of one cluster.

Clusters. In facet f an item's code is the tuple of its first ``levels`` level codes (``codes_NxFxL`` from
the residual quantizer), flattened to one int64 key sum_l c_l M^(levels-1-l). The occupied keys become the
initial clusters (the codebook product M^L is never materialised). Rebalancing then changes clusters, so
each facet keeps an explicit cluster table: cluster ids are 0..C_f-1, renumbered per snapshot, and a
(key, cluster) pair table records which clusters each key's items ended up in (a split key maps to its
parts, a merged key to its target). Centroid of a cluster = mean of its members' embeddings (for an
unsplit code cluster this is the code's reconstruction plus the mean residual). The cluster geometry
(centroids, splits, merges, delta assignment) uses each facet's view of the items, ``facet_emb_NxFxD``
(what the quantizer quantized in that facet, e.g. its facet projection of the embedding; default the
embedding itself in every facet); reranking always uses ``emb_NxD``.
- Split (``upper_bound``): a cluster of S > upper items is split by k-means (k-means++ seeding, Lloyd,
  numpy, seeded) on its members' residuals (embedding minus the cluster mean; all members share the code
  reconstruction, so this is k-means on the quantization residuals up to a shift) into ceil(S / upper)
  parts; parts still above the bound are split again; a degenerate k-means (all members equal) falls back
  to equal chunks along the residuals' first principal direction, so every part ends <= upper.
- Merge (``lower_bound``): clusters with fewer than ``lower`` items are merged, smallest first, into the
  nearest other cluster by centroid (L2) among those that stay <= upper after the merge; the target's
  centroid becomes the weighted mean. A small cluster with no admissible target stays (reported in stats).
- Balance stats (``BalanceStats``) before and after, per facet: clusters, min/max/mean size, max/mean, Gini.

CSR per facet: ``items_FxR`` holds item rows sorted by cluster, then by row, -1 past the last item;
cluster c of facet f is ``items_FxR[f, offsets_FxC[f, c] : offsets_FxC[f, c] + counts_FxC[f, c]]``.

Snapshots. ``build_snapshot`` = a full snapshot (clusters from codes, rebalance, CSR). ``add_items`` = a
delta snapshot: new items take free rows (external id -> row in ``row_of_id_V``), are assigned per facet to
an existing cluster (never re-clustering others): with ``codes_AxFxL`` (e.g. the quantizer's
``assign_codes``) to the nearest-centroid cluster among those their code key maps to, else (or for a key no
cluster holds) to the nearest centroid overall; then they are inserted at the end of their clusters' CSR
ranges (O(N + A) copy, no sort). Centroids stay those of the full snapshot until the next one. Row and
cluster capacities are fixed per full snapshot, so the serving arrays keep their shapes across deltas
(one compilation). Like ``fresh_index``, ids are external in [0, V) and a new item is retrievable as soon
as ``add_items`` returns; unlike it, new items join the clusters (no separate fresh table to search).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np

from recjax import validation
from recjax.retrieval.mfli_rebalance import BalanceStats, RebalanceConfig, cluster_facet


@dataclass(frozen=True)
class FacetTable:
    """One facet's cluster table (host). ``pair_key_P`` / ``pair_cluster_P``: code key -> cluster pairs."""

    centroids_CxD: np.ndarray
    pair_key_P: np.ndarray  # int64
    pair_cluster_P: np.ndarray  # int32

    @property
    def num_clusters(self) -> int:
        return self.centroids_CxD.shape[0]


@dataclass(frozen=True)
class MFLIIndex:
    """A snapshot (immutable; ``add_items`` returns a new one). Rows >= ``num_rows`` are free."""

    emb_RxD: np.ndarray  # float32, zeros in free rows
    ids_R: np.ndarray  # int32 external id per row, -1 = free
    row_of_id_V: np.ndarray  # int32 row per external id, -1 = absent
    cluster_RxF: np.ndarray  # int32, -1 in free rows
    counts_FxC: np.ndarray  # int32, 0 for padding clusters
    offsets_FxC: np.ndarray  # int32 CSR start per cluster
    items_FxR: np.ndarray  # int32 rows sorted by (cluster, row), -1 past the end
    facets: tuple[FacetTable, ...]
    num_rows: int
    num_codes: int  # M
    levels: int
    facet_space: bool = False  # clusters live in per-facet embeddings (facet_emb_*), not emb_RxD
    stats_before: tuple[BalanceStats, ...] = ()
    stats_after: tuple[BalanceStats, ...] = ()
    version: int = 0  # full snapshot number (set by the caller)
    delta: int = 0  # deltas applied since the full snapshot

    @property
    def num_facets(self) -> int:
        return self.cluster_RxF.shape[1]

    @property
    def row_capacity(self) -> int:
        return self.emb_RxD.shape[0]

    @property
    def cluster_capacity(self) -> int:
        return self.counts_FxC.shape[1]

    @property
    def dim(self) -> int:
        return self.emb_RxD.shape[1]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ServingArrays:
    """The jnp arrays serving reads (a pytree; shapes fixed per full snapshot)."""

    emb_RxD: jax.Array
    ids_R: jax.Array
    row_of_id_V: jax.Array
    cluster_RxF: jax.Array
    centroids_FxCxD: jax.Array
    valid_FxC: jax.Array  # bool: a real cluster (padding clusters never selected)
    counts_FxC: jax.Array
    offsets_FxC: jax.Array
    items_FxR: jax.Array


# --------------------------------------------------------------------------------------- validation


def _check_float(name: str, x, shape) -> np.ndarray:
    validation.check_float_values(name, x, shape)
    return np.asarray(x, np.float32)


def _check_codes(name: str, codes, n: int | None, num_codes: int | None, levels: int | None):
    validation.check_shape(name, codes, (n, None, None))
    validation.check_dtype(name, codes, "iu")
    c = np.asarray(codes, np.int64)
    if c.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one facet (F >= 1), got shape {c.shape}")
    if c.shape[2] == 0:
        raise ValueError(f"{name}: expected at least one code level (L >= 1), got shape {c.shape}")
    m = int(c.max()) + 1 if num_codes is None else int(num_codes)
    validation.check_range(name, c, 0, m)
    lv = c.shape[2] if levels is None else levels
    if not 1 <= lv <= c.shape[2]:
        raise ValueError(f"levels: expected 1 <= levels <= L={c.shape[2]}, got {lv}")
    if lv * np.log2(max(m, 2)) >= 62:
        raise ValueError(f"levels: M^levels = {m}^{lv} does not fit a 62-bit cluster key")
    return c, m, lv


def _check_ids(name: str, ids, a: int, id_capacity: int) -> np.ndarray:
    validation.check_shape(name, ids, (a,))
    validation.check_dtype(name, ids, "iu")
    out = np.asarray(ids, np.int64)
    validation.check_ids(name, out, id_capacity)
    uniq, counts = np.unique(out, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{name}: expected unique ids, id {uniq[counts > 1][0]} is repeated")
    return out.astype(np.int32)


def code_keys(codes_NxL: np.ndarray, num_codes: int) -> np.ndarray:
    """Mixed-radix key of each code tuple, int64."""
    key = np.zeros(codes_NxL.shape[0], np.int64)
    for level in range(codes_NxL.shape[1]):
        key = key * num_codes + codes_NxL[:, level]
    return key


def _csr(cluster_N: np.ndarray, num_clusters: int, capacity: int, rows_total: int):
    counts = np.bincount(cluster_N, minlength=num_clusters)
    items = np.full(rows_total, -1, np.int32)
    items[: len(cluster_N)] = np.argsort(cluster_N, kind="stable")
    counts = np.pad(counts, (0, capacity - num_clusters))
    return counts.astype(np.int32), (np.cumsum(counts) - counts).astype(np.int32), items


# -------------------------------------------------------------------------------------- snapshots


def build_snapshot(
    emb_NxD,
    codes_NxFxL,
    *,
    facet_emb_NxFxD=None,
    ids_N=None,
    config: RebalanceConfig | None = None,
    num_codes: int | None = None,
    levels: int | None = None,
    row_capacity: int | None = None,
    id_capacity: int | None = None,
    cluster_capacity: int | None = None,
    version: int = 0,
) -> MFLIIndex:
    """Full snapshot: clusters from the codes (first ``levels`` levels; default all), split/merge by
    ``config``, CSR. ``ids_N``: external ids (default row r -> id r), unique in [0, V). ``row_capacity``
    (default N) bounds rows for later deltas, ``id_capacity`` (default row_capacity) the external ids,
    ``cluster_capacity`` (default the largest facet's count) pads the cluster axis so shapes can stay fixed
    across full snapshots too. ``facet_emb_NxFxD``: each facet's view of the items (the quantizer's facet
    inputs, e.g. its facet projections) for centroids, splits, merges and delta assignment; default
    ``emb_NxD`` in every facet. Reranking always uses ``emb_NxD``."""
    emb = _check_float("emb_NxD", emb_NxD, (None, None))
    n, d = emb.shape
    if n == 0:
        raise ValueError("emb_NxD: expected at least one item, got 0 rows")
    codes, m, lv = _check_codes("codes_NxFxL", codes_NxFxL, n, num_codes, levels)
    f_num = codes.shape[1]
    facet_x = None
    if facet_emb_NxFxD is not None:
        facet_x = _check_float("facet_emb_NxFxD", facet_emb_NxFxD, (n, f_num, d))
    r = n if row_capacity is None else int(row_capacity)
    if r < n:
        raise ValueError(f"row_capacity: expected >= N={n}, got {r}")
    v = r if id_capacity is None else int(id_capacity)
    if ids_N is None and v < n:
        raise ValueError(f"id_capacity: expected >= N={n} (default ids 0..N-1), got {v}")
    ids = np.arange(n, dtype=np.int32) if ids_N is None else _check_ids("ids_N", ids_N, n, v)
    config = RebalanceConfig() if config is None else config
    rng = np.random.default_rng(config.seed)
    results = []
    for f in range(f_num):
        x = emb if facet_x is None else facet_x[:, f]
        cl, cents, pkey, pcl, before, after = cluster_facet(x, code_keys(codes[:, f, :lv], m), config, rng)
        results.append((cl, FacetTable(cents, pkey, pcl), before, after))
    cmax = max(t.num_clusters for _, t, _, _ in results)
    cap = cmax if cluster_capacity is None else int(cluster_capacity)
    if cap < cmax:
        raise ValueError(f"cluster_capacity: expected >= {cmax} (clusters of the largest facet), got {cap}")
    csr = [_csr(c, t.num_clusters, cap, r) for c, t, _, _ in results]
    cluster = np.full((r, len(results)), -1, np.int32)
    cluster[:n] = np.stack([c for c, _, _, _ in results], axis=1)
    row_of_id = np.full(v, -1, np.int32)
    row_of_id[ids] = np.arange(n, dtype=np.int32)
    return MFLIIndex(
        emb_RxD=np.concatenate([emb, np.zeros((r - n, d), np.float32)]),
        ids_R=np.concatenate([ids, np.full(r - n, -1, np.int32)]),
        row_of_id_V=row_of_id,
        cluster_RxF=cluster,
        counts_FxC=np.stack([x[0] for x in csr]),
        offsets_FxC=np.stack([x[1] for x in csr]),
        items_FxR=np.stack([x[2] for x in csr]),
        facets=tuple(t for _, t, _, _ in results),
        num_rows=n,
        num_codes=m,
        levels=lv,
        facet_space=facet_x is not None,
        stats_before=tuple(b for _, _, b, _ in results),
        stats_after=tuple(a for _, _, _, a in results),
        version=version,
    )


def _nearest(x_AxD, centroids_CxD, allowed_AxC=None) -> np.ndarray:
    dist = np.sum(centroids_CxD**2, axis=1)[None, :] - 2 * x_AxD @ centroids_CxD.T
    if allowed_AxC is not None:
        dist = np.where(allowed_AxC, dist, np.inf)
    return np.argmin(dist, axis=1).astype(np.int32)


def _allowed_by_code(key_A, table: FacetTable) -> np.ndarray:
    """(A, C) bool: clusters holding each key's items; all clusters for a key none holds."""
    lo = np.searchsorted(table.pair_key_P, key_A, side="left")  # pairs are sorted by key
    num = np.searchsorted(table.pair_key_P, key_A, side="right") - lo
    allowed = np.zeros((len(key_A), table.num_clusters), bool)
    rows = np.repeat(np.arange(len(key_A)), num)
    pos = np.repeat(lo - (np.cumsum(num) - num), num) + np.arange(num.sum())
    allowed[rows, table.pair_cluster_P[pos]] = True
    allowed[num == 0] = True
    return allowed


def assign_to_clusters(index: MFLIIndex, x_AxFxD: np.ndarray, codes_AxFxL=None, chunk: int = 4096):
    """(A, F) cluster of each new item per facet from its facet embeddings (see the module docstring).
    Inputs validated by the caller."""
    a = x_AxFxD.shape[0]
    out = np.empty((a, index.num_facets), np.int32)
    for f, table in enumerate(index.facets):
        for s in range(0, a, chunk):
            x = x_AxFxD[s : s + chunk, f]
            allowed = None
            if codes_AxFxL is not None:
                key = code_keys(codes_AxFxL[s : s + chunk, f, : index.levels], index.num_codes)
                allowed = _allowed_by_code(key, table)
            out[s : s + chunk, f] = _nearest(x, table.centroids_CxD, allowed)
    return out


def add_items(index: MFLIIndex, ids_A, emb_AxD, *, codes_AxFxL=None, facet_emb_AxFxD=None) -> MFLIIndex:
    """Delta snapshot: A new items (external ids new and unique, in [0, V)) join existing clusters.
    ``facet_emb_AxFxD`` is required when the snapshot was built with facet embeddings (and refused when not).
    Cost: the snapshot's host arrays are copied (O(R (D + F)); snapshots are immutable)."""
    emb = _check_float("emb_AxD", emb_AxD, (None, index.dim))
    a = emb.shape[0]
    if index.facet_space != (facet_emb_AxFxD is not None):
        want = "facet embeddings" if index.facet_space else "None (the snapshot has no facet embeddings)"
        raise ValueError(f"facet_emb_AxFxD: expected {want}, got {type(facet_emb_AxFxD).__name__}")
    if facet_emb_AxFxD is None:
        facet_x = np.broadcast_to(emb[:, None, :], (a, index.num_facets, index.dim))
    else:
        facet_x = _check_float("facet_emb_AxFxD", facet_emb_AxFxD, (a, index.num_facets, index.dim))
    ids = _check_ids("ids_A", ids_A, a, len(index.row_of_id_V))
    present = ids[index.row_of_id_V[ids] >= 0]
    if len(present):
        raise ValueError(f"ids_A: expected new ids, id {present[0]} is already indexed")
    if index.num_rows + a > index.row_capacity:
        raise ValueError(
            f"ids_A: row capacity {index.row_capacity} exceeded ({index.num_rows} used, {a} added); "
            "build a full snapshot with a larger row_capacity"
        )
    codes = None
    if codes_AxFxL is not None:
        codes = _check_codes("codes_AxFxL", codes_AxFxL, a, index.num_codes, index.levels)[0]
        if codes.shape[1] != index.num_facets or codes.shape[2] < index.levels:
            raise ValueError(
                f"codes_AxFxL: expected shape ({a}, {index.num_facets}, >= {index.levels}), got {codes.shape}"
            )
    new_cluster = assign_to_clusters(index, facet_x, codes)
    rows = np.arange(index.num_rows, index.num_rows + a, dtype=np.int32)
    counts, offsets, items = index.counts_FxC.copy(), index.offsets_FxC.copy(), index.items_FxR.copy()
    for f in range(index.num_facets):
        c = new_cluster[:, f]
        order = np.argsort(c, kind="stable")  # new rows by cluster, then row
        ends = index.offsets_FxC[f] + index.counts_FxC[f]
        merged = np.insert(index.items_FxR[f, : index.num_rows], ends[c[order]], rows[order])
        items[f, : len(merged)] = merged
        counts[f] += np.bincount(c, minlength=index.cluster_capacity).astype(np.int32)
        offsets[f] = np.cumsum(counts[f]) - counts[f]
    emb_all, ids_all, cluster = index.emb_RxD.copy(), index.ids_R.copy(), index.cluster_RxF.copy()
    emb_all[rows], ids_all[rows], cluster[rows] = emb, ids, new_cluster
    row_of_id = index.row_of_id_V.copy()
    row_of_id[ids] = rows
    return replace(
        index,
        emb_RxD=emb_all,
        ids_R=ids_all,
        row_of_id_V=row_of_id,
        cluster_RxF=cluster,
        counts_FxC=counts,
        offsets_FxC=offsets,
        items_FxR=items,
        num_rows=index.num_rows + a,
        delta=index.delta + 1,
    )


def check_consistent(index: MFLIIndex) -> None:
    """Raises AssertionError unless the CSR equals the item -> cluster table (every used row exactly once
    per facet, in its cluster's range, rows ascending inside a cluster, counts and offsets matching)."""
    n = index.num_rows
    for f in range(index.num_facets):
        c = index.cluster_RxF[:n, f]
        num = index.facets[f].num_clusters
        assert (c >= 0).all() and (c < num).all(), f"facet {f}: cluster ids outside [0, {num})"
        assert (index.cluster_RxF[n:, f] == -1).all(), f"facet {f}: free rows hold clusters"
        counts = np.bincount(c, minlength=index.cluster_capacity)
        assert np.array_equal(counts, index.counts_FxC[f]), f"facet {f}: counts differ from the table"
        assert np.array_equal(index.offsets_FxC[f], np.cumsum(counts) - counts), f"facet {f}: offsets"
        items = index.items_FxR[f]
        assert (items[n:] == -1).all(), f"facet {f}: CSR entries past the last item"
        assert np.array_equal(np.sort(items[:n]), np.arange(n)), f"facet {f}: rows not each exactly once"
        assert np.array_equal(c[items[:n]], np.repeat(np.arange(len(counts)), counts)), f"facet {f}: order"
        within = np.diff(items[:n]) > 0
        same = np.diff(c[items[:n]]) == 0
        assert within[same].all(), f"facet {f}: rows not ascending inside a cluster"


def serving_arrays(index: MFLIIndex) -> ServingArrays:
    """The snapshot on the device (padding clusters: zero centroid, count 0, not valid)."""
    f, cap = index.num_facets, index.cluster_capacity
    cents = np.zeros((f, cap, index.dim), np.float32)
    valid = np.zeros((f, cap), bool)
    for i, t in enumerate(index.facets):
        cents[i, : t.num_clusters] = t.centroids_CxD
        valid[i, : t.num_clusters] = True
    return ServingArrays(
        emb_RxD=jnp.asarray(index.emb_RxD),
        ids_R=jnp.asarray(index.ids_R),
        row_of_id_V=jnp.asarray(index.row_of_id_V),
        cluster_RxF=jnp.asarray(index.cluster_RxF),
        centroids_FxCxD=jnp.asarray(cents),
        valid_FxC=jnp.asarray(valid),
        counts_FxC=jnp.asarray(index.counts_FxC),
        offsets_FxC=jnp.asarray(index.offsets_FxC),
        items_FxR=jnp.asarray(index.items_FxR),
    )
