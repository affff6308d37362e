"""Gather + score op (MFLI rerank): ``gather_score(queries_BxD, table_RxD, rows_BxC, impl=...)`` -> (B, C)
float32, score = <q_b, table[rows[b, c]]>, -inf where the row is < 0 (padding).

Implementations:
- ``"pallas"``: the kernel (``pallas_kernels.gather_score``; interpret mode off a GPU). Needs D a power
  of two.
- ``"xla"``: ``table[rows] * q`` summed over D in float32 (XLA fuses the gather into the reduction).
- ``"reference"``: the kernel module's plain-JAX definition (HIGHEST-precision einsum).
``"auto"``: pallas on a supporting GPU when D is a power of two and R * D < 2^31 (int32 offsets), xla
elsewhere.

Letters: B queries, C candidates per query, R table rows, D dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import gather_score as kernel
from recjax import validation
from recjax.ops import dispatch

IMPLS = dispatch.IMPLS


def _xla(queries_BxD, table_RxD, rows_BxC):
    x = table_RxD[jnp.maximum(rows_BxC, 0)].astype(jnp.float32)
    s = jnp.sum(x * queries_BxD.astype(jnp.float32)[:, None, :], axis=2)
    return jnp.where(rows_BxC >= 0, s, -jnp.inf)


def resolve(impl: str, dim: int) -> str:
    name = dispatch.resolve_impl(impl, IMPLS)
    if impl == "auto" and name == "pallas" and dim & (dim - 1):
        return "xla"
    return name


def gather_score(
    queries_BxD: jax.Array, table_RxD: jax.Array, rows_BxC: jax.Array, *, impl: str = "auto"
) -> jax.Array:
    """Jittable; shapes and dtypes are checked here (row ranges are the caller's: the table's index)."""
    validation.check_shape("table_RxD", table_RxD, (None, None))
    d = table_RxD.shape[1]
    validation.check_shape("queries_BxD", queries_BxD, (None, d))
    validation.check_shape("rows_BxC", rows_BxC, (queries_BxD.shape[0], None))
    validation.check_dtype("queries_BxD", queries_BxD, "f")
    validation.check_dtype("table_RxD", table_RxD, "f")
    validation.check_dtype("rows_BxC", rows_BxC, "iu")
    name = resolve(impl, d)
    if name == "pallas" and table_RxD.shape[0] * d >= 2**31:
        # The kernel gathers with int32 element offsets (row * D): a larger table would wrap around.
        if impl == "pallas":
            raise ValueError(f"table_RxD: the pallas kernel needs R * D < 2^31, got {table_RxD.shape}")
        name = "xla"
    if name == "reference":
        return kernel.gather_score_reference(queries_BxD, table_RxD, rows_BxC)
    if name == "xla":
        return _xla(queries_BxD, table_RxD, rows_BxC)
    return kernel.gather_score(queries_BxD, table_RxD, rows_BxC, interpret=not dispatch.pallas_supported())
