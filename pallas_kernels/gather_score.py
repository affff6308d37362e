"""Gather + score (MFLI rerank), Pallas (Triton lowering): scores_BxC[b, c] = <q_b, table[rows[b, c]]>.

Each query has its own candidate rows (the items of its selected clusters), so the work is a batched
gather-matvec, memory-bound: B C D table elements read once, no B x C x D intermediate in HBM. Rows < 0
are padding and score -inf. One program scores ``block_c`` candidates of one query: it loads their row ids,
gathers the (block_c, D) rows straight from HBM (pointer gather, as ``grouped_matmul``'s token gather),
multiplies by the query in float32 and reduces over D. The grid's fastest axis is the candidate block, so
the programs of one query run together and share the query row.

Letters: B queries, C candidates per query, R table rows, D dim (a power of two for the Triton block).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _kernel(q_ref, rows_ref, table_ref, out_ref, *, num_rows):
    rows = rows_ref[0, :]
    valid = rows >= 0
    x = table_ref[jnp.clip(rows, 0, num_rows - 1), :].astype(jnp.float32)  # (block_c, D) gather
    q = q_ref[0, :].astype(jnp.float32)
    s = jnp.sum(x * q[None, :], axis=1)
    out_ref[0, :] = jnp.where(valid, s, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("block_c", "num_warps", "interpret"))
def gather_score(
    queries_BxD: jax.Array,
    table_RxD: jax.Array,
    rows_BxC: jax.Array,
    *,
    block_c: int = 128,
    num_warps: int = 4,
    interpret: bool = False,
) -> jax.Array:
    """(B, C) float32 scores; C is padded to a multiple of ``block_c`` inside (padding rows -1)."""
    b, d = queries_BxD.shape
    c = rows_BxC.shape[1]
    if d & (d - 1):
        raise ValueError(f"D: expected a power of two (Triton block), got {d}")
    cp = -(-c // block_c) * block_c
    rows = jnp.pad(rows_BxC.astype(jnp.int32), ((0, 0), (0, cp - c)), constant_values=-1)
    out = pl.pallas_call(
        functools.partial(_kernel, num_rows=table_RxD.shape[0]),
        grid=(b, cp // block_c),
        in_specs=[
            pl.BlockSpec((1, d), lambda i, j: (i, 0)),
            pl.BlockSpec((1, block_c), lambda i, j: (i, j)),
            pl.BlockSpec(table_RxD.shape, lambda i, j: (0, 0)),
        ],
        out_specs=pl.BlockSpec((1, block_c), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((b, cp), jnp.float32),
        interpret=interpret,
        compiler_params=_compiler_params(num_warps),
        name="gather_score",
    )(queries_BxD, rows, table_RxD)
    return out[:, :c]


def _compiler_params(num_warps: int):
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=1)


def gather_score_reference(queries_BxD, table_RxD, rows_BxC) -> jax.Array:
    """Plain JAX: gather (B, C, D), float32 HIGHEST-precision contraction, -inf for rows < 0."""
    x = table_RxD[jnp.maximum(rows_BxC, 0)].astype(jnp.float32)
    s = jnp.einsum("bcd,bd->bc", x, queries_BxD.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return jnp.where(rows_BxC >= 0, s, -jnp.inf)
