"""Workdir guards: one writer (second process refused, a SIGKILLed holder's lock taken over), config diff and
the resume guard, finished runs."""

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from recjax.train import workdir as wd
from recjax.train.workdir import ABSENT, Change, ConfigChangedError, WorkdirBusyError, WorkdirLock

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Takes the lock, says so, then waits (for stdin to close, or for a kill); "fork": a forked child keeps
# the lock while the parent exits.
_HOLDER = textwrap.dedent(
    """
    import os, sys, time
    from recjax.train.workdir import WorkdirLock
    lock = WorkdirLock(sys.argv[1])
    lock.acquire()
    if sys.argv[2] == "fork":
        child = os.fork()
        if child == 0:
            time.sleep(120)
            os._exit(0)
        print(child, flush=True)
        os._exit(0)
    print("locked", flush=True)
    sys.stdin.read()
    lock.release()
    """
)


def _holder(workdir, mode="wait"):
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(workdir), mode],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip()
    assert line, "holder did not start"
    return proc, line


def test_second_writer_refused_then_clean_release(tmp_path, caplog):
    proc, _ = _holder(tmp_path)
    try:
        with pytest.raises(WorkdirBusyError, match=f"in use by pid {proc.pid} on ") as info:
            WorkdirLock(tmp_path).acquire()
        assert "command: " in str(info.value) and "has exited" not in str(info.value)
    finally:
        proc.communicate("", timeout=30)  # clean exit: releases and empties the lock file
    assert proc.returncode == 0 and (tmp_path / ".lock").read_text() == ""
    with caplog.at_level(logging.WARNING), WorkdirLock(tmp_path):
        holder = json.loads((tmp_path / ".lock").read_text())
        assert holder["pid"] == os.getpid() and set(holder) == {"pid", "host", "started", "command"}
        with WorkdirLock(tmp_path):  # re-entrant within the process
            pass
        assert (tmp_path / ".lock").read_text()  # still held by the outer block
    assert not caplog.records and (tmp_path / ".lock").read_text() == ""


def test_sigkilled_holder_lock_taken_over_with_one_line(tmp_path, caplog):
    proc, _ = _holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with caplog.at_level(logging.WARNING), WorkdirLock(tmp_path):  # the kernel released the flock
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    [record] = caplog.records
    message = record.getMessage()
    assert f"taking over the lock left by pid {proc.pid} " in message and "\n" not in message
    assert "forked" not in message


def test_forked_child_keeps_the_lock_and_is_named(tmp_path):
    proc, child = _holder(tmp_path, "fork")
    proc.wait(timeout=30)
    try:
        with pytest.raises(WorkdirBusyError, match=f"pid {proc.pid} .*has exited, so a process it forked"):
            WorkdirLock(tmp_path).acquire()
    finally:
        os.kill(int(child), signal.SIGKILL)
    for _ in range(100):  # the child is reparented; wait until the kernel has released its lock
        try:
            with WorkdirLock(tmp_path):
                break
        except WorkdirBusyError:
            time.sleep(0.05)
    else:
        pytest.fail("lock not released after the child was killed")


# -- config diff ---------------------------------------------------------------------------------------------
def test_config_diff_nested_added_removed_and_json_round_trip():
    old = {"train": {"lr": 1e-3, "ks": [10, 50], "loss": {"name": "bce", "neg": 4}}, "gone": 1, "same": "x"}
    new = {
        "train": {"lr": 3e-3, "ks": (10, 50), "loss": {"name": "bce", "neg": np.int64(8)}},
        "same": "x",
        "model": {"dim": 16},
    }
    assert wd.config_diff(old, new) == [
        Change("gone", 1, ABSENT),
        Change("model", ABSENT, {"dim": 16}),  # an added subtree is one change
        Change("train.loss.neg", 4, 8),
        Change("train.lr", 1e-3, 3e-3),
    ]
    assert wd.config_diff(old, json.loads(json.dumps(old))) == []
    assert wd.config_diff({"ks": (1, 2)}, {"ks": [1, 2]}) == []  # a tuple equals the list it is stored as
    assert wd.config_diff({"ks": [1, 2]}, {"ks": [2, 1]}) == [Change("ks", [1, 2], [2, 1])]  # order matters
    assert wd.config_diff({"a": True}, {"a": 1}) == [Change("a", True, 1)]
    assert wd.config_diff({"a": 1}, {"a": 1.0}) == []
    assert wd.config_diff({"a": {"b": 1}}, {"a": 2}) == [Change("a", {"b": 1}, 2)]


def _config(**train):
    return {"model": {"dim": 16}, "train": {"lr": 1e-3, "num_epochs": 10, "progress": True, **train}}


def _with_checkpoint(workdir: pathlib.Path) -> None:
    (workdir / "checkpoints" / "1").mkdir(parents=True)


def test_check_resume_config(tmp_path):
    assert wd.check_resume_config(tmp_path, _config()) == []  # first start: stored
    assert json.loads((tmp_path / "config.json").read_text()) == _config()
    # Nothing to resume yet (a run that failed before its first checkpoint): any config is stored.
    assert wd.check_resume_config(tmp_path, _config(lr=5e-3)) == []
    _with_checkpoint(tmp_path)
    assert wd.check_resume_config(tmp_path, _config(lr=5e-3)) == []  # unchanged
    with pytest.raises(ConfigChangedError) as info:
        wd.check_resume_config(tmp_path, {**_config(lr=1e-2), "model": {"dim": 32}})
    message = str(info.value)
    assert "model.dim: 16 -> 32" in message and "train.lr: 0.005 -> 0.01" in message, message
    assert "(model.dim,train.lr)" in message
    # Allowed explicitly (a key, a prefix, a comma-separated string, or everything).
    for allow in ({"train.lr", "model"}, "train.lr, model", True):
        changes = wd.check_resume_config(tmp_path, {**_config(lr=1e-2), "model": {"dim": 32}}, allow)
        assert [c.key for c in changes] == ["model.dim", "train.lr"]
        wd.write_json_atomic(tmp_path / "config.json", _config(lr=5e-3))  # back to the stored one
    # Result-neutral keys pass silently; more epochs pass and are reported; fewer are refused.
    assert wd.check_resume_config(tmp_path, _config(lr=5e-3, progress=False)) == []
    assert wd.check_resume_config(tmp_path, _config(lr=5e-3, num_epochs=20)) == [
        Change("train.num_epochs", 10, 20)
    ]
    with pytest.raises(ConfigChangedError, match="train.num_epochs: 20 -> 5"):
        wd.check_resume_config(tmp_path, _config(lr=5e-3, num_epochs=5))
    assert json.loads((tmp_path / "config.json").read_text())["train"]["num_epochs"] == 20


def test_messages():
    assert wd.resume_message(32, 2) == "resumed from step 32 (after epoch 2)"
    assert wd.resume_message(20, 1, 4) == "resumed from step 20 (batch 4 of epoch 2)"
    changes = [Change("train.num_epochs", 10, 20), Change("data.name", "a", ABSENT)]
    assert wd.format_changes(changes) == (
        'config changed on resume: train.num_epochs 10 -> 20, data.name "a" -> <absent>'
    )


def test_finished_results(tmp_path):
    assert wd.finished_results(tmp_path, _config()) is None
    (tmp_path / "results.json").write_text('{"test": {"hr@10": 0.5}')  # torn write
    assert wd.finished_results(tmp_path, _config()) is None
    wd.write_json_atomic(tmp_path / "results.json", {"test": {}})  # the Trainer's, before the config added
    assert wd.finished_results(tmp_path, _config()) is None
    wd.write_json_atomic(tmp_path / "results.json", {"test": {"hr@10": 0.5}, "config": _config()})
    assert wd.finished_results(tmp_path, _config(progress=False))["test"] == {"hr@10": 0.5}
    assert wd.finished_results(tmp_path, _config(num_epochs=20)) is None  # continue training
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary file left
