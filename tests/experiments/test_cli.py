"""The CLI end to end on synthetic data, config overrides, sweep tables, and clear config errors."""

import os
import pathlib
import re
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
    assert "| trained " in p.stdout and "| popularity |" in p.stdout
    assert (tmp_path / "results.json").exists() and (tmp_path / "metrics.jsonl").exists()
    assert list((tmp_path / "tensorboard").iterdir())
    assert not re.search(r"^I\d{4} ", p.stderr, re.M), p.stderr[-3000:]  # no absl/Orbax INFO by default


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--config=experiments/configs/synthetic_tiny.py", "--config.model.num_blockz=2"],
            "unknown config key --config.model.num_blockz: no field 'num_blockz' in model; "
            "did you mean 'num_blocks'?",
        ),
        # The default config is loaded when the flag is defined: the same message without --config.
        (["--config.train.num_epochz=2"], "did you mean 'num_epochs'?"),
        (["--config.modell.x=2"], "no field 'modell' in the config; did you mean 'model'?"),
    ],
)
def test_unknown_config_key_names_the_closest(tmp_path, args, message):
    p = _run("experiments.run", f"--workdir={tmp_path}", *args, timeout=120)
    assert p.returncode == 1 and message in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]


def test_unknown_sweep_config_key_names_the_closest(tmp_path):
    p = _run(
        "experiments.sweep",
        "--config=experiments/configs/synthetic_tiny.py",
        "--config.train.lerning_rate=0.1",
        f"--out={tmp_path}",
        timeout=120,
    )
    assert p.returncode == 1 and "did you mean 'learning_rate'?" in p.stderr and "Traceback" not in p.stderr


def test_bad_value_is_rejected_before_the_data_loads(tmp_path):
    p = _run(
        "experiments.run",
        "--config=experiments/configs/synthetic_tiny.py",
        f"--workdir={tmp_path / 'run'}",
        "--config.model.num_heads=3",  # does not divide embed_dim=16: only the model config knows
        timeout=120,
    )
    assert p.returncode == 1 and "sasrec.num_heads: expected a divisor of embed_dim=16, got 3" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "run").exists()


def test_sweep_bad_value_fails_before_training(tmp_path):
    p = _run(
        "experiments.sweep",
        "--config=experiments/configs/synthetic_tiny.py",
        "--sweep=model.num_blocks=1,x",
        f"--out={tmp_path}",
        timeout=120,
    )
    assert p.returncode == 1 and "--sweep model.num_blocks=1,x: 'x' is not an int" in p.stderr
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


def test_format_table_orders_metrics_numerically():
    from experiments.train_lib import format_table

    names = ["hr@10", "hr@200", "hr@50", "mrr", "ndcg@10", "ndcg@200", "ndcg@50"]  # results.json order
    results = {
        "test": {k: 0.5 for k in names},
        "popularity_test": {k: 0.25 for k in names},
        "dataset": {"name": "synthetic", "users": 10, "items": 20},
        "best_epoch": 1,
        "epochs": 1,
        "s_per_epoch": 1.0,
        "wall_s": 2.0,
        "devices": "1 x cpu",
    }
    header, rule, trained, popularity = format_table(results).splitlines()[:4]
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells == ["model", "hr@10", "hr@50", "hr@200", "ndcg@10", "ndcg@50", "ndcg@200", "mrr"]
    assert len(header) == len(rule) == len(trained) == len(popularity)  # aligned columns


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


def test_default_config_quick_synthetic_and_ml1m_argument():
    from experiments import overrides
    from experiments.configs import default, sasrec_ml1m

    quick = default.get_config()
    overrides.validate(quick)
    assert quick.data.name == "synthetic" and quick.train.num_epochs <= 20  # the minute-long main job
    assert default.get_config("ml1m").to_dict() == sasrec_ml1m.get_config().to_dict()
    with pytest.raises(ValueError, match="expected one of"):
        default.get_config("ml-1m")
    assert overrides.load_config(f"{ROOT}/experiments/configs/default.py:ml1m").data.name == "ml-1m"
