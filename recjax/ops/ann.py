"""Int8 ANN search op (SilverTorch): brute force or IVF, optionally filtered by a Bloom plan.

``int8_search(queries_BxD, items, k, mask_BxW=..., impl=...)`` and ``ivf_search(queries_BxD, index, k,
nprobe, bloom_index=..., plan=..., impl=...)`` return (scores_BxK float32, ids_BxK int32), best first,
score = dot_int32(q8, item8) * item_scale * query_scale. Fewer than k allowed items -> score -inf, id -1.
Implementations:
- ``"pallas"``: the fused kernel (pallas_kernels/int8_ann.py; interpret mode off GPU). Selection keeps the
  2 best per bin of items (see the kernel docstring); ``exact=True`` makes every bin hold <= 2 items.
- ``"xla"``: int8 ``dot_general`` with int32 accumulation + mask + ``lax.top_k`` (exact; B x N scores).
- ``"reference"``: the plain-JAX definition from the kernel module.
- ``"auto"``: pallas on a GPU, xla elsewhere; brute force with B < 16 queries also goes to xla (the kernel's
  MMA tile is 16 query rows; measured on H200 at B=1: xla 0.28 ms, pallas 0.41 ms).
IVF with a Bloom plan is "probe, then filter": the plan is evaluated only on the probed clusters' words.

Importing this module also registers ``"pallas"`` in recjax.ops.topk (float queries and items quantized
on the fly, excluded ids cleared from the mask). It is not made the ``auto`` choice there because int8
scores are approximate and evaluation expects exact float ranking.

Letters: B queries, N items, D dim, K results, W mask words (ceil(N / 32)), P probes, L clusters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import int8_ann
from recjax import validation
from recjax.ops import dispatch, topk
from recjax.retrieval import bloom as bloom_lib
from recjax.retrieval.ivf import IVFIndex, probe_clusters
from recjax.retrieval.quantize import Int8Embeddings, quantize_items, quantize_queries

IMPLS = ("auto", "pallas", "xla", "reference")


def _resolve(impl: str, batch: int = 16) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    return ("pallas" if dispatch.pallas_supported() and batch >= 16 else "xla") if impl == "auto" else impl


def _bloom_impl(impl: str) -> str:
    """The Bloom kernel on a GPU (any batch) or when pallas is asked for; the plain-JAX evaluation else."""
    return "pallas" if impl == "pallas" or (impl == "auto" and dispatch.pallas_supported()) else "reference"


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
    bloom_index: bloom_lib.BloomIndex,
    plan: bloom_lib.BloomPlan,
    *,
    impl: str = "auto",
    exact: bool = False,
):
    """Bloom filter over all items (one packed mask per query), then the fused int8 search."""
    if bloom_index.num_items != items.num_rows:
        raise ValueError(
            f"bloom_index: expected {items.num_rows} items (the search layout), got {bloom_index.num_items}"
        )
    words = bloom_lib.filter_words(
        bloom_index, plan, impl=_bloom_impl(impl), interpret=not dispatch.pallas_supported()
    )
    return int8_search(queries_BxD, items, k, mask_BxW=words, impl=impl, exact=exact)


def ivf_search(
    queries_BxD: jax.Array,
    index: IVFIndex,
    k: int,
    nprobe: int,
    *,
    bloom_index: bloom_lib.BloomIndex | None = None,
    plan: bloom_lib.BloomPlan | None = None,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """IVF search over the ``nprobe`` best clusters per query. With ``plan`` (and a ``bloom_index`` built
    in the IVF sorted order, padded by ``max_tiles * block_n / 32`` words) the filter is evaluated only
    on the probed clusters' words. Exact within the probed clusters when no cluster exceeds 2 tiles."""
    _check_common(queries_BxD, index.items.dim, index.num_items, k)
    if not 1 <= nprobe <= index.num_clusters:
        raise ValueError(f"nprobe: expected 1 <= nprobe <= L={index.num_clusters}, got {nprobe}")
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
    mask = None
    v = index.max_tiles * index.block_n // 32
    if plan is not None:
        mask = bloom_lib.filter_words_probed(
            bloom_index,
            plan,
            probes,
            index.tile_start_L,
            block_n=index.block_n,
            max_tiles=index.max_tiles,
            impl=_bloom_impl(impl),
            interpret=not dispatch.pallas_supported(),
        )
    if name == "pallas":
        # queries per cluster on average decide how many share one cluster scan
        block_q = int8_ann.choose_block_q(max(1, queries_BxD.shape[0] * nprobe // index.num_clusters))
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
            interpret=not dispatch.pallas_supported(),
        )
    # dense definition over the sorted rows: allowed = row of a probed cluster (and its filter bit)
    b, rows, block_n = queries_BxD.shape[0], index.ids_sorted.shape[0], index.block_n
    local = jnp.arange(v * 32)
    rows_BxPxV = (index.tile_start_L[probes] * block_n)[..., None] + local
    inside = local < (index.num_tiles_L[probes] * block_n)[..., None]
    if mask is not None:
        inside &= int8_ann.unpack_mask_reference(mask.reshape(b * nprobe, v), v * 32).reshape(inside.shape)
    b_idx = jnp.broadcast_to(jnp.arange(b)[:, None, None], rows_BxPxV.shape)
    allowed = jnp.zeros((b, rows), bool).at[b_idx, jnp.where(inside, rows_BxPxV, rows)].set(True, mode="drop")
    allowed &= (index.ids_sorted >= 0)[None, :]
    scores = _xla_scores(q.values_NxD, index.items.values_NxD, index.items.scales_N)
    return _dense_topk(scores, allowed, q.scales_N, k, ids_N=index.ids_sorted)


# ------------------------------------------------------------------------ recjax.ops.topk registration


def _pack_allowed(allowed_BxN: jax.Array) -> jax.Array:
    b, n = allowed_BxN.shape
    w = -(-n // 32)
    bits = jnp.pad(allowed_BxN, ((0, 0), (0, w * 32 - n))).reshape(b, w, 32).astype(jnp.uint32)
    return jnp.sum(bits << jnp.arange(32, dtype=jnp.uint32), axis=2, dtype=jnp.uint32)


def pack_mask(allowed_BxN) -> jax.Array:
    """(B, N) bool -> (B, ceil(N / 32)) uint32 words, the kernels' mask layout."""
    return _pack_allowed(jnp.asarray(allowed_BxN, bool))


def _topk_pallas(queries_BxD, items_NxD, k, *, exclude_BxH=None):
    mask = None
    if exclude_BxH is not None:
        mask = _pack_allowed(~topk.exclusion_mask(exclude_BxH, items_NxD.shape[0]))
    return int8_search(queries_BxD, quantize_items(items_NxD), k, mask_BxW=mask, impl="pallas")


topk.register_impl("pallas", _topk_pallas)
