"""HyperCast TAE store: round trip, appends, random reads, versions, a SIGKILL mid-write."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from recjax.data.tae_store import TAEStore, VersionMismatchError


def _rows(n, d, start=0, seed=0):
    rng = np.random.default_rng(seed)
    users = np.arange(start, start + n, dtype=np.int32) // 3
    items = np.arange(start, start + n, dtype=np.int32) * 7 + 1
    return users, items, rng.normal(size=(n, d)).astype(np.float32)


def test_round_trip_appends_and_random_reads(tmp_path):
    store = TAEStore(tmp_path / "s", chunk_rows=16)
    store.create_version(1, 8, dtype="float32")
    w = store.writer(1, "train")
    u1, i1, t1 = _rows(37, 8)
    u2, i2, t2 = _rows(20, 8, start=37, seed=1)
    w.append(u1, i1, t1)
    w.append(u2, i2, t2)
    r = store.reader(1, "train")
    assert r.rows == 57
    users, items, tae = np.concatenate([u1, u2]), np.concatenate([i1, i2]), np.concatenate([t1, t2])
    perm = np.random.default_rng(3).permutation(57)
    np.testing.assert_array_equal(r.get(users[perm], items[perm]), tae[perm])
    keys, all_tae = r.read_all()
    np.testing.assert_array_equal(keys, np.stack([users, items], 1))
    np.testing.assert_array_equal(all_tae, tae)
    # a reopened writer continues after the committed rows and still refuses a key it has
    w2 = store.writer(1, "train")
    assert w2.rows == 57
    with pytest.raises(ValueError, match="already in table 'train'"):
        w2.append(u1[:1], i1[:1], t1[:1])
    with pytest.raises(KeyError, match=r"no TAE for \(user 999, item 5\)"):
        r.get(np.array([999]), np.array([5]))


def test_float16_storage_rounds(tmp_path):
    store = TAEStore(tmp_path / "s")
    store.create_version(2, 4)
    u, i, t = _rows(10, 4)
    store.writer(2, "valid").append(u, i, t)
    got = store.reader(2, "valid").get(u, i)
    np.testing.assert_allclose(got, t, rtol=1e-3, atol=1e-3)
    assert got.dtype == np.float32


def test_versions_roll_forward_and_mismatch_is_rejected(tmp_path):
    store = TAEStore(tmp_path / "s", chunk_rows=8)
    store.create_version(1, 4, dtype="float32")
    u, i, t = _rows(12, 4)
    store.writer(1, "train").append(u, i, t)
    store.seal(1)
    old = store.reader(1, "train", require_sealed=True)
    # roll a new version forward while the old reader is in use
    store.create_version(2, 4, dtype="float32")
    store.writer(2, "train").append(u, i, t + 1.0)
    with pytest.raises(ValueError, match="FM version 2 is not sealed"):
        store.reader(2, "train", require_sealed=True)
    np.testing.assert_array_equal(old.get(u, i), t)
    np.testing.assert_array_equal(store.reader(2, "train").get(u, i), t + 1.0)
    with pytest.raises(VersionMismatchError, match="expected TAE of version 2, this reader holds version 1"):
        old.get(u, i, version=2)
    with pytest.raises(ValueError, match="sealed"):
        store.writer(1, "train")
    with pytest.raises(ValueError, match="already exists"):
        store.create_version(1, 4)


def test_bad_inputs_name_the_argument(tmp_path):
    store = TAEStore(tmp_path / "s")
    with pytest.raises(ValueError, match="version: expected a positive int"):
        store.create_version(0, 4)
    with pytest.raises(ValueError, match="dim: expected > 0"):
        store.create_version(1, 0)
    with pytest.raises(ValueError, match="dtype: expected one of"):
        store.create_version(1, 4, dtype="int8")
    with pytest.raises(KeyError, match="FM version 3 is not in the store"):
        store.reader(3, "train")
    store.create_version(1, 4)
    w = store.writer(1, "train")
    with pytest.raises(ValueError, match=r"tae_KxD: expected shape \(2, 4\)"):
        w.append(np.array([1, 2]), np.array([1, 2]), np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="tae_KxD: expected finite"):
        w.append(np.array([1]), np.array([1]), np.full((1, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="table: expected letters"):
        store.writer(1, "../x")
    with pytest.raises(KeyError, match="table: version 1 has no table 'test'"):
        store.reader(1, "test")


_CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from recjax.data.tae_store import TAEStore
    store = TAEStore(sys.argv[1], chunk_rows=64)
    store.create_version(2, 16, dtype="float32")
    w = store.writer(2, "train")
    # also keep appending to version 1's other table: a kill must not corrupt its committed rows either
    w1 = store.writer(1, "extra")
    print("ready", flush=True)
    k = 0
    while True:
        rows = np.arange(k * 50, (k + 1) * 50)
        w.append(rows.astype(np.int32), rows.astype(np.int32) + 1,
                 np.repeat(rows[:, None], 16, 1).astype(np.float32))
        w1.append(rows.astype(np.int32), rows.astype(np.int32) + 2,
                  np.repeat(-rows[:, None], 16, 1).astype(np.float32))
        k += 1
    """
)


def test_sigkill_mid_write_keeps_committed_versions(tmp_path):
    root = tmp_path / "s"
    store = TAEStore(root, chunk_rows=64)
    store.create_version(1, 16, dtype="float32")
    u, i, t = _rows(300, 16)
    store.writer(1, "train").append(u, i, t)
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(root)], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"ready"
    deadline = time.time() + 20
    while time.time() < deadline:  # kill once a few appends are committed, at an arbitrary point
        info = TAEStore(root).versions()[2]["tables"].get("train", {"rows": 0})
        if info["rows"] >= 500:
            break
        time.sleep(0.01)
    time.sleep(np.random.default_rng(0).uniform(0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = TAEStore(root)
    # version 1's committed table is intact, bit for bit
    np.testing.assert_array_equal(store.reader(1, "train").get(u, i), t)
    # the tables being written hold exactly their committed appends, each consistent
    for version, table, sign, off in ((2, "train", 1, 1), (1, "extra", -1, 2)):
        r = store.reader(version, table)
        assert r.rows % 50 == 0 and r.rows >= (450 if version == 2 else 0)
        keys, tae = r.read_all()
        rows = np.arange(r.rows)
        np.testing.assert_array_equal(keys, np.stack([rows, rows + off], 1))
        np.testing.assert_array_equal(tae, sign * np.repeat(rows[:, None], 16, 1).astype(np.float32))
    # and appending goes on after the crash from the committed count
    w = store.writer(2, "train")
    n = w.rows
    w.append(np.array([10**6]), np.array([1]), np.ones((1, 16), np.float32))
    assert store.reader(2, "train").rows == n + 1
