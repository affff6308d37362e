"""The LIME ablation through experiments.sweep: every setting of the issue's grid builds, and a real (one
setting) sweep trains LIME through run_experiment's task table and writes its table."""

import pytest

from experiments import sweep
from experiments.configs import lime_tiny

ABLATION = [
    ("model.num_links", ["4", "8", "16", "32", "64"]),
    ("model.attention", ["xor", "mha"]),
    ("model.contextualize", ["True", "False"]),
]


def test_the_whole_ablation_grid_is_valid(tmp_path, monkeypatch):
    calls = []
    fake = {"test": {"hr@10": 0.1}, "best_epoch": 1, "epochs": 1, "wall_s": 1.0, "s_per_epoch": 1.0}
    monkeypatch.setattr(sweep, "run_experiment", lambda cfg, workdir: calls.append(cfg) or fake)
    sweep.run_sweep(lime_tiny.get_config(), ABLATION, [0], tmp_path)
    assert len(calls) == 20
    assert {(c.model.num_links, c.model.attention, c.model.contextualize) for c in calls} == {
        (r, a, x) for r in (4, 8, 16, 32, 64) for a in ("xor", "mha") for x in (True, False)
    }


def test_a_bad_lime_setting_is_named_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "run_experiment", lambda cfg, workdir: pytest.fail("trained"))
    with pytest.raises(ValueError, match="lime.num_links"):
        sweep.run_sweep(lime_tiny.get_config(), [("model.num_links", ["4", "0"])], [0], tmp_path)


@pytest.mark.slow
def test_a_lime_sweep_trains_through_run_experiment(tmp_path):
    config = lime_tiny.get_config()
    config.train.num_epochs = 1
    config.data.synthetic.num_users, config.data.synthetic.num_items = 200, 120
    rows = sweep.run_sweep(config, [("model.attention", ["mha"])], [0], tmp_path)
    assert [r["status"] for r in rows] == ["ok"] and rows[0]["test/hr@10"] > 0
    assert "attention-mha" in (tmp_path / "results.md").read_text()
