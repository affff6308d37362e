"""experiments/bench/moe.py --small runs on CPU (the stage breakdown and the grouped-GEMM table); the
correctness check it also runs is the kernel tests' job, skipped here to keep CI time down."""

from experiments.bench import moe as moe_bench


def test_bench_small_runs(capsys):
    assert moe_bench.main(["--small", "--skip-check", "--suite", "none", "--impls", "fused,ragged"]) == 0
    out = capsys.readouterr().out
    assert "fused stages" in out and "dx combine" in out and "jax.lax.ragged_dot" in out
