"""LIME-XOR link-side attention op: the links' read of the history (``recjax.layers.lime`` calls it).

``xor_link_attention(q_links_xRxHxA, k_hist_xLxHxA, v_hist_xLxHxV, valid_xL, norm_length, bias_xHxRxL=None,
impl=...)`` -> (..., R, H, V) float32, ``sum_l valid * silu(q_r . k_l + bias) / norm_length * v_l``.
Leading dims ``x`` broadcast between the arguments (a history shared by K requests has K = 1).

Implementations:
- ``"xla"``: two einsums with the (…, H, R, L) weights in between (the layer's original form).
- ``"pallas"``: ``pallas_kernels.lime_xor`` (history streamed in tiles, weights kept on chip; interpret mode
  off a GPU). The leading dims are broadcast and flattened first, so a shared history is read once per
  request.
- ``"reference"``: the kernel module's HIGHEST-precision definition.
``"auto"``: xla everywhere for now: the kernel has run only in interpret mode (docs/LIME.md), and is chosen
explicitly (``LimeConfig.xor_impl``; ``experiments/bench/lime.py --models lime_xor_pallas``) until its GPU
numbers are in.

Letters: R links, L history, H heads, A q/k dim, V value dim, x leading dims.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from pallas_kernels import lime_xor as kernel
from recjax import validation
from recjax.ops import dispatch

IMPLS = dispatch.IMPLS


def _xla(q, k, v, valid, norm_length, bias):
    logits = jnp.einsum("...rha,...lha->...hrl", q, k)
    if bias is not None:
        logits = logits + bias
    w_xHxRxL = jnp.where(valid[..., None, None, :], jax.nn.silu(logits) / norm_length, 0.0)
    return jnp.einsum("...hrl,...lhv->...rhv", w_xHxRxL, v)


def xor_link_attention(
    q_links_xRxHxA: jax.Array,
    k_hist_xLxHxA: jax.Array,
    v_hist_xLxHxV: jax.Array,
    valid_xL: jax.Array,
    norm_length: int,
    bias_xHxRxL: jax.Array | None = None,
    *,
    impl: str = "auto",
) -> jax.Array:
    """Jittable; see the module docstring."""
    R, H, A = q_links_xRxHxA.shape[-3:]
    validation.check_positive("norm_length", norm_length)
    validation.check_shape("k_hist_xLxHxA", k_hist_xLxHxA, (None,) * (k_hist_xLxHxA.ndim - 2) + (H, A))
    L = k_hist_xLxHxA.shape[-3]
    validation.check_shape("v_hist_xLxHxV", v_hist_xLxHxV, (None,) * (v_hist_xLxHxV.ndim - 3) + (L, H, None))
    validation.check_shape("valid_xL", valid_xL, (None,) * (valid_xL.ndim - 1) + (L,))
    if bias_xHxRxL is not None:
        validation.check_shape("bias_xHxRxL", bias_xHxRxL, (None,) * (bias_xHxRxL.ndim - 3) + (H, R, L))
    name = "xla" if impl == "auto" else dispatch.resolve_impl(impl, IMPLS)
    if name == "xla":
        return _xla(q_links_xRxHxA, k_hist_xLxHxA, v_hist_xLxHxV, valid_xL, norm_length, bias_xHxRxL)
    V = v_hist_xLxHxV.shape[-1]
    shapes = [
        q_links_xRxHxA.shape[:-3],
        k_hist_xLxHxA.shape[:-3],
        v_hist_xLxHxV.shape[:-3],
        valid_xL.shape[:-1],
    ]
    if bias_xHxRxL is not None:
        shapes.append(bias_xHxRxL.shape[:-3])
    lead = jnp.broadcast_shapes(*shapes)

    def flat(x, tail):  # broadcast the leading dims, flatten them to one batch dim
        return jnp.broadcast_to(x, lead + x.shape[len(x.shape) - tail :]).reshape((-1,) + x.shape[-tail:])

    q = jnp.moveaxis(flat(q_links_xRxHxA, 3), 2, 1)  # (B, H, R, A)
    k = jnp.moveaxis(flat(k_hist_xLxHxA, 3), 2, 1)  # (B, H, L, A)
    v = jnp.moveaxis(flat(v_hist_xLxHxV, 3), 2, 1)  # (B, H, L, V)
    valid = flat(valid_xL, 1)
    bias = None if bias_xHxRxL is None else flat(bias_xHxRxL, 3)
    if name == "reference":
        out = kernel.xor_link_attention_reference(q, k, v, valid, bias, norm_length=norm_length)
    else:
        out = _pallas(q, k, v, valid, bias, norm_length)
    return jnp.moveaxis(out, 1, 2).reshape(lead + (R, H, V))  # (..., R, H, V)


# The kernel has no reverse-mode rule: the forward runs it, the backward is the definition's VJP (XLA), so
# a model with xor_impl="pallas" trains (the saving is the forward's; a backward kernel is not written).
@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _pallas(q, k, v, valid, bias, norm_length):
    interpret = not dispatch.pallas_supported()
    return kernel.xor_link_attention(q, k, v, valid, bias, norm_length=norm_length, interpret=interpret)


def _pallas_fwd(q, k, v, valid, bias, norm_length):
    return _pallas(q, k, v, valid, bias, norm_length), (q, k, v, valid, bias)


def _pallas_bwd(norm_length, saved, g):
    q, k, v, valid, bias = saved

    def definition(q, k, v, bias):
        return kernel.xor_link_attention_reference(q, k, v, valid, bias, norm_length=norm_length)

    dq, dk, dv, dbias = jax.vjp(definition, q, k, v, bias)[1](g)
    return dq, dk, dv, None, dbias


_pallas.defvjp(_pallas_fwd, _pallas_bwd)
