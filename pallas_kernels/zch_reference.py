"""MPZCH hashing, probe windows and the plain-JAX reference of insert-or-find / lookup (the semantics).

Hashing: an ID's 64-bit splitmix64 hash ``h`` picks its bucket (``(h >> 32) % num_buckets``); probes never
leave the bucket, so row-wise sharding by buckets keeps every probe on the device that owns the bucket.

Probing (``probing=``), inside the bucket of ``bucket_size`` slots:
- ``"linear"``: one window of ``max_probe`` slots from ``start = (h & 0xffffffff) % bucket_size``, circular.
- ``"two_choice"`` (default; balanced allocation, "power of two choices"): the bucket is cut into aligned
  sub-blocks of ``L = ceil(max_probe / 2)`` slots (``nsub = ceil(bucket_size / L)``; when L does not divide
  the bucket the last sub-block wraps circularly onto the first slots). An ID has two *distinct* candidate
  windows: ``a = (h & 0xffffffff) % nsub`` and ``b = (a + 1 + h2 % (nsub - 1)) % nsub`` with ``h2`` a second
  splitmix64 round of ``h`` (one window when the bucket holds a single sub-block). At most ``2 L`` slots are
  probed, about ``max_probe``. With ``max_probe == bucket_size`` the two windows cover the whole bucket.

Semantics of ``insert_or_find``, per distinct ID of a batch (linear probing: the result equals inserting the
batch's distinct IDs one at a time in some order; two_choice: see the window preference below):
  1. the ID is stored anywhere in its window(s) -> that slot (HIT);
  2. else it takes the first EMPTY slot of its *probe sequence* (INSERTED): linear: the window in order;
     two_choice: its preferred window (the one with more EMPTY slots, ties -> window a), then the other one;
  3. else -> slot -1 (FULL), table unchanged for it: FULL means every slot of every window of the ID is live.
The preference is decided on the table as it was when the ID's windows were scanned, i.e. at the start of the
call in this reference (the batch's own insertions do not move it: the staleness of a parallel GPU launch,
and it keeps the reference vectorized). So a two_choice result need NOT equal any one-at-a-time order: two
IDs with the same two windows both prefer the emptier one at the start of the call and may both land
there, where sequential insertion would have sent the second to the other window. What holds: each ID gets
one slot (repeated IDs one slot; the first occurrence reports INSERTED); distinct IDs get distinct slots;
nothing live is overwritten; FULL only when every slot of both windows is live. Eviction leaves holes, so
step 1 scans every window completely before step 2 claims.

Vectorization (the rounds serialize the claims, with the preferences fixed at the call start): dedupe by a
sort; one read-only scan of the windows (found slot, EMPTY count and first EMPTY per window); then rounds over
probe positions: every pending ID looks at its current probe slot, the ones seeing EMPTY propose it, the
smallest ID per proposed slot wins (a sort), everyone else advances (from the end of the preferred window it
jumps to the other window's first EMPTY).

ID representation: int64 here (callers enable x64 locally); ``EMPTY`` = -1; raw IDs are >= 0.
Letters: N IDs in the batch, S table slots, K windows per ID (1 or 2), L slots per window.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

EMPTY = -1  # int64 all ones; raw IDs are >= 0
STATUS_HIT, STATUS_INSERTED, STATUS_FULL, STATUS_PAD = 0, 1, 2, 3
PROBINGS = ("linear", "two_choice")


def _as_i64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_MIX1, _MIX2 = _as_i64(0xBF58476D1CE4E5B9), _as_i64(0x94D049BB133111EB)
_SECOND = _as_i64(0x9E3779B97F4A7C15)  # golden-ratio salt: the second choice's hash


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
    """(first slot of the ID's bucket, linear-probing start offset inside it), int32."""
    h = hash64(ids)
    bucket = _srl(h, 32) % num_buckets
    start = (h & 0xFFFFFFFF) % bucket_size
    return (bucket * bucket_size).astype(jnp.int32), start.astype(jnp.int32)


def check_probing(probing: str) -> None:
    if probing not in PROBINGS:
        raise ValueError(f"probing: expected one of {PROBINGS}, got {probing!r}")


def geometry(bucket_size: int, max_probe: int, probing: str) -> tuple[int, int, int]:
    """(K windows per ID, L slots per window, nsub sub-blocks per bucket) - static Python ints."""
    check_probing(probing)
    if probing == "linear":
        return 1, max_probe, bucket_size
    length = min(-(-max_probe // 2), bucket_size)
    nsub = -(-bucket_size // length)
    return (2 if nsub > 1 else 1), length, nsub


def probe_windows(ids, num_buckets: int, bucket_size: int, max_probe: int, probing: str):
    """-> (base_N int32: first slot of the bucket, starts: tuple of K int32 arrays: each window's first slot
    as an offset inside the bucket). Slot j of window k: ``base + (starts[k] + j) % bucket_size``."""
    k_windows, length, nsub = geometry(bucket_size, max_probe, probing)
    h = hash64(ids)
    base = ((_srl(h, 32) % num_buckets) * bucket_size).astype(jnp.int32)
    low = h & 0xFFFFFFFF
    if probing == "linear":
        return base, ((low % bucket_size).astype(jnp.int32),)
    first = low % nsub
    if k_windows == 1:
        return base, ((first * length).astype(jnp.int32),)
    second = (first + 1 + (hash64(h ^ jnp.int64(_SECOND)) & 0xFFFFFFFF) % (nsub - 1)) % nsub
    return base, ((first * length).astype(jnp.int32), (second * length).astype(jnp.int32))


def preferred_order(starts, first_empty, count):
    """Two-choice preference -> (start of the preferred window, start of the other, first EMPTY offset in
    each, -1 if none). The window with more EMPTY slots first, ties -> the first window. One window: the
    "other" is the same window with no EMPTY left to try."""
    if len(starts) == 1:
        return starts[0], starts[0], first_empty[0], jnp.full_like(first_empty[0], -1)
    swap = count[1] > count[0]
    s_pref, s_other = jnp.where(swap, starts[1], starts[0]), jnp.where(swap, starts[0], starts[1])
    fe_pref = jnp.where(swap, first_empty[1], first_empty[0])
    fe_other = jnp.where(swap, first_empty[0], first_empty[1])
    return s_pref, s_other, fe_pref, fe_other


def claim_start(fe_pref, fe_other, length: int, k_windows: int):
    """Position in the probe sequence (pref window 0..L-1, then the other L..2L-1) of the first EMPTY, or the
    end K L when there is none."""
    end = k_windows * length
    other = jnp.where(fe_other >= 0, length + fe_other, end) if k_windows == 2 else end
    return jnp.where(fe_pref >= 0, fe_pref, other).astype(jnp.int32)


def next_position(q, fe_other, length: int, k_windows: int):
    """Advance one probe; leaving the preferred window jumps to the other window's first EMPTY (slots before
    it were live at the scan and stay live during the call)."""
    q = q + 1
    if k_windows == 2:
        q = jnp.where(q == length, jnp.where(fe_other >= 0, length + fe_other, 2 * length), q)
    return q


def probe_slot(base, s_pref, s_other, q, length: int, bucket_size: int):
    """Slot at probe-sequence position q (see ``claim_start``)."""
    second = q >= length
    return base + (jnp.where(second, s_other, s_pref) + jnp.where(second, q - length, q)) % bucket_size


def dedupe(ids_N):
    """Sort-based dedupe -> (uniq_N: the distinct IDs (EMPTY padding counts as one) compacted to the front in
    ascending order, then EMPTY;
    order: the sort permutation; group_N: per sorted lane, the index of its distinct ID in uniq_N; first_N:
    whether a sorted lane is the first (lowest batch lane) occurrence of its ID)."""
    n = ids_N.shape[0]
    order = jnp.argsort(ids_N, stable=True)
    sorted_N = ids_N[order]
    first = jnp.concatenate([jnp.ones((1,), jnp.bool_), sorted_N[1:] != sorted_N[:-1]])
    group = jnp.cumsum(first.astype(jnp.int32)) - 1
    uniq = jnp.full((n,), EMPTY, ids_N.dtype).at[jnp.where(first, group, n)].set(sorted_N, mode="drop")
    return uniq, order, group, first


def undedupe(slot_U, status_U, order, group, first):
    """Distinct-ID results back to the batch's lanes: repeats share the slot; only the first occurrence of a
    new ID reports INSERTED, the others HIT."""
    n = order.shape[0]
    slot_s, status_s = slot_U[group], status_U[group]
    status_s = jnp.where(~first & (status_s == STATUS_INSERTED), STATUS_HIT, status_s)
    slot_N = jnp.zeros((n,), jnp.int32).at[order].set(slot_s)
    status_N = jnp.zeros((n,), jnp.int32).at[order].set(status_s)
    return slot_N, status_N


def scan_windows_xla(table_S, ids_N, valid, base, starts, *, bucket_size: int, length: int):
    """Read-only scan of every window -> (found, slot (-1 absent), first EMPTY offset per window (K, N) (-1:
    none), EMPTY count per window (K, N)). Stops early once every valid ID is found."""
    k_windows = len(starts)
    starts_KxN = jnp.stack(starts)

    def cond(c):
        return (c[0] < k_windows * length) & jnp.any(valid & ~c[1])

    def body(c):
        p, found, slot, first_empty, count = c
        k, j = p // length, p % length
        s = base + (starts_KxN[k] + j) % bucket_size
        cur = table_S[s]
        hit = valid & ~found & (cur == ids_N)
        empty = cur == EMPTY
        fe = first_empty[k]
        first_empty = first_empty.at[k].set(jnp.where((fe < 0) & empty, j, fe))
        count = count.at[k].add(empty.astype(jnp.int32))
        return p + 1, found | hit, jnp.where(hit, s, slot), first_empty, count

    minus = jnp.full(ids_N.shape, -1, jnp.int32)
    init = (
        jnp.int32(0),
        jnp.zeros(ids_N.shape, bool),
        minus,
        jnp.full((k_windows,) + ids_N.shape, -1, jnp.int32),
        jnp.zeros((k_windows,) + ids_N.shape, jnp.int32),
    )
    _, found, slot, first_empty, count = lax.while_loop(cond, body, init)
    return found, slot, first_empty, count


def lookup_reference_i64(table_S, ids_N, *, num_buckets, max_probe, probing="two_choice"):
    """Slot of each ID in its window(s), -1 if absent (x64 enabled)."""
    bucket_size = table_S.shape[0] // num_buckets
    _, length, _ = geometry(bucket_size, max_probe, probing)
    base, starts = probe_windows(ids_N, num_buckets, bucket_size, max_probe, probing)
    valid = ids_N != EMPTY
    return scan_windows_xla(table_S, ids_N, valid, base, starts, bucket_size=bucket_size, length=length)[1]


def insert_or_find_reference_i64(table_S, ids_N, *, num_buckets, max_probe, probing="two_choice"):
    """(new table, slot_N int32, status_N int32); see the module docstring (x64 enabled)."""
    n, n_slots = ids_N.shape[0], table_S.shape[0]
    bucket_size = n_slots // num_buckets
    k_windows, length, _ = geometry(bucket_size, max_probe, probing)
    uniq_N, order, group, first = dedupe(ids_N)
    valid = uniq_N != EMPTY
    base, starts = probe_windows(uniq_N, num_buckets, bucket_size, max_probe, probing)
    found, slot, first_empty, count = scan_windows_xla(
        table_S, uniq_N, valid, base, starts, bucket_size=bucket_size, length=length
    )
    s_pref, s_other, fe_pref, fe_other = preferred_order(starts, first_empty, count)
    end = k_windows * length
    lanes = jnp.arange(n, dtype=jnp.int32)
    no_slot = jnp.int32(np.iinfo(np.int32).max)

    def cond(c):
        return jnp.any(c[2])

    def body(c):
        table, q, pending, slot, inserted = c
        s = probe_slot(base, s_pref, s_other, q, length, bucket_size)
        propose = pending & (table[s] == EMPTY)
        key_s, lane_s = lax.sort((jnp.where(propose, s, no_slot), lanes), num_keys=2)
        head = (key_s != no_slot) & jnp.concatenate([jnp.ones((1,), bool), key_s[1:] != key_s[:-1]])
        win = jnp.zeros((n,), bool).at[lane_s].set(head)
        table = table.at[jnp.where(win, s, n_slots)].set(uniq_N, mode="drop")
        q = next_position(q, fe_other, length, k_windows)
        return table, q, pending & ~win & (q < end), jnp.where(win, s, slot), inserted | win

    q0 = claim_start(fe_pref, fe_other, length, k_windows)
    pending = valid & ~found & (q0 < end)
    table, _, _, slot, inserted = lax.while_loop(
        cond, body, (table_S, q0, pending, slot, jnp.zeros((n,), bool))
    )
    status = jnp.where(inserted, STATUS_INSERTED, jnp.where(slot >= 0, STATUS_HIT, STATUS_FULL))
    status = jnp.where(valid, status, STATUS_PAD)
    slot_N, status_N = undedupe(slot, status, order, group, first)
    return table, slot_N, status_N


# ----------------------------------------------------------------------------- uint32-pair wrappers


def i64(pairs):
    return lax.bitcast_convert_type(pairs, jnp.int64)


def pairs(x64):
    return lax.bitcast_convert_type(x64, jnp.uint32)


@functools.partial(jax.jit, static_argnames=("num_buckets", "max_probe", "probing"))
def zch_reference(identity_Sx2, ids_Nx2, *, num_buckets: int, max_probe: int, probing: str = "two_choice"):
    """Plain-JAX insert-or-find (the semantics) -> (identity_Sx2, slot_N, status_N)."""
    with jax.enable_x64(True):
        table, slot, status = insert_or_find_reference_i64(
            i64(identity_Sx2), i64(ids_Nx2), num_buckets=num_buckets, max_probe=max_probe, probing=probing
        )
        return pairs(table), slot, status


@functools.partial(jax.jit, static_argnames=("num_buckets", "max_probe", "probing"))
def zch_lookup_reference(
    identity_Sx2, ids_Nx2, *, num_buckets: int, max_probe: int, probing: str = "two_choice"
):
    with jax.enable_x64(True):
        return lookup_reference_i64(
            i64(identity_Sx2), i64(ids_Nx2), num_buckets=num_buckets, max_probe=max_probe, probing=probing
        )
