"""experiments/bench/lime_xor_op.py --small: every implementation row matches the reference and is timed
both per call and inside the jitted loop (bench_common.timed_in_loop)."""

from experiments.bench import lime_xor_op


def test_small_rows_match_the_reference_and_are_timed_in_the_loop():
    rows = lime_xor_op.main(["--small", "--reps", "1", "--inner", "2", "--bias", "1"])
    assert {r["impl"] for r in rows} == {"xla", "pallas", "kernel bl=128", "kernel bl=256"}
    assert len(rows) == 4 * len(lime_xor_op.SMALL_POINTS)
    for r in rows:
        assert r["note"] == "" and r["rel_err"] < 1e-5, r
        assert r["ms"] > 0 and r["loop_ms"] > 0, r
