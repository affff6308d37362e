"""LIME-XOR link-side attention, Pallas (Triton lowering): the links' read of the history,

    out[b, h, r, :] = sum_l valid[b, l] * silu(q[b, h, r] . k[b, h, l] + bias[b, h, r, l]) / N * v[b, h, l, :]

the O(R L) half of XOR attention that grows with the history (the history's read of the R links is
O(L R) pointwise work per item, which XLA fuses well). XLA materialises the (B, H, R, L) logits and weights
in HBM between its einsums; here each program streams one tile of ``block_l`` history rows (k, v, valid,
the optional bias) once, keeps the R x block_l weights on chip and accumulates an (R, V) partial, so the
bytes are the history's k and v (plus the bias when given) read once. The grid is (B, H, S) with the
history split into S chunks of ``block_l`` (split-L, so a batch of 4 still fills the card); the S partials
are summed by XLA (B H S R V floats, small).

Triton's ``dot`` needs every dim >= 16 and powers of two: R, A and V are zero-padded to the next power of two
>= 16 (exact: zero q/k columns add nothing to the logits, zero v columns give outputs that are sliced away,
padded links are sliced away), L to a multiple of ``block_l`` with valid = 0.

Letters: B batch (requests), H heads, R links, L history, A q/k dim, V value dim, S history chunks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (int(n) - 1).bit_length())


def _kernel(*refs, inv_norm, has_bias):
    if has_bias:
        q_ref, k_ref, v_ref, valid_ref, bias_ref, out_ref = refs
    else:
        q_ref, k_ref, v_ref, valid_ref, out_ref = refs
    q = q_ref[0, 0, :, :].astype(jnp.float32)  # (R, A)
    k = k_ref[0, 0, :, :].astype(jnp.float32)  # (block_l, A)
    logits = jax.lax.dot_general(
        q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )  # (R, block_l)
    if has_bias:
        logits = logits + bias_ref[0, 0, :, :].astype(jnp.float32)
    valid = valid_ref[0, :] > 0
    w = jnp.where(valid[None, :], jax.nn.silu(logits) * inv_norm, 0.0)
    v = v_ref[0, 0, :, :].astype(jnp.float32)  # (block_l, V)
    out_ref[0, 0, 0, :, :] = jnp.dot(w, v, preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("norm_length", "block_l", "num_warps", "interpret"))
def xor_link_attention(
    q_BxHxRxA: jax.Array,
    k_BxHxLxA: jax.Array,
    v_BxHxLxV: jax.Array,
    valid_BxL: jax.Array,
    bias_BxHxRxL: jax.Array | None = None,
    *,
    norm_length: int,
    block_l: int = 128,
    num_warps: int = 4,
    interpret: bool = False,
) -> jax.Array:
    """(B, H, R, V) float32; see the module docstring. Shapes are the caller's to check (``recjax.ops``)."""
    if block_l < 16 or block_l & (block_l - 1):
        raise ValueError(f"block_l: expected a power of two >= 16 (Triton block), got {block_l}")
    B, H, R, A = q_BxHxRxA.shape
    L, V = k_BxHxLxA.shape[2], v_BxHxLxV.shape[3]
    Rp, Ap, Vp = _pow2_at_least_16(R), _pow2_at_least_16(A), _pow2_at_least_16(V)
    S = -(-L // block_l)
    Lp = S * block_l
    q = jnp.pad(q_BxHxRxA, ((0, 0), (0, 0), (0, Rp - R), (0, Ap - A)))
    k = jnp.pad(k_BxHxLxA, ((0, 0), (0, 0), (0, Lp - L), (0, Ap - A)))
    v = jnp.pad(v_BxHxLxV, ((0, 0), (0, 0), (0, Lp - L), (0, Vp - V)))
    valid = jnp.pad(valid_BxL.astype(jnp.int32), ((0, 0), (0, Lp - L)))
    args = [q, k, v, valid]
    in_specs = [
        pl.BlockSpec((1, 1, Rp, Ap), lambda b, h, s: (b, h, 0, 0)),
        pl.BlockSpec((1, 1, block_l, Ap), lambda b, h, s: (b, h, s, 0)),
        pl.BlockSpec((1, 1, block_l, Vp), lambda b, h, s: (b, h, s, 0)),
        pl.BlockSpec((1, block_l), lambda b, h, s: (b, s)),
    ]
    if bias_BxHxRxL is not None:
        args.append(jnp.pad(bias_BxHxRxL, ((0, 0), (0, 0), (0, Rp - R), (0, Lp - L))))
        in_specs.append(pl.BlockSpec((1, 1, Rp, block_l), lambda b, h, s: (b, h, 0, s)))
    partial_BxHxSxRxV = pl.pallas_call(
        functools.partial(_kernel, inv_norm=1.0 / norm_length, has_bias=bias_BxHxRxL is not None),
        grid=(B, H, S),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((1, 1, 1, Rp, Vp), lambda b, h, s: (b, h, s, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((B, H, S, Rp, Vp), jnp.float32),
        interpret=interpret,
        compiler_params=_compiler_params(num_warps),
        name="lime_xor_links",
    )(*args)
    return jnp.sum(partial_BxHxSxRxV, axis=2)[:, :, :R, :V]


def _compiler_params(num_warps: int):
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=2)


def xor_link_attention_reference(
    q_BxHxRxA, k_BxHxLxA, v_BxHxLxV, valid_BxL, bias_BxHxRxL=None, *, norm_length: int
) -> jax.Array:
    """Plain JAX, HIGHEST-precision float32 einsums: the definition above."""
    hi = jax.lax.Precision.HIGHEST
    f32 = jnp.float32
    logits = jnp.einsum("bhra,bhla->bhrl", q_BxHxRxA.astype(f32), k_BxHxLxA.astype(f32), precision=hi)
    if bias_BxHxRxL is not None:
        logits = logits + bias_BxHxRxL.astype(f32)
    w = jnp.where(valid_BxL[:, None, None, :], jax.nn.silu(logits) / norm_length, 0.0)
    return jnp.einsum("bhrl,bhlv->bhrv", w, v_BxHxLxV.astype(f32), precision=hi)
