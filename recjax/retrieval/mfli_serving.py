"""MFLI serving without ANN (arXiv 2602.16124), jitted with fixed shapes over an ``mfli_index`` snapshot.

Letters: B queries, T trigger items per query, F facets, C clusters per facet (padded), K clusters selected
per facet, S = K F selected slots, P max candidates, R index rows, D dim, k results.

``retrieve(arrays, k, k_clusters=, max_candidates=, queries_BxD= | trigger_ids_BxT=, ...)``:
1. Clusters per facet, two modes:
   - user embedding (``queries_BxD``): score each valid cluster by <q, centroid>, take the top K per facet
     (ties: lower cluster id first);
   - trigger items (``trigger_ids_BxT`` external ids, -1 = padding), the paper's mode: the histogram of the
     triggers' clusters per facet; ``key=None`` takes the K most frequent clusters (ties: the cluster whose
     first trigger comes first), with a ``key`` it samples K distinct clusters with probability proportional
     to their counts (Gumbel top-K, i.e. sequential sampling without replacement), as the paper samples K
     indices from the histogram. Computed over the T triggers (T x T comparisons), never B x C.
   Fewer than K valid clusters (K > clusters, or fewer distinct trigger clusters) leave -1 slots.
2. Candidates: the selected clusters in slot order (rank 0 of facets 0..F-1, then rank 1, ...: truncation
   drops the worst ranks of every facet alike), their CSR items concatenated (rows ascending within a
   cluster) into a buffer of ``max_candidates`` rows, truncated past it, -1 padded. An item in clusters of
   several facets keeps only its first position (sort-based dedup; skipped for F = 1, where clusters
   partition the items).
3. Rerank: score = <q, item embedding> through ``recjax.ops.gather_score`` (``impl``: the Pallas gather +
   score kernel on a GPU, XLA elsewhere), top k (ties: earlier buffer position). In trigger mode without
   ``queries_BxD`` the query is the mean of the valid triggers' embeddings (a deviation: the paper reranks
   with the model's user embedding, which the caller can pass as ``queries_BxD`` with the triggers).
Results: external ids (-1 and score -inf when fewer than k candidates), their rows, and the number of
distinct candidates per query.

Deviation: the paper samples K indices over the union of facets; here K per facet (F K in all), so each
facet contributes; equal budgets with one facet are K' = F K.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from recjax import validation
from recjax.ops import gather_score
from recjax.retrieval.mfli_index import ServingArrays

_HI = jax.lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Retrieved:
    scores_Bxk: jax.Array  # best first, -inf = missing
    ids_Bxk: jax.Array  # external ids, -1 = missing
    rows_Bxk: jax.Array  # index rows, -1 = missing
    num_candidates_B: jax.Array  # distinct valid candidates in the buffer


def select_by_queries(arrays: ServingArrays, queries_BxD: jax.Array, k_clusters: int) -> jax.Array:
    """(B, F, K) cluster ids (-1 = none): top K clusters per facet by <q, centroid>."""
    scores = jnp.einsum("bd,fcd->bfc", queries_BxD, arrays.centroids_FxCxD, precision=_HI)
    scores = jnp.where(arrays.valid_FxC[None], scores, -jnp.inf)
    top, cluster = jax.lax.top_k(scores, k_clusters)
    return jnp.where(jnp.isneginf(top), -1, cluster).astype(jnp.int32)


def select_by_triggers(
    arrays: ServingArrays, trigger_rows_BxT: jax.Array, k_clusters: int, key: jax.Array | None = None
) -> jax.Array:
    """(B, F, K) cluster ids (-1 = none) from the histogram of the triggers' clusters per facet."""
    b, t = trigger_rows_BxT.shape
    ok = trigger_rows_BxT >= 0
    c_BxFxT = jnp.where(
        ok[:, None, :], arrays.cluster_RxF[jnp.maximum(trigger_rows_BxT, 0)].swapaxes(1, 2), -1
    )
    same = (c_BxFxT[..., :, None] == c_BxFxT[..., None, :]) & (c_BxFxT[..., None, :] >= 0)
    count = jnp.sum(same, axis=-1)
    first = ~jnp.any(same & jnp.tri(t, k=-1, dtype=bool), axis=-1)  # no earlier trigger in this cluster
    weight = jnp.where(first & (c_BxFxT >= 0), count, 0).astype(jnp.float32)
    logits = jnp.where(weight > 0, weight, -jnp.inf)
    if key is not None:
        logits = jnp.log(weight) + jax.random.gumbel(key, weight.shape)
        logits = jnp.where(weight > 0, logits, -jnp.inf)
    pad = max(0, k_clusters - t)
    logits = jnp.pad(logits, ((0, 0), (0, 0), (0, pad)), constant_values=-jnp.inf)
    c_BxFxT = jnp.pad(c_BxFxT, ((0, 0), (0, 0), (0, pad)), constant_values=-1)
    top, pos = jax.lax.top_k(logits, k_clusters)
    return jnp.where(jnp.isneginf(top), -1, jnp.take_along_axis(c_BxFxT, pos, axis=-1))


def gather_candidates(arrays: ServingArrays, clusters_BxFxK: jax.Array, max_candidates: int) -> jax.Array:
    """(B, P) candidate rows, -1 padded: the selected clusters' items in slot order, truncated at P."""
    b, f, k = clusters_BxFxK.shape
    cl_BxS = clusters_BxFxK.swapaxes(1, 2).reshape(b, k * f)  # rank-major slots
    facet_S = jnp.tile(jnp.arange(f, dtype=jnp.int32), k)
    ok = cl_BxS >= 0
    c = jnp.maximum(cl_BxS, 0)
    count = jnp.where(ok, arrays.counts_FxC[facet_S, c], 0)
    csr_start = arrays.offsets_FxC[facet_S, c]
    end = jnp.cumsum(count, axis=1)
    start = end - count
    # slot of each buffer position: number of slots starting at or before it, minus one
    b_idx = jnp.broadcast_to(jnp.arange(b)[:, None], start.shape)
    marks = jnp.zeros((b, max_candidates), jnp.int32).at[b_idx, start].add(1, mode="drop")
    slot = jnp.cumsum(marks, axis=1) - 1
    p = jnp.arange(max_candidates)[None, :]
    inside = p < end[:, -1:]
    slot = jnp.clip(slot, 0, k * f - 1)
    at = jnp.take_along_axis(csr_start, slot, 1) + p - jnp.take_along_axis(start, slot, 1)
    flat = facet_S[slot] * arrays.items_FxR.shape[1] + jnp.where(inside, at, 0)
    return jnp.where(inside, arrays.items_FxR.reshape(-1)[flat], -1)


def first_occurrence(rows_BxP: jax.Array) -> jax.Array:
    """(B, P) bool: the row is >= 0 and does not occur earlier in its buffer."""
    b, p = rows_BxP.shape
    order = jnp.argsort(rows_BxP, axis=1, stable=True)
    srt = jnp.take_along_axis(rows_BxP, order, axis=1)
    dup_sorted = jnp.concatenate([jnp.zeros((b, 1), bool), srt[:, 1:] == srt[:, :-1]], axis=1)
    dup = jnp.zeros((b, p), bool).at[jnp.arange(b)[:, None], order].set(dup_sorted)
    return ~dup & (rows_BxP >= 0)


@functools.partial(jax.jit, static_argnames=("k", "k_clusters", "max_candidates", "impl", "mode"))
def serve(arrays, queries_BxD, trigger_rows_BxT, key, *, k, k_clusters, max_candidates, impl, mode):
    """The jitted path behind :func:`retrieve`, no checks (trigger *rows*, not ids; ``mode`` "queries" or
    "triggers"); benchmarks time this."""
    if mode == "queries":
        clusters = select_by_queries(arrays, queries_BxD, k_clusters)
    else:
        clusters = select_by_triggers(arrays, trigger_rows_BxT, k_clusters, key)
        if queries_BxD is None:
            ok = (trigger_rows_BxT >= 0)[..., None]
            emb = jnp.where(ok, arrays.emb_RxD[jnp.maximum(trigger_rows_BxT, 0)], 0)
            queries_BxD = jnp.sum(emb, axis=1) / jnp.maximum(jnp.sum(ok, axis=1), 1)
    rows = gather_candidates(arrays, clusters, max_candidates)
    keep = first_occurrence(rows) if arrays.cluster_RxF.shape[1] > 1 else rows >= 0
    scores = gather_score.gather_score(queries_BxD, arrays.emb_RxD, rows, impl=impl)
    scores = jnp.where(keep, scores, -jnp.inf)
    top, pos = jax.lax.top_k(scores, k)
    found = ~jnp.isneginf(top)
    top_rows = jnp.where(found, jnp.take_along_axis(rows, pos, axis=1), -1)
    ids = jnp.where(found, arrays.ids_R[jnp.maximum(top_rows, 0)], -1)
    return Retrieved(top, ids, top_rows, jnp.sum(keep, axis=1).astype(jnp.int32))


def retrieve(
    arrays: ServingArrays,
    k: int,
    *,
    k_clusters: int,
    max_candidates: int,
    queries_BxD=None,
    trigger_ids_BxT=None,
    key: jax.Array | None = None,
    impl: str = "auto",
) -> Retrieved:
    """Public boundary: validates, maps trigger ids to rows, runs the jitted path (see the docstring)."""
    d = arrays.emb_RxD.shape[1]
    c = arrays.valid_FxC.shape[1]
    if queries_BxD is None and trigger_ids_BxT is None:
        raise ValueError("queries_BxD, trigger_ids_BxT: expected at least one of them, got neither")
    if not 1 <= k_clusters <= c:
        raise ValueError(
            f"k_clusters: expected 1 <= k_clusters <= C={c} (cluster capacity), got {k_clusters}"
        )
    if not 1 <= k <= max_candidates:
        raise ValueError(f"k: expected 1 <= k <= max_candidates={max_candidates}, got {k}")
    rows = None
    b = None
    if trigger_ids_BxT is not None:
        validation.check_shape("trigger_ids_BxT", trigger_ids_BxT, (None, None))
        validation.check_dtype("trigger_ids_BxT", trigger_ids_BxT, "iu")
        v = arrays.row_of_id_V.shape[0]
        validation.check_ids("trigger_ids_BxT", trigger_ids_BxT, v, padding=-1)
        tid = jnp.asarray(trigger_ids_BxT, jnp.int32)
        rows = jnp.where(tid >= 0, arrays.row_of_id_V[jnp.maximum(tid, 0)], -1)
        missing = np.argwhere((np.asarray(tid) >= 0) & (np.asarray(rows) < 0))
        if len(missing):
            at = tuple(int(i) for i in missing[0])
            raise ValueError(f"trigger_ids_BxT: id {int(tid[at])} at {at} is not in the index")
        b = tid.shape[0]
    if queries_BxD is not None:
        validation.check_shape("queries_BxD", queries_BxD, (b, d))
        validation.check_dtype("queries_BxD", queries_BxD, "f")
        validation.check_finite("queries_BxD", queries_BxD)
        queries_BxD = jnp.asarray(queries_BxD, jnp.float32)
    if key is not None and rows is None:
        raise ValueError("key: sampling needs trigger_ids_BxT (the histogram mode)")
    mode = "triggers" if rows is not None else "queries"
    return serve(
        arrays,
        queries_BxD,
        rows,
        key,
        k=k,
        k_clusters=k_clusters,
        max_candidates=max_candidates,
        impl=impl,
        mode=mode,
    )
