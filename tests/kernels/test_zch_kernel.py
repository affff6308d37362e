"""MPZCH kernels: invariants of insert-or-find / lookup on the Pallas kernel (interpret) and the reference.

The two give the same result up to which free slot a new ID claims (the kernel's claim order depends on
scheduling), so both are checked against the invariants and against each other where the answer is unique
(hits, lookups, counts). The window is recomputed here with an independent numpy splitmix64.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import zch

S, NUM_BUCKETS, MAX_PROBE, BLOCK = 256, 4, 16, 32
IMPLS = {
    "pallas": lambda t, i, nb, mp: zch.zch_insert_or_find(
        t, i, num_buckets=nb, max_probe=mp, block=BLOCK, interpret=True
    ),
    "reference": lambda t, i, nb, mp: zch.zch_reference(t, i, num_buckets=nb, max_probe=mp),
}


def np_window(ids, num_slots, num_buckets, max_probe):
    """Slots of each ID's probe window, (N, P), from a numpy splitmix64."""
    with np.errstate(over="ignore"):
        x = ids.astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h = x ^ (x >> np.uint64(31))
    bs = num_slots // num_buckets
    bucket = ((h >> np.uint64(32)) % np.uint64(num_buckets)).astype(np.int64)
    start = ((h & np.uint64(0xFFFFFFFF)) % np.uint64(bs)).astype(np.int64)
    return bucket[:, None] * bs + (start[:, None] + np.arange(max_probe)) % bs


def random_ids(rng, n, n_distinct, big=True):
    high = 2**62 if big else 2**31 - 1
    pool = rng.integers(0, high, size=n_distinct, dtype=np.int64)
    return pool[rng.integers(0, n_distinct, size=n)]  # duplicates


def check_invariants(before, after, ids, slot, status, num_buckets, max_probe):
    """before/after: int64 identity tables; ids: int64 batch; returns the number of FULL lanes."""
    win = np_window(ids, before.shape[0], num_buckets, max_probe)
    ok = slot >= 0
    assert np.array_equal(ok, status != zch.STATUS_FULL)
    assert (after[slot[ok]] == ids[ok]).all(), "slot does not hold its ID"
    assert np.array([s in w for s, w in zip(slot[ok], win[ok], strict=False)]).all(), (
        "slot outside the probe window"
    )
    for u in np.unique(ids):  # same ID -> one slot
        assert len(np.unique(slot[ids == u])) == 1
    live = np.unique(slot[ok])
    assert len(live) == len(np.unique(ids[ok])), "distinct IDs share a slot"
    assert (after[before != -1] == before[before != -1]).all(), "a live ID was overwritten"
    was_there = np.isin(ids, before)
    assert (status[was_there] == zch.STATUS_HIT).all()
    assert (slot[was_there] == np.array([np.flatnonzero(before == i)[0] for i in ids[was_there]])).all()
    new_unique = np.unique(ids[ok & ~was_there])
    assert (status == zch.STATUS_INSERTED).sum() == len(new_unique)
    assert set(after[after != -1]) == set(before[before != -1]) | set(new_unique)
    full = ~ok
    if full.any():  # FULL only when every slot of the window holds another ID
        assert (after[win[full]] != -1).all()
    return int(full.sum())


def run(impl, table, ids, nb=NUM_BUCKETS, mp=MAX_PROBE):
    new, slot, status = IMPLS[impl](
        jnp.asarray(zch.split_ids(table)), jnp.asarray(zch.split_ids(ids)), nb, mp
    )
    return zch.join_ids(np.asarray(new)).copy(), np.asarray(slot), np.asarray(status)


def test_split_join_round_trip(rng):
    ids = np.concatenate([[0, 1, 2**31, 2**40 + 3, 2**63 - 1], rng.integers(0, 2**63 - 1, 50)]).astype(
        np.int64
    )
    pairs = zch.split_ids(ids)
    assert pairs.dtype == np.uint32 and pairs.shape == (55, 2)
    assert np.array_equal(pairs[3], [3, 2**8]) and np.array_equal(zch.join_ids(pairs), ids)
    assert zch.join_ids(np.asarray(zch.empty_identity(3))).tolist() == [-1, -1, -1]


@pytest.mark.parametrize("impl", ["pallas", "reference"])
def test_insert_or_find_invariants_across_batches(impl, rng):
    table = np.full(S, -1, np.int64)
    first_slot = {}
    for big in (False, True):  # 80 lanes: not a multiple of the block; repeated + colliding IDs
        ids = random_ids(rng, 75, 40, big=big)
        old = list(first_slot)[:5] or list(ids[:5])  # IDs of the previous batch
        ids = np.concatenate([ids, old]).astype(np.int64)
        new, slot, status = run(impl, table, ids)
        assert check_invariants(table, new, ids, slot, status, NUM_BUCKETS, MAX_PROBE) == 0
        for i, s in zip(ids, slot, strict=False):
            assert first_slot.setdefault(int(i), int(s)) == s, "same ID moved across batches"
        table = new


def test_kernel_matches_reference_on_hits_lookups_and_counts(rng):
    table = np.full(S, -1, np.int64)
    table, _, _ = run("reference", table, random_ids(rng, 80, 70))
    ids = random_ids(rng, 80, 60)  # same shapes as above: compilations are shared
    ids[::3] = table[table != -1][: len(ids[::3])]
    out = {impl: run(impl, table, ids) for impl in IMPLS}
    (tp, sp, stp), (tr, sr, str_) = out["pallas"], out["reference"]
    assert np.array_equal(stp, str_)
    hit = stp == zch.STATUS_HIT
    assert np.array_equal(sp[hit & np.isin(ids, table)], sr[hit & np.isin(ids, table)])
    assert (tp != -1).sum() == (tr != -1).sum()
    for t in (tp, tr):  # lookup kernel == lookup reference on the filled table, absent IDs -> -1
        q = np.concatenate([ids[:-7], rng.integers(2**62, 2**63 - 1, 7)]).astype(np.int64)
        args = (jnp.asarray(zch.split_ids(t)), jnp.asarray(zch.split_ids(q)))
        lk = np.asarray(
            zch.zch_lookup(*args, num_buckets=NUM_BUCKETS, max_probe=MAX_PROBE, block=BLOCK, interpret=True)
        )
        lr = np.asarray(zch.zch_lookup_reference(*args, num_buckets=NUM_BUCKETS, max_probe=MAX_PROBE))
        assert np.array_equal(lk, lr)
        assert (lk[-7:] == -1).all() and (t[lk[:-7]] == ids[:-7]).all()


@pytest.mark.parametrize("impl", ["pallas", "reference"])
def test_full_table_falls_back_and_never_overwrites(impl, rng):
    table = np.full(S, -1, np.int64)
    ids = rng.choice(2**40, size=3 * S // 2, replace=False).astype(np.int64)  # more distinct IDs than slots
    ids = np.concatenate([ids, ids[:20]])
    new, slot, status = run(impl, table, ids, 4, S // 4)  # window = whole bucket
    n_full = check_invariants(table, new, ids, slot, status, 4, S // 4)
    assert n_full >= S // 2 and (new != -1).all(), "table should be full, with the rest FULL"
    again, slot2, status2 = run(impl, new, ids, 4, S // 4)
    assert np.array_equal(again, new) and np.array_equal(slot2, slot)
    assert ((status2 == zch.STATUS_HIT) == (slot >= 0)).all()


@pytest.mark.parametrize("impl", ["pallas", "reference"])
def test_hole_before_live_id_does_not_duplicate(impl, rng):
    ids = rng.choice(2**40, size=200, replace=False).astype(np.int64)
    table, slot, _ = run(impl, np.full(S, -1, np.int64), ids, 1, S)  # one bucket: long probe chains
    win = np_window(ids, S, 1, S)
    # an ID whose slot is not its first probe: free the first probe slot (an eviction) and look it up again
    k = int(np.flatnonzero(slot != win[:, 0])[0])
    table = table.copy()
    table[win[k, 0]] = -1
    new, slot2, status2 = run(impl, table, ids, 1, S)  # same batch again (same shape: no recompilation)
    assert slot2[k] == slot[k] and status2[k] == zch.STATUS_HIT
    evicted = slot == win[k, 0]  # the ID that lived in the freed slot comes back as a new ID
    assert np.array_equal(slot2[~evicted], slot[~evicted]) and (status2[evicted] == zch.STATUS_INSERTED).all()
    assert (new == -1).sum() == S - 200 and len(np.unique(slot2)) == 200


@pytest.mark.parametrize("impl", ["pallas", "reference"])
def test_window_not_a_multiple_of_the_probe_width(impl, rng):
    """max_probe 5 with 8 probes read per step: probes past the window must be ignored (FULL, not slot 6)."""
    ids = rng.choice(2**40, 80, replace=False).astype(np.int64)
    table, slot, status = run(impl, np.full(S, -1, np.int64), ids, 32, 5)  # 32 buckets of 8 slots
    n_full = check_invariants(np.full(S, -1, np.int64), table, ids, slot, status, 32, 5)
    assert (status[slot < 0] == zch.STATUS_FULL).all() and n_full == (slot < 0).sum()
