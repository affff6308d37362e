"""experiments/bench/zch_bytes.py: the per-ID sector count of the MPZCH kernel's probe pattern -- exact on
hand-made offsets (program = slowest lane, misses read to the windows' end) and consistent on a real
two-choice table (every stored ID found; kernel >= lane-masked >= 1 sector; more steps at load 0.9; inserts
counted over the batch's distinct IDs)."""

import numpy as np
import pytest

from experiments.bench import zch_bytes


def test_count_of_known_offsets():
    # 2 windows of 64 slots, 8 slots (2 sectors) per window per step; programs of 2 lanes
    offset = np.array([0, 7, 8, 63, -1, 0])
    c = zch_bytes.count(offset, 2, 64, block=2, width=8)
    lane = np.array([1, 1, 2, 8, 8, 1])  # steps per lane; a miss reads all 8 steps
    prog = np.array([1, 1, 8, 8, 8, 8])  # each lane pays its program's slowest lane
    assert c["steps lane"] == pytest.approx(lane.mean()) and c["steps prog"] == pytest.approx(prog.mean())
    assert c["sectors/ID"] == pytest.approx(4 * prog.mean()) and c["masked"] == pytest.approx(4 * lane.mean())
    assert c["ideal"] == pytest.approx((5 * 1 + 32) / 6)  # a hit: 1 sector; the miss: 2 x 512 B / 32 B
    assert c["bytes/ID"] == pytest.approx(32 * 4 * prog.mean() + 12)


def test_real_table_counts():
    args = ["--slots", "16384", "--bucket-size", "4096", "--batch", "2048", "--fill-batch", "512"]
    rows = zch_bytes.main([*args, "--home-groups"])
    look = {(r["load"] > 0.7, r["dist"]): r for r in rows if r["op"] == "lookup"}
    home = {(r["load"] > 0.7, r["dist"]): r for r in rows if r["op"].startswith("lookup, home group")}
    assert home.keys() == look.keys()
    for key, r in home.items():  # a hashed start can only shorten the mean walk to an ID, never below 1 step
        assert 1.0 <= r["steps lane"] <= look[key]["steps lane"] and r["steps prog"] <= 8, (key, r)
    assert len(look) == 4
    for r in rows:
        lanes = r.get("distinct", 1.0)  # kernel lanes per batch ID (inserts run on the distinct IDs)
        assert r["sectors/ID"] >= r["masked"] >= 4 * lanes - 1e-9 and r["ideal"] >= lanes - 1e-9, r
        assert r["full"] == 0, r  # small fill batches: the reference's stale preference stays harmless
    assert look[(True, "uniform")]["steps lane"] > look[(False, "uniform")]["steps lane"]
    assert look[(True, "zipf")]["unique"] < look[(True, "uniform")]["unique"]  # hot IDs repeat
    # insert-or-find runs on the batch's distinct IDs: a Zipf batch has few, so fewer sectors per batch ID
    ins = {(r["load"] > 0.7, r["dist"]): r for r in rows if r["op"] == "insert-or-find"}
    assert ins[(True, "zipf")]["distinct"] < 0.5 < 0.9 < ins[(True, "uniform")]["distinct"] <= 1.0
    assert ins[(True, "zipf")]["sectors/ID"] < ins[(True, "uniform")]["sectors/ID"]
    assert all(0 < r["cas/ID"] <= 1.0 for r in ins.values())  # one CAS round, at most every lane
