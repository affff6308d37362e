"""Bit-sliced Bloom filter evaluation of compiled boolean plans (SilverTorch), Pallas (Triton lowering).

Index layout (bit-sliced): ``index_MxW`` int32, bit j of word ``index[m, w]`` is Bloom bit m of item
32 w + j. A term with hash rows h_1..h_K "maybe matches" item i iff bits h_1..h_K of item i are all set,
so one AND of K words tests 32 items at once.

Plan (fixed shape, compiled once per query on the host): a CNF, AND over C clauses of OR over T literals,
each literal = a kind and K Bloom rows:
  kind 0 FALSE (padding inside a clause), 1 term test, 2 NOT term test, 3 TRUE (padding clause / empty
  query / a negated literal in ``superset`` mode).
Output: packed allow-mask words, same bit convention as the index (the Int8 ANN kernel reads it as is).

Each program evaluates one plan row (query) over ``block_w`` words (32 * block_w items) starting at that
row's word offset: offset 0 for brute force, the probed cluster's first word for IVF (probe, then filter:
only the words of probed clusters are read). The grid's first (fastest) axis is the query row, so programs
running at the same time read the same index tile and it is served from L2 for all queries of the batch.

Letters: M Bloom bits per item (index rows), W words (items / 32), R plan rows, C clauses, T literals per
clause, K hashes, V output words per row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

KIND_FALSE, KIND_TERM, KIND_NOT_TERM, KIND_TRUE = 0, 1, 2, 3


def _literal(kind, test_V):
    ones = jnp.full_like(test_V, -1)
    return jnp.where(
        kind == KIND_TERM,
        test_V,
        jnp.where(kind == KIND_NOT_TERM, ~test_V, jnp.where(kind == KIND_TRUE, ones, 0)),
    )


def _bloom_kernel(offset_ref, rows_ref, kinds_ref, index_ref, out_ref, *, block_w, clauses, literals, hashes):
    r = pl.program_id(0)
    start = offset_ref[r] + pl.program_id(1) * block_w
    result = jnp.full((block_w,), -1, jnp.int32)
    for c in range(clauses):
        clause = jnp.zeros((block_w,), jnp.int32)
        for t in range(literals):
            test = jnp.full((block_w,), -1, jnp.int32)
            for h in range(hashes):
                row = rows_ref[0, c, t, h]
                test = test & index_ref[row, pl.ds(start, block_w)]
            clause = clause | _literal(kinds_ref[0, c, t], test)
        result = result & clause
    out_ref[0, :] = result


@functools.partial(jax.jit, static_argnames=("num_words", "block_w", "interpret"))
def bloom_filter_words(
    index_MxW: jax.Array,
    plan_rows_RxCxTxK: jax.Array,
    plan_kinds_RxCxT: jax.Array,
    word_offset_R: jax.Array | None = None,
    *,
    num_words: int,
    block_w: int = 256,
    interpret: bool = False,
) -> jax.Array:
    """Evaluates R plans, each over ``num_words`` words from its offset. Returns (R, num_words) int32.

    The index must hold at least ``max(offset) + ceil(num_words / block_w) * block_w`` words (the
    recjax builder pads it); words past the real items evaluate to whatever their bits say (zero bits).
    """
    r, c, t, k = plan_rows_RxCxTxK.shape
    tiles = -(-num_words // block_w)
    if word_offset_R is None:
        word_offset_R = jnp.zeros((r,), jnp.int32)
    need = tiles * block_w
    index = index_MxW
    if index.shape[1] < need:  # brute force on an unpadded index
        index = jnp.pad(index, ((0, 0), (0, need - index.shape[1])))
    kernel = functools.partial(_bloom_kernel, block_w=block_w, clauses=c, literals=t, hashes=k)
    out = pl.pallas_call(
        kernel,
        grid=(r, tiles),
        in_specs=[
            pl.BlockSpec((r,), lambda i, j: (0,)),
            pl.BlockSpec((1, c, t, k), lambda i, j: (i, 0, 0, 0)),
            pl.BlockSpec((1, c, t), lambda i, j: (i, 0, 0)),
            pl.BlockSpec(index.shape, lambda i, j: (0, 0)),
        ],
        out_specs=pl.BlockSpec((1, block_w), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((r, need), jnp.int32),
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="bloom_filter",
    )(
        word_offset_R.astype(jnp.int32),
        plan_rows_RxCxTxK.astype(jnp.int32),
        plan_kinds_RxCxT.astype(jnp.int32),
        index.astype(jnp.int32),
    )
    return out[:, :num_words]


def _compiler_params():
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4, num_stages=1)


def bloom_filter_words_reference(
    index_MxW, plan_rows_RxCxTxK, plan_kinds_RxCxT, word_offset_R=None, *, num_words: int
) -> jax.Array:
    """Plain-JAX evaluation of the same plans (gathers the K rows per literal)."""
    r = plan_rows_RxCxTxK.shape[0]
    if word_offset_R is None:
        word_offset_R = jnp.zeros((r,), jnp.int32)
    cols_RxV = word_offset_R[:, None] + jnp.arange(num_words)[None, :]
    index = jnp.pad(index_MxW, ((0, 0), (0, max(0, int(num_words)))))  # reads past the end are zero bits
    words_RxCxTxKxV = index[plan_rows_RxCxTxK[..., None], cols_RxV[:, None, None, None, :]]
    test_RxCxTxV = lax.reduce(words_RxCxTxKxV, jnp.int32(-1), lax.bitwise_and, (3,))
    lit = _literal(plan_kinds_RxCxT[..., None], test_RxCxTxV)
    clause_RxCxV = lax.reduce(lit, jnp.int32(0), lax.bitwise_or, (2,))
    return lax.reduce(clause_RxCxV, jnp.int32(-1), lax.bitwise_and, (1,))
