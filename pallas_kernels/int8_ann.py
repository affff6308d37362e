"""Fused Int8 ANN scoring + top-k (SilverTorch), brute force and IVF, Pallas (Triton lowering).

Scores are ``float32(dot_int32(q, item)) * item_scale`` (the query scale is applied after selection: it is
one positive number per query and does not change the ranking), with int8 x int8 -> int32 dots on the
tensor cores (``jnp.dot(..., preferred_element_type=int32)`` lowers to Triton ``tt.dot`` with an int32
accumulator, i.e. IMMA / wgmma s8 on Hopper).

Selection inside the kernel, without writing the B x N score matrix: each program owns a block of queries
and a chunk of ``tiles_per_chunk`` item tiles of ``block_n`` items. It keeps, per query and per *column* of
the tile, the ``per_bin`` best scores seen over the chunk (a register-resident insertion network: a few
compares/selects per score, no sort). So the items are split into bins (bin = one column position within
one chunk, ``tiles_per_chunk`` items) and each bin contributes its ``per_bin`` best. A small merge
(``lax.top_k`` over the ``bins * per_bin`` candidates per query) gives the final top-k.
This is exact whenever a bin holds <= ``per_bin`` items (``tiles_per_chunk <= per_bin``, used by the
tests); otherwise an item of the true top-k is lost only if more than ``per_bin`` top-k items share a bin
(with per_bin=2 and L bins the expected number lost is about k^3 / (6 L^2); the wrappers choose
L >= 16 k, i.e. < k / 1500 items lost). The same bin idea as ``lax.approx_max_k`` on TPU, with 2 per bin.

A packed filter mask (bit j of word w = item 32 w + j allowed) is applied inside the kernel: filtered items
get score -inf and never enter the per-bin lists. Results with fewer than k allowed items are padded with
score -inf and id -1.

IVF: items stored sorted by cluster, each cluster padded to whole tiles (padding rows have id -1). Every
(query, probe) pair becomes a row of a "slot" matrix grouped by cluster, so one program scans one cluster
for up to ``block_q`` queries that probe it (the cluster tile is loaded once for all of them, and the
int8 dot is a real matrix product on the tensor cores). The per-pair mask covers only the probed cluster's
words (probe, then filter). Selection per (query, cluster): the scan is split into ``num_chunks`` chunks of
consecutive tiles, each with its own T bins of ``per_bin`` slots, because a query's top-k often lies in one
cluster: with one chunk and 2 slots a cluster can give at most 2 T items and its bins overflow (issue 14:
recall 0.83 at every nprobe). ``choose_ivf_selection`` sizes (num_chunks, per_bin) for that worst case.

Letters: B queries, N items, D embedding dim (padded to a power of two >= 32), K results, Q queries per
program (block_q), T items per tile (block_n), S kept per bin (per_bin), C item chunks, W mask words,
P probes per query, L clusters, R slot rows (work items x Q), M max tiles per cluster, X work items.

Deviation from the public SilverTorch op: it scores one query at a time with dp4a on CUDA cores and runs
top-k as a separate op; here queries are batched onto tensor cores and top-k is fused (per bin).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

MAX_DIM = 1024
NUM_SMS_HINT = 132  # H100 SXM; only used to pick enough programs for small batches


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def padded_dim(d: int) -> int:
    if not 1 <= d <= MAX_DIM:
        raise ValueError(f"d: expected 1 <= d <= {MAX_DIM} (Triton tiles hold one full row), got {d}")
    return max(32, _next_pow2(d))


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad, constant_values=value)


def _unpack_bits(words_QxV: jax.Array) -> jax.Array:
    """(Q, T/32) int32 words -> (Q, T) bool, item j <-> bit j % 32 of word j // 32."""
    q, v = words_QxV.shape
    shifts = lax.broadcasted_iota(jnp.int32, (1, 1, 32), 2)
    bits = lax.shift_right_logical(words_QxV[:, :, None], shifts) & 1
    return bits.reshape(q, v * 32) != 0


def _mask_tile(mask_ref, t, block_n):
    """(Q, T) bool allow-bits of tile t of this program's mask block."""
    v = block_n // 32
    return _unpack_bits(mask_ref[:, pl.ds(pl.multiple_of(t * v, v), v)])


def _insert(slots_v, slots_i, score_QxT, ids_QxT):
    """Insertion of one new score per (query, column) into the sorted per-bin lists (best first)."""
    new_v, new_i = [], []
    cur_v, cur_i = score_QxT, ids_QxT
    for sv, si in zip(slots_v, slots_i, strict=True):
        better = cur_v > sv  # strict: on ties the earlier item stays
        new_v.append(jnp.where(better, cur_v, sv))
        new_i.append(jnp.where(better, cur_i, si))
        cur_v, cur_i = jnp.where(better, sv, cur_v), jnp.where(better, si, cur_i)
    return new_v, new_i


def _scan_tiles(
    q_QxD, items_ref, scales_ref, ids_fn, mask_ref, first_tile, num_tiles, *, block_n, per_bin, mask_tile0=0
):
    """Scores ``num_tiles`` tiles of ``items_ref`` from ``first_tile`` and keeps the per-bin best.
    Tile t of the scan reads mask tile ``mask_tile0 + t`` of this program's mask block."""
    nq = q_QxD.shape[0]

    def body(t, carry):
        slots_v, slots_i = carry
        row0 = pl.multiple_of((first_tile + t) * block_n, block_n)
        tile_TxD = items_ref[pl.ds(row0, block_n), :]
        dots_QxT = jnp.dot(q_QxD, tile_TxD.T, preferred_element_type=jnp.int32)
        score_QxT = dots_QxT.astype(jnp.float32) * scales_ref[pl.ds(row0, block_n)][None, :]
        ids_T, valid_T = ids_fn(row0)
        valid_QxT = jnp.broadcast_to(valid_T[None, :], (nq, block_n))
        if mask_ref is not None:
            valid_QxT = valid_QxT & _mask_tile(mask_ref, mask_tile0 + t, block_n)
        score_QxT = jnp.where(valid_QxT, score_QxT, -jnp.inf)
        ids_QxT = jnp.broadcast_to(ids_T[None, :], (nq, block_n))
        slots_v, slots_i = _insert(slots_v, slots_i, score_QxT, ids_QxT)
        return slots_v, slots_i

    init_v = [jnp.full((nq, block_n), -jnp.inf, jnp.float32) for _ in range(per_bin)]
    init_i = [jnp.full((nq, block_n), -1, jnp.int32) for _ in range(per_bin)]
    return lax.fori_loop(0, num_tiles, body, (init_v, init_i))


def _store(out_v_ref, out_i_ref, slots_v, slots_i, block_n, col0=0):
    """Slot j of the lists -> columns [col0 + j T, col0 + (j + 1) T) of the output block."""
    for j, (v, i) in enumerate(zip(slots_v, slots_i, strict=True)):
        start = col0 + j * block_n
        at = pl.ds(start if isinstance(start, int) else pl.multiple_of(start, block_n), block_n)
        out_v_ref[:, at] = v
        out_i_ref[:, at] = i


def _brute_kernel(*refs, block_n, tiles_per_chunk, num_items, per_bin, has_mask):
    if has_mask:
        q_ref, items_ref, scales_ref, mask_ref, out_v_ref, out_i_ref = refs
    else:
        q_ref, items_ref, scales_ref, out_v_ref, out_i_ref = refs
        mask_ref = None
    chunk_start = pl.program_id(1) * (tiles_per_chunk * block_n)

    def ids_fn(row0):
        ids_T = chunk_start + row0 + lax.broadcasted_iota(jnp.int32, (block_n,), 0)
        return ids_T, ids_T < num_items

    slots_v, slots_i = _scan_tiles(
        q_ref[...],
        items_ref,
        scales_ref,
        ids_fn,
        mask_ref,
        0,
        tiles_per_chunk,
        block_n=block_n,
        per_bin=per_bin,
    )
    _store(out_v_ref, out_i_ref, slots_v, slots_i, block_n)


def _merge(cand_v_BxX, cand_i_BxX, q_scales_B, k, block_n, per_bin, return_exact):
    if cand_v_BxX.shape[1] < k:  # e.g. IVF with few probes of small clusters: pad, results get id -1
        cand_v_BxX = _pad_axis(cand_v_BxX, 1, k, -jnp.inf)
        cand_i_BxX = _pad_axis(cand_i_BxX, 1, k, -1)
    vals_BxK, pos_BxK = lax.top_k(cand_v_BxX, k)
    ids_BxK = jnp.take_along_axis(cand_i_BxX, pos_BxK, axis=1)
    ids_BxK = jnp.where(jnp.isneginf(vals_BxK), -1, ids_BxK).astype(jnp.int32)
    out = (vals_BxK * q_scales_B[:, None], ids_BxK)
    if not return_exact:
        return out
    # Certificate: if no bin's last kept slot made it into the top-k, every item a bin dropped scores <=
    # that slot <= the k-th returned score, so the returned scores are the exact top-k scores.
    slot_BxK = (pos_BxK % (block_n * per_bin)) // block_n
    exact_B = ~jnp.any((slot_BxK == per_bin - 1) & ~jnp.isneginf(vals_BxK), axis=1)
    return (*out, exact_B)


def choose_block_q(b: int) -> int:
    return 16 if b <= 16 else 32 if b <= 32 else 64


def choose_tiles_per_chunk(
    n: int,
    b: int,
    k: int,
    block_n: int,
    block_q: int,
    min_bins_per_k: int = 16,
    min_programs: int = 2 * NUM_SMS_HINT,
) -> int:
    """Bin size such that there are >= min_bins_per_k * k bins and >= min_programs programs."""
    num_tiles = -(-n // block_n)
    q_blocks = -(-b // block_q)
    chunks_wanted = max(-(-min_bins_per_k * k // block_n), -(-min_programs // q_blocks))
    return max(1, num_tiles // chunks_wanted)


@functools.partial(
    jax.jit,
    static_argnames=(
        "k",
        "block_q",
        "block_n",
        "tiles_per_chunk",
        "per_bin",
        "num_warps",
        "return_exact",
        "interpret",
    ),
)
def int8_ann_topk(
    q_BxD: jax.Array,
    q_scales_B: jax.Array,
    items_NxD: jax.Array,
    item_scales_N: jax.Array,
    mask_BxW: jax.Array | None = None,
    *,
    k: int,
    block_q: int = 64,
    block_n: int = 64,
    tiles_per_chunk: int = 8,
    per_bin: int = 2,
    num_warps: int | None = None,
    return_exact: bool = False,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Brute-force fused int8 search. Returns (scores_BxK float32, ids_BxK int32), best first, plus
    ``exact_B`` (bool: the scores are provably the exact top-k) when ``return_exact``.

    ``mask_BxW``: optional packed allow-mask, int32/uint32 words, W = ceil(N / 32) (extra words ignored).
    Inputs are assumed validated (see recjax.ops.ann); shapes are padded here.
    """
    b, d = q_BxD.shape
    n = items_NxD.shape[0]
    dp = padded_dim(d)
    chunk = tiles_per_chunk * block_n
    num_chunks = -(-n // chunk)
    np_ = num_chunks * chunk
    bp = -(-b // block_q) * block_q
    q = _pad_axis(_pad_axis(q_BxD.astype(jnp.int8), 1, dp), 0, bp)
    items = _pad_axis(_pad_axis(items_NxD.astype(jnp.int8), 1, dp), 0, np_)
    scales = _pad_axis(item_scales_N.astype(jnp.float32), 0, np_, 1.0)
    has_mask = mask_BxW is not None
    args = [q, items, scales]
    in_specs = [
        pl.BlockSpec((block_q, dp), lambda i, c: (i, 0)),
        pl.BlockSpec((chunk, dp), lambda i, c: (c, 0)),
        pl.BlockSpec((chunk,), lambda i, c: (c,)),
    ]
    if has_mask:
        words = lax.bitcast_convert_type(mask_BxW, jnp.int32) if mask_BxW.dtype == jnp.uint32 else mask_BxW
        words = words.astype(jnp.int32)[:, : np_ // 32]
        args.append(_pad_axis(_pad_axis(words, 1, np_ // 32), 0, bp))
        in_specs.append(pl.BlockSpec((block_q, chunk // 32), lambda i, c: (i, c)))
    kernel = functools.partial(
        _brute_kernel,
        block_n=block_n,
        tiles_per_chunk=tiles_per_chunk,
        num_items=n,
        per_bin=per_bin,
        has_mask=has_mask,
    )
    width = num_chunks * block_n * per_bin
    out_spec = pl.BlockSpec((block_q, block_n * per_bin), lambda i, c: (i, c))
    cand_v, cand_i = pl.pallas_call(
        kernel,
        grid=(bp // block_q, num_chunks),
        in_specs=in_specs,
        out_specs=[out_spec, out_spec],
        out_shape=[
            jax.ShapeDtypeStruct((bp, width), jnp.float32),
            jax.ShapeDtypeStruct((bp, width), jnp.int32),
        ],
        compiler_params=_compiler_params(num_warps, block_q, block_n, per_bin),
        interpret=interpret,
        name="int8_ann_brute",
    )(*args)
    return _merge(cand_v[:b], cand_i[:b], q_scales_B.astype(jnp.float32), k, block_n, per_bin, return_exact)


def _compiler_params(num_warps: int | None, block_q: int, block_n: int, per_bin: int):
    from jax.experimental.pallas import triton as pltriton

    if num_warps is None:  # the per-bin lists live in registers: 2 * per_bin * Q * T values per program
        num_warps = 8 if block_q * block_n * per_bin >= 16384 else 4

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=2)


# ----------------------------------------------------------------------------------------------- IVF


def _ivf_kernel(
    tile_start_ref,
    num_tiles_ref,
    q_ref,
    items_ref,
    scales_ref,
    ids_ref,
    *rest,
    block_n,
    per_bin,
    num_chunks,
    has_mask,
):
    if has_mask:
        mask_ref, out_v_ref, out_i_ref = rest
    else:
        (out_v_ref, out_i_ref), mask_ref = rest, None
    w = pl.program_id(0)
    first_tile = tile_start_ref[w]
    num_tiles = num_tiles_ref[w]
    q_QxD = q_ref[...]

    def ids_fn(row0):
        ids_T = ids_ref[pl.ds(row0, block_n)]
        return ids_T, ids_T >= 0

    scan = functools.partial(
        _scan_tiles, q_QxD, items_ref, scales_ref, ids_fn, mask_ref, block_n=block_n, per_bin=per_bin
    )
    if num_chunks == 1:
        _store(out_v_ref, out_i_ref, *scan(first_tile, num_tiles), block_n)
        return
    # The cluster's tiles split into num_chunks consecutive chunks of ceil(tiles / num_chunks) tiles, each
    # with its own T bins: num_chunks T bins per (query, cluster) whatever the cluster's size (the top-k of
    # a query often lies in one cluster; one scan's T bins of per_bin slots cannot hold it).
    chunk_tiles = (num_tiles + num_chunks - 1) // num_chunks

    def chunk(j, carry):
        t0 = j * chunk_tiles
        count = jnp.clip(num_tiles - t0, 0, chunk_tiles)  # 0 -> the chunk's lists stay -inf / -1
        slots = scan(first_tile + t0, count, mask_tile0=t0)
        _store(out_v_ref, out_i_ref, *slots, block_n, col0=j * (block_n * per_bin))
        return carry

    lax.fori_loop(0, num_chunks, chunk, 0)


def group_pairs_by_cluster(probes_BxP: jax.Array, num_clusters: int, block_q: int):
    """Assigns every (query, probe) pair a slot row so that rows of one work item share one cluster.

    Returns (slot_BxP, work_cluster_X, work_valid_X, slot_query_R) with X = ceil(B P / Q) + min(L, B P)
    work items (an upper bound, so shapes are static) and R = X * Q slot rows (-1 = empty row).
    """
    b, p = probes_BxP.shape
    bp = b * p
    num_work = -(-bp // block_q) + min(num_clusters, bp)
    flat_c = probes_BxP.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat_c, stable=True)
    sorted_c = flat_c[order]
    counts_L = jnp.bincount(flat_c, length=num_clusters)
    starts_L = jnp.cumsum(counts_L) - counts_L
    blocks_L = -(-counts_L // block_q)
    block_end_L = jnp.cumsum(blocks_L)
    block_start_L = block_end_L - blocks_L
    rank = jnp.arange(bp) - starts_L[sorted_c]
    slot_sorted = (block_start_L[sorted_c] + rank // block_q) * block_q + rank % block_q
    slot_flat = jnp.zeros((bp,), jnp.int32).at[order].set(slot_sorted.astype(jnp.int32))
    work = jnp.arange(num_work)
    work_cluster = jnp.searchsorted(block_end_L, work, side="right").astype(jnp.int32)
    work_valid = work < block_end_L[-1]
    work_cluster = jnp.where(work_valid, work_cluster, 0)
    slot_query = jnp.full((num_work * block_q,), -1, jnp.int32).at[slot_flat].set(jnp.arange(bp) // p)
    return slot_flat.reshape(b, p), work_cluster, work_valid, slot_query


def ivf_expected_loss(k: int, block_n: int, max_tiles: int, num_chunks: int, per_bin: int) -> float:
    """Expected top-k items lost by one (query, cluster) scan in the worst case: all min(k, n) of the
    query's top-k in the largest cluster (n = max_tiles T items). Its bins hold b = ceil(max_tiles /
    num_chunks) items each; a bin's count of top items is hypergeometric (n, min(k, n), b); a bin loses
    what exceeds per_bin."""
    b = -(-max_tiles // num_chunks)
    if b <= per_bin:
        return 0.0
    n = max_tiles * block_n
    kc = min(k, n)

    def log_comb(a, c):
        return math.lgamma(a + 1) - math.lgamma(c + 1) - math.lgamma(a - c + 1)

    lost = 0.0
    for x in range(per_bin + 1, min(b, kc) + 1):
        if b - x <= n - kc:
            lost += (x - per_bin) * math.exp(log_comb(kc, x) + log_comb(n - kc, b - x) - log_comb(n, b))
    return num_chunks * block_n * lost


@functools.lru_cache(maxsize=256)
def choose_ivf_selection(
    k: int, block_n: int, max_tiles: int, block_q: int, max_lost_frac: float = 1e-3, max_slots: int = 16384
) -> tuple[int, int]:
    """(num_chunks, per_bin) for ``int8_ivf_topk``: the fewest candidates per (query, cluster), num_chunks
    T per_bin, whose worst-case loss (``ivf_expected_loss``) is <= max_lost_frac of the top-k; per_bin is
    capped so the lists (Q T per_bin values per slot) stay in registers. Ties -> the smaller per_bin
    (fewer selects per score). Every (query, cluster) can then return its cluster's whole top-k."""
    s_max = max(2, min(8, max_slots // (block_q * block_n)))
    target = max_lost_frac * min(k, max_tiles * block_n)
    best = None
    for per_bin in range(2, s_max + 1):
        for chunks in range(1, -(-max_tiles // per_bin) + 1):  # the last one is exact (bins <= per_bin)
            if ivf_expected_loss(k, block_n, max_tiles, chunks, per_bin) <= target:
                best = min(best or (1 << 62,), (chunks * per_bin, per_bin, chunks))
                break
    return best[2], best[1]


@functools.partial(
    jax.jit,
    static_argnames=(
        "k",
        "block_q",
        "block_n",
        "per_bin",
        "num_chunks",
        "num_warps",
        "return_exact",
        "interpret",
    ),
)
def int8_ivf_topk(
    q_BxD: jax.Array,
    q_scales_B: jax.Array,
    probes_BxP: jax.Array,
    items_sorted_NxD: jax.Array,
    item_scales_sorted_N: jax.Array,
    item_ids_sorted_N: jax.Array,
    cluster_tile_start_L: jax.Array,
    cluster_num_tiles_L: jax.Array,
    mask_BxPxV: jax.Array | None = None,
    *,
    k: int,
    block_q: int = 64,
    block_n: int = 64,
    per_bin: int = 2,
    num_chunks: int = 1,
    num_warps: int | None = None,
    return_exact: bool = False,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """IVF search over clusters ``probes_BxP``. Items are sorted by cluster, each cluster padded to whole
    tiles of ``block_n`` (``N`` a multiple of ``block_n``; padding rows have id -1). Returned ids are the
    original ids from ``item_ids_sorted_N``.

    ``mask_BxPxV``: optional packed allow-mask per (query, probe) covering only that cluster's words
    (bit j of word v = item 32 v + j of the cluster), V >= max cluster tiles * block_n / 32.

    Selection: each (query, probed cluster) keeps the ``per_bin`` best of each of ``num_chunks * block_n``
    bins (cluster c's bins hold ceil(tiles_c / num_chunks) items): exact when that is <= ``per_bin`` for
    every cluster; ``choose_ivf_selection`` sizes both from k. ``num_chunks=1, per_bin=2`` (the defaults)
    keeps at most 2 T items per cluster.
    """
    b, d = q_BxD.shape
    num_clusters = cluster_tile_start_L.shape[0]
    dp = padded_dim(d)
    slot_BxP, work_cluster_X, work_valid_X, slot_query_R = group_pairs_by_cluster(
        probes_BxP, num_clusters, block_q
    )
    num_work = work_cluster_X.shape[0]
    q = _pad_axis(q_BxD.astype(jnp.int8), 1, dp)
    q_slots_RxD = jnp.where(slot_query_R[:, None] >= 0, q[jnp.maximum(slot_query_R, 0)], 0).astype(jnp.int8)
    tile_start_X = jnp.where(work_valid_X, cluster_tile_start_L[work_cluster_X], 0).astype(jnp.int32)
    num_tiles_X = jnp.where(work_valid_X, cluster_num_tiles_L[work_cluster_X], 0).astype(jnp.int32)
    items = _pad_axis(items_sorted_NxD.astype(jnp.int8), 1, dp)
    n = items.shape[0]
    full = lambda shape: pl.BlockSpec(shape, lambda w: (0,) * len(shape))  # noqa: E731
    args = [
        tile_start_X,
        num_tiles_X,
        q_slots_RxD,
        items,
        item_scales_sorted_N.astype(jnp.float32),
        item_ids_sorted_N.astype(jnp.int32),
    ]
    in_specs = [
        full((num_work,)),
        full((num_work,)),
        pl.BlockSpec((block_q, dp), lambda w: (w, 0)),
        full((n, dp)),
        full((n,)),
        full((n,)),
    ]
    has_mask = mask_BxPxV is not None
    if has_mask:
        words = mask_BxPxV
        if words.dtype == jnp.uint32:
            words = lax.bitcast_convert_type(words, jnp.int32)
        v = _next_pow2(max(words.shape[2], block_n // 32))
        words = _pad_axis(words.astype(jnp.int32), 2, v)
        mask_slots = (
            jnp.zeros((num_work * block_q, v), jnp.int32).at[slot_BxP.reshape(-1)].set(words.reshape(-1, v))
        )
        args.append(mask_slots)
        in_specs.append(pl.BlockSpec((block_q, v), lambda w: (w, 0)))
    kernel = functools.partial(
        _ivf_kernel, block_n=block_n, per_bin=per_bin, num_chunks=num_chunks, has_mask=has_mask
    )
    width = num_chunks * block_n * per_bin
    out_spec = pl.BlockSpec((block_q, width), lambda w: (w, 0))
    rows = num_work * block_q
    cand_v, cand_i = pl.pallas_call(
        kernel,
        grid=(num_work,),
        in_specs=in_specs,
        out_specs=[out_spec, out_spec],
        out_shape=[
            jax.ShapeDtypeStruct((rows, width), jnp.float32),
            jax.ShapeDtypeStruct((rows, width), jnp.int32),
        ],
        compiler_params=_compiler_params(num_warps, block_q, block_n, per_bin),
        interpret=interpret,
        name="int8_ann_ivf",
    )(*args)
    p = probes_BxP.shape[1]
    cand_v = cand_v[slot_BxP].reshape(b, p * width)
    cand_i = cand_i[slot_BxP].reshape(b, p * width)
    return _merge(cand_v, cand_i, q_scales_B.astype(jnp.float32), k, block_n, per_bin, return_exact)


# ------------------------------------------------------------------------------------------ references


def int8_scores_reference(q_BxD, items_NxD, item_scales_N) -> jax.Array:
    """Exact int32 dots, then the same float32 scaling as the kernel (before the query scale).

    Up to D = 1024 the dots run as a float32 GEMM at HIGHEST precision, which is exact there (every partial
    sum is an integer of magnitude <= 128^2 D <= 2^24, for any int8 values): XLA's GPU lowers this int32
    dot_general as a reduce fusion, which at B = 128, 32k items compiled for 2 min 49 s and ran for minutes
    on an H200 (2026-12-03). Beyond that the int32 dot stays, slow but exact."""
    acc = jnp.float32 if q_BxD.shape[1] * 128 * 128 <= (1 << 24) else jnp.int32
    dots = lax.dot_general(
        q_BxD.astype(acc),
        items_NxD.astype(acc),
        (((1,), (1,)), ((), ())),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=acc,
    )
    return dots.astype(jnp.float32) * item_scales_N.astype(jnp.float32)[None, :]


def unpack_mask_reference(mask_BxW: jax.Array, n: int) -> jax.Array:
    words = mask_BxW.astype(jnp.uint32)
    bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return bits.reshape(words.shape[0], -1)[:, :n] != 0


def int8_ann_reference(q_BxD, q_scales_B, items_NxD, item_scales_N, mask_BxW=None, *, k: int):
    """Plain-JAX definition: exact int32 scores, mask -> -inf, lax.top_k, query scale, id -1 for -inf."""
    scores = int8_scores_reference(q_BxD, items_NxD, item_scales_N)
    if mask_BxW is not None:
        scores = jnp.where(unpack_mask_reference(mask_BxW, items_NxD.shape[0]), scores, -jnp.inf)
    vals, ids = lax.top_k(scores, k)
    ids = jnp.where(jnp.isneginf(vals), -1, ids).astype(jnp.int32)
    return vals * q_scales_B.astype(jnp.float32)[:, None], ids
