"""experiments/bench/freescale.py --small on CPU: the balance table (zig-zag never worse than none) and a
throughput row with prioritized lookups and row-sparse Adam (collision fraction in (0, 1])."""

from experiments.bench import freescale


def _rows(text: str, first: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first} |"))
    out = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        out.append([c.strip() for c in line.strip("|").split("|")])
    return out


def test_freescale_bench_small(tmp_path, capsys):
    freescale.main(["--small", "--part=balance"])
    balance = _rows(capsys.readouterr().out, "devices")
    assert balance and all(float(r[4]) <= float(r[3]) + 1e-9 for r in balance)  # zigzag <= none
    freescale.main(["--small", "--part=throughput", "--devices=2", "--balance=zigzag", "--prefetch=1",
                    "--lookups=prioritized", "--sparse=1", f"--workdir={tmp_path}"])  # fmt: skip
    (row,) = _rows(capsys.readouterr().out, "devices")
    assert row[:6] == ["2", "zigzag", "1", "prioritized", "1", "-"]
    assert float(row[6]) > 0 and 0 < float(row[9]) <= 1
