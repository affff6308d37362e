"""MFLI ablations through experiments.sweep: a config's ``serving`` section makes ``run_experiment`` report
MFLI / brute-force / IVF serving recall among the test metrics, so a sweep over training settings (facets,
levels, delayed start) and serving settings (split/merge on/off) tabulates them. Checks: the brute-force
recall equals the ranking metric HR@k of the same best model (ties aside), recalls are fractions
nondecreasing in k, and the split/merge switch changes the clusters MFLI reads but not brute force."""

import math

from experiments import sweep
from experiments.configs import base, mfli_tiny


def _config():
    config = mfli_tiny.get_config()
    config.data.pipeline = "numpy"
    config.train.update(num_epochs=2, eval_batch_size=500, checkpoint_every_epochs=0, progress=False)
    config.model.update(start_step=8, level_interval=8)
    config.serving = base.mfli_serving(upper=32, lower=2, k_clusters=4, candidates=256, ivf_clusters=16)
    return config


def test_sweep_reports_serving_recall_and_split_merge_switch(tmp_path):
    rows = sweep.run_sweep(_config(), [("serving.rebalance", ["True", "False"])], [0], tmp_path)
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    on, off = rows
    for r in rows:
        for m in ("mfli", "brute", "ivf"):
            rec = [r[f"test/{m}_recall@{k}"] for k in (50, 100, 200)]
            assert all(0 <= v <= 1 for v in rec) and rec == sorted(rec), (m, rec)
        # ranking's HR@50 counts score ties against the target; 1000 test users
        assert abs(r["test/brute_recall@50"] - r["test/hr@50"]) <= 2 / 1000, r
    assert on["test/brute_recall@50"] == off["test/brute_recall@50"]  # same model (same seed, same data)
    assert not math.isclose(on["test/mfli_candidates"], off["test/mfli_candidates"])
    table = (tmp_path / "results.md").read_text()
    assert "mfli_recall@50" in table and "serving.rebalance" in (tmp_path / "results.csv").read_text()


def test_bad_serving_section_is_refused_before_training():
    import pytest

    from experiments.train_lib import check_model_config

    for change, message in (
        ({"cold": 1.0}, "serving.cold: expected a fraction"),
        ({"lower": 100}, "serving.lower: expected 0 <= lower <= upper=32"),
        ({"k_clusters": 0}, "serving.k_clusters: expected >= 1"),
    ):
        config = _config()
        config.serving.update(change)
        with pytest.raises(ValueError, match=message):
            check_model_config(config)
    config = _config()
    config.serving.extra = 1
    with pytest.raises(ValueError, match=r"serving: unknown keys \['extra'\]"):
        check_model_config(config)
    from experiments.configs import synthetic_tiny

    other = synthetic_tiny.get_config()
    other.serving = base.mfli_serving()
    with pytest.raises(ValueError, match="only MFLI models"):
        check_model_config(other)
