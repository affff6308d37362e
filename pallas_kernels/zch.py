"""MPZCH remap kernels: multi-probe zero-collision hashing of raw 64-bit IDs into table slots (Pallas).

Table layout: ``identity_S`` holds the raw ID stored in each slot (``EMPTY`` = all ones, i.e. int64 -1). The S
slots are split into ``num_buckets`` buckets of ``bucket_size = S // num_buckets`` consecutive slots. An ID's
64-bit hash (splitmix64 finalizer) picks its bucket (high 32 bits) and a start offset inside it (low 32 bits);
its probe window is the ``max_probe`` slots ``start, start+1, ...`` taken circularly *inside the bucket*, so
row-wise sharding by buckets keeps every probe on the device that owns the bucket.

Semantics (``insert_or_find``), per ID of a batch, equivalent to inserting the batch's distinct IDs one at a
time in some order:
  1. if the ID is stored anywhere in its window -> that slot (status HIT);
  2. else it claims the first EMPTY slot of its window, in probe order, at its turn (status INSERTED);
  3. else (window full) -> slot -1 (status FULL); the table is unchanged for it. Nothing live is overwritten.
Repeated IDs in a batch get the same slot; distinct IDs get distinct slots. Eviction (freeing slots) is the
caller's business (recjax.embeddings.zch); because it leaves holes, step 1 always scans the whole window
before step 2 claims (a hole before a live ID must not lead to a second copy).

Kernel (one launch for the whole batch): each program takes ``block`` IDs; pass 1 is a read-only scan of the
window (early exit once every lane found its ID); pass 2 claims with a 64-bit compare-and-swap
``CAS(slot, EMPTY, id)`` from the lane's first empty probe position onward: an old value EMPTY means claimed,
the lane's own ID means a concurrent lane inserted the same ID (found), anything else means keep probing.
Slots only go EMPTY -> ID inside a launch, which makes this race-free (a stale EMPTY read in pass 1 only
moves the lane's claim start earlier; CASes are coherent).

Deviation / JAX limitation: ``jax.experimental.pallas.triton.atomic_cas`` (jax 0.11.2) only accepts a
*scalar* ref (no indexer, no mask) — ``atomic_cas(ref.at[i], ...)`` fails to trace — so it cannot address a
table element. This file defines its own small primitive ``table_cas(ref, idx_B, cmp_B, val_B)`` with a
Triton lowering to ``tt.atomic_cas`` on a tensor of pointers (``ref + idx``), and a state-discharge rule that
applies the lanes one after another, so ``interpret=True`` (CPU) runs the same kernel as a valid
serialization. Masked-off lanes CAS ``EMPTY -> EMPTY`` (a no-op) since ``tt.atomic_cas`` has no mask.

ID representation: JAX without ``jax_enable_x64`` has no 64-bit integers, and the library runs in 32-bit
mode. Public arrays therefore carry raw IDs and identities as uint32 pairs ``(..., 2) = [low, high]``; the
functions here enable x64 locally (``jax.enable_x64(True)``, legal inside an outer jit) and bitcast the pairs
to int64 for the kernel and the reference. ``split_ids`` / ``join_ids`` convert numpy int64 <-> pairs.
Slots are int32 (tables below 2**31 slots).

Letters: N IDs in the batch, S table slots, P max_probe, B lanes per program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import core as jax_core
from jax._src import state
from jax._src.lib.triton import dialect as tt_dialect
from jax._src.pallas.triton import lowering as tl
from jax._src.state import discharge as state_discharge
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

EMPTY = -1  # int64 all ones; raw IDs are >= 0
STATUS_HIT, STATUS_INSERTED, STATUS_FULL, STATUS_PAD = 0, 1, 2, 3


# ----------------------------------------------------------------------------- compare-and-swap on a table


table_cas_p = jax_core.Primitive("zch_table_cas")


@table_cas_p.def_effectful_abstract_eval
def _table_cas_abstract_eval(ref_aval, idx_aval, cmp_aval, val_aval):
    if not (idx_aval.shape == cmp_aval.shape == val_aval.shape) or len(idx_aval.shape) != 1:
        raise ValueError("table_cas: idx, cmp and val must be vectors of one shape")
    if cmp_aval.dtype != val_aval.dtype or ref_aval.dtype != val_aval.dtype:
        raise ValueError("table_cas: ref, cmp and val must share a dtype")
    return jax_core.ShapedArray(val_aval.shape, val_aval.dtype), {state.WriteEffect(0)}


def table_cas(ref, idx_B, cmp_B, val_B):
    """Per lane: ``old = ref[idx]; if old == cmp: ref[idx] = val``; returns the olds (atomic per lane)."""
    return table_cas_p.bind(ref, idx_B, cmp_B, val_B)


@state_discharge.register_discharge_rule(table_cas_p)
def _table_cas_discharge_rule(ctx, ref, idx_B, cmp_B, val_B):
    del ctx

    def lane(i, carry):  # lanes in order: one valid serialization of the atomics
        table, old = carry
        cur = table[idx_B[i]]
        table = table.at[idx_B[i]].set(jnp.where(cur == cmp_B[i], val_B[i], cur))
        return table, old.at[i].set(cur)

    table, old = lax.fori_loop(0, idx_B.shape[0], lane, (ref, jnp.zeros_like(val_B)))
    return (table, None, None, None), old


@tl.register_lowering(table_cas_p)
def _table_cas_lowering_rule(ctx: tl.LoweringRuleContext, ptr, idx, cmp, val):
    _, idx_aval, cmp_aval, val_aval = ctx.avals_in
    idx = tl._ensure_ir_value(idx, idx_aval)
    ptrs = tl._add(tl._bcast_to(ptr, idx_aval.shape), idx)
    result_type = tl.ir.RankedTensorType.get(idx_aval.shape, tt_dialect.PointerType(ptr.type).pointee_type)
    return tt_dialect.atomic_cas(
        result_type,
        ptrs,
        tl._ensure_ir_value(cmp, cmp_aval),
        tl._ensure_ir_value(val, val_aval),
        sem=tt_dialect.MemSemantic.ACQUIRE_RELEASE,
        scope=tt_dialect.MemSyncScope.GPU,
    )


# ----------------------------------------------------------------------------- hashing and windows (int64)


def _as_i64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_MIX1, _MIX2 = _as_i64(0xBF58476D1CE4E5B9), _as_i64(0x94D049BB133111EB)


def _srl(x, n: int):
    return lax.shift_right_logical(x, jnp.int64(n))


def hash64(x):
    """splitmix64 finalizer (a bijection of 64-bit words with full avalanche) on int64, wrapping arithmetic.

    int64 rather than uint64 on purpose: the Triton lowering cannot build uint64 constants >= 2**63."""
    x = x ^ _srl(x, 30)
    x = x * jnp.int64(_MIX1)
    x = x ^ _srl(x, 27)
    x = x * jnp.int64(_MIX2)
    return x ^ _srl(x, 31)


def window(ids, num_buckets: int, bucket_size: int):
    """(first slot of the ID's bucket, start offset inside it), int32."""
    h = hash64(ids)
    bucket = _srl(h, 32) % num_buckets
    start = (h & 0xFFFFFFFF) % bucket_size
    return (bucket * bucket_size).astype(jnp.int32), start.astype(jnp.int32)


def _any(mask_B):
    return jnp.max(mask_B.astype(jnp.int32)) > 0


def _scan_window(table_ref, ids, valid, base, start, *, bucket_size, max_probe, width):
    """Pass 1 (read only): the ID's slot in its window (-1 if absent) and its first EMPTY probe (-1: none).

    Each step reads ``width`` consecutive probes per lane (a 2-D gather: 8 slots = 64 B = two sectors), so a
    block of lanes waits for its longest probe chain / width steps instead of its longest chain."""
    big = jnp.int32(2**30)
    offs_W = lax.broadcasted_iota(jnp.int32, (1, width), 1)

    def cond(c):
        p, found, _, _ = c
        return (p < max_probe) & _any(valid & ~found)

    def body(c):
        p, found, first_empty, slot = c
        offs = p + offs_W  # (1, W)
        s = base[:, None] + (start[:, None] + offs) % bucket_size  # (B, W)
        cur = table_ref[s]
        inwin = offs < max_probe
        hit = (valid & ~found)[:, None] & (cur == ids[:, None]) & inwin
        hit_slot = jnp.max(jnp.where(hit, s, -1), axis=1)
        empty_at = jnp.min(jnp.where((cur == EMPTY) & inwin, offs, big), axis=1)
        first_empty = jnp.where((first_empty < 0) & (empty_at < big), empty_at, first_empty)
        return p + width, found | (hit_slot >= 0), first_empty, jnp.where(hit_slot >= 0, hit_slot, slot)

    minus = jnp.full(ids.shape, -1, jnp.int32)
    init = (jnp.int32(0), jnp.zeros(ids.shape, jnp.bool_), minus, minus)
    _, found, first_empty, slot = lax.while_loop(cond, body, init)
    return found, first_empty, slot


def _lookup_kernel(ids_ref, table_ref, slot_ref, *, bucket_size, num_buckets, max_probe, width):
    ids = ids_ref[...]
    valid = ids != EMPTY
    base, start = window(ids, num_buckets, bucket_size)
    _, _, slot = _scan_window(
        table_ref, ids, valid, base, start, bucket_size=bucket_size, max_probe=max_probe, width=width
    )
    slot_ref[...] = slot


def _insert_kernel(
    ids_ref, table_in_ref, table_ref, slot_ref, status_ref, *, bucket_size, num_buckets, max_probe, width
):
    del table_in_ref  # aliased with table_ref
    ids = ids_ref[...]
    valid = ids != EMPTY
    base, start = window(ids, num_buckets, bucket_size)
    found, first_empty, slot = _scan_window(
        table_ref, ids, valid, base, start, bucket_size=bucket_size, max_probe=max_probe, width=width
    )
    empty_B = jnp.full(ids.shape, EMPTY, ids.dtype)

    def cond(c):
        _, pending, _, _ = c
        return _any(pending)

    def body(c):  # pass 2: claim with CAS from the first empty probe on
        p, pending, slot, inserted = c
        s = base + (start + p) % bucket_size
        old = table_cas(table_ref, s, empty_B, jnp.where(pending, ids, empty_B))
        claimed = pending & (old == EMPTY)
        got = claimed | (pending & (old == ids))
        p = p + 1
        return p, pending & ~got & (p < max_probe), jnp.where(got, s, slot), inserted | claimed

    pending = valid & ~found & (first_empty >= 0)
    p0 = jnp.maximum(first_empty, 0)
    _, _, slot, inserted = lax.while_loop(cond, body, (p0, pending, slot, jnp.zeros(ids.shape, jnp.bool_)))
    status = jnp.where(inserted, STATUS_INSERTED, jnp.where(slot >= 0, STATUS_HIT, STATUS_FULL))
    slot_ref[...] = slot
    status_ref[...] = jnp.where(valid, status, STATUS_PAD)


# ----------------------------------------------------------------------------- int64 wrappers (x64 enabled)


def _pad(ids_N, block):
    n = ids_N.shape[0]
    n_pad = max(block, -(-n // block) * block)
    return jnp.pad(ids_N, (0, n_pad - n), constant_values=EMPTY), n_pad


def _compiler_params(num_warps):
    return plt.CompilerParams(num_warps=num_warps, num_stages=1)


def lookup_i64(table_S, ids_N, *, num_buckets, max_probe, block=128, width=8, num_warps=4, interpret=False):
    """Read-only: slot of each ID or -1. int64 arrays; call with x64 enabled."""
    n = ids_N.shape[0]
    ids_pad, n_pad = _pad(ids_N, block)
    kernel = functools.partial(
        _lookup_kernel,
        bucket_size=table_S.shape[0] // num_buckets,
        num_buckets=num_buckets,
        max_probe=max_probe,
        width=width,
    )
    slot = pl.pallas_call(
        kernel,
        grid=(n_pad // block,),
        in_specs=[pl.BlockSpec((block,), lambda i: (i,)), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((block,), lambda i: (i,)),
        out_shape=jax.ShapeDtypeStruct((n_pad,), jnp.int32),
        compiler_params=_compiler_params(num_warps),
        interpret=interpret,
        name="zch_lookup",
    )(ids_pad, table_S)
    return slot[:n]


def insert_or_find_i64(
    table_S, ids_N, *, num_buckets, max_probe, block=128, width=8, num_warps=4, interpret=False
):
    """(new table, slot_N int32 (-1 when the window is full), status_N int32). Call with x64 enabled."""
    n = ids_N.shape[0]
    ids_pad, n_pad = _pad(ids_N, block)
    kernel = functools.partial(
        _insert_kernel,
        bucket_size=table_S.shape[0] // num_buckets,
        num_buckets=num_buckets,
        max_probe=max_probe,
        width=width,
    )
    table, slot, status = pl.pallas_call(
        kernel,
        grid=(n_pad // block,),
        in_specs=[pl.BlockSpec((block,), lambda i: (i,)), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=[
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec((block,), lambda i: (i,)),
            pl.BlockSpec((block,), lambda i: (i,)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(table_S.shape, table_S.dtype),
            jax.ShapeDtypeStruct((n_pad,), jnp.int32),
            jax.ShapeDtypeStruct((n_pad,), jnp.int32),
        ],
        input_output_aliases={1: 0},
        compiler_params=_compiler_params(num_warps),
        interpret=interpret,
        name="zch_insert_or_find",
    )(ids_pad, table_S)
    return table, slot[:n], status[:n]


# ----------------------------------------------------------------------------- plain-JAX reference (int64)


def _dedupe(ids_N):
    """Sorted distinct IDs on lanes of first occurrence (others EMPTY), the sort order, and per sorted lane
    lane holding its distinct ID."""
    n = ids_N.shape[0]
    order = jnp.argsort(ids_N, stable=True)
    sorted_N = ids_N[order]
    first = jnp.concatenate([jnp.ones((1,), jnp.bool_), sorted_N[1:] != sorted_N[:-1]]) & (sorted_N != EMPTY)
    uniq_N = jnp.where(first, sorted_N, EMPTY)
    group_N = lax.cummax(jnp.where(first, jnp.arange(n, dtype=jnp.int32), 0))
    return uniq_N, order, group_N, first


def _scan_window_xla(table_S, ids_N, valid, base, start, *, bucket_size, max_probe):
    def cond(c):
        p, found, _, _ = c
        return (p < max_probe) & jnp.any(valid & ~found)

    def body(c):
        p, found, first_empty, slot = c
        s = base + (start + p) % bucket_size
        cur = table_S[s]
        hit = valid & ~found & (cur == ids_N)
        first_empty = jnp.where((first_empty < 0) & (cur == EMPTY), p, first_empty)
        return p + 1, found | hit, first_empty, jnp.where(hit, s, slot)

    minus = jnp.full(ids_N.shape, -1, jnp.int32)
    _, found, first_empty, slot = lax.while_loop(
        cond, body, (jnp.int32(0), jnp.zeros(ids_N.shape, bool), minus, minus)
    )
    return found, first_empty, slot


def lookup_reference_i64(table_S, ids_N, *, num_buckets, max_probe):
    """Slot of each ID in its window, -1 if absent (x64 enabled)."""
    bucket_size = table_S.shape[0] // num_buckets
    base, start = window(ids_N, num_buckets, bucket_size)
    valid = ids_N != EMPTY
    return _scan_window_xla(table_S, ids_N, valid, base, start, bucket_size=bucket_size, max_probe=max_probe)[
        2
    ]


def insert_or_find_reference_i64(table_S, ids_N, *, num_buckets, max_probe):
    """Defines the semantics: distinct IDs in ascending order, each hit-or-claim-first-empty-in-probe-order.

    Vectorized as rounds over probe positions: every pending distinct ID looks at its current probe slot; the
    ones seeing EMPTY propose it, the smallest ID per proposed slot wins (a sort), everyone else advances.
    That is the one-at-a-time insertion in round order, so it is sequential-equivalent.
    """
    n, n_slots = ids_N.shape[0], table_S.shape[0]
    bucket_size = n_slots // num_buckets
    uniq_N, order, group_N, first = _dedupe(ids_N)
    valid = uniq_N != EMPTY
    base, start = window(uniq_N, num_buckets, bucket_size)
    found, first_empty, slot = _scan_window_xla(
        table_S, uniq_N, valid, base, start, bucket_size=bucket_size, max_probe=max_probe
    )
    lanes = jnp.arange(n, dtype=jnp.int32)
    no_slot = jnp.int32(np.iinfo(np.int32).max)

    def cond(c):
        return jnp.any(c[2])

    def body(c):
        table, p, pending, slot, inserted = c
        s = base + (start + p) % bucket_size
        propose = pending & (table[s] == EMPTY)
        key_s, lane_s = lax.sort((jnp.where(propose, s, no_slot), lanes), num_keys=2)
        head = (key_s != no_slot) & jnp.concatenate([jnp.ones((1,), bool), key_s[1:] != key_s[:-1]])
        win = jnp.zeros((n,), bool).at[lane_s].set(head)
        table = table.at[jnp.where(win, s, n_slots)].set(uniq_N, mode="drop")
        p = p + 1
        return table, p, pending & ~win & (p < max_probe), jnp.where(win, s, slot), inserted | win

    pending = valid & ~found & (first_empty >= 0)
    init = (table_S, jnp.maximum(first_empty, 0), pending, slot, jnp.zeros((n,), bool))
    table, _, _, slot, inserted = lax.while_loop(cond, body, init)
    # Back to the batch's lanes: every occurrence gets its distinct ID's slot; the first one is INSERTED.
    slot_sorted = slot[group_N]
    status_sorted = jnp.where(
        inserted[group_N] & first, STATUS_INSERTED, jnp.where(slot_sorted >= 0, STATUS_HIT, STATUS_FULL)
    )
    sorted_ids = ids_N[order]
    status_sorted = jnp.where(sorted_ids == EMPTY, STATUS_PAD, status_sorted)
    slot_N = jnp.zeros((n,), jnp.int32).at[order].set(slot_sorted)
    status_N = jnp.zeros((n,), jnp.int32).at[order].set(status_sorted)
    return table, slot_N, status_N


# ----------------------------------------------------------------------------- public API on uint32 pairs


def split_ids(ids) -> np.ndarray:
    """numpy int64/uint64 raw IDs -> uint32 pairs (..., 2) = [low, high] (host side)."""
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"ids: expected an integer dtype, got {arr.dtype}")
    return np.ascontiguousarray(arr.astype(np.uint64)).view(np.uint32).reshape(arr.shape + (2,))


def join_ids(pairs) -> np.ndarray:
    """uint32 pairs (..., 2) -> int64 raw IDs (host side); EMPTY comes back as -1."""
    arr = np.ascontiguousarray(np.asarray(pairs, dtype=np.uint32))
    return arr.view(np.int64).reshape(arr.shape[:-1])


def empty_identity(num_slots: int) -> jax.Array:
    return jnp.full((num_slots, 2), 0xFFFFFFFF, jnp.uint32)


def _i64(pairs):
    return lax.bitcast_convert_type(pairs, jnp.int64)


def _pairs(x64):
    return lax.bitcast_convert_type(x64, jnp.uint32)


@functools.partial(
    jax.jit, static_argnames=("num_buckets", "max_probe", "block", "width", "num_warps", "interpret")
)
def zch_insert_or_find(
    identity_Sx2,
    ids_Nx2,
    *,
    num_buckets: int,
    max_probe: int,
    block: int = 128,
    width: int = 8,
    num_warps: int = 4,
    interpret: bool = False,
):
    """Pallas insert-or-find on uint32 pairs -> (identity_Sx2, slot_N int32, status_N int32)."""
    with jax.enable_x64(True):
        table, slot, status = insert_or_find_i64(
            _i64(identity_Sx2),
            _i64(ids_Nx2),
            num_buckets=num_buckets,
            max_probe=max_probe,
            block=block,
            width=width,
            num_warps=num_warps,
            interpret=interpret,
        )
        return _pairs(table), slot, status


@functools.partial(
    jax.jit, static_argnames=("num_buckets", "max_probe", "block", "width", "num_warps", "interpret")
)
def zch_lookup(
    identity_Sx2,
    ids_Nx2,
    *,
    num_buckets: int,
    max_probe: int,
    block: int = 128,
    width: int = 8,
    num_warps: int = 4,
    interpret: bool = False,
):
    """Pallas read-only lookup on uint32 pairs -> slot_N int32 (-1 absent)."""
    with jax.enable_x64(True):
        return lookup_i64(
            _i64(identity_Sx2),
            _i64(ids_Nx2),
            num_buckets=num_buckets,
            max_probe=max_probe,
            block=block,
            width=width,
            num_warps=num_warps,
            interpret=interpret,
        )


@functools.partial(jax.jit, static_argnames=("num_buckets", "max_probe"))
def zch_reference(identity_Sx2, ids_Nx2, *, num_buckets: int, max_probe: int):
    """Plain-JAX insert-or-find (the semantics) -> (identity_Sx2, slot_N, status_N)."""
    with jax.enable_x64(True):
        table, slot, status = insert_or_find_reference_i64(
            _i64(identity_Sx2), _i64(ids_Nx2), num_buckets=num_buckets, max_probe=max_probe
        )
        return _pairs(table), slot, status


@functools.partial(jax.jit, static_argnames=("num_buckets", "max_probe"))
def zch_lookup_reference(identity_Sx2, ids_Nx2, *, num_buckets: int, max_probe: int):
    with jax.enable_x64(True):
        return lookup_reference_i64(
            _i64(identity_Sx2), _i64(ids_Nx2), num_buckets=num_buckets, max_probe=max_probe
        )
