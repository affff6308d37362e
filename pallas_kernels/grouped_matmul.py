"""MoEBlaze-style expert FFN: grouped GEMMs that gather rows by token index, fused SwiGLU, fused combine.

Letters: L tokens, D model dim, F expert hidden dim, E experts, K top-k slots, G = E*K (expert, slot) groups,
P padded dispatch rows (static upper bound), T = P / bm row tiles, Ts tiles per slot (static bound).

Dispatch by indices only (no permuted copy of the activations): :func:`make_dispatch_plan` sorts the L*K
(token, slot) assignments by group g = expert*K + slot (argsort + searchsorted + cumsum, no atomics) and lays
them out in a padded row space where every group starts on a multiple of ``bm``. Each row p carries
``token_P[p]`` (the token it reads, L for padding) and ``weight_P[p]``; every row tile belongs to exactly one
expert, so a tile is one dense GEMM against one expert's weights. ``pos_LxK`` is the inverse map (assignment
-> padded row), ``slot_tiles_KxTs`` the combine map (the tiles of each slot).

Kernels (Triton-lowering ``pl.pallas_call``; ``jnp.dot`` in bf16 with float32 accumulation, which Triton
lowers to wgmma on Hopper):
- ``_up_kernel``: rows gathered from the unpermuted x_LxD; both projections and SiLU(a)*b in registers;
  only h_PxF is written.
- ``_combine_kernel``: h @ W2[e], times the routing weight, added into y at the token's row. Combine without
  atomics: launch s handles only the tiles of slot s; a token appears exactly once per slot, so within a
  launch every output row is owned by one program, and the K launches run in order on the aliased output
  (read-add-write). Padding rows write to an extra trash row L, so no masked scatter is needed.
- backward: ``_bwd_act_kernel`` recomputes a, b (by default nothing but the routing plan is saved by the
  forward; ``recompute=False`` saves a and b instead and skips those two GEMMs),
  forms g = dy[tok] @ W2[e]^T and writes da, db, the recomputed h and the per-row routing-weight gradient;
  ``_tgmm_kernel`` accumulates the weight gradients over each expert's contiguous tile range;
  ``_combine_kernel`` again scatters dx = da @ Wg^T + db @ Wu^T by the same indices.

Deviations from the paper: groups are (expert, slot) rather than expert so the combine needs no atomics
(costs up to E*K*(bm-1) padding rows); by default the forward stores nothing but the index maps and the
backward recomputes both projections (2 extra GEMMs; the paper recomputes only the SiLU); Triton lowering
instead of hand-written wgmma/TMA (TMA cannot gather rows on Hopper). An expert id equal to E marks a
dropped assignment (masked token, over capacity): it gets no row and no compute.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

ACTIVATIONS = ("swiglu", "silu")


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes: bm rows per tile (the dispatch padding unit), bn columns of the up / backward-activation
    kernels (2-3 accumulators), bn_out columns of the combine and weight-gradient kernels (1 accumulator), bk
    contraction chunk."""

    bm: int = 128
    bn: int = 64
    bk: int = 64
    bn_out: int = 128
    num_warps: int = 8
    num_stages: int = 3


class DispatchPlan(NamedTuple):
    token_P: jax.Array  # int32, token read by each padded row; L on padding rows
    weight_P: jax.Array  # float32 routing weight per row; 0 on padding rows
    tile_expert_T: jax.Array  # int32 expert of each row tile; E on tiles past the end
    expert_tiles_Ex2: jax.Array  # int32 [first, last+1) tile of each expert (contiguous)
    slot_tiles_KxTs: jax.Array  # int32 tiles holding slot s, -1 padded
    pos_LxK: jax.Array  # int32 padded row of assignment (token, slot): the inverse map
    load_E: jax.Array  # int32 tokens routed to each expert


def plan_sizes(num_tokens: int, num_experts: int, top_k: int, bm: int) -> tuple[int, int]:
    """(P, Ts): static bounds on padded rows and on tiles per slot."""
    groups = num_experts * top_k
    rows = num_tokens * top_k + groups * (bm - 1)
    p = -(-rows // bm) * bm
    ts = min((num_tokens + num_experts * (bm - 1)) // bm, p // bm)
    return p, ts


def make_dispatch_plan(
    expert_ids_LxK: jax.Array, weights_LxK: jax.Array, num_experts: int, bm: int
) -> DispatchPlan:
    """Index maps of the dispatch from sorts, searches and prefix sums only (no scatter, no atomics)."""
    n_tok, k = expert_ids_LxK.shape
    g_count = num_experts * k
    p_rows, ts = plan_sizes(n_tok, num_experts, k, bm)
    n_tiles = p_rows // bm
    ids_A = expert_ids_LxK.astype(jnp.int32).reshape(-1)
    kept_A = ids_A < num_experts  # id == E marks a dropped assignment: sorted last, in no group
    group_A = jnp.where(kept_A, ids_A * k + jnp.arange(n_tok * k, dtype=jnp.int32) % k, g_count)
    order_A = jnp.argsort(group_A, stable=True).astype(jnp.int32)
    sorted_group_A = group_A[order_A]
    g = jnp.arange(g_count, dtype=jnp.int32)
    start_G = jnp.searchsorted(sorted_group_A, g, side="left").astype(jnp.int32)
    size_G = jnp.searchsorted(sorted_group_A, g, side="right").astype(jnp.int32) - start_G
    padded_size_G = (size_G + bm - 1) // bm * bm
    padded_end_G = jnp.cumsum(padded_size_G).astype(jnp.int32)
    padded_start_G = padded_end_G - padded_size_G

    p = jnp.arange(p_rows, dtype=jnp.int32)
    group_P = jnp.searchsorted(padded_end_G, p, side="right").astype(jnp.int32)  # G past the end
    gc_P = jnp.minimum(group_P, g_count - 1)
    offset_P = p - padded_start_G[gc_P]
    valid_P = (group_P < g_count) & (offset_P < size_G[gc_P])
    assign_P = order_A[jnp.clip(start_G[gc_P] + offset_P, 0, n_tok * k - 1)]
    token_P = jnp.where(valid_P, assign_P // k, n_tok).astype(jnp.int32)
    weight_P = jnp.where(valid_P, weights_LxK.reshape(-1).astype(jnp.float32)[assign_P], 0.0)

    group_T = group_P[::bm]
    tile_expert_T = jnp.where(group_T < g_count, group_T // k, num_experts).astype(jnp.int32)
    tile_slot_T = jnp.where(group_T < g_count, group_T % k, k)
    first = padded_start_G[g.reshape(num_experts, k)[:, 0]] // bm
    last = padded_end_G[g.reshape(num_experts, k)[:, -1]] // bm
    expert_tiles_Ex2 = jnp.stack([first, last], axis=1).astype(jnp.int32)

    order_T = jnp.argsort(tile_slot_T, stable=True).astype(jnp.int32)
    sorted_slot_T = tile_slot_T[order_T]
    s = jnp.arange(k)
    slot_start = jnp.searchsorted(sorted_slot_T, s, side="left")
    slot_count = jnp.searchsorted(sorted_slot_T, s, side="right") - slot_start
    j = jnp.arange(ts)
    slot_tiles_KxTs = jnp.where(
        j[None, :] < slot_count[:, None],
        order_T[jnp.minimum(slot_start[:, None] + j[None, :], n_tiles - 1)],
        -1,
    ).astype(jnp.int32)

    rank_A = jnp.argsort(order_A).astype(jnp.int32)  # inverse permutation: sorted position of each assignment
    gk_A = jnp.minimum(group_A, g_count - 1)
    # a dropped assignment points at row P-1, a padding row whenever anything was dropped (weight 0, h 0)
    pos_A = jnp.where(kept_A, padded_start_G[gk_A] + rank_A - start_G[gk_A], p_rows - 1)
    load_E = size_G.reshape(num_experts, k).sum(axis=1)
    return DispatchPlan(
        token_P,
        weight_P,
        tile_expert_T,
        expert_tiles_Ex2,
        slot_tiles_KxTs,
        pos_A.reshape(n_tok, k).astype(jnp.int32),
        load_E.astype(jnp.int32),
    )


def _silu(a):
    return a * jax.nn.sigmoid(a)


def _dot(a, b, trans_a=False, trans_b=False):
    dims = (((0,) if trans_a else (1,)), ((1,) if trans_b else (0,)))
    return jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)


def _gather_rows(ref, tok, valid, n_valid_rows, cols):
    """Rows ``tok`` of a (rows, cols) ref; padding rows read row 0 and come back as zeros."""
    rows = ref[jnp.minimum(tok, n_valid_rows - 1), cols]
    return jnp.where(valid[:, None], rows, jnp.zeros_like(rows))


def _up_kernel(token_ref, tile_expert_ref, x_ref, wg_ref, *rest, n_tok, num_experts, blocks, activation):
    rest = list(rest)
    wu_ref = rest.pop(0) if activation == "swiglu" else None
    h_ref, pre_refs = rest[0], rest[1:]  # pre_refs: saved a (and b) when not recomputing
    bm, bn, bk = blocks.bm, blocks.bn, blocks.bk
    i, j = pl.program_id(0), pl.program_id(1)
    e = tile_expert_ref[i]
    tok = token_ref[pl.ds(i * bm, bm)]
    valid = tok < n_tok
    cols = pl.ds(j * bn, bn)

    @pl.when(e < num_experts)
    def _():
        def body(kk, acc):
            acc_a, acc_b = acc
            xk = _gather_rows(x_ref, tok, valid, n_tok, pl.ds(kk * bk, bk))
            acc_a += _dot(xk, wg_ref[e, pl.ds(kk * bk, bk), cols])
            if wu_ref is not None:
                acc_b += _dot(xk, wu_ref[e, pl.ds(kk * bk, bk), cols])
            return acc_a, acc_b

        zero = jnp.zeros((bm, bn), jnp.float32)
        a, b = jax.lax.fori_loop(0, x_ref.shape[1] // bk, body, (zero, zero))
        if activation == "linear":  # plain grouped GEMM, for the microbenchmark
            h = a
        else:
            h = _silu(a) * b if wu_ref is not None else _silu(a)
        h_ref[...] = h.astype(h_ref.dtype)
        for ref, v in zip(pre_refs, (a, b), strict=False):
            ref[...] = v.astype(ref.dtype)

    @pl.when(e >= num_experts)
    def _():
        for ref in (h_ref, *pre_refs):
            ref[...] = jnp.zeros((bm, bn), ref.dtype)


def _combine_kernel(
    slot_tiles_ref, tile_expert_ref, token_ref, weight_ref, *refs, n_tok, blocks, n_lhs, transpose_w, scale
):
    """y[tok] += weight * sum_i lhs_i[rows] @ W_i[e] for the tiles of one slot; y has a trash row n_tok."""
    lhs_refs, w_refs = refs[:n_lhs], refs[n_lhs : 2 * n_lhs]
    y_ref = refs[-1]  # refs[-2] is the same buffer (aliased input)
    bm, bn, bk = blocks.bm, blocks.bn_out, blocks.bk
    j, n = pl.program_id(0), pl.program_id(1)
    tile = slot_tiles_ref[j]

    @pl.when(tile >= 0)
    def _():
        e = tile_expert_ref[tile]
        rows = pl.ds(tile * bm, bm)
        cols = pl.ds(n * bn, bn)

        def body(kk, acc):
            chunk = pl.ds(kk * bk, bk)
            for lhs_ref, w_ref in zip(lhs_refs, w_refs, strict=True):
                if transpose_w:  # W_i is (E, D, F): contract with its F axis
                    acc += _dot(lhs_ref[rows, chunk], w_ref[e, cols, chunk], trans_b=True)
                else:
                    acc += _dot(lhs_ref[rows, chunk], w_ref[e, chunk, cols])
            return acc

        out = jax.lax.fori_loop(0, lhs_refs[0].shape[1] // bk, body, jnp.zeros((bm, bn), jnp.float32))
        if scale:
            out = out * weight_ref[rows][:, None]
        tok = token_ref[rows]  # padding rows hold n_tok: the trash row, so no mask is needed
        y_ref[tok, cols] = y_ref[tok, cols] + out

    del n_tok


def _bwd_act_kernel(
    token_ref,
    weight_ref,
    tile_expert_ref,
    x_ref,
    dy_ref,
    wg_ref,
    *rest,
    n_tok,
    num_experts,
    blocks,
    activation,
    saved,
):
    swiglu = activation == "swiglu"
    rest = list(rest)
    wu_ref = rest.pop(0) if swiglu else None
    w2_ref = rest.pop(0)
    a_in = rest.pop(0) if saved else None  # saved pre-activations (no recompute)
    b_in = rest.pop(0) if saved and swiglu else None
    da_ref = rest.pop(0)
    db_ref = rest.pop(0) if swiglu else None
    h_ref, dw_ref = rest
    bm, bn, bk = blocks.bm, blocks.bn, blocks.bk
    i, j = pl.program_id(0), pl.program_id(1)
    e = tile_expert_ref[i]
    tok = token_ref[pl.ds(i * bm, bm)]
    valid = tok < n_tok
    cols = pl.ds(j * bn, bn)
    outs = [r for r in (da_ref, db_ref, h_ref) if r is not None]

    @pl.when(e < num_experts)
    def _():
        def body(kk, acc, recompute=True):
            chunk = pl.ds(kk * bk, bk)
            dyk = _gather_rows(dy_ref, tok, valid, n_tok, chunk)
            if not recompute:
                return acc + _dot(dyk, w2_ref[e, cols, chunk], trans_b=True)
            acc_a, acc_b, acc_g = acc
            xk = _gather_rows(x_ref, tok, valid, n_tok, chunk)
            acc_a += _dot(xk, wg_ref[e, chunk, cols])
            if wu_ref is not None:
                acc_b += _dot(xk, wu_ref[e, chunk, cols])
            acc_g += _dot(dyk, w2_ref[e, cols, chunk], trans_b=True)
            return acc_a, acc_b, acc_g

        zero = jnp.zeros((bm, bn), jnp.float32)
        if saved:
            g = jax.lax.fori_loop(0, dy_ref.shape[1] // bk, lambda kk, acc: body(kk, acc, False), zero)
            a = a_in[pl.ds(i * bm, bm), cols].astype(jnp.float32)
            b = b_in[pl.ds(i * bm, bm), cols].astype(jnp.float32) if swiglu else zero
        else:
            a, b, g = jax.lax.fori_loop(0, x_ref.shape[1] // bk, body, (zero, zero, zero))
        sig = jax.nn.sigmoid(a)
        silu = a * sig
        dsilu = sig * (1.0 + a * (1.0 - sig))
        h = silu * b if wu_ref is not None else silu
        dw_ref[pl.ds(i * bm, bm), j] = jnp.sum(g * h, axis=1)
        dh = g * weight_ref[pl.ds(i * bm, bm)][:, None]
        if wu_ref is not None:
            da_ref[...] = (dh * b * dsilu).astype(da_ref.dtype)
            db_ref[...] = (dh * silu).astype(db_ref.dtype)
        else:
            da_ref[...] = (dh * dsilu).astype(da_ref.dtype)
        h_ref[...] = h.astype(h_ref.dtype)

    @pl.when(e >= num_experts)
    def _():
        for r in outs:
            r[...] = jnp.zeros((bm, bn), r.dtype)
        dw_ref[pl.ds(i * bm, bm), j] = jnp.zeros((bm,), jnp.float32)


def _tgmm_kernel(
    expert_tiles_ref,
    token_ref,
    weight_ref,
    lhs_ref,
    *refs,
    n_tok,
    blocks,
    lhs_gather,
    rhs_gather,
    rhs_scale,
    n_rhs,
):
    """out_i[e] = lhs[rows of e]^T @ rhs_i[rows of e]; rows are gathered by token where the flag says so."""
    rhs_refs, out_refs = refs[:n_rhs], refs[n_rhs:]
    bm, bn = blocks.bm, blocks.bn_out
    e, m, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    first, last = expert_tiles_ref[e, 0], expert_tiles_ref[e, 1]
    cols_m, cols_n = pl.ds(m * bn, bn), pl.ds(n * bn, bn)

    def load(ref, gather, rows, tok, valid, cols):
        return _gather_rows(ref, tok, valid, n_tok, cols) if gather else ref[rows, cols]

    def body(t, accs):
        rows = pl.ds(t * bm, bm)
        tok = token_ref[rows]
        valid = tok < n_tok
        lhs = load(lhs_ref, lhs_gather, rows, tok, valid, cols_m)
        new = []
        for acc, rhs_ref in zip(accs, rhs_refs, strict=True):
            rhs = load(rhs_ref, rhs_gather, rows, tok, valid, cols_n)
            if rhs_scale:
                rhs = (rhs.astype(jnp.float32) * weight_ref[rows][:, None]).astype(rhs.dtype)
            new.append(acc + _dot(lhs, rhs, trans_a=True))
        return tuple(new)

    zero = jnp.zeros((bn, bn), jnp.float32)
    accs = jax.lax.fori_loop(first, last, body, (zero,) * n_rhs)
    for acc, out_ref in zip(accs, out_refs, strict=True):
        out_ref[...] = acc.astype(out_ref.dtype)


def _whole(shape):
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _params(blocks):
    return plt.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _check_blocks(d, f, blocks):
    for name, dim in (("D", d), ("F", f)):
        for b in ("bn", "bk", "bn_out"):
            if dim % getattr(blocks, b):
                raise ValueError(f"{name}={dim} must be a multiple of blocks.{b}={getattr(blocks, b)}")


def expert_up(plan, x_LxD, wg_ExDxF, wu_ExDxF, *, blocks, activation, interpret, save_preact=False):
    """h_PxF: rows gathered by ``plan.token_P``; activation "swiglu", "silu" or "linear" (plain GEMM).
    ``save_preact``: also return the pre-activations [a_PxF, (b_PxF)] for a backward without recompute."""
    n_tok, d = x_LxD.shape
    num_experts, _, f = wg_ExDxF.shape
    p_rows = plan.token_P.shape[0]
    ws = (wg_ExDxF, wu_ExDxF) if activation == "swiglu" else (wg_ExDxF,)
    n_pre = len(ws) if save_preact else 0
    kernel = functools.partial(
        _up_kernel, n_tok=n_tok, num_experts=num_experts, blocks=blocks, activation=activation
    )
    outs = pl.pallas_call(
        kernel,
        grid=(p_rows // blocks.bm, f // blocks.bn),
        in_specs=[_whole(plan.token_P.shape), _whole(plan.tile_expert_T.shape), _whole(x_LxD.shape)]
        + [_whole(w.shape) for w in ws],
        out_specs=[pl.BlockSpec((blocks.bm, blocks.bn), lambda i, j: (i, j))] * (1 + n_pre),
        out_shape=[jax.ShapeDtypeStruct((p_rows, f), x_LxD.dtype)] * (1 + n_pre),
        compiler_params=_params(blocks),
        interpret=interpret,
        name="moe_expert_up",
    )(plan.token_P, plan.tile_expert_T, x_LxD, *ws)
    return (outs[0], outs[1:]) if save_preact else outs[0]


def expert_combine(plan, lhs, ws, n_tok, *, blocks, transpose_w, scale, interpret):
    """sum_s over slots of (weight *) sum_i lhs_i[rows] @ W_i[e] scattered to the token rows: (L, D) f32."""
    k, ts = plan.slot_tiles_KxTs.shape
    d = ws[0].shape[1] if transpose_w else ws[0].shape[2]
    y = jnp.zeros((n_tok + 1, d), jnp.float32)
    kernel = functools.partial(
        _combine_kernel, n_tok=n_tok, blocks=blocks, n_lhs=len(lhs), transpose_w=transpose_w, scale=scale
    )
    for s in range(k):  # launches in order: slot s owns every output row once
        args = (plan.slot_tiles_KxTs[s], plan.tile_expert_T, plan.token_P, plan.weight_P, *lhs, *ws, y)
        y = pl.pallas_call(
            kernel,
            grid=(ts, d // blocks.bn_out),
            in_specs=[_whole(a.shape) for a in args],
            out_specs=_whole(y.shape),
            out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
            input_output_aliases={len(args) - 1: 0},
            compiler_params=_params(blocks),
            interpret=interpret,
            name="moe_expert_combine",
        )(*args)
    return y[:n_tok]


def expert_bwd_act(plan, x_LxD, dy_LxD, wg, wu, w2, *, blocks, activation, interpret, saved_preact=()):
    """(da[, db]), h, dweight partials; ``saved_preact`` = [a, (b)] from the forward skips their recompute."""
    n_tok, _ = x_LxD.shape
    num_experts, _, f = wg.shape
    p_rows = plan.token_P.shape[0]
    nf = f // blocks.bn
    ws = (wg, w2) if activation == "silu" else (wg, wu, w2)
    n_act = 1 if activation == "silu" else 2
    ws = (*ws, *saved_preact)
    kernel = functools.partial(
        _bwd_act_kernel,
        n_tok=n_tok,
        num_experts=num_experts,
        blocks=blocks,
        activation=activation,
        saved=bool(saved_preact),
    )
    tile = pl.BlockSpec((blocks.bm, blocks.bn), lambda i, j: (i, j))
    outs = pl.pallas_call(
        kernel,
        grid=(p_rows // blocks.bm, nf),
        in_specs=[
            _whole(a.shape) for a in (plan.token_P, plan.weight_P, plan.tile_expert_T, x_LxD, dy_LxD, *ws)
        ],
        out_specs=[tile] * (n_act + 1) + [_whole((p_rows, nf))],
        out_shape=[jax.ShapeDtypeStruct((p_rows, f), x_LxD.dtype)] * (n_act + 1)
        + [jax.ShapeDtypeStruct((p_rows, nf), jnp.float32)],
        compiler_params=_params(blocks),
        interpret=interpret,
        name="moe_expert_bwd_act",
    )(plan.token_P, plan.weight_P, plan.tile_expert_T, x_LxD, dy_LxD.astype(x_LxD.dtype), *ws)
    return outs[:n_act], outs[n_act], outs[n_act + 1]


def expert_tgmm(
    plan,
    lhs,
    rhs_list,
    n_tok,
    num_experts,
    *,
    lhs_gather,
    rhs_gather,
    rhs_scale,
    blocks,
    out_dtype,
    interpret,
):
    m, n = lhs.shape[1], rhs_list[0].shape[1]
    kernel = functools.partial(
        _tgmm_kernel,
        n_tok=n_tok,
        blocks=blocks,
        lhs_gather=lhs_gather,
        rhs_gather=rhs_gather,
        rhs_scale=rhs_scale,
        n_rhs=len(rhs_list),
    )
    args = (plan.expert_tiles_Ex2, plan.token_P, plan.weight_P, lhs, *rhs_list)
    out = pl.BlockSpec((None, blocks.bn_out, blocks.bn_out), lambda e, i, j: (e, i, j))
    return pl.pallas_call(
        kernel,
        grid=(num_experts, m // blocks.bn_out, n // blocks.bn_out),
        in_specs=[_whole(a.shape) for a in args],
        out_specs=[out] * len(rhs_list),
        out_shape=[jax.ShapeDtypeStruct((num_experts, m, n), out_dtype)] * len(rhs_list),
        compiler_params=_params(blocks),
        interpret=interpret,
        name="moe_expert_tgmm",
    )(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _moe_ffn(x, expert_ids, weights, wg, wu, w2, blocks, activation, interpret, recompute):
    return _moe_ffn_fwd(x, expert_ids, weights, wg, wu, w2, blocks, activation, interpret, recompute)[0]


def _moe_ffn_fwd(x, expert_ids, weights, wg, wu, w2, blocks, activation, interpret, recompute):
    n_tok = x.shape[0]
    plan = make_dispatch_plan(expert_ids, weights, wg.shape[0], blocks.bm)
    common = dict(blocks=blocks, activation=activation, interpret=interpret)
    if recompute:
        h, pre = expert_up(plan, x, wg, wu, **common), ()
    else:
        h, pre = expert_up(plan, x, wg, wu, save_preact=True, **common)
    y = expert_combine(
        plan, [h], [w2], n_tok, blocks=blocks, transpose_w=False, scale=True, interpret=interpret
    )
    # Saved: the inputs (already alive), the index maps and, only without recompute, a (and b).
    return y.astype(x.dtype), (x, expert_ids, wg, wu, w2, plan, tuple(pre))


def _moe_ffn_bwd(blocks, activation, interpret, recompute, res, dy):
    x, expert_ids, wg, wu, w2, plan, pre = res
    n_tok, num_experts = x.shape[0], wg.shape[0]
    acts, h, dw_PxNf = expert_bwd_act(
        plan, x, dy, wg, wu, w2, blocks=blocks, activation=activation, interpret=interpret, saved_preact=pre
    )
    common = dict(blocks=blocks, interpret=interpret)
    (dw2,) = expert_tgmm(
        plan,
        h,
        [dy.astype(x.dtype)],
        n_tok,
        num_experts,
        lhs_gather=False,
        rhs_gather=True,
        rhs_scale=True,
        out_dtype=w2.dtype,
        **common,
    )
    dws_in = expert_tgmm(
        plan,
        x,
        list(acts),
        n_tok,
        num_experts,
        lhs_gather=True,
        rhs_gather=False,
        rhs_scale=False,
        out_dtype=wg.dtype,
        **common,
    )
    w_in = [wg] if activation == "silu" else [wg, wu]
    dx = expert_combine(plan, list(acts), w_in, n_tok, transpose_w=True, scale=False, **common)
    dweights = jnp.where(expert_ids < num_experts, jnp.sum(dw_PxNf, axis=1)[plan.pos_LxK], 0.0)
    dwu = None if activation == "silu" else dws_in[1].astype(wu.dtype)
    return dx.astype(x.dtype), None, dweights, dws_in[0], dwu, dw2


_moe_ffn.defvjp(_moe_ffn_fwd, _moe_ffn_bwd)


def moe_ffn(
    x_LxD,
    expert_ids_LxK,
    weights_LxK,
    w_gate_ExDxF,
    w_up_ExDxF,
    w_down_ExFxD,
    *,
    activation: str = "swiglu",
    blocks: Blocks = Blocks(),
    interpret: bool = False,
    recompute: bool = True,
) -> jax.Array:
    """y[t] = sum_s weights[t, s] * FFN_{expert_ids[t, s]}(x[t]) with index dispatch and fused kernels.

    ``expert_ids == E`` marks a dropped assignment (padding token, over capacity): no compute, no output.

    FFN_e(x) = (SiLU(x Wg_e) * (x Wu_e)) Wd_e for "swiglu", SiLU(x Wg_e) Wd_e for "silu" (``w_up`` unused,
    may be None). Differentiable in x, weights and the three expert weight tensors. ``recompute=False``
    saves the pre-activations a (and b), 2 P x F, so the backward skips two GEMMs.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    _check_blocks(x_LxD.shape[1], w_gate_ExDxF.shape[2], blocks)
    return _moe_ffn(
        x_LxD,
        expert_ids_LxK,
        weights_LxK,
        w_gate_ExDxF,
        w_up_ExDxF,
        w_down_ExFxD,
        blocks,
        activation,
        interpret,
        recompute,
    )


def moe_ffn_reference(
    x_LxD, expert_ids_LxK, weights_LxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, *, activation: str = "swiglu"
) -> jax.Array:
    """Plain float32 definition: every expert on every token, then the routed ones picked and weighted."""
    hi = jax.lax.Precision.HIGHEST
    x = x_LxD.astype(jnp.float32)
    a_ExLxF = jnp.einsum("ld,edf->elf", x, w_gate_ExDxF.astype(jnp.float32), precision=hi)
    h = jax.nn.silu(a_ExLxF)
    if activation == "swiglu":
        h = h * jnp.einsum("ld,edf->elf", x, w_up_ExDxF.astype(jnp.float32), precision=hi)
    y_ExLxD = jnp.einsum("elf,efd->eld", h, w_down_ExFxD.astype(jnp.float32), precision=hi)
    num_experts = w_gate_ExDxF.shape[0]
    picked_LxKxD = y_ExLxD[jnp.minimum(expert_ids_LxK, num_experts - 1), jnp.arange(x.shape[0])[:, None]]
    weights = jnp.where(expert_ids_LxK < num_experts, weights_LxK.astype(jnp.float32), 0.0)
    return jnp.einsum("lk,lkd->ld", weights, picked_LxKxD, precision=hi)


def grouped_matmul_reference(lhs_MxK: jax.Array, rhs_GxKxN: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
    """Rows of lhs in consecutive groups; row m multiplies rhs[group of m]. Rows past the groups give 0."""
    m = lhs_MxK.shape[0]
    ends = jnp.cumsum(group_sizes_G)
    group_M = jnp.searchsorted(ends, jnp.arange(m), side="right")
    valid = group_M < rhs_GxKxN.shape[0]
    w = rhs_GxKxN[jnp.minimum(group_M, rhs_GxKxN.shape[0] - 1)].astype(jnp.float32)
    out = jnp.einsum("mk,mkn->mn", lhs_MxK.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    return jnp.where(valid[:, None], out, 0.0)
