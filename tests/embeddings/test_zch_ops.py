"""recjax.ops.zch: ID conversion, impl dispatch (Pallas interpret == XLA on the unique answers), helpers and
bad inputs."""

import jax.numpy as jnp
import numpy as np
import pytest

from recjax.ops import zch as ops


def test_as_id_pairs_forms(rng):
    big = rng.integers(0, 2**63 - 1, 9, dtype=np.int64)
    pairs = ops.as_id_pairs(big)
    assert pairs.dtype == jnp.uint32 and pairs.shape == (9, 2)
    assert np.array_equal(ops.join_ids(np.asarray(pairs)), big)
    small = rng.integers(0, 2**31 - 1, (3, 4)).astype(np.int32)
    from_jax = ops.as_id_pairs(jnp.asarray(small))
    assert from_jax.shape == (3, 4, 2)
    assert np.array_equal(ops.join_ids(np.asarray(from_jax)), small.astype(np.int64))
    assert ops.as_id_pairs(pairs) is pairs


def test_pallas_and_xla_agree(rng):
    ident = ops.empty_identity(512)
    ids = ops.as_id_pairs(rng.integers(0, 2**50, 300)[rng.integers(0, 300, 200)])
    kw = dict(num_buckets=4, max_probe=32)
    out = {impl: ops.insert_or_find(ident, ids, impl=impl, **kw) for impl in ("pallas", "xla")}
    (tp, sp, stp), (tx, sx, stx) = out["pallas"], out["xla"]
    # which lane of a repeated new ID reports INSERTED depends on scheduling on a GPU: compare counts
    assert np.array_equal(
        np.bincount(np.asarray(stp), minlength=4), np.bincount(np.asarray(stx), minlength=4)
    )
    assert np.array_equal(np.asarray(stp) == ops.STATUS_FULL, np.asarray(stx) == ops.STATUS_FULL)
    stored_p = set(ops.join_ids(np.asarray(tp)).tolist())
    assert stored_p == set(ops.join_ids(np.asarray(tx)).tolist())
    for t, s in ((tp, sp), (tx, sx)):
        look = {impl: np.asarray(ops.lookup(t, ids, impl=impl, **kw)) for impl in ("pallas", "xla")}
        assert np.array_equal(look["pallas"], np.asarray(s)) and np.array_equal(look["xla"], np.asarray(s))
    bucket, starts, length = ops.probe_windows(ids, num_buckets=4, bucket_size=128, max_probe=32)
    assert starts.shape == (200, 2) and length == 16
    sp, starts = np.asarray(sp), np.asarray(starts)
    off = (sp[:, None] % 128 - starts) % 128  # offset inside each window
    assert np.array_equal(sp // 128, np.asarray(bucket)) and (off < 16).any(axis=1).all()
    assert (starts % 16 == 0).all() and (starts[:, 0] != starts[:, 1]).all()  # aligned, distinct windows
    assert np.array_equal(bucket, ops.windows(ids, num_buckets=4, bucket_size=128)[0])  # same sharding


def test_linear_probing_option(rng):
    """probing="linear": one window of max_probe slots from the hashed start (the earlier scheme)."""
    ident = ops.empty_identity(512)
    ids = ops.as_id_pairs(rng.choice(2**50, 150, replace=False))
    kw = dict(num_buckets=4, max_probe=32, impl="xla", probing="linear")
    _, slot, status = ops.insert_or_find(ident, ids, **kw)
    bucket, start = ops.windows(ids, num_buckets=4, bucket_size=128)
    sp = np.asarray(slot)
    assert (np.asarray(status) == ops.STATUS_INSERTED).all()
    assert np.array_equal(sp // 128, np.asarray(bucket)) and ((sp % 128 - np.asarray(start)) % 128 < 32).all()
    b2, starts, length = ops.probe_windows(
        ids, num_buckets=4, bucket_size=128, max_probe=32, probing="linear"
    )
    assert length == 32 and np.array_equal(np.asarray(starts)[:, 0], np.asarray(start))


def test_admission_uniform_is_per_id(rng):
    ids = ops.as_id_pairs(rng.integers(0, 2**40, 2000))
    u = np.asarray(ops.admission_uniform(ids, jnp.uint32(7)))
    assert ((u >= 0) & (u < 1)).all() and 0.45 < u.mean() < 0.55
    assert np.array_equal(u, np.asarray(ops.admission_uniform(ids, jnp.uint32(7))))
    assert not np.array_equal(u, np.asarray(ops.admission_uniform(ids, jnp.uint32(8))))


def test_bad_inputs():
    ident = ops.empty_identity(64)
    ids = ops.as_id_pairs(np.array([1, 2]))
    with pytest.raises(ValueError, match="ids: expected raw IDs >= 0"):
        ops.as_id_pairs(np.array([5, -3]))
    with pytest.raises(
        TypeError, match="ids: expected signed integer or unsigned integer dtype, got float32"
    ):
        ops.as_id_pairs(np.array([1.0], np.float32))
    with pytest.raises(TypeError, match="ids: expected int32 or uint32 pairs"):
        ops.as_id_pairs(jnp.array([1], jnp.int16))
    with pytest.raises(ValueError, match=r"max_probe: expected 1..bucket size 16, got 17"):
        ops.insert_or_find(ident, ids, num_buckets=4, max_probe=17)
    with pytest.raises(ValueError, match="identity slots: expected > 0, got 0"):
        ops.lookup(ops.empty_identity(0), ids, num_buckets=1, max_probe=1)
    with pytest.raises(TypeError, match="identity: expected uint32 pairs"):
        ops.lookup(ident.astype(jnp.int32), ids, num_buckets=1, max_probe=4)
    with pytest.raises(ValueError, match=r"ids: expected shape \(\*, 2\)"):
        ops.lookup(ident, ids[:, :1], num_buckets=1, max_probe=4)
    with pytest.raises(ValueError, match="impl: expected one of"):
        ops.lookup(ident, ids, num_buckets=1, max_probe=4, impl="triton")
    with pytest.raises(ValueError, match="probing: expected one of"):
        ops.insert_or_find(ident, ids, num_buckets=1, max_probe=4, probing="cuckoo")
