"""Runs that cannot silently go wrong (issue 17): a diverging run stops (or skips) and never keeps NaN
parameters as best; two runs on one workdir; a resume with a changed config; a finished workdir."""

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments.configs import synthetic_tiny
from experiments.train_lib import run_experiment, train_config
from recjax.data import synthetic
from recjax.data.splits import leave_one_out
from recjax.models.registry import build_model
from recjax.train.tasks import NextItemTask
from recjax.train.trainer import Trainer
from recjax.train.workdir import ConfigChangedError

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _tiny(**train):
    config = synthetic_tiny.get_config()
    config.data.synthetic.num_users, config.data.synthetic.num_items = 300, 100
    config.data.pipeline = "numpy"
    config.train.update({"num_epochs": 1, **train})
    return config


def _trainer(workdir, config):
    from flax import nnx

    tcfg = train_config(config.train)
    ds = synthetic.make_synthetic(**config.data.synthetic.to_dict())
    model_cfg = config.model.to_dict()
    model = build_model(model_cfg.pop("name"), ds.num_items, max_len=20, rngs=nnx.Rngs(0), **model_cfg)
    return Trainer(model, NextItemTask.from_config(leave_one_out(ds), tcfg, max_len=20), tcfg, workdir)


def _all_finite(tree) -> bool:
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(jax.device_get(tree)))


def test_diverging_run_stops_naming_the_step(tmp_path):
    trainer = _trainer(tmp_path, _tiny(learning_rate=1e6))
    with pytest.raises(FloatingPointError, match=r"training step \d+: non-finite loss"):
        trainer.fit()
    # The step that went non-finite changed nothing: the state and the best copy stay finite.
    assert _all_finite(trainer.state.params) and _all_finite(trainer.best["params"])


def test_diverging_run_can_skip_steps(tmp_path):
    trainer = _trainer(tmp_path, _tiny(learning_rate=1e6, nonfinite="skip", num_epochs=2))
    res = trainer.fit()
    assert res["skipped_steps"] > 0
    assert _all_finite(trainer.state.params) and _all_finite(trainer.best["params"])
    # A ranking of finite scores: never the "MRR 1.0" a NaN model used to get.
    assert res["test"]["mrr"] < 0.5


def test_skipped_steps_do_not_depend_on_checkpoint_frequency(tmp_path):
    """A skipped step was counted twice when a checkpoint fell on the step after it."""
    counts = []
    for every in (0, 1):
        config = _tiny(learning_rate=1e6, nonfinite="skip", checkpoint_every_steps=every)
        trainer = _trainer(tmp_path / str(every), config)
        counts.append(trainer.fit()["skipped_steps"])
    assert counts[0] == counts[1] > 0, counts


def test_resume_with_changed_config_is_refused_and_finished_run_is_reported(tmp_path, capsys):
    config = _tiny()
    first = run_experiment(config, tmp_path)
    assert (tmp_path / "config.json").exists()
    again = run_experiment(_tiny(), tmp_path)  # same config, finished: reported, not retrained
    assert "already finished" in capsys.readouterr().out and again["test"] == first["test"]
    changed = _tiny(learning_rate=1e-2)
    with pytest.raises(ConfigChangedError, match=r"train\.learning_rate: 0\.003 -> 0\.01"):
        run_experiment(changed, tmp_path)
    # The CLI says it in one line (no traceback) before loading anything.
    cli = _cli(tmp_path, "--config.train.num_epochs=1", "--config.train.learning_rate=0.01")
    out, _ = cli.communicate(timeout=120)
    assert cli.returncode != 0 and "error: refusing to resume" in out and "Traceback" not in out, out
    assert "--allow_config_change" in out or "allow these keys" in out
    # Allowed explicitly: the run goes on from its checkpoint (here: 1 more epoch) and says so.
    changed.train.num_epochs = 2
    res = run_experiment(changed, tmp_path, allow_change="train.learning_rate")
    out = capsys.readouterr().out
    assert "resumed from step" in out and "train.learning_rate 0.003 -> 0.01" in out
    assert res["epochs"] == 2 and res["resumed_from_step"] == first["steps"]


def _cli(workdir, *extra, env=None):
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = [
        sys.executable, "-m", "experiments.run", "--config=experiments/configs/synthetic_tiny.py",
        f"--workdir={workdir}", "--config.data.pipeline=numpy", "--config.data.synthetic.num_users=300",
        "--config.data.synthetic.num_items=100", *extra,
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
def test_second_run_on_a_workdir_is_refused(tmp_path):
    first = _cli(tmp_path, "--config.train.num_epochs=3")
    lock = tmp_path / ".lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text().strip()):
        time.sleep(0.05)
    assert json.loads(lock.read_text())["pid"] == first.pid
    second = _cli(tmp_path, "--config.train.num_epochs=3")
    out2, _ = second.communicate(timeout=300)
    out1, _ = first.communicate(timeout=300)
    assert second.returncode != 0 and f"in use by pid {first.pid}" in out2, out2
    assert first.returncode == 0, out1
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["epochs"] == 3 and results["resumed_from_step"] is None


def test_time_budget_stops_tests_best_and_resume_continues(tmp_path):
    """A spent ``max_train_seconds`` ends the run after the epoch's validation with test metrics of the best
    parameters; the workdir is not "finished": running it again continues to the same result as a run
    without a budget."""
    # checkpoints every 2 epochs: the run out of time after epoch 1 saves anyway, so the second run continues
    budget = _tiny(num_epochs=3, max_train_seconds=1e-6, checkpoint_every_epochs=2)
    first = _trainer(tmp_path / "b", budget).fit()
    assert first["out_of_time"] and first["epochs"] == 1 and first["best_epoch"] == 1
    assert set(first["test"]) >= {"hr@10", "ndcg@10"}
    assert json.loads((tmp_path / "b" / "results.json").read_text())["out_of_time"]
    from recjax.train import workdir as workdir_lib

    stored = tmp_path / "stored"
    stored.mkdir()
    for out_of_time, expected in ((False, True), (True, False)):  # same config: finished unless out of time
        (stored / "results.json").write_text(json.dumps({"config": {"a": 1}, "out_of_time": out_of_time}))
        assert (workdir_lib.finished_results(stored, {"a": 1}) is not None) == expected
        assert workdir_lib.finished_results(stored, {"a": 1}, accept_out_of_time=True) is not None
    resumed = _trainer(tmp_path / "b", _tiny(num_epochs=3, checkpoint_every_epochs=2)).fit()
    full = _trainer(tmp_path / "full", _tiny(num_epochs=3)).fit()
    assert not resumed["out_of_time"] and resumed["epochs"] == 3 and resumed["resumed_from_step"] > 0
    assert resumed["test"] == pytest.approx(full["test"], rel=1e-6)
    with pytest.raises(ValueError, match="max_train_seconds"):
        train_config(_tiny(max_train_seconds=-1.0).train)
    with pytest.raises(ValueError, match="max_train_seconds=5.0 needs checkpoints"):
        train_config(_tiny(max_train_seconds=5.0, checkpoint_every_epochs=0).train)
