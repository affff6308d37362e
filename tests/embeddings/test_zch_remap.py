"""Raw-ID remapping for sequential models (recjax.embeddings.zch_remap): same ID -> same row across batches,
distinct IDs -> distinct rows (MPZCH) where modulo hashing collides, row + Adam resets inside a jitted step,
read-only evaluation, bad inputs. Small shapes; one table config per method so compilations are shared."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from recjax.embeddings import zch_remap as zr
from recjax.ops import zch as ops

T, B, L = 32, 2, 8  # table slots, batch, sequence


def remapper(method="mpzch", eviction="lru"):
    return zr.ItemIdRemapper(zr.RemapConfig(T, method=method, max_probe=T, eviction=eviction, impl="xla"))


def raw_batch(ids_BxL1):
    """Training batch from raw ID sequences (0 = padding, left-padded)."""
    ids = np.asarray(ids_BxL1, np.int64)
    return dict(inputs=ids[:, :-1], targets=ids[:, 1:], mask=ids[:, :-1] != 0)


def distinct_ids(rng, n):
    """Distinct raw IDs spanning 64 bits (high words non-zero for most)."""
    return rng.choice(2**62, size=3 * n, replace=False)[:n].astype(np.int64) + 1


def test_same_id_same_row_across_batches_and_distinct_rows(rng):
    ids = distinct_ids(rng, 12)
    seq = np.zeros((B, L + 1), np.int64)
    seq[:, 3:] = rng.choice(ids, size=(B, L - 2))  # repeats within the batch
    seq[0, 3:9] = ids[:6]
    seq[1, 3:9] = ids[6:]
    for method in ("mpzch", "modulo"):
        r = remapper(method)
        state = r.init_state()
        out1, state, _, _ = r.remap(state, raw_batch(seq), 0)
        perm = seq.copy()
        perm[:, 3:] = perm[::-1, 3:]  # the same IDs in other positions, next step
        out2, state, reset2, _ = r.remap(state, raw_batch(perm), 1)
        rows = {}
        for out, s in ((out1, seq), (out2, perm)):
            for key, raw in (("inputs", s[:, :-1]), ("targets", s[:, 1:])):
                got = np.asarray(out[key])
                assert ((got == 0) == (raw == 0)).all(), (method, key)  # padding stays padding
                assert got.min() >= 0 and got.max() <= T
                for i, row in zip(raw.reshape(-1), got.reshape(-1), strict=True):
                    if i:
                        assert rows.setdefault(int(i), int(row)) == row, method  # same ID, same row
        assert not np.asarray(reset2).any()  # nothing new in the second batch
        if method == "mpzch":  # 12 IDs in 32 slots: all distinct rows
            assert len(set(rows.values())) == len(rows) == 12


def test_modulo_collides_where_mpzch_does_not(rng):
    cand = distinct_ids(rng, 200)
    _, h = ops.windows(ops.as_id_pairs(cand), num_buckets=1, bucket_size=T)
    h = np.asarray(h)
    # Two IDs with the same modulo row (pigeonhole guarantees one among 200 IDs over 32 rows).
    i = next(i for i in range(len(cand)) if (h[:i] == h[i]).any())
    a, b = cand[int(np.argmax(h[:i] == h[i]))], cand[i]
    seq = np.zeros((B, L + 1), np.int64)
    seq[0, -2:] = [a, b]
    seq[1, -1] = cand[-1]
    got = {}
    for method in ("modulo", "mpzch"):
        r = remapper(method)
        out, _, _, _ = r.remap(r.init_state(), raw_batch(seq), 0)
        got[method] = np.asarray(out["inputs"])[0, -1], np.asarray(out["targets"])[0, -1]
    assert got["modulo"][0] == got["modulo"][1] == h[i] + 1
    assert got["mpzch"][0] != got["mpzch"][1]
    assert zr.modulo_collision_rate(np.array([a, b]), T) == 1.0


def test_reset_of_reassigned_rows_and_adam_state_inside_jit(rng):
    """Fill the table, then new IDs evict LRU victims: exactly the re-assigned rows get a fresh init and
    zero Adam moments inside the jitted step; every other row is untouched."""
    r = remapper("mpzch", "lru")
    ids = distinct_ids(rng, T + 4)
    params = {"embedding": {"items": jnp.asarray(rng.normal(size=(T + 1, 4)), jnp.float32)}, "w": jnp.ones(3)}
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-zero mu / nu
    init_fn = jax.nn.initializers.normal(1.0)

    @jax.jit
    def step(params, opt_state, zch_state, batch, step, key):
        out, zch_state, reset_R, stats = r.remap(zch_state, batch, step)
        params, opt_state = zr.reset_item_rows(params, opt_state, reset_R, key, init_fn=init_fn)
        return params, opt_state, zch_state, out, reset_R, stats

    def batch_of(xs):  # one shape for every call (one compilation); IDs in the targets, zeros after
        flat = np.zeros(B * (T // B + 2), np.int64)
        flat[: len(xs)] = xs
        seq = np.concatenate([np.zeros((B, 1), np.int64), flat.reshape(B, -1)], axis=1)
        return zr.to_id_pairs(raw_batch(seq))  # 64-bit IDs cross the jit boundary as uint32 pairs

    zs = r.init_state()
    key = jax.random.key(int(rng.integers(1 << 30)))
    p1, o1, zs, out, reset, stats = step(params, opt_state, zs, batch_of(ids[:T]), 0, key)
    reset = np.asarray(reset)
    used = np.unique(np.concatenate([np.asarray(out["inputs"]).ravel(), np.asarray(out["targets"]).ravel()]))
    assert set(used) - {0} == set(np.flatnonzero(reset)) and reset.sum() == T  # every first insert resets
    fresh = np.asarray(init_fn(key, (T + 1, 4), jnp.float32))
    np.testing.assert_array_equal(np.asarray(p1["embedding"]["items"])[reset], fresh[reset])
    np.testing.assert_array_equal(
        np.asarray(p1["embedding"]["items"])[~reset], params["embedding"]["items"][~reset]
    )
    for moment in ("mu", "nu"):
        m0, m1 = getattr(opt_state[0], moment), getattr(o1[0], moment)
        assert not np.asarray(m1["embedding"]["items"])[reset].any()
        np.testing.assert_array_equal(
            np.asarray(m1["embedding"]["items"])[~reset], m0["embedding"]["items"][~reset]
        )
        np.testing.assert_array_equal(m1["w"], m0["w"])  # other parameters untouched
    # Refresh half of the IDs (so they are recent), then 4 new IDs must evict 4 of the stale ones.
    p1 = jax.tree.map(lambda x: x + 1.0, p1)
    o1 = jax.tree.map(lambda x: x + 1.0 if x.dtype == jnp.float32 else x, o1)
    recent = ids[T // 2 : T]
    _, _, zs, _, reset_b, _ = step(p1, o1, zs, batch_of(recent), 1, key)
    assert not np.asarray(reset_b).any()
    new = ids[T:]
    key2 = jax.random.fold_in(key, 7)
    p2, o2, zs, out2, reset2, stats2 = step(p1, o1, zs, batch_of(new), 2, key2)
    reset2 = np.asarray(reset2)
    assert int(stats2["evictions"]) == 4 and reset2.sum() == 4
    new_rows = set(np.asarray(out2["inputs"]).ravel()) | set(np.asarray(out2["targets"]).ravel())
    assert set(np.flatnonzero(reset2)) == new_rows - {0}
    fresh2 = np.asarray(init_fn(key2, (T + 1, 4), jnp.float32))
    np.testing.assert_array_equal(np.asarray(p2["embedding"]["items"])[reset2], fresh2[reset2])
    np.testing.assert_array_equal(
        np.asarray(p2["embedding"]["items"])[~reset2], np.asarray(p1["embedding"]["items"])[~reset2]
    )
    assert not np.asarray(o2[0].mu["embedding"]["items"])[reset2].any()
    assert not np.asarray(o2[0].nu["embedding"]["items"])[reset2].any()
    # The victims were stale IDs (LRU), never the refreshed half.
    ev, _, _, _ = r.remap(
        zs, dict(inputs=recent[None, :], mask=np.ones((1, len(recent)), bool)), 3, training=False
    )
    assert (np.asarray(ev["inputs"]) > 0).all()


def test_eval_is_read_only(rng):
    r = remapper("mpzch")
    ids = distinct_ids(rng, 2 * L)
    seq = np.zeros((B, L + 1), np.int64)
    seq[:, 1:] = ids[: B * L].reshape(B, L)
    state0 = r.init_state()
    out, state, _, _ = r.remap(state0, raw_batch(seq), 0)
    unknown = distinct_ids(rng, 3)
    ev_batch = dict(
        inputs=seq[:, :-1],
        mask=seq[:, :-1] != 0,
        target=np.array([seq[0, -1], unknown[0]]),
        exclude=seq[:, :4],
    )
    ev, state_ev, reset, stats = r.remap(state, ev_batch, 5, training=False)
    np.testing.assert_array_equal(np.asarray(ev["inputs"]), np.asarray(out["inputs"]))
    np.testing.assert_array_equal(np.asarray(ev["target_known"]), [True, False])
    assert int(np.asarray(ev["target"])[1]) == 0 and not np.asarray(reset).any()
    assert int(stats["inserts"]) == 0
    for k in state["item"]:
        np.testing.assert_array_equal(np.asarray(state_ev["item"][k]), np.asarray(state["item"][k]))


def test_full_table_without_eviction_drops_inputs_from_the_mask(rng):
    r = remapper("mpzch", "none")
    ids = distinct_ids(rng, T + 6)
    seq = np.zeros((B, (T + 6) // B + 1), np.int64)
    seq[:, 1:] = ids.reshape(B, -1)
    out, state, reset, stats = r.remap(r.init_state(), raw_batch(seq), 0)
    assert int(stats["fallbacks"]) > 0 and np.asarray(reset).sum() == T
    rows, mask = np.asarray(out["inputs"]), np.asarray(out["mask"])
    np.testing.assert_array_equal(mask, (rows != 0))
    assert (rows == 0).sum() > (seq[:, :-1] == 0).sum()  # some real IDs found no row
    assert (np.diff(mask.astype(int), axis=1) >= 0).all()  # re-left-padded: the kept inputs at the end
    # (input, target) pairs move together: each kept input's target is the next raw ID of the sequence.
    lookup, *_ = r.remap(state, dict(target=ids), 1, training=False)  # each ID's row (0: none)
    row_of = dict(zip(ids, np.asarray(lookup["target"]), strict=True))
    tgt = np.asarray(out["targets"])
    for b in range(B):
        kept = [(x, t) for x, t, m in zip(rows[b], tgt[b], mask[b], strict=True) if m]
        want = [(row_of.get(i, 0), row_of.get(j, 0)) for i, j in zip(seq[b, :-1], seq[b, 1:], strict=True)]
        assert kept == [p for p in want if p[0] != 0]


def test_expected_modulo_collision_rate_matches(rng):
    ids = distinct_ids(rng, 2000)
    got = zr.modulo_collision_rate(ids, 4000)
    assert abs(got - zr.expected_modulo_collision_rate(2000, 4000)) < 0.05


def test_bad_inputs():
    r = remapper("mpzch")
    st = r.init_state()
    with pytest.raises(ValueError, match="raw IDs >= 0"):
        r.remap(st, dict(inputs=np.array([[1, -5]])), 0)
    with pytest.raises(TypeError, match="inputs"):
        r.remap(st, dict(inputs=np.array([[1.0, 2.0]])), 0)
    with pytest.raises(ValueError, match="training remaps only"):
        r.remap(st, dict(inputs=np.array([[1, 2]]), exclude=np.array([[1]])), 0)
    with pytest.raises(KeyError, match="expected at least one of"):
        r.remap(st, dict(mask=np.array([[True]])), 0)
    with pytest.raises(ValueError, match="method"):
        zr.RemapConfig(8, method="cuckoo")
    with pytest.raises(ValueError, match="table_size"):
        zr.RemapConfig(0)


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(method="modulo", probing="bogus"), ValueError, r"RemapConfig\.probing: expected one of"),
        (dict(method="modulo", eviction="bogus"), ValueError, r"RemapConfig\.eviction: expected one of"),
        (dict(eviction="lfu", ttl=-1), ValueError, r"RemapConfig\.ttl: expected >= 0, got -1"),
        (dict(eviction="ttl"), ValueError, r"RemapConfig\.ttl: expected > 0 with eviction='ttl', got 0"),
        (dict(max_probe=0), ValueError, r"RemapConfig\.max_probe: expected > 0, got 0"),
        (dict(max_probe=2.5), TypeError, r"RemapConfig\.max_probe: expected an int, got float"),
        (dict(max_probe=T + 1), ValueError, rf"RemapConfig\.max_probe: expected <= .* = {T}, got {T + 1}"),
        (dict(num_buckets=4, max_probe=T // 2), ValueError, r"RemapConfig\.max_probe: .* = 8, got 16"),
        (dict(num_buckets=5, max_probe=4), ValueError, r"RemapConfig\.num_buckets: expected a divisor"),
        (dict(num_buckets=0), ValueError, r"RemapConfig\.num_buckets: expected > 0"),
    ],
)
def test_bad_config(kw, error, match):
    with pytest.raises(error, match=match):
        zr.RemapConfig(T, **kw)


def test_config_accepts_the_bucket_size_as_max_probe():
    cfg = zr.RemapConfig(T, num_buckets=4, max_probe=T // 4)
    assert zr.ItemIdRemapper(cfg).coll is not None
    zr.RemapConfig(T, method="modulo", max_probe=4 * T)  # modulo ignores the probe window
    with pytest.raises(ValueError, match="no 2-D parameter"):
        zr.reset_item_rows({"w": jnp.ones((3, 2))}, (), jnp.zeros((3,), bool), jax.random.key(0))
    with pytest.raises(ValueError, match="reset_R: expected 5 rows"):
        zr.reset_item_rows(
            {"embedding": {"items": jnp.ones((5, 2))}}, (), jnp.zeros((3,), bool), jax.random.key(0)
        )


def test_owner_tracking_counts_inherited_rows_for_modulo_only(rng):
    """IDs a, b share a modulo row: b arriving after a inherits a's trained row (counted), a coming back
    inherits b's; with MPZCH both get their own (reset) rows and nothing is inherited."""
    cand = distinct_ids(rng, 200)
    _, h = ops.windows(ops.as_id_pairs(cand), num_buckets=1, bucket_size=T)
    h = np.asarray(h)
    i = next(i for i in range(len(cand)) if (h[:i] == h[i]).any())
    a, b = cand[int(np.argmax(h[:i] == h[i]))], cand[i]
    stream = [a, a, b, b, a]  # one ID per training call, as the target of a one-step sequence
    want = {"modulo": ([1, 0, 1, 0, 1], [0, 0, 1, 0, 1]), "mpzch": ([1, 0, 1, 0, 0], [0, 0, 0, 0, 0])}
    for method, (arrivals, inherited) in want.items():
        r = remapper(method)
        state, got = r.init_state(), ([], [])
        for step, x in enumerate(stream):
            _, state, _, stats = r.remap(state, raw_batch(np.array([[0, x]])), step)
            got[0].append(int(stats["arrivals"]))
            got[1].append(int(stats["inherited"]))
        assert got == (arrivals, inherited), method
        totals = {k: 0 for k in zr.COUNTERS} | {
            "ids": 5,
            "arrivals": sum(arrivals),
            "inherited": sum(inherited),
        }
        rates = r.rates(totals, state)
        assert float(rates["inherited_rate"]) == pytest.approx(sum(inherited) / 5)
        assert float(rates["table_usage"]) == pytest.approx((1 if method == "modulo" else 2) / T)


def test_unknown_inputs_are_dropped_and_rows_re_left_padded(rng):
    """Evaluation: an input ID without a row is removed from the sequence and the row is re-left-padded
    (with every per-position array, e.g. timestamps), so the last known item is in the final position;
    the result equals the same batch with those IDs removed by hand."""
    r = remapper("mpzch")
    ids = distinct_ids(rng, 2 * L)
    seq = np.zeros((B, L + 1), np.int64)
    seq[:, 3:] = ids[: B * (L - 2)].reshape(B, L - 2)
    _, state, _, _ = r.remap(r.init_state(), raw_batch(seq), 0)
    unknown = distinct_ids(rng, 3)
    inputs = seq[:, 1:].copy()  # (B, L): position 0 padding, then known IDs
    inputs[0, -1] = unknown[0]  # the last input unknown (the query position)
    inputs[1, 3] = unknown[1]  # an unknown input in the middle
    times = rng.integers(1, 10**9, size=(B, L))
    ev_batch = dict(inputs=inputs, mask=inputs != 0, target=seq[:, -1], exclude=seq[:, :L], times=times)
    ev, *_ = r.remap(state, ev_batch, 1, training=False)
    ref_inputs, ref_times = np.zeros_like(inputs), np.zeros_like(times)
    for b in range(B):
        keep = np.isin(inputs[b], unknown, invert=True) & (inputs[b] != 0)
        n = keep.sum()
        ref_inputs[b, L - n :], ref_times[b, L - n :] = inputs[b, keep], times[b, keep]
    ref, *_ = r.remap(state, dict(inputs=ref_inputs, mask=ref_inputs != 0), 1, training=False)
    np.testing.assert_array_equal(np.asarray(ev["inputs"]), np.asarray(ref["inputs"]))
    np.testing.assert_array_equal(np.asarray(ev["mask"]), np.asarray(ref["mask"]))
    assert np.asarray(ev["inputs"])[:, -1].all()  # a known item in the query position
    np.testing.assert_array_equal(np.asarray(ev["times"])[np.asarray(ev["mask"])], ref_times[ref_times != 0])
    ex, *_ = r.remap(state, dict(exclude=seq[:, :L]), 1, training=False)
    np.testing.assert_array_equal(np.asarray(ev["exclude"]), np.asarray(ex["exclude"]))  # not re-ordered
