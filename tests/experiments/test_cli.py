"""The CLI end to end on synthetic data, config overrides, sweep tables, and clear config errors."""

import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from experiments import sweep
from experiments.configs import synthetic_tiny

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(*args, timeout=600):
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_cli_trains_and_prints_table(tmp_path):
    p = _run(
        "experiments.run",
        "--config=experiments/configs/synthetic_tiny.py",
        f"--workdir={tmp_path}",
        "--config.train.num_epochs=2",
        "--config.model.num_blocks=2",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| trained |" in p.stdout and "| popularity |" in p.stdout
    assert (tmp_path / "results.json").exists() and (tmp_path / "metrics.jsonl").exists()
    assert list((tmp_path / "tensorboard").iterdir())


def test_unknown_config_key_is_rejected(tmp_path):
    p = _run(
        "experiments.run",
        "--config=experiments/configs/synthetic_tiny.py",
        f"--workdir={tmp_path}",
        "--config.model.num_blockz=2",
        timeout=120,
    )
    assert p.returncode != 0 and "num_blockz" in p.stderr


def test_sweep_override_parsing():
    cfg = synthetic_tiny.get_config()
    sweep.apply_override(cfg, "model.num_blocks", "3")
    sweep.apply_override(cfg, "train.learning_rate", "0.01")
    sweep.apply_override(cfg, "train.ks", "(5, 10)")
    assert cfg.model.num_blocks == 3 and cfg.train.learning_rate == 0.01 and tuple(cfg.train.ks) == (5, 10)
    with pytest.raises(KeyError, match="num_blockz"):
        sweep.apply_override(cfg, "model.num_blockz", "3")
    with pytest.raises(KeyError, match="modell"):
        sweep.apply_override(cfg, "modell.x", "3")
    with pytest.raises(ValueError, match="--sweep"):
        sweep.parse_axis("model.num_blocks")


def test_sweep_writes_table_csv_and_plot(tmp_path):
    rows = [
        {"run": r, "seed": s, "test/hr@10": 0.1 * i + 0.01 * s, "test/mrr": 0.05}
        for i, r in enumerate(["a", "b"])
        for s in (0, 1)
    ]
    sweep.write_tables(rows, tmp_path, "hr@10")
    md = (tmp_path / "results.md").read_text()
    assert "| a | 2 | 0.0050 ± 0.0050" in md and "| b | 2 | 0.1050 ± 0.0050" in md
    assert (tmp_path / "results.csv").read_text().count("\n") == 5
    assert (tmp_path / "hr_at_10.png").stat().st_size > 1000


def test_train_config_rejects_bad_values():
    from experiments.train_lib import train_config

    cfg = synthetic_tiny.get_config().train
    cfg.batch_size = 0
    with pytest.raises(ValueError, match="train.batch_size"):
        train_config(cfg)
    cfg = synthetic_tiny.get_config().train
    cfg.loss.name = "hinge"
    with pytest.raises(ValueError, match="train.loss.name"):
        train_config(cfg)
    assert isinstance(cfg, ml_collections.ConfigDict)
    cfg = synthetic_tiny.get_config().train
    cfg.early_stop_metric = "ndcg@20"  # not among ks=(10, 50)
    with pytest.raises(ValueError, match="early_stop_metric"):
        train_config(cfg)
