"""experiments.sweep's ablation mode (base + one change at a time, the base run shared), worker shards (every
setting trained by exactly one worker) and ``collect`` (tables from the workdirs, time-cut runs flagged,
missing ones named with the worker's error); end to end: ``--workers=2`` gives the same metrics as one
process training the same setting."""

import json
import subprocess
import sys

import pytest

from experiments import sweep
from experiments.configs import synthetic_tiny
from recjax.train import workdir as workdir_lib

AXES = [("model.num_blocks", ["1", "2"]), ("train.learning_rate", ["0.003", "0.01"])]


def test_ablation_mode_shares_the_base_run():
    config = synthetic_tiny.get_config()  # num_blocks 1, learning_rate 3e-3: the base values
    settings = sweep.plan(config, AXES, [0, 1], "ablation")
    names = [s.name for s in settings[::2]]
    assert names == ["base", "num_blocks-2", "learning_rate-0.01"]
    assert [s.seed for s in settings[:2]] == [0, 1]
    by_name = {s.name: s for s in settings}
    assert by_name["base"].config.model.num_blocks == 1 and by_name["base"].axes == {}
    assert by_name["num_blocks-2"].config.train.learning_rate == pytest.approx(3e-3)  # one change only
    assert by_name["learning_rate-0.01"].config.model.num_blocks == 1
    assert len(sweep.plan(config, AXES, [0], "grid")) == 4  # the product, base values included
    with pytest.raises(ValueError, match="--mode: expected one of"):
        sweep.plan(config, AXES, [0], "random")


def test_parse_shard():
    assert sweep.parse_shard("1/3") == (1, 3)
    for bad, message in (("3/3", "0 <= i < N"), ("1-3", "expected 'i/N'"), ("-1/2", "0 <= i < N")):
        with pytest.raises(ValueError, match=message):
            sweep.parse_shard(bad)


def test_shards_split_the_settings_between_workers(tmp_path, monkeypatch):
    trained = []

    def fake_run(cfg, workdir):
        trained.append(workdir.name)
        if cfg.model.num_blocks == 2:
            raise RuntimeError("out of memory (simulated)")
        return {"test": {"hr@10": 0.1}, "best_epoch": 1, "wall_s": 1.0}

    monkeypatch.setattr(sweep, "run_experiment", fake_run)
    config = synthetic_tiny.get_config()
    parts = [sweep.run_sweep(config, AXES, [0, 1], tmp_path, mode="ablation", shard=(i, 2)) for i in (0, 1)]
    everything = [f"{s.name}_seed{s.seed}" for s in sweep.plan(config, AXES, [0, 1], "ablation")]
    assert sorted(trained) == sorted(everything) and len(set(trained)) == len(trained)
    assert not (tmp_path / "results.md").exists()  # a worker's part writes no tables
    stored = json.loads((tmp_path / "worker1.json").read_text())
    assert stored == parts[1] and [r["seed"] for r in stored] == [1, 1, 1]


def _store(workdir, cfg, hr, out_of_time=False):
    config_dict = json.loads(cfg.to_json_best_effort())
    workdir.mkdir(parents=True)
    result = {"config": config_dict, "test": {"hr@10": hr}, "best_epoch": 3, "wall_s": 2.0}
    workdir_lib.write_json_atomic(workdir / "results.json", {**result, "out_of_time": out_of_time})


def test_collect_reads_the_workdirs_and_names_what_is_missing(tmp_path):
    config = synthetic_tiny.get_config()
    axes = [("model.num_blocks", ["2"])]
    base0, base1, two0, two1 = sweep.plan(config, axes, [0, 1], "ablation")
    _store(tmp_path / "base_seed0", base0.config, 0.2)
    _store(tmp_path / "base_seed1", base1.config, 0.4, out_of_time=True)
    _store(tmp_path / "num_blocks-2_seed0", base0.config, 0.9)  # another config's results: not this run's
    (tmp_path / "worker1.json").write_text(
        json.dumps([{"run": "num_blocks-2", "seed": 1, "status": "error", "error": "RuntimeError: boom"}])
    )
    rows = sweep.collect(config, axes, [0, 1], tmp_path, mode="ablation", echo=False)
    assert [(r["run"], r["seed"], r["status"]) for r in rows] == [
        ("base", 0, "ok"),
        ("base", 1, "ok"),
        ("num_blocks-2", 0, "error"),
        ("num_blocks-2", 1, "error"),
    ]
    assert [r["error"] for r in rows[2:]] == ["not finished", "RuntimeError: boom"]
    md = (tmp_path / "results.md").read_text().splitlines()
    assert md[2] == "| base | 2 | 0.3000 ± 0.1000 | ok; stopped by train.max_train_seconds: seeds 1 |"
    assert md[3].startswith("| num_blocks-2 | 0 of 2 | – |") and "seed 1: RuntimeError: boom" in md[3]


@pytest.mark.slow
def test_two_workers_train_what_one_process_trains(tmp_path):
    out = tmp_path / "sweep"
    args = [
        "--config=experiments/configs/synthetic_tiny.py",
        "--config.train.num_epochs=1",
        "--sweep=model.num_blocks=1,2",
        "--mode=ablation",
        "--seeds=0",
        f"--out={out}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.sweep", *args, "--workers=2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    logs = [(out / f"worker{i}.log").read_text() for i in (0, 1)]
    assert "base seed 0" in logs[0] and "num_blocks-2" not in logs[0]
    assert "num_blocks-2 seed 0" in logs[1] and "base seed 0" not in logs[1]
    md = (out / "results.md").read_text()
    assert "| base | 1 |" in md and "| num_blocks-2 | 1 |" in md and "error" not in md
    # The same setting trained again in this process: the same numbers (a worker is a plain run).
    config = synthetic_tiny.get_config()
    config.train.num_epochs = 1
    (two,) = [s for s in sweep.plan(config, [("model.num_blocks", ["2"])], [0], "ablation") if s.axes]
    again = sweep.run_experiment(two.config, tmp_path / "again")
    stored = json.loads((out / "num_blocks-2_seed0" / "results.json").read_text())
    assert stored["test"] == pytest.approx(again["test"], rel=1e-5)


def test_names_stay_unique_and_repeats_are_refused():
    config = synthetic_tiny.get_config()
    names = [
        s.name for s in sweep.plan(config, [("model.dropout", ["0.3"]), ("train.num_epochs", ["3"])], [0])
    ]
    assert names == ["dropout-0.3_num_epochs-3"]  # the last key part names a run
    # two axes sharing the last key part ("name"): the whole dotted key names the runs
    axes = [("train.loss.name", ["bce"]), ("data.name", ["ml-100k"]), ("model.dropout", ["0.3"])]
    clash = [s.name for s in sweep.plan(config, axes, [0], "ablation")]
    assert clash == ["base", "train.loss.name-bce", "data.name-ml-100k", "model.dropout-0.3"]
    with pytest.raises(ValueError, match="--sweep train.seed: the seeds are --seeds"):
        sweep.plan(config, [("train.seed", ["3"])], [0])
    # one value spelled twice is one setting; a repeated seed is an error
    lrs = sweep.plan(config, [("train.learning_rate", ["1e-3", "0.001"])], [0], "grid")
    assert [s.name for s in lrs] == ["learning_rate-1e-3"]
    with pytest.raises(ValueError, match="a seed is repeated"):
        sweep.plan(config, [], [0, 0], "grid")


class _FakeProcess:
    started: list = []

    def __init__(self, cmd, **kw):
        self.cmd, self.terminated, self.waited = cmd, False, False
        _FakeProcess.started.append(self)

    def poll(self):
        return 0 if self.terminated else None  # runs until terminated

    def terminate(self):
        self.terminated = True

    def wait(self, timeout=None):
        self.waited = True

    @property
    def returncode(self):
        return 0 if self.terminated else None


def test_workers_never_outlive_the_parent(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep.subprocess, "Popen", _FakeProcess)
    monkeypatch.setattr(sweep, "keep_parent_off_gpu", lambda: None)  # this pytest process has a backend
    _FakeProcess.started = []
    (tmp_path / "worker7.json").write_text("[]")  # an earlier sweep's: removed at the start

    def report():
        raise RuntimeError("table refresh failed")

    with pytest.raises(RuntimeError, match="table refresh failed"):
        sweep.run_workers(["--seeds=0"], 2, tmp_path, report, poll_s=0.0)
    procs = _FakeProcess.started
    assert len(procs) == 2 and all(p.terminated and p.waited for p in procs)
    assert procs[1].cmd[-2:] == ["--workers=1", "--shard=1/2"] and not (tmp_path / "worker7.json").exists()
    with pytest.raises(ValueError, match="before '--'"):
        sweep.run_workers(["--seeds=0", "--", "x"], 2, tmp_path, report)


def test_parent_with_a_jax_backend_is_refused(monkeypatch):
    import jax

    jax.devices()  # this process now holds a backend: pinning the parent to the CPU would be void
    with pytest.raises(RuntimeError, match="JAX already holds a device in the parent"):
        sweep.keep_parent_off_gpu()
