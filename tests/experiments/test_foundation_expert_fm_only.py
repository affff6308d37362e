"""experiments.foundation_expert --fm-only: one FM of a seed trains alone (as one of several parallel
processes), and the plain run on the same workdir reuses it instead of training it again."""

import json

import pytest

from experiments import foundation_expert

TINY = "experiments/configs/foundation_expert_tiny.py"


def test_fm_only_trains_one_fm_that_the_full_run_reuses(tmp_path):
    wd = str(tmp_path / "fe")
    only = foundation_expert.main(["--config", TINY, "--workdir", wd, "--quiet", "--fm-only", "2"])
    assert (tmp_path / "fe" / "seed0" / "fm2").is_dir()
    assert not (tmp_path / "fe" / "seed0" / "fm1").exists()  # the other FM is left to its own process
    assert not (tmp_path / "fe" / "store").exists()  # no TAE logged: the FM may still train on
    fm2 = tmp_path / "fe" / "seed0" / "fm2"
    ckpts = {f: f.stat().st_mtime_ns for f in (fm2 / "checkpoints").rglob("*") if f.is_file()}
    assert ckpts

    def epochs_logged():
        return sum('"epoch/epoch"' in line for line in (fm2 / "metrics.jsonl").read_text().splitlines())

    assert epochs_logged() == 2
    full = foundation_expert.main(["--config", TINY, "--workdir", wd, "--quiet"])
    # the FM was resumed from its finished state: no checkpoint rewritten, no epoch trained, same metrics
    assert {f: f.stat().st_mtime_ns for f in ckpts} == ckpts and epochs_logged() == 2
    assert full["per_seed"][0]["fm2"] == only[0]["test"]
    assert (
        json.loads((tmp_path / "fe" / "results.json").read_text())["per_seed"]["0"]["fm2"] == only[0]["test"]
    )
    assert full["expert_out_of_time"] == []  # no expert budget in the tiny config
    # and it is the FM the plain run trains itself (same seed, config and workdir layout); experts cut by
    # their wall-clock budget are named in the summary and the table
    alone = foundation_expert.main(
        ["--config", TINY, "--workdir", str(tmp_path / "plain"), "--quiet"]
        + ["--set", "expert_train.max_train_seconds=1e-6"]
    )
    assert alone["per_seed"][0]["fm2"] == only[0]["test"]
    trained = {k.split("/")[0] for k in alone["per_seed"][0]["expert"]}  # surfaces with an expert
    assert alone["expert_out_of_time"] and len(alone["expert_out_of_time"]) == 3 * len(trained)
    table = (tmp_path / "plain" / "table.md").read_text()
    assert "Experts stopped by expert_train.max_train_seconds" in table
    with pytest.raises(SystemExit, match="fm_blocks are"):  # refused before --fresh deletes the workdir
        foundation_expert.main(["--config", TINY, "--workdir", wd, "--quiet", "--fresh", "--fm-only", "5"])
    assert (tmp_path / "fe" / "results.json").exists()
