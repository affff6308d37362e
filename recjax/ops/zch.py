"""MPZCH remap ops: raw 64-bit IDs -> table slots by multi-probe zero-collision hashing.

``insert_or_find(identity_Sx2, ids_Nx2, num_buckets=, max_probe=, probing=, impl=)`` -> (identity_Sx2,
slot_N, status_N); ``lookup(identity_Sx2, ids_Nx2, num_buckets=, max_probe=, probing=, impl=)`` -> slot_N
(-1 = absent), read only.

Probing (``pallas_kernels.zch_reference`` defines it): ``"two_choice"`` (default) gives each ID two windows
of ``ceil(max_probe / 2)`` aligned slots inside its bucket and inserts into the one with more EMPTY slots
(falling back to the other); ``"linear"`` is one window of ``max_probe`` slots (the earlier scheme, kept for
ablations). A table must be read with the probing it was filled with.

IDs are uint32 pairs ``(N, 2) = [low, high]`` of the raw non-negative int64 ID (``as_id_pairs`` converts
numpy int64 on the host, or a non-negative int32 JAX array); the identity table is ``(S, 2)`` uint32 with all
ones (int64 -1) for an empty slot. Status per ID: ``STATUS_HIT``, ``STATUS_INSERTED``, ``STATUS_FULL`` (every
window full: slot -1, nothing overwritten), ``STATUS_PAD`` (the ID was ``EMPTY_PAIR``, i.e. padding).
Implementations:
- ``"pallas"``: one-launch Triton kernel with 64-bit compare-and-swap (``pallas_kernels.zch``); off a GPU it
  runs in interpret mode (slow; for tests).
- ``"xla"`` / ``"reference"``: the sort/dedupe plain-JAX definition (vectorized rounds; the same function,
  it is already jit-friendly; a new ID may land on a different free slot - or, with two-choice, window -
  than with the kernel, never with a different *set* of guarantees).
``"auto"`` is Pallas on an NVIDIA GPU (sm_80+) and XLA elsewhere.

Letters: N IDs, S slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import zch as kz
from pallas_kernels import zch_reference as kzr
from recjax import validation
from recjax.ops import dispatch

IMPLS = dispatch.IMPLS
PROBINGS = kz.PROBINGS
STATUS_HIT, STATUS_INSERTED, STATUS_FULL, STATUS_PAD = (
    kz.STATUS_HIT,
    kz.STATUS_INSERTED,
    kz.STATUS_FULL,
    kz.STATUS_PAD,
)
EMPTY_PAIR = np.uint32(0xFFFFFFFF)
_EMPTY_U64 = np.uint64(2**64 - 1)  # the empty marker (-1 as int64): both uint32 halves EMPTY_PAIR
split_ids, join_ids, empty_identity = kz.split_ids, kz.join_ids, kz.empty_identity


def resolve_impl(impl: str) -> str:
    return dispatch.resolve_impl(impl, IMPLS)


def as_id_pairs(ids, name: str = "ids") -> jax.Array:
    """Raw IDs -> uint32 pairs (..., 2). Accepts numpy int64/int32/uint (host), a JAX signed int32 array
    (values must be >= 0), or uint32 pairs (..., 2) (returned as is). Negative IDs and the uint64 ID
    2**64 - 1 (the empty marker) are rejected."""
    if isinstance(ids, np.ndarray) or np.isscalar(ids) or isinstance(ids, (list, tuple)):
        arr = np.asarray(ids)
        validation.check_dtype(name, arr, "iu")
        if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
            bad = tuple(np.argwhere(arr < 0)[0])
            raise ValueError(
                f"{name}: expected raw IDs >= 0 (-1 is the empty marker), got {arr[bad]} at {bad}"
            )
        if arr.dtype.itemsize == 8 and arr.dtype.kind == "u" and arr.size and (arr == _EMPTY_U64).any():
            bad = tuple(int(i) for i in np.argwhere(arr == _EMPTY_U64)[0])
            raise ValueError(
                f"{name}: expected raw IDs < 2**64 - 1 (2**64 - 1 is the empty marker, it would become "
                f"padding), got {arr[bad]} at {bad}"
            )
        return jnp.asarray(kz.split_ids(arr))
    if ids.dtype == jnp.uint32 and ids.ndim >= 1 and ids.shape[-1] == 2:
        return ids
    validation.check_dtype(name, ids, "i")
    if ids.dtype.itemsize != 4:
        raise TypeError(f"{name}: expected int32 or uint32 pairs (..., 2) as a JAX array, got {ids.dtype}")
    validation.check_range(name, ids, 0, 2**31)
    return jnp.stack([ids.astype(jnp.uint32), jnp.zeros_like(ids, jnp.uint32)], axis=-1)


def check_table(identity_Sx2, num_buckets: int, max_probe: int, probing: str = "two_choice") -> None:
    validation.check_shape("identity", identity_Sx2, (None, 2))
    if identity_Sx2.dtype != jnp.uint32:
        raise TypeError(f"identity: expected uint32 pairs (S, 2), got {identity_Sx2.dtype}")
    n_slots = identity_Sx2.shape[0]
    validation.check_positive("identity slots", n_slots)
    validation.check_positive("num_buckets", num_buckets)
    if n_slots % num_buckets:
        raise ValueError(f"num_buckets: expected a divisor of the table size {n_slots}, got {num_buckets}")
    if n_slots >= 2**31:
        raise ValueError(f"identity: expected fewer than 2**31 slots (int32 slots), got {n_slots}")
    bucket_size = n_slots // num_buckets
    if not 1 <= max_probe <= bucket_size:
        raise ValueError(f"max_probe: expected 1..bucket size {bucket_size}, got {max_probe}")
    kzr.check_probing(probing)


def _check(identity_Sx2, ids_Nx2, num_buckets, max_probe, probing):
    check_table(identity_Sx2, num_buckets, max_probe, probing)
    validation.check_shape("ids", ids_Nx2, (None, 2))
    if ids_Nx2.dtype != jnp.uint32:
        raise TypeError(f"ids: expected uint32 pairs (N, 2) (see as_id_pairs), got {ids_Nx2.dtype}")


def _dispatch(kernel, reference, identity_Sx2, ids_Nx2, num_buckets, max_probe, impl, block, probing):
    """Validates, then runs the Pallas kernel (interpret mode off-GPU) or the plain-JAX reference."""
    _check(identity_Sx2, ids_Nx2, num_buckets, max_probe, probing)
    kw = dict(num_buckets=num_buckets, max_probe=max_probe, probing=probing)
    if resolve_impl(impl) == "pallas":
        return kernel(identity_Sx2, ids_Nx2, block=block, interpret=not dispatch.pallas_supported(), **kw)
    return reference(identity_Sx2, ids_Nx2, **kw)


def insert_or_find(
    identity_Sx2,
    ids_Nx2,
    *,
    num_buckets: int,
    max_probe: int = 128,
    impl: str = "auto",
    block: int | None = None,  # lanes per program; None = the measured default per probing scheme
    probing: str = "two_choice",
):
    """-> (identity_Sx2, slot_N int32, status_N int32). See the module docstring."""
    return _dispatch(
        kz.zch_insert_or_find,
        kz.zch_reference,
        identity_Sx2,
        ids_Nx2,
        num_buckets,
        max_probe,
        impl,
        block,
        probing,
    )


def lookup(
    identity_Sx2,
    ids_Nx2,
    *,
    num_buckets: int,
    max_probe: int = 128,
    impl: str = "auto",
    block: int | None = None,  # lanes per program; None = the measured default per probing scheme
    probing: str = "two_choice",
):
    """-> slot_N int32, -1 where the ID is not in the table. Never modifies the table."""
    return _dispatch(
        kz.zch_lookup,
        kz.zch_lookup_reference,
        identity_Sx2,
        ids_Nx2,
        num_buckets,
        max_probe,
        impl,
        block,
        probing,
    )


def windows(ids_Nx2, *, num_buckets: int, bucket_size: int):
    """(global bucket_N, linear-probing start offset_N) int32 of each ID (bucket -1 for padding): the bucket
    for sharding (the same under both probings), the offset as a uniform hash (reserved rows, modulo)."""
    with jax.enable_x64(True):
        ids = jax.lax.bitcast_convert_type(ids_Nx2, jnp.int64)
        base, start = kz.window(ids, num_buckets, bucket_size)
        bucket = jnp.where(ids == kz.EMPTY, -1, base // bucket_size)
        return bucket.astype(jnp.int32), start.astype(jnp.int32)


def probe_windows(
    ids_Nx2, *, num_buckets: int, bucket_size: int, max_probe: int, probing: str = "two_choice"
):
    """The windows an ID may live in, for eviction -> (global bucket_N (-1 for padding), starts_NxK int32:
    each window's first slot as an offset inside the bucket, L: slots per window). Slot j of window k is
    ``bucket * bucket_size + (starts[:, k] + j) % bucket_size``; K = 1 (linear, L = max_probe) or 2."""
    _, length, _ = kzr.geometry(bucket_size, max_probe, probing)
    with jax.enable_x64(True):
        ids = jax.lax.bitcast_convert_type(ids_Nx2, jnp.int64)
        base, starts = kz.probe_windows(ids, num_buckets, bucket_size, max_probe, probing)
        bucket = jnp.where(ids == kz.EMPTY, -1, base // bucket_size).astype(jnp.int32)
        return bucket, jnp.stack(starts, axis=-1).astype(jnp.int32), length


def admission_uniform(ids_Nx2, salt) -> jax.Array:
    """A uniform [0, 1) number per ID (same ID, same salt -> same number): admission decisions that agree for
    repeated IDs in a batch. ``salt`` is a uint32 scalar (e.g. from the step and a seed)."""
    with jax.enable_x64(True):
        ids = jax.lax.bitcast_convert_type(ids_Nx2, jnp.int64)
        h = kz.hash64(ids ^ (jnp.asarray(salt).astype(jnp.int64) * jnp.int64(0x2545F4914F6CDD1D)))
        return (jax.lax.shift_right_logical(h, jnp.int64(40)).astype(jnp.float32) / float(2**24)).astype(
            jnp.float32
        )
