"""Int8 ANN search op (SilverTorch): brute force or IVF, filtered by a packed mask and/or a Bloom plan.

``int8_search(queries_BxD, items, k, mask_BxW=..., impl=...)`` and ``ivf_search(queries_BxD, index, k,
nprobe, mask_BxW=..., bloom_index=..., plan=..., impl=...)`` return (scores_BxK float32, ids_BxK int32),
best first, score = dot_int32(q8, item8) * item_scale * query_scale. Fewer than k allowed items -> score
-inf, id -1.
Implementations:
- ``"pallas"``: the fused kernel (pallas_kernels/int8_ann.py; interpret mode off GPU). Selection keeps the
  best few per bin of items (see the kernel docstring); ``exact=True`` makes every bin hold <= 2 items.
- ``"xla"``: int8 ``dot_general`` with int32 accumulation + mask + ``lax.top_k`` (exact; B x N scores).
- ``"reference"``: the plain-JAX definition from the kernel module.
- ``"auto"``: pallas on a GPU, xla elsewhere; brute force with B < 16 queries also goes to xla (the kernel's
  MMA tile is 16 query rows; measured on H200 at B=1: xla 0.28 ms, pallas 0.41 ms).
IVF filters: ``mask_BxW`` over the original ids (gathered onto the probed clusters' sorted rows) and/or a
Bloom plan, "probe, then filter": the plan is evaluated only on the probed clusters' words. Both become one
per-(query, probe) mask inside the kernel, so filtered items never compete for the top-k.

``recjax.ops.topk``'s ``"pallas"`` implementation is ``int8_search`` (float queries and items quantized on
the fly, excluded ids cleared from the mask); topk imports this module, never the other way round.
The IVF index type (``IVFIndex``) and the coarse probe (``probe_clusters``) live here, the op that reads
them; k-means and building the index are ``recjax.retrieval.ivf``. The Bloom plan is evaluated by
``recjax.ops.bloom`` with the same ``impl``.

Letters: B queries, N items, D dim, K results, W mask words (ceil(N / 32)), P probes, L clusters,
R rows per probed cluster (max_tiles * block_n), V words per probed cluster (R / 32).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import int8_ann
from recjax import validation
from recjax.ops import bloom as bloom_op
from recjax.ops import dispatch
from recjax.ops.quantize import Int8Embeddings, quantize_queries

IMPLS = dispatch.IMPLS


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class IVFIndex:
    """Int8 items sorted by cluster. Cluster c holds sorted rows [tile_start[c] * T, (tile_start[c] +
    num_tiles[c]) * T); padding rows have id -1 and zero values. ``sorted_row_N[i]`` is the row of item i.
    A pytree (the ints are static), so it can be an argument of a jitted function. Built by
    ``recjax.retrieval.ivf.build_ivf_index`` (T = ``block_n``)."""

    centroids_LxD: jax.Array
    items: Int8Embeddings  # sorted + padded rows
    ids_sorted: jax.Array  # (rows,) int32 original item id, -1 for padding
    tile_start_L: jax.Array
    num_tiles_L: jax.Array
    sorted_row_N: jax.Array
    block_n: int = field(metadata=dict(static=True))
    max_tiles: int = field(metadata=dict(static=True))  # largest cluster, in tiles (sizes the probe mask)
    num_items: int = field(metadata=dict(static=True))

    @property
    def num_clusters(self) -> int:
        return self.centroids_LxD.shape[0]


@functools.partial(jax.jit, static_argnames=("nprobe",))
def probe_clusters(queries_BxD: jax.Array, centroids_LxD: jax.Array, nprobe: int) -> jax.Array:
    """The ``nprobe`` clusters with the largest <q, c> per query (distinct), int32 (B, P)."""
    sim = jnp.dot(queries_BxD.astype(jnp.float32), centroids_LxD.T, preferred_element_type=jnp.float32)
    return jax.lax.top_k(sim, nprobe)[1].astype(jnp.int32)


def _resolve(impl: str, batch: int = 16) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    return ("pallas" if dispatch.pallas_supported() and batch >= 16 else "xla") if impl == "auto" else impl


def _check_common(queries_BxD, d: int, n: int, k: int) -> None:
    validation.check_shape("queries_BxD", queries_BxD, (None, d))
    validation.check_dtype("queries_BxD", queries_BxD, "f")
    int8_ann.padded_dim(d)  # unsupported d -> ValueError naming d
    if not 0 < k <= n:
        raise ValueError(f"k: expected 1 <= k <= N={n}, got {k}")


def _check_mask(name: str, mask, shape) -> None:
    validation.check_shape(name, mask, shape)
    validation.check_dtype(name, mask, "iu")
    if np.dtype(mask.dtype).itemsize != 4:
        raise TypeError(f"{name}: expected 32-bit words (int32/uint32), got {np.dtype(mask.dtype)}")


@jax.jit
def _xla_scores(q_BxD, items_NxD, item_scales_N):
    return int8_ann.int8_scores_reference(q_BxD, items_NxD, item_scales_N)


def _dense_topk(scores_BxN, allowed_BxN, q_scales_B, k, ids_N=None):
    if allowed_BxN is not None:
        scores_BxN = jnp.where(allowed_BxN, scores_BxN, -jnp.inf)
    vals, pos = jax.lax.top_k(scores_BxN, k)
    ids = pos if ids_N is None else ids_N[pos]
    return vals * q_scales_B[:, None], jnp.where(jnp.isneginf(vals), -1, ids).astype(jnp.int32)


def int8_search(
    queries_BxD: jax.Array,
    items: Int8Embeddings,
    k: int,
    *,
    mask_BxW: jax.Array | None = None,
    impl: str = "auto",
    exact: bool = False,
    min_bins_per_k: int = 16,
    return_exact: bool = False,
) -> tuple[jax.Array, ...]:
    """Brute-force int8 search; ``mask_BxW`` packed allow-bits (bit j of word w = item 32 w + j).
    ``return_exact`` adds ``exact_B``: True where the scores are provably the exact top-k (always True for
    xla / reference; for pallas the per-bin certificate, see pallas_kernels/int8_ann.py)."""
    n, d = items.values_NxD.shape
    _check_common(queries_BxD, d, n, k)
    if mask_BxW is not None:
        _check_mask("mask_BxW", mask_BxW, (queries_BxD.shape[0], -(-n // 32)))
    q = quantize_queries(queries_BxD)  # rejects NaN / inf
    name = _resolve(impl, queries_BxD.shape[0])
    certified = (jnp.ones((queries_BxD.shape[0],), bool),) if return_exact else ()
    if name == "reference":
        out = int8_ann.int8_ann_reference(
            q.values_NxD, q.scales_N, items.values_NxD, items.scales_N, mask_BxW, k=k
        )
        return (*out, *certified)
    if name == "xla":
        allowed = None if mask_BxW is None else int8_ann.unpack_mask_reference(mask_BxW, n)
        scores = _xla_scores(q.values_NxD, items.values_NxD, items.scales_N)
        return (*_dense_topk(scores, allowed, q.scales_N, k), *certified)
    b = queries_BxD.shape[0]
    block_q = int8_ann.choose_block_q(b)
    block_n = 64 if n >= 64 * 64 else 32  # T=64 measured fastest on H200 (benchmarks/RESULTS.md)
    per_bin = 2
    tiles = per_bin if exact else int8_ann.choose_tiles_per_chunk(n, b, k, block_n, block_q, min_bins_per_k)
    return int8_ann.int8_ann_topk(
        q.values_NxD,
        q.scales_N,
        items.values_NxD,
        items.scales_N,
        mask_BxW,
        k=k,
        block_q=block_q,
        block_n=block_n,
        tiles_per_chunk=tiles,
        per_bin=per_bin,
        return_exact=return_exact,
        interpret=not dispatch.pallas_supported(),
    )


def filtered_search(
    queries_BxD,
    items: Int8Embeddings,
    k: int,
    bloom_index: bloom_op.BloomIndex,
    plan: bloom_op.BloomPlan,
    *,
    impl: str = "auto",
    exact: bool = False,
):
    """Bloom filter over all items (one packed mask per query), then the fused int8 search."""
    if bloom_index.num_items != items.num_rows:
        raise ValueError(
            f"bloom_index: expected {items.num_rows} items (the search layout), got {bloom_index.num_items}"
        )
    words = bloom_op.filter_words(bloom_index, plan, impl=impl)  # auto: the Bloom kernel on a GPU, any B
    return int8_search(queries_BxD, items, k, mask_BxW=words, impl=impl, exact=exact)


def ivf_search(
    queries_BxD: jax.Array,
    index: IVFIndex,
    k: int,
    nprobe: int,
    *,
    mask_BxW: jax.Array | None = None,
    bloom_index: bloom_op.BloomIndex | None = None,
    plan: bloom_op.BloomPlan | None = None,
    impl: str = "auto",
    exact: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """IVF search over the ``nprobe`` best clusters per query; returns original item ids.

    Filters (ANDed; filtered items never compete for the top-k, for every impl):
    - ``mask_BxW``: packed allow-bits over the *original* item ids (the layout ``int8_search`` and
      ``ops.bloom.filter_words`` use: bit j of word w = item 32 w + j), mapped here to the words of each
      probed cluster in the sorted layout (B P V words are gathered; the B x N mask is never permuted);
    - ``plan`` with a ``bloom_index`` built in the IVF sorted order (``item_order=index.ids_sorted``,
      ``pad_words=max_tiles * block_n / 32``): probe, then filter, the plan is evaluated only on the probed
      clusters' words.
    pallas selection per (query, probed cluster): ``int8_ann.choose_ivf_selection`` sizes the bins from k
    so that even a top-k lying entirely in one cluster loses <= 0.1 % of it in expectation (a query's
    top-k usually sits in its nearest clusters); ``exact=True`` makes every bin hold <= 2 items (every
    probed item is a candidate). xla / reference are exact. Jittable (``nprobe`` and ``k`` static)."""
    _check_common(queries_BxD, index.items.dim, index.num_items, k)
    b = queries_BxD.shape[0]
    if not 1 <= nprobe <= index.num_clusters:
        raise ValueError(f"nprobe: expected 1 <= nprobe <= L={index.num_clusters}, got {nprobe}")
    if mask_BxW is not None:
        _check_mask("mask_BxW", mask_BxW, (b, -(-index.num_items // 32)))
    if (plan is None) != (bloom_index is None):
        raise ValueError("plan and bloom_index: expected both or neither")
    if bloom_index is not None and bloom_index.num_items != index.ids_sorted.shape[0]:
        raise ValueError(
            f"bloom_index: expected the IVF sorted layout of {index.ids_sorted.shape[0]} rows, "
            f"got {bloom_index.num_items}"
        )
    q = quantize_queries(queries_BxD)
    probes = probe_clusters(queries_BxD, index.centroids_LxD, nprobe)
    name = _resolve(impl)
    if name == "reference":
        return _ivf_reference(q, index, probes, k, mask_BxW, bloom_index, plan)
    mask = None  # (B, P, V) words: each probed cluster's allow-bits
    if plan is not None:
        mask = bloom_op.filter_words_probed(
            bloom_index,
            plan,
            probes,
            index.tile_start_L,
            block_n=index.block_n,
            max_tiles=index.max_tiles,
            impl=impl,
        )
        mask = jax.lax.bitcast_convert_type(mask.astype(jnp.int32), jnp.uint32)
    if mask_BxW is not None:
        probed = _probed_allow_words(index, probes, mask_BxW)
        mask = probed if mask is None else mask & probed
    if name == "pallas":
        # queries per cluster on average decide how many share one cluster scan
        block_q = int8_ann.choose_block_q(max(1, b * nprobe // index.num_clusters))
        if exact:
            chunks, per_bin = -(-index.max_tiles // 2), 2
        else:
            chunks, per_bin = int8_ann.choose_ivf_selection(k, index.block_n, index.max_tiles, block_q)
        return int8_ann.int8_ivf_topk(
            q.values_NxD,
            q.scales_N,
            probes,
            index.items.values_NxD,
            index.items.scales_N,
            index.ids_sorted,
            index.tile_start_L,
            index.num_tiles_L,
            mask,
            k=k,
            block_q=block_q,
            block_n=index.block_n,
            per_bin=per_bin,
            num_chunks=chunks,
            interpret=not dispatch.pallas_supported(),
        )
    # xla: dense scores over the sorted rows, allowed = row of a probed cluster (and its filter bit)
    rows_BxPxR, inside_BxPxR = _probed_rows(index, probes)
    v = inside_BxPxR.shape[-1] // 32
    if mask is not None:
        bits = int8_ann.unpack_mask_reference(mask.reshape(b * nprobe, v), v * 32)
        inside_BxPxR &= bits.reshape(inside_BxPxR.shape)
    rows = index.ids_sorted.shape[0]
    b_idx = jnp.broadcast_to(jnp.arange(b)[:, None, None], rows_BxPxR.shape)
    at = jnp.where(inside_BxPxR, rows_BxPxR, rows)
    allowed = jnp.zeros((b, rows), bool).at[b_idx, at].set(True, mode="drop")
    allowed &= (index.ids_sorted >= 0)[None, :]
    scores = _xla_scores(q.values_NxD, index.items.values_NxD, index.items.scales_N)
    return _dense_topk(scores, allowed, q.scales_N, k, ids_N=index.ids_sorted)


def _probed_rows(index: IVFIndex, probes_BxP):
    """Sorted rows of each probed cluster, (B, P, R) with R = max_tiles * block_n, and which are inside it."""
    local_R = jnp.arange(index.max_tiles * index.block_n)
    rows = (index.tile_start_L[probes_BxP] * index.block_n)[..., None] + local_R
    return rows, local_R < (index.num_tiles_L[probes_BxP] * index.block_n)[..., None]


def _probed_allow_words(index: IVFIndex, probes_BxP, mask_BxW):
    """Original-id allow-bits gathered onto each probed cluster's sorted rows, packed (B, P, V) uint32."""
    b, p = probes_BxP.shape
    rows_BxPxR, inside = _probed_rows(index, probes_BxP)
    ids = jnp.where(inside, index.ids_sorted.at[rows_BxPxR].get(mode="fill", fill_value=-1), -1)
    words = mask_BxW.astype(jnp.uint32)
    word_BxPxR = jnp.take_along_axis(words, jnp.maximum(ids, 0).reshape(b, -1) // 32, axis=1)
    bit = (word_BxPxR.reshape(ids.shape) >> (jnp.maximum(ids, 0) % 32).astype(jnp.uint32)) & 1
    allowed = (bit != 0) & (ids >= 0)
    return _pack_allowed(allowed.reshape(b * p, -1)).reshape(b, p, -1)


def _ivf_reference(q, index: IVFIndex, probes_BxP, k, mask_BxW, bloom_index, plan):
    """Definition over the original ids: item i competes iff its cluster is probed and every filter allows
    it (the Bloom plan evaluated on all words of the sorted layout, then read at i's sorted row)."""
    n, block_n = index.num_items, index.block_n
    row_N = index.sorted_row_N
    cluster_N = jnp.searchsorted(index.tile_start_L, row_N // block_n, side="right") - 1
    allowed = jnp.any(cluster_N[None, :, None] == probes_BxP[:, None, :], axis=2)
    if mask_BxW is not None:
        allowed &= int8_ann.unpack_mask_reference(mask_BxW, n)
    if plan is not None:
        words = bloom_op.filter_words(bloom_index, plan, impl="reference")
        allowed &= int8_ann.unpack_mask_reference(words, bloom_index.num_items)[:, row_N]
    items = index.items
    scores = int8_ann.int8_scores_reference(q.values_NxD, items.values_NxD[row_N], items.scales_N[row_N])
    return _dense_topk(scores, allowed, q.scales_N, k)


def _pack_allowed(allowed_BxN: jax.Array) -> jax.Array:
    b, n = allowed_BxN.shape
    w = -(-n // 32)
    bits = jnp.pad(allowed_BxN, ((0, 0), (0, w * 32 - n))).reshape(b, w, 32).astype(jnp.uint32)
    return jnp.sum(bits << jnp.arange(32, dtype=jnp.uint32), axis=2, dtype=jnp.uint32)


def pack_mask(allowed_BxN) -> jax.Array:
    """(B, N) bool -> (B, ceil(N / 32)) uint32 words, the kernels' mask layout."""
    return _pack_allowed(jnp.asarray(allowed_BxN, bool))
