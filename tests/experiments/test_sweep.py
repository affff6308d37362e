"""experiments.sweep: every setting validated before the first trains, failed settings reported while the
others go on, tables rewritten after each run, metric columns in numeric order."""

import csv

import pytest

from experiments import sweep
from experiments.configs import synthetic_tiny


def _no_training(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(sweep, "run_experiment", lambda cfg, workdir: calls.append(workdir))
    return calls


@pytest.mark.parametrize(
    "axes, message",
    [
        ([("model.num_blocks", ["1", "x"])], "--sweep model.num_blocks=1,x: 'x' is not an int"),
        ([("train.learning_rate", ["1e-3", "fast"])], "'fast' is not a float"),
        ([("train.progress", ["true", "maybe"])], "'maybe' is not a bool"),
        (
            [("model.num_blockz", ["1"])],
            "--sweep model.num_blockz=1: no field 'num_blockz' in model; did you mean",
        ),
        # Each value alone parses; the combination only fails when its model config is built.
        (
            [("model.num_heads", ["1", "3"])],
            r"--sweep setting model.num_heads=3 \(seed 0\): sasrec.num_heads",
        ),
        ([("train.batch_size", ["64", "0"])], "train.batch_size: expected > 0"),
    ],
)
def test_bad_setting_fails_before_any_training(tmp_path, monkeypatch, axes, message):
    calls = _no_training(monkeypatch)
    with pytest.raises(ValueError, match=message):
        sweep.run_sweep(synthetic_tiny.get_config(), axes, [0], tmp_path)
    assert calls == [] and not (tmp_path / "results.md").exists()


def test_bad_seed_is_named():
    assert sweep.parse_seeds(["0", "7"]) == [0, 7]
    with pytest.raises(ValueError, match="--seeds 0,x: 'x' is not an int"):
        sweep.parse_seeds(["0", "x"])


@pytest.mark.slow
def test_failing_setting_is_reported_and_the_others_finish(tmp_path, monkeypatch):
    config = synthetic_tiny.get_config()
    config.train.num_epochs = 1
    real = sweep.run_experiment

    def run_or_fail(cfg, workdir):
        if cfg.model.num_blocks == 1:
            raise RuntimeError("out of memory (simulated)")
        # The tables already hold the failed first setting: a sweep killed now would keep it.
        assert "RuntimeError: out of memory (simulated)" in (tmp_path / "results.md").read_text()
        return real(cfg, workdir)

    monkeypatch.setattr(sweep, "run_experiment", run_or_fail)
    rows = sweep.run_sweep(config, [("model.num_blocks", ["1", "2"])], [0], tmp_path)
    assert [r["status"] for r in rows] == ["error", "ok"] and rows[1]["test/hr@10"] > 0
    md = (tmp_path / "results.md").read_text().splitlines()
    assert md[0].endswith("| status |")
    (failed,) = [line for line in md if line.startswith("| num_blocks-1 |")]
    assert "seed 0: RuntimeError: out of memory (simulated)" in failed and "–" in failed
    (ok,) = [line for line in md if line.startswith("| num_blocks-2 |")]
    assert ok.endswith("| ok |") and " ± " in ok
    with open(tmp_path / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["status"] for r in csv_rows] == ["error", "ok"] and csv_rows[0]["test/hr@10"] == ""
    assert (tmp_path / "hr_at_10.png").stat().st_size > 1000


def test_metric_columns_in_numeric_order(tmp_path):
    keys = [
        "test/hr@10",
        "test/hr@200",
        "test/hr@50",
        "test/mrr",
        "test/ndcg@10",
        "test/ndcg@200",
        "test/ndcg@50",
    ]
    rows = [{"run": "a", "seed": 0, "status": "ok", "error": "", **{k: 0.1 for k in keys}, "wall_s": 1.0}]
    sweep.write_tables(rows, tmp_path, "hr@10")
    header = (tmp_path / "results.md").read_text().splitlines()[0]
    assert header == "| run | seeds | hr@10 | hr@50 | hr@200 | ndcg@10 | ndcg@50 | ndcg@200 | mrr | status |"
    csv_header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    metrics = ["hr@10", "hr@50", "hr@200", "ndcg@10", "ndcg@50", "ndcg@200", "mrr"]
    assert csv_header[4:] == [f"test/{m}" for m in metrics] + ["wall_s"]


def test_runs_stopped_by_the_time_budget_are_flagged_and_kept_in_the_means(tmp_path):
    rows = [
        {"run": "a", "seed": s, "status": "ok", "error": "", "test/hr@10": v, "out_of_time": cut}
        for s, v, cut in ((0, 0.2, False), (1, 0.4, True))
    ]
    sweep.write_tables(rows, tmp_path, "hr@10", echo=False)
    line = (tmp_path / "results.md").read_text().splitlines()[2]
    assert line == "| a | 2 | 0.3000 ± 0.1000 | ok; stopped by train.max_train_seconds: seeds 1 |"
