"""Multi-process launch: 2 CPU processes (2 simulated devices each, jax.distributed over localhost, gloo
collectives) train a tiny HSTU with a row-sharded table to the same losses, metrics and table as one
process on the same 4-device mesh; the launch settings are read from the environment and checked."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from recjax.sharding import distributed

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # two processes compiling at once: no shared unlocked cache
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), f"--process_id={i}", f"--port={port}", f"--out={tmp_path}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    # The 1-process reference on the same global device count and mesh, here (8 simulated devices).
    sys.path.insert(0, str(WORKER.parent))
    import multiprocess_worker

    ref = multiprocess_worker.run(tmp_path / "reference")
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-3000:] for x in logs)
    got = json.loads((tmp_path / "result.json").read_text())
    assert got["processes"] == 2 and ref["processes"] == 1
    assert len(got["losses"]) == multiprocess_worker.STEPS
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5)
    assert got["valid"].keys() == ref["valid"].keys()
    for k in ref["valid"]:
        np.testing.assert_allclose(got["valid"][k], ref["valid"][k], rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(got["table"], ref["table"], rtol=1e-5, atol=1e-7)
    assert not np.allclose(ref["table"], 0)


def test_config_from_env_and_bad_values_named():
    env = {"RECJAX_COORDINATOR": "10.0.0.1:1234", "RECJAX_NUM_PROCESSES": "2", "RECJAX_PROCESS_ID": "1",
           "RECJAX_LOCAL_DEVICE_IDS": "1"}  # fmt: skip
    cfg = distributed.DistributedConfig.from_env(env)
    assert cfg == distributed.DistributedConfig(True, "10.0.0.1:1234", 2, 1, (1,))
    assert not distributed.DistributedConfig.from_env({}).enabled
    assert distributed.DistributedConfig.from_env({}, enabled=True).enabled  # auto-detect (cluster env)
    with pytest.raises(ValueError, match="RECJAX_NUM_PROCESSES: expected an integer"):
        distributed.DistributedConfig.from_env({**env, "RECJAX_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match="distributed.coordinator: expected 'host:port'"):
        distributed.DistributedConfig(True, "localhost")
    with pytest.raises(ValueError, match="distributed.process_id: expected 0..num_processes-1"):
        distributed.DistributedConfig(True, "localhost:1", 2, 2)
    with pytest.raises(ValueError, match="distributed.num_processes and distributed.process_id"):
        distributed.DistributedConfig(True, "localhost:1")
    assert not distributed.initialize(distributed.DistributedConfig())  # disabled: nothing happens
