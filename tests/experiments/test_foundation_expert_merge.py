"""experiments.foundation_expert --merge: seeds trained as parallel processes (one workdir each) are joined
into one table; a seed present in two workdirs is refused."""

import json

import pytest

from experiments import foundation_expert as fe


def _workdir(path, per_seed):
    path.mkdir()
    (path / "results.json").write_text(json.dumps({"per_seed": per_seed}))
    return str(path)


def test_merge_joins_seeds_and_refuses_a_repeated_seed(tmp_path):
    a = _workdir(tmp_path / "a", {"0": {"expert": {"s/auc": 0.7}}})
    b = _workdir(tmp_path / "b", {"1": {"expert": {"s/auc": 0.8}}, "2": {"expert": {"s/auc": 0.9}}})
    merged = fe.merged_seeds([a, b])
    assert sorted(merged) == [0, 1, 2] and merged[2]["expert"]["s/auc"] == 0.9
    with pytest.raises(SystemExit, match="seed 0 is in more than one"):
        fe.merged_seeds([a, a])
    with pytest.raises(SystemExit, match="does not exist"):
        fe.merged_seeds([str(tmp_path / "missing")])
