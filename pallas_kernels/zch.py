"""MPZCH remap kernels: multi-probe zero-collision hashing of raw 64-bit IDs into table slots (Pallas Triton).

Table layout: ``identity_S`` holds the raw ID stored in each slot (``EMPTY`` = all ones, i.e. int64 -1). The S
slots are split into ``num_buckets`` buckets; an ID's hash picks its bucket and, inside it, either one linear
window of ``max_probe`` slots (``probing="linear"``) or two candidate windows of ``ceil(max_probe / 2)``
aligned slots (``probing="two_choice"``, the default). Hashing, windows and the semantics are defined in
``pallas_kernels.zch_reference`` (with the plain-JAX reference); this file holds the kernels and re-exports.

Kernel (one launch for the whole batch): each program takes ``block`` IDs.
Pass 1 (read only) scans the window(s), ``width`` consecutive slots per window per step (a 2-D gather: 8 slots
= 64 B = two sectors), the two windows of an ID side by side in the same step; it stops early once every lane
of the program found its ID (lookups of stored IDs), otherwise reads every window completely (eviction leaves
holes: an EMPTY slot before a live copy must not lead to a second copy). For inserts it also counts the EMPTY
slots of each window and notes the first one.
Pass 2 claims with a 64-bit compare-and-swap ``CAS(slot, EMPTY, id)`` along the lane's probe sequence from its
first EMPTY: linear: the window in order; two_choice: the preferred window (more EMPTY slots in pass 1, ties
-> the first), then the other one from its first EMPTY. Old value EMPTY -> claimed (INSERTED); the lane's
own ID -> a concurrent lane inserted the same ID (HIT); anything else -> next probe. End of the sequence ->
FULL (slot -1): every slot of every window was live.

Concurrency argument. Inside a launch slots only go EMPTY -> ID (nothing is freed or moved), so (i) an ID
stored before the launch is found by pass 1 (the whole window set is read) and never inserted again; (ii) a
stale EMPTY seen in pass 1 only makes a lane try a slot that meanwhile got taken, which its CAS detects, and
the first-EMPTY offsets can only be too early, never skip a free slot; (iii) two lanes with *distinct* IDs
can only meet at a slot through the CAS on EMPTY, which admits exactly one of them: distinct IDs get distinct
slots and nothing live is overwritten. The remaining hazard is two lanes with the *same* new ID: with linear
probing they walk the same probe order and meet in the CAS (the loser reads its own ID and takes that slot),
so the linear wrapper feeds the batch as is. With two_choice the two lanes read the window loads at different
moments and may prefer different windows - the ID would be stored twice. The two_choice wrapper therefore
dedupes the batch first (a sort: each distinct ID appears in one lane per launch, ``zch_reference.dedupe``)
and maps the results back to the repeats, so only (i)-(iii) apply. The preference itself is advisory: the
loads a lane reads may include some of the same launch's insertions (the reference reads the table at the
start of the call), which changes which window a new ID lands in, never the guarantees: same ID -> one slot,
distinct IDs -> distinct slots, FULL only when both windows are full, lookup finds every stored ID.

The CAS primitive is ``pallas_kernels.zch_cas.table_cas`` (``plt.atomic_cas`` takes only a scalar ref in jax
0.11.2); in interpret mode (CPU) its lanes apply one after another, one valid serialization.

ID representation: JAX without ``jax_enable_x64`` has no 64-bit integers, and the library runs in 32-bit
mode. Public arrays therefore carry raw IDs and identities as uint32 pairs ``(..., 2) = [low, high]``; the
functions here enable x64 locally (``jax.enable_x64(True)``, legal inside an outer jit) and bitcast the pairs
to int64 for the kernel and the reference. ``split_ids`` / ``join_ids`` convert numpy int64 <-> pairs.
Slots are int32 (tables below 2**31 slots).

Letters: N IDs in the batch, S table slots, B lanes per program, W probes per window per step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import zch_reference as ref
from pallas_kernels.zch_cas import table_cas, table_cas_p  # noqa: F401  (re-exported)
from pallas_kernels.zch_reference import (  # noqa: F401  (re-exported: the module's historical API)
    EMPTY,
    PROBINGS,
    STATUS_FULL,
    STATUS_HIT,
    STATUS_INSERTED,
    STATUS_PAD,
    hash64,
    insert_or_find_reference_i64,
    lookup_reference_i64,
    probe_windows,
    window,
    zch_lookup_reference,
    zch_reference,
)


def _any(mask_B):
    return jnp.max(mask_B.astype(jnp.int32)) > 0


def _scan_windows(table_ref, ids, valid, base, starts, *, bucket_size, length, width, count):
    """Pass 1 (read only) -> (found_B, slot_B (-1 absent), first EMPTY offset per window (tuple of K, -1:
    none), EMPTY count per window (tuple of K)); the last two only when ``count`` (inserts)."""
    big = jnp.int32(2**30)
    offs_W = lax.broadcasted_iota(jnp.int32, (1, width), 1)
    k_windows = len(starts)

    def cond(c):
        p, found = c[0], c[1]
        return (p < length) & _any(valid & ~found)

    def body(c):
        p, found, slot, first_empty, n_empty = c
        offs = p + offs_W  # (1, W)
        inwin = offs < length
        fe_out, cnt_out = [], []
        for k in range(k_windows):  # the windows side by side: a hit in either ends the lane's search
            s = base[:, None] + (starts[k][:, None] + offs) % bucket_size  # (B, W)
            cur = table_ref[s]
            hit = (valid & ~found)[:, None] & (cur == ids[:, None]) & inwin
            hit_slot = jnp.max(jnp.where(hit, s, -1), axis=1)
            found, slot = found | (hit_slot >= 0), jnp.where(hit_slot >= 0, hit_slot, slot)
            if count:
                empty = (cur == EMPTY) & inwin
                empty_at = jnp.min(jnp.where(empty, offs, big), axis=1)
                fe = first_empty[k]
                fe_out.append(jnp.where((fe < 0) & (empty_at < big), empty_at, fe))
                cnt_out.append(n_empty[k] + jnp.sum(empty.astype(jnp.int32), axis=1, dtype=jnp.int32))
        return p + width, found, slot, tuple(fe_out), tuple(cnt_out)

    minus = jnp.full(ids.shape, -1, jnp.int32)
    zeros = jnp.zeros(ids.shape, jnp.int32)
    per_window = (tuple(minus for _ in starts), tuple(zeros for _ in starts)) if count else ((), ())
    init = (jnp.int32(0), jnp.zeros(ids.shape, jnp.bool_), minus) + per_window
    _, found, slot, first_empty, n_empty = lax.while_loop(cond, body, init)
    return found, slot, first_empty, n_empty


def _lookup_kernel(ids_ref, table_ref, slot_ref, *, bucket_size, num_buckets, max_probe, probing, width):
    ids = ids_ref[...]
    _, length, _ = ref.geometry(bucket_size, max_probe, probing)
    base, starts = probe_windows(ids, num_buckets, bucket_size, max_probe, probing)
    _, slot, _, _ = _scan_windows(
        table_ref,
        ids,
        ids != EMPTY,
        base,
        starts,
        bucket_size=bucket_size,
        length=length,
        width=width,
        count=False,
    )
    slot_ref[...] = slot


def _insert_kernel(
    ids_ref,
    table_in_ref,
    table_ref,
    slot_ref,
    status_ref,
    *,
    bucket_size,
    num_buckets,
    max_probe,
    probing,
    width,
):
    del table_in_ref  # aliased with table_ref
    ids = ids_ref[...]
    valid = ids != EMPTY
    k_windows, length, _ = ref.geometry(bucket_size, max_probe, probing)
    base, starts = probe_windows(ids, num_buckets, bucket_size, max_probe, probing)
    found, slot, first_empty, n_empty = _scan_windows(
        table_ref, ids, valid, base, starts, bucket_size=bucket_size, length=length, width=width, count=True
    )
    s_pref, s_other, fe_pref, fe_other = ref.preferred_order(starts, first_empty, n_empty)
    end = k_windows * length
    empty_B = jnp.full(ids.shape, EMPTY, ids.dtype)

    def cond(c):
        return _any(c[1])

    def body(c):  # pass 2: claim with CAS along the probe sequence
        q, pending, slot, inserted = c
        s = ref.probe_slot(base, s_pref, s_other, q, length, bucket_size)
        old = table_cas(table_ref, s, empty_B, jnp.where(pending, ids, empty_B))
        claimed = pending & (old == EMPTY)
        got = claimed | (pending & (old == ids))
        q = ref.next_position(q, fe_other, length, k_windows)
        return q, pending & ~got & (q < end), jnp.where(got, s, slot), inserted | claimed

    q0 = ref.claim_start(fe_pref, fe_other, length, k_windows)
    pending = valid & ~found & (q0 < end)
    _, _, slot, inserted = lax.while_loop(cond, body, (q0, pending, slot, jnp.zeros(ids.shape, jnp.bool_)))
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


# Lanes per program, measured on an H200 at 100M slots, load 0.9 (benchmarks/RESULTS.md, MPZCH): two-choice
# lookups 1.09-1.37e9 IDs/s with 64 lanes vs 0.97-1.06e9 with 128; linear was best at 128 (vs 256).
DEFAULT_BLOCK = {"two_choice": 64, "linear": 128}


def default_block(probing: str, block: int | None) -> int:
    return DEFAULT_BLOCK[probing] if block is None else block


def _bind(kernel, table_S, num_buckets, max_probe, probing, width):
    """The kernel body with its static geometry (shared by lookup and insert-or-find)."""
    return functools.partial(
        kernel,
        bucket_size=table_S.shape[0] // num_buckets,
        num_buckets=num_buckets,
        max_probe=max_probe,
        probing=probing,
        width=width,
    )


def lookup_i64(
    table_S,
    ids_N,
    *,
    num_buckets,
    max_probe,
    probing="two_choice",
    block=None,
    width=8,
    num_warps=4,
    interpret=False,
):
    """Read-only: slot of each ID or -1. int64 arrays; call with x64 enabled."""
    ref.check_probing(probing)
    block = default_block(probing, block)
    n = ids_N.shape[0]
    ids_pad, n_pad = _pad(ids_N, block)
    kernel = _bind(_lookup_kernel, table_S, num_buckets, max_probe, probing, width)
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


def _insert_call(table_S, ids_N, *, num_buckets, max_probe, probing, block, width, num_warps, interpret):
    n = ids_N.shape[0]
    ids_pad, n_pad = _pad(ids_N, block)
    kernel = _bind(_insert_kernel, table_S, num_buckets, max_probe, probing, width)
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


def insert_or_find_i64(
    table_S,
    ids_N,
    *,
    num_buckets,
    max_probe,
    probing="two_choice",
    block=None,
    width=8,
    num_warps=4,
    interpret=False,
):
    """(new table, slot_N int32 (-1 when every window is full), status_N int32). Call with x64 enabled.
    two_choice dedupes the batch first (see the concurrency argument in the module docstring)."""
    ref.check_probing(probing)
    block = default_block(probing, block)
    kw = dict(
        num_buckets=num_buckets,
        max_probe=max_probe,
        probing=probing,
        block=block,
        width=width,
        num_warps=num_warps,
        interpret=interpret,
    )
    if probing == "linear":
        return _insert_call(table_S, ids_N, **kw)
    uniq, order, group, first = ref.dedupe(ids_N)
    table, slot_u, status_u = _insert_call(table_S, uniq, **kw)
    return (table, *ref.undedupe(slot_u, status_u, order, group, first))


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


_STATIC = ("num_buckets", "max_probe", "probing", "block", "width", "num_warps", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def zch_insert_or_find(
    identity_Sx2,
    ids_Nx2,
    *,
    num_buckets: int,
    max_probe: int,
    probing: str = "two_choice",
    block: int | None = None,
    width: int = 8,
    num_warps: int = 4,
    interpret: bool = False,
):
    """Pallas insert-or-find on uint32 pairs -> (identity_Sx2, slot_N int32, status_N int32)."""
    with jax.enable_x64(True):
        table, slot, status = insert_or_find_i64(
            ref.i64(identity_Sx2),
            ref.i64(ids_Nx2),
            num_buckets=num_buckets,
            max_probe=max_probe,
            probing=probing,
            block=block,
            width=width,
            num_warps=num_warps,
            interpret=interpret,
        )
        return ref.pairs(table), slot, status


@functools.partial(jax.jit, static_argnames=_STATIC)
def zch_lookup(
    identity_Sx2,
    ids_Nx2,
    *,
    num_buckets: int,
    max_probe: int,
    probing: str = "two_choice",
    block: int | None = None,
    width: int = 8,
    num_warps: int = 4,
    interpret: bool = False,
):
    """Pallas read-only lookup on uint32 pairs -> slot_N int32 (-1 absent)."""
    with jax.enable_x64(True):
        return lookup_i64(
            ref.i64(identity_Sx2),
            ref.i64(ids_Nx2),
            num_buckets=num_buckets,
            max_probe=max_probe,
            probing=probing,
            block=block,
            width=width,
            num_warps=num_warps,
            interpret=interpret,
        )
