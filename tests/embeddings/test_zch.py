"""Managed-collision embedding collection: remap invariants, eviction victims, admission, resets, read-only
mode, checkpoints, sharded == single device, bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from recjax.embeddings import zch as ez
from recjax.ops import zch as ops
from recjax.train.checkpoint import Checkpointer


def table(
    policy="none",
    *,
    n=64,
    reserved=0,
    buckets=1,
    probe=None,
    ttl=0,
    feature_ttl=(),
    admit=1.0,
    probing=None,
    **kw,
):
    return ez.ZchTableConfig(
        "t",
        num_embeddings=n + reserved,
        embedding_dim=4,
        feature_names=kw.pop("features", ("a",)),
        num_buckets=buckets,
        max_probe=probe or n // buckets,
        eviction=ez.EvictionPolicy(policy, ttl=ttl, feature_ttl=feature_ttl),
        admission_probability=admit,
        num_reserved_slots=reserved,
        **({"probing": probing} if probing else {}),
    )


def shared_table():
    """One config (and batch size 20) for several tests, so they share one compilation."""
    return table("lru", n=64, reserved=4, ttl=10, feature_ttl=(("short", 2),), features=("long", "short"))


def np_state(st):
    return jax.tree.map(np.asarray, st)


def test_remap_invariants_two_features_and_steps(rng):
    cfg = table(n=256, buckets=4, probe=32, features=("user", "friend"))
    coll = ez.ZchEmbeddingCollection([cfg], impl="xla")
    state = coll.init_state()
    remap = jax.jit(lambda s, f, step: coll.remap(s, f, step))
    pool = rng.integers(0, 2**62, 120, dtype=np.int64)
    seen = {}
    for step in range(3):
        f = {"user": pool[rng.integers(0, 120, (6, 7))], "friend": pool[rng.integers(0, 120, 33)]}
        before = np_state(state["t"])
        rows, state, resets, stats = remap(state, {k: ops.as_id_pairs(v) for k, v in f.items()}, step)
        ids = np.concatenate([f["user"].ravel(), f["friend"]])
        r = np.concatenate([np.asarray(rows["user"]).ravel(), np.asarray(rows["friend"])])
        assert rows["user"].shape == (6, 7) and (r >= 0).all()
        for i, row in zip(ids, r, strict=True):  # same ID -> same row, across features and steps
            assert seen.setdefault(int(i), int(row)) == row
        assert len(np.unique(r)) == len(np.unique(ids))
        new_rows = np.unique(r[~np.isin(ids, ops.join_ids(before["identity"]))])
        assert np.array_equal(np.flatnonzero(np.asarray(resets["t"])), new_rows)
        s = {k: int(v) for k, v in stats["t"].items()}
        assert s["ids"] == len(ids) and s["inserts"] == len(new_rows) and s["fallbacks"] == 0
        assert s["used"] == len(seen)
        after = np_state(state["t"])
        assert (after["last_seen"][r] == step).all() and (after["count"] >= 0).all()
        m = ez.zch_metrics(stats["t"], cfg.num_slots)
        assert m["table_usage"] == len(seen) / 256 and m["collision_rate"] == 0.0


def full_state(rng, cfg, coll, step):
    """A table whose single bucket is full, with distinct random metadata; returns (state, ids)."""
    n = cfg.num_slots
    ids = rng.choice(2**40, n, replace=False).astype(np.int64)
    state = coll.init_state()
    _, state, _, _ = coll.remap(state, {"a": ids}, 0)
    st = dict(state["t"])
    st["last_seen"] = jnp.asarray(rng.permutation(n).astype(np.int32))  # all < step
    st["count"] = jnp.asarray(rng.permutation(n).astype(np.int32) + 1)
    st["expiry"] = jnp.asarray((rng.permutation(n) + step - n // 2).astype(np.int32))  # about half expired
    st["inserted_at"] = jnp.zeros((n,), jnp.int32)
    state["t"] = st
    return state, ops.join_ids(np.asarray(st["identity"]))


@pytest.mark.parametrize("policy", ["lru", "lfu", "ttl", "none"])
def test_eviction_picks_the_policy_victim(policy, rng):
    step = 100
    cfg = table(policy, n=16, reserved=2, ttl=5)
    coll = ez.ZchEmbeddingCollection([cfg], impl="xla")
    state, stored = full_state(rng, cfg, coll, step)
    st = np_state(state["t"])
    keep = int(np.argmin(st["last_seen"]))  # the LRU slot, but used in this batch: not evictable
    new_id = 2**41 + 7
    batch = np.array([new_id] + [stored[keep]] * 15)  # same batch shape as the fill: one compilation
    rows, new_state, resets, stats = coll.remap(state, {"a": batch}, step)
    rows = np.asarray(rows["a"])
    eligible = np.arange(16) != keep
    if policy == "lru":
        want = np.flatnonzero(eligible)[np.argmin(st["last_seen"][eligible])]
    elif policy == "lfu":
        want = np.flatnonzero(eligible)[np.argmin(st["count"][eligible])]
    elif policy == "ttl":
        ok = eligible & (st["expiry"] <= step)
        want = np.flatnonzero(ok)[np.argmin(st["expiry"][ok])]
    if policy == "none":
        assert rows[0] in (16, 17) and int(stats["t"]["fallbacks"]) == 1 and not np.asarray(resets["t"]).any()
    else:
        assert rows[0] == want and rows[1] == keep
        after = np_state(new_state["t"])
        assert ops.join_ids(after["identity"])[want] == new_id
        assert np.flatnonzero(np.asarray(resets["t"])).tolist() == [want]
        assert after["count"][want] == 1 and after["inserted_at"][want] == step
        assert int(stats["t"]["evictions"]) == 1 and int(stats["t"]["eviction_age_sum"]) == step
    assert rows[1] == keep


@pytest.mark.parametrize("probing", ["two_choice", "linear"])
def test_lru_victim_comes_from_the_union_of_the_windows(probing, rng):
    """64 slots, max_probe 16: two windows of 8 (or one linear window of 16) out of the bucket. The table is
    full; a new ID evicts the least recently seen slot of *its* windows, not of the table."""
    cfg = table("lru", n=64, probe=16, probing=probing)
    coll = ez.ZchEmbeddingCollection([cfg], impl="xla")
    st = coll.init_state()["t"]
    st["identity"] = ops.as_id_pairs(rng.choice(2**40, 64, replace=False))
    new_ids = rng.choice(2**40, 4, replace=False) + 2**41
    bucket, starts, length = ops.probe_windows(
        ops.as_id_pairs(new_ids), num_buckets=1, bucket_size=64, max_probe=16, probing=probing
    )
    assert length == (8 if probing == "two_choice" else 16)
    win = (np.asarray(starts)[:, :, None] + np.arange(length)).reshape(4, -1) % 64
    assert len(set(win[0])) == 16  # two distinct windows of 8 / one of 16
    # the least recently seen slot of the table is outside the windows; the windows' oldest is the last slot
    # scanned (two-choice: in the second window, so a victim search of the first window alone would miss it)
    last = rng.permutation(64).astype(np.int32) + 10
    last[win[0, -1]] = 5
    last[np.setdiff1d(np.arange(64), win[0])[0]] = 1
    st["last_seen"] = jnp.asarray(last)
    st["inserted_at"] = jnp.zeros((64,), jnp.int32)
    rows, new_state, resets, stats = coll.remap({"t": st}, {"a": new_ids[:1]}, 100)
    want = win[0, -1]
    assert int(np.asarray(rows["a"])[0]) == want and int(stats["t"]["evictions"]) == 1
    assert ops.join_ids(np.asarray(new_state["t"]["identity"]))[want] == new_ids[0]
    assert np.flatnonzero(np.asarray(resets["t"])).tolist() == [want]


def test_ttl_without_expired_slot_falls_back(rng):
    cfg = table("ttl", n=16, reserved=2, ttl=5)  # the config of the eviction test: same compilation
    coll = ez.ZchEmbeddingCollection([cfg], impl="xla")
    state, stored = full_state(rng, cfg, coll, step=0)  # expiries around 0 .. 16: use step -100: none expired
    rows, new_state, resets, stats = coll.remap(state, {"a": np.full(16, 2**41)}, -100)
    assert (np.asarray(rows["a"]) >= 16).all() and int(stats["t"]["fallbacks"]) == 16
    assert np.array_equal(ops.join_ids(np.asarray(new_state["t"]["identity"])), stored)


def test_active_eviction_per_feature_ttl(rng):
    coll = ez.ZchEmbeddingCollection([shared_table()], impl="xla")
    state = coll.init_state()
    long_ids = rng.choice(2**40, 10, replace=False)
    short_ids = rng.choice(2**40, 10, replace=False) + 2**41
    rows, state, _, _ = coll.remap(state, {"long": long_ids, "short": short_ids}, 0)
    state, resets, stats = coll.evict_expired(state, 5)  # short expired at 2, long lives until 10
    freed = np.flatnonzero(np.asarray(resets["t"]))
    assert np.array_equal(freed, np.sort(np.asarray(rows["short"])))
    assert int(stats["t"]["evictions"]) == 10 and int(stats["t"]["eviction_age_sum"]) == 50
    left = set(ops.join_ids(np.asarray(state["t"]["identity"])).tolist()) - {-1}
    assert left == set(long_ids.tolist())
    state, resets, _ = coll.evict_expired(state, 10)
    assert int(np.asarray(resets["t"]).sum()) == 10 and (np.asarray(state["t"]["last_seen"]) == -1).all()


def test_admission_uses_reserved_rows(rng):
    cfg = table(n=512, reserved=8, admit=0.5, probe=64)
    coll = ez.ZchEmbeddingCollection([cfg], impl="xla", seed=3)
    state = coll.init_state()
    ids = rng.choice(2**40, 400, replace=False)
    ids = np.concatenate([ids, ids[:50]])  # repeats decide alike
    rows, state, resets, stats = coll.remap(state, {"a": ids}, 1)
    rows = np.asarray(rows["a"])
    out = rows >= 512
    assert (rows[out] < 520).all() and np.array_equal(rows[:50], rows[400:])
    assert 120 < (~out[:400]).sum() < 280  # Binomial(400, 0.5), > 8 sigma margin
    assert int(stats["t"]["not_admitted"]) == out.sum() and int(stats["t"]["fallbacks"]) == out.sum()
    assert not np.asarray(resets["t"])[512:].any() and np.asarray(resets["t"]).sum() == (~out[:400]).sum()
    stored = set(ops.join_ids(np.asarray(state["t"]["identity"])).tolist()) - {-1}
    assert stored == set(ids[:400][~out[:400]].tolist())
    rows2, _, _, _ = coll.remap(state, {"a": ids}, 2)  # admitted IDs stay admitted, on their rows
    assert np.array_equal(np.asarray(rows2["a"])[~out], rows[~out])


def test_read_only_mode(rng):
    coll = ez.ZchEmbeddingCollection([shared_table()], impl="xla")
    ids = rng.choice(2**40, 20, replace=False)
    rows, state, _, _ = coll.remap(coll.init_state(), {"long": ids}, 0)
    query = np.concatenate([ids, [2**50, 2**50 + 1]])
    rows_ro, state_ro, resets, stats = coll.remap(state, {"long": query}, 1, training=False)
    rows_ro = np.asarray(rows_ro["long"])
    assert np.array_equal(rows_ro[:20], np.asarray(rows["long"])) and (rows_ro[20:] >= 64).all()
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state_ro), strict=True)
    )
    assert not np.asarray(resets["t"]).any() and int(stats["t"]["fallbacks"]) == 2


def test_reset_rows_fresh_init_and_zero_optimizer_state(rng):
    cfg = table(n=32, reserved=4)
    coll = ez.ZchEmbeddingCollection([cfg], impl="xla")
    params = coll.init_params(jax.random.key(0))
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    _, opt_state = tx.update(grads, opt_state, params)
    mask = jnp.asarray(rng.random(36) < 0.3)
    init_fn = jax.nn.initializers.normal(1.0)
    key = jax.random.key(5)
    new_t, new_opt = jax.jit(lambda p, o, m: ez.reset_rows(p, o, m, init_fn, key, table_name="t"))(
        params["t"], opt_state, mask
    )
    m = np.asarray(mask)
    fresh = np.asarray(init_fn(key, (36, 4), jnp.float32))
    assert np.array_equal(np.asarray(new_t)[m], fresh[m])
    assert np.array_equal(np.asarray(new_t)[~m], np.asarray(params["t"])[~m])
    mu, nu = new_opt[0].mu["t"], new_opt[0].nu["t"]
    assert (np.asarray(mu)[m] == 0).all() and (np.asarray(nu)[m] == 0).all()
    assert (
        np.array_equal(np.asarray(mu)[~m], np.asarray(opt_state[0].mu["t"])[~m])
        and (np.asarray(nu)[~m] != 0).all()
    )
    assert int(new_opt[0].count) == 1


def test_checkpoint_round_trip(tmp_path, rng):
    coll = ez.ZchEmbeddingCollection([shared_table()], impl="xla")
    _, state, _, _ = coll.remap(coll.init_state(), {"short": rng.choice(2**40, 20, replace=False)}, 3)
    ckpt = Checkpointer(tmp_path / "zch")
    ckpt.save(3, state, force=True)
    back = ckpt.restore(coll.init_state())
    ckpt.close()
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def test_sharded_equals_single_device(rng):
    mesh = jax.make_mesh((8,), ("model",))
    cfg = table("lru", n=256, buckets=16, probe=16)
    coll = ez.ZchEmbeddingCollection([cfg], impl="xla")
    single, sharded = coll.init_state(), coll.init_state()
    f1 = jax.jit(lambda s, ids, step: coll.remap(s, {"a": ids}, step))
    f8 = jax.jit(lambda s, ids, step: coll.remap(s, {"a": ids}, step, mesh=mesh))
    pool = rng.choice(2**40, 400, replace=False)
    for step in range(3):  # 400 IDs into 256 slots: LRU evictions from step 1 on
        ids = ops.as_id_pairs(pool[rng.integers(0, 400, 160)])
        out1, out8 = f1(single, ids, step), f8(sharded, ids, step)
        single, sharded = out1[1], out8[1]
        for a, b in zip(jax.tree.leaves(out1), jax.tree.leaves(out8), strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    assert int(out1[3]["t"]["evictions"]) > 0


def test_bad_inputs():
    coll = ez.ZchEmbeddingCollection([table(n=64)], impl="xla")
    state = coll.init_state()
    with pytest.raises(ValueError, match=r"features\['a'\]: expected raw IDs >= 0"):
        coll.remap(state, {"a": np.array([3, -2])}, 0)
    with pytest.raises(TypeError, match=r"features\['a'\]: expected signed integer or unsigned integer"):
        coll.remap(state, {"a": np.array([1.5])}, 0)
    with pytest.raises(ValueError, match=r"features\['a'\]: expected values in \[0, 2147483648\)"):
        coll.remap(state, {"a": jnp.array([4, -1])}, 0)
    with pytest.raises(KeyError, match="unknown feature 'b'"):
        coll.remap(state, {"b": np.array([1])}, 0)
    with pytest.raises(ValueError, match="num_reserved_slots < num_embeddings"):
        ez.ZchEmbeddingCollection([table(n=0, reserved=4, probe=1)])
    with pytest.raises(ValueError, match="max_probe: expected 1..bucket size 16, got 32"):
        ez.ZchEmbeddingCollection([table(n=64, buckets=4, probe=32)])
    with pytest.raises(ValueError, match="num_buckets: expected a divisor"):
        ez.ZchEmbeddingCollection([table(n=64, buckets=5, probe=4)])
    with pytest.raises(ValueError, match="kind: expected one of"):
        ez.EvictionPolicy("fifo")
    with pytest.raises(ValueError, match="probing: expected one of"):
        ez.ZchEmbeddingCollection([table(n=64, probing="quadratic")])
    with pytest.raises(ValueError, match="impl: expected one of"):
        ez.ZchEmbeddingCollection([table(n=64)], impl="cuda")
    with pytest.raises(ValueError, match="divisible by 8 shards"):
        coll.remap(state, {"a": np.array([1])}, 0, mesh=jax.make_mesh((8,), ("model",)))


def test_new_owner_gets_fresh_row_and_optimizer_state(rng):
    """remap (evicts) then reset_rows: the evicted row is re-initialised and its Adam rows zeroed."""
    cfg = table("lru", n=16, reserved=2, ttl=5)  # the eviction test's config: shared compilation
    coll = ez.ZchEmbeddingCollection([cfg], impl="xla")
    state, stored = full_state(rng, cfg, coll, step=100)
    params = coll.init_params(jax.random.key(1))
    tx = optax.adam(0.1)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    updates, opt_state = tx.update(grads, tx.init(params), params)
    params = optax.apply_updates(params, updates)
    batch = np.array([2**45] + [stored[0]] * 15)
    rows, _, resets, _ = coll.remap(state, {"a": batch}, 100)
    init_fn = jax.nn.initializers.normal(1.0)
    reset = jax.jit(lambda p, o, m, k: ez.reset_rows(p, o, m, init_fn, k, table_name="t"))
    new_table, new_opt = reset(params["t"], opt_state, resets["t"], jax.random.key(2))
    victim = int(np.asarray(rows["a"])[0])
    mask = np.asarray(resets["t"])
    assert np.flatnonzero(mask).tolist() == [victim]
    fresh = np.asarray(init_fn(jax.random.key(2), (18, 4), jnp.float32))
    assert np.array_equal(np.asarray(new_table)[victim], fresh[victim])
    assert np.array_equal(np.asarray(new_table)[~mask], np.asarray(params["t"])[~mask])
    assert (np.asarray(new_opt[0].mu["t"])[victim] == 0).all() and (
        np.asarray(new_opt[0].nu["t"])[victim] == 0
    ).all()
    assert (np.asarray(opt_state[0].nu["t"])[victim] != 0).all()
