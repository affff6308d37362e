"""Expert parallelism: experts sharded over a mesh axis, tokens exchanged with all-to-all (``jax.shard_map``).

``expert_parallel_ffn(x_LxD, expert_ids_LxK, weights_LxK, w_gate, w_up, w_down, mesh=..., axis="expert")``
computes the same y_LxD as ``recjax.ops.grouped_matmul.moe_expert_ffn`` with tokens split over ``axis``
(L / N per device) and experts split over the same axis (E / N per device). Per device:
1. sort the local (token, slot) assignments by destination device (argsort + searchsorted, no atomics) and
   gather them into a send buffer (N, C, D) with their local expert ids (id E/N marks an empty slot);
2. ``all_to_all`` the buffers; run the local experts on the received (N*C) rows with the routed expert op
   (index dispatch on the device: empty slots are dropped, no compute);
3. ``all_to_all`` the outputs back, and combine each token's k results with its routing weights by gathers.
C = L/N * k (dropless: a device may send all its assignments to one device) unless ``capacity`` is given;
then assignments past C per destination are dropped (contribute zero), as in capacity-based EP.
Gradients flow through both all-to-alls (their transpose is the reverse all-to-all).

Letters: L tokens, D model dim, F expert hidden, E experts, K top-k, N devices on the axis, C slots per pair.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from recjax.ops import grouped_matmul as gmm_ops


def _local_ep(x, ids, weights, wg, wu, w2, *, axis, capacity, activation, impl):
    n = jax.lax.axis_size(axis)
    n_tok, k = ids.shape
    e_loc = wg.shape[0]
    a_count = n_tok * k
    cap = a_count if capacity is None else capacity
    ids_A = ids.reshape(-1)
    dest_A = jnp.where(ids_A < e_loc * n, ids_A // e_loc, n)  # n: dropped before dispatch
    order_A = jnp.argsort(dest_A, stable=True)
    sorted_dest = dest_A[order_A]
    dev = jnp.arange(n)
    start_N = jnp.searchsorted(sorted_dest, dev, side="left")
    count_N = jnp.searchsorted(sorted_dest, dev, side="right") - start_N
    c = jnp.arange(cap)
    src_NxC = order_A[jnp.minimum(start_N[:, None] + c[None, :], a_count - 1)]
    filled_NxC = c[None, :] < count_N[:, None]
    send_x = x[src_NxC // k]  # (N, C, D): the cross-device send buffer
    send_e = jnp.where(filled_NxC, ids_A[src_NxC] % e_loc, e_loc).astype(jnp.int32)
    recv_x = jax.lax.all_to_all(send_x, axis, 0, 0)
    recv_e = jax.lax.all_to_all(send_e, axis, 0, 0)
    d = x.shape[1]
    out = gmm_ops.moe_expert_ffn(
        recv_x.reshape(n * cap, d),
        recv_e.reshape(n * cap, 1),
        jnp.ones((n * cap, 1), jnp.float32),
        wg,
        wu,
        w2,
        activation=activation,
        impl=impl,
    )
    back_NxCxD = jax.lax.all_to_all(out.reshape(n, cap, d), axis, 0, 0)
    # each assignment's slot in the buffer of its destination: rank within the destination bucket
    rank_A = jnp.argsort(order_A)
    slot_A = rank_A - start_N[jnp.minimum(dest_A, n - 1)]
    kept_A = (dest_A < n) & (slot_A < cap)
    y_AxD = back_NxCxD[jnp.minimum(dest_A, n - 1), jnp.clip(slot_A, 0, cap - 1)].astype(jnp.float32)
    w_A = jnp.where(kept_A, weights.reshape(-1).astype(jnp.float32), 0.0)
    return jnp.sum((y_AxD * w_A[:, None]).reshape(n_tok, k, d), axis=1).astype(x.dtype)


def expert_parallel_ffn(
    x_LxD: jax.Array,
    expert_ids_LxK: jax.Array,
    weights_LxK: jax.Array,
    w_gate_ExDxF: jax.Array,
    w_up_ExDxF: jax.Array | None,
    w_down_ExFxD: jax.Array,
    *,
    mesh: jax.sharding.Mesh,
    axis: str = "expert",
    capacity: int | None = None,
    activation: str = "swiglu",
    impl: str = "auto",
) -> jax.Array:
    """Routed expert FFN, experts and tokens sharded over ``mesh`` axis ``axis`` (see module docstring)."""
    gmm_ops.validate_ffn_inputs(
        x_LxD, expert_ids_LxK, weights_LxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, activation
    )
    if axis not in mesh.axis_names:
        raise ValueError(f"axis: expected one of the mesh axes {mesh.axis_names}, got {axis!r}")
    n = mesh.shape[axis]
    n_tok, num_experts = x_LxD.shape[0], w_gate_ExDxF.shape[0]
    if num_experts % n or n_tok % n:
        raise ValueError(
            f"expert parallel over {n} devices needs E={num_experts} and L={n_tok} divisible by {n}"
        )
    if capacity is not None and capacity < 1:
        raise ValueError(f"capacity: expected >= 1 or None, got {capacity}")
    fn = functools.partial(_local_ep, axis=axis, capacity=capacity, activation=activation, impl=impl)
    if w_up_ExDxF is None:
        w_up_ExDxF = jnp.zeros((n, 1, 1), w_gate_ExDxF.dtype)  # placeholder shard for "silu"; never read
        fn_inner = fn

        def fn(x, ids, w, wg, wu, w2):  # noqa: F811 - drop the placeholder
            del wu
            return fn_inner(x, ids, w, wg, None, w2)

    tok, exp = P(axis), P(axis)
    return jax.shard_map(
        fn, mesh=mesh, in_specs=(tok, tok, tok, exp, exp, exp), out_specs=tok, check_vma=False
    )(x_LxD, expert_ids_LxK, weights_LxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
