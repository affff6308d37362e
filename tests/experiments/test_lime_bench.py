"""experiments/bench/lime.py --small: one row per model and (history, candidates) point, each timed per call
and, with --inner, inside a jitted loop; the CSV and the plot are written; FLOPs grow with the candidates for
target attention and barely for LIME (its per-candidate cost is O(R D))."""

import csv

import pytest

from experiments.bench import lime as lime_bench


def test_small_grid_rows_csv_and_loop_timing(tmp_path):
    rows = lime_bench.main(
        ["--small", "--out", str(tmp_path), "--models", "lime_xor,hstu_target", "--inner", "2"]
    )
    g = lime_bench.SMALL
    points = {(g.fixed_history, c) for c in g.candidates} | {(h, g.fixed_candidates) for h in g.histories}
    assert len(rows) == 2 * len(points)
    assert all(r["ms"] > 0 and r["ms_loop"] > 0 and r["note"] == "" for r in rows), rows
    with open(tmp_path / "lime_latency_small.csv") as f:
        stored = list(csv.DictReader(f))
    assert [r["model"] for r in stored] == [r["model"] for r in rows] and "ms_loop" in stored[0]
    assert (tmp_path / "plots" / "lime_latency_small.png").stat().st_size > 1000
    by = {(r["model"], r["history"], r["candidates"]): r["gflop"] for r in rows}
    lo, hi = (g.fixed_history, min(g.candidates)), (g.fixed_history, max(g.candidates))
    grow = {m: by[(m, *hi)] / by[(m, *lo)] for m in ("lime_xor", "hstu_target")}
    assert grow["hstu_target"] > 2 * grow["lime_xor"], grow


def test_bad_inner_is_refused():
    with pytest.raises(SystemExit):
        lime_bench.main(["--small", "--inner", "-1"])
