"""Symmetric int8 quantization of embeddings for the Int8 ANN index (SilverTorch).

Each row x (an item or a query) is stored as ``values = round(x / scale)`` clipped to [-127, 127] with
``scale = max|x| / 127`` (one float32 per row). A query-item score is then ``dot_int32(q, v) * scale_item *
scale_query`` where the int32 dot is exact, so every int8 path can be compared bit-exactly with an int32
reference. -128 is never produced, so negation is safe and |dot| <= 127 * 127 * D < 2**24 for D <= 1024
(exact in float32).

All-zero rows get scale 1.0 and values 0 (score 0 for every pair).

Letters: N rows, D embedding dim.
Deviation from the paper: SilverTorch supports a global or per-item scale; we always use per-row scales
(a global scale is the special case of equal scales and is not exposed separately).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from recjax import validation

INT8_MAX = 127


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Int8Embeddings:
    """``values_NxD`` int8 and ``scales_N`` float32 (> 0); ``dequantize()`` gives back approximately x."""

    values_NxD: jax.Array
    scales_N: jax.Array

    @property
    def num_rows(self) -> int:
        return self.values_NxD.shape[0]

    @property
    def dim(self) -> int:
        return self.values_NxD.shape[1]

    def dequantize(self) -> jax.Array:
        return self.values_NxD.astype(jnp.float32) * self.scales_N[:, None]


def _quantize_rows(x_NxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = x_NxD.astype(jnp.float32)
    amax_N = jnp.max(jnp.abs(x), axis=1)
    scales_N = jnp.where(amax_N > 0, amax_N / INT8_MAX, 1.0).astype(jnp.float32)
    values = jnp.clip(jnp.round(x / scales_N[:, None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return values, scales_N


_quantize_rows_jit = jax.jit(_quantize_rows)


def quantize_int8(x_NxD: jax.Array, *, name: str = "x_NxD") -> Int8Embeddings:
    """Per-row symmetric int8 quantization of float embeddings (items or queries). NaN/inf rejected."""
    validation.check_shape(name, x_NxD, (None, None))
    validation.check_dtype(name, x_NxD, "f")
    validation.check_finite(name, x_NxD)
    if x_NxD.shape[1] == 0:
        raise ValueError(f"{name}: expected D >= 1, got shape {tuple(x_NxD.shape)}")
    values, scales = _quantize_rows_jit(jnp.asarray(x_NxD))
    return Int8Embeddings(values, scales)


def quantize_items(items_NxD: jax.Array) -> Int8Embeddings:
    """Item side: one scale per item."""
    return quantize_int8(items_NxD, name="items_NxD")


def quantize_queries(queries_BxD: jax.Array) -> Int8Embeddings:
    """Query side: one scale per query (it does not change the ranking, only the returned score units)."""
    return quantize_int8(queries_BxD, name="queries_BxD")


def quantization_error_bound(emb: Int8Embeddings) -> jax.Array:
    """Per-row bound on |x - dequantize(x)| (half a quantization step)."""
    return emb.scales_N / 2
