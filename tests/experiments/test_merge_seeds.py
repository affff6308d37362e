"""--merge of experiments.foundation_expert / mfli_experiment (train_lib.merged_per_seed): seeds trained as
parallel processes (one workdir each) are joined, in order, from either per-seed layout; a seed present in
two workdirs and a missing workdir are refused."""

import json

import pytest

from experiments.train_lib import merged_per_seed


def _workdir(path, per_seed, **settings):
    path.mkdir()
    (path / "results.json").write_text(json.dumps({"per_seed": per_seed, "config": "c.py", **settings}))
    return str(path)


def test_merge_joins_seeds_and_refuses_a_repeated_seed(tmp_path):
    a = _workdir(tmp_path / "a", {"0": {"expert": {"s/auc": 0.7}}})
    b = _workdir(tmp_path / "b", {"1": {"expert": {"s/auc": 0.8}}, "2": {"expert": {"s/auc": 0.9}}})
    pairs, settings = merged_per_seed([a, b], ("config",))
    merged = dict(pairs)
    assert sorted(merged) == [0, 1, 2] and merged[2]["expert"]["s/auc"] == 0.9
    assert settings == {"config": "c.py"}
    c = _workdir(tmp_path / "c", [{"seed": 5, "x": 1}, {"seed": 3, "x": 2}])  # mfli_experiment's layout
    assert [s for s, _ in merged_per_seed([c, a])[0]] == [5, 3, 0]
    with pytest.raises(SystemExit, match="seed 0 is in more than one"):
        merged_per_seed([a, a])
    with pytest.raises(SystemExit, match="does not exist"):
        merged_per_seed([str(tmp_path / "missing")])
    other = _workdir(tmp_path / "d", {"4": {}}, set=["fm_train.num_epochs=3"])  # another setting: refused
    with pytest.raises(SystemExit, match="was run with set="):
        merged_per_seed([a, other], ("config", "set"))
