"""experiments/bench/mfli.py --small runs on CPU and prints a consistent table: brute force recalls itself
exactly, recalls are fractions, IVF runs at MFLI's candidate count."""

import pytest

from experiments.bench import mfli as mfli_bench


@pytest.mark.slow
def test_mfli_bench_small(capsys):
    # one batch size and the xla rerank only (the pallas path is compared in tests/retrieval/ and kernels/)
    assert mfli_bench.main(["--small", "--b", "4", "--impls", "xla"]) == 0
    out = capsys.readouterr().out
    assert "# facet 0: clusters" in out and "Gini" in out
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[1].isdigit():
            rows[(cells[0].split(" nprobe")[0], int(cells[1]))] = cells
    assert "FAILED" not in out
    for m in ("brute-f32", "brute-int8", "mfli-xla", "mfli-triggers", "ivf-int8", "gather-score xla"):
        assert (m, 4) in rows, (m, sorted(rows))
    assert rows[("brute-f32", 4)][7:10] == ["1.0000"] * 3
    for m in ("mfli-xla", "ivf-int8"):
        assert all(0 < float(r) <= 1 for r in rows[(m, 4)][7:10]), rows[(m, 4)]
    # equal candidate count: IVF scans about as many items as MFLI's distinct candidates
    mfli_cands, ivf_cands = float(rows[("mfli-xla", 4)][4]), float(rows[("ivf-int8", 4)][4])
    assert abs(ivf_cands - mfli_cands) <= 100 / 2, (mfli_cands, ivf_cands)  # one IVF list is 100 items
