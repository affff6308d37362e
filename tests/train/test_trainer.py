"""Trainer: learning signal, data parallel == one device, exact resume after SIGKILL."""

import json
import os
import pathlib
import signal
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
from recjax.train.checkpoint import KILL_ENV, committed_steps
from recjax.train.tasks import NextItemTask, next_item_loss
from recjax.train.trainer import Trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _trainer(tmp_path, num_devices, epochs=1):
    from flax import nnx

    config = synthetic_tiny.get_config()
    config.train.num_devices, config.train.num_epochs = num_devices, epochs
    ds = synthetic.make_synthetic(**config.data.synthetic.to_dict())
    model_cfg = config.model.to_dict()
    model = build_model(
        model_cfg.pop("name"),
        ds.num_items,
        max_len=config.data.max_len,
        rngs=nnx.Rngs(params=0, dropout=1),
        **model_cfg,
    )
    tcfg = train_config(config.train)
    task = NextItemTask.from_config(leave_one_out(ds), tcfg, max_len=config.data.max_len)
    return Trainer(model, task, tcfg, tmp_path)


def _one_step(trainer):
    """Loss/grad-norm of the real train step, and the raw gradients of the same loss, on one batch."""
    from flax import nnx

    from recjax.data import batching
    from recjax.sharding import mesh as mesh_lib

    batch = mesh_lib.shard_batch(
        next(batching.batches(trainer.task.train_examples, 64, shuffle=True, seed=0, epoch=0)), trainer.mesh
    )
    s = trainer.state
    key = jax.random.fold_in(s.rng, s.step)  # the key the step uses
    params, rest = jax.device_get((s.params, s.rest))  # the step donates its state
    trainer.state, metrics = trainer.train_step(s, batch)  # (one and eight both take this extra step)

    @jax.jit
    def grads(params, rest, batch):
        model = nnx.merge(trainer.graphdef, params, rest)
        loss_fn = lambda m: next_item_loss(trainer.cfg.loss, m, batch, key)[0]  # noqa: E731
        return nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param))(model)

    return jax.device_get(grads(params, rest, batch)), jax.device_get(metrics)


def test_data_parallel_matches_single_device(tmp_path):
    assert jax.device_count() == 8
    one, eight = _trainer(tmp_path / "one", 1), _trainer(tmp_path / "eight", 8)
    # One step: same loss, gradient norm and gradients (dropout on, same RNG).
    (g1, m1), (g8, m8) = _one_step(one), _one_step(eight)
    for k in m1:
        np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5, err_msg=k)
    # Some gradients are mathematically zero (softmax shift invariance) and only rounding noise remains:
    # absolute tolerance relative to the largest gradient.
    scale = max(np.abs(a).max() for a in jax.tree.leaves(g1))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale)
    # A whole epoch: the same ranking quality. Not bit-equal: reduction order differs, and Adam's first
    # steps move every coordinate by about lr * sign(g), so near-zero gradients flip with rounding.
    r1, r8 = one.fit(), eight.fit()
    for k in r1["test"]:
        assert r1["test"][k] == pytest.approx(r8["test"][k], abs=0.02), k


def test_learns_beyond_popularity(tmp_path):
    config = synthetic_tiny.get_config()
    res = run_experiment(config, tmp_path)
    assert res["test"]["hr@10"] > 1.1 * res["popularity_test"]["hr@10"], res


def _cli(workdir, *extra, env=None):
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        "--config=experiments/configs/synthetic_tiny.py",
        f"--workdir={workdir}",
        "--config.train.num_epochs=2",
        "--config.train.checkpoint_every_steps=4",  # divides the 16 steps of an epoch: two saves at its end
        "--config.data.pipeline=numpy",
        *extra,
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _assert_same_results(full, resumed):
    a = json.loads((full / "results.json").read_text())
    b = json.loads((resumed / "results.json").read_text())
    assert b["resumed_from_step"] is not None and b["steps"] == a["steps"]
    for k in a["test"]:
        assert b["test"][k] == pytest.approx(a["test"][k], abs=1e-6), k


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    full = _cli(tmp_path / "full")
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out
    total_steps = json.loads((tmp_path / "full" / "results.json").read_text())["steps"]

    killed = _cli(tmp_path / "killed")
    ckpt = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for a mid-run checkpoint (step >= 8), then kill without warning
        steps = [s for s in committed_steps(ckpt) if s is not None]
        if steps and max(steps) >= 8:
            break
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "results.json").exists()
    steps = [s for s in committed_steps(ckpt) if s is not None]
    assert 0 < max(steps) < total_steps, steps

    resumed = _cli(tmp_path / "killed")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resumed from step" in out
    _assert_same_results(tmp_path / "full", tmp_path / "killed")

    # Killed inside a save, while an old checkpoint is half deleted (the third save: step 12, or the
    # second save of step 16 at the epoch end in the old scheme): the resume still reaches the same result.
    torn = _cli(tmp_path / "torn", env={KILL_ENV: "delete"})
    torn.communicate(timeout=600)
    assert torn.returncode == -signal.SIGKILL
    resumed = _cli(tmp_path / "torn")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "Traceback" not in out
    _assert_same_results(tmp_path / "full", tmp_path / "torn")


def test_moe_feed_forward_trains_with_router_loss(tmp_path):
    """SASRec with an MoE FFN: the router aux loss reaches the loss and gradients reach the router."""
    from flax import nnx

    from recjax.data import batching
    from recjax.sharding import mesh as mesh_lib

    config = synthetic_tiny.get_config()
    ds = synthetic.make_synthetic(**config.data.synthetic.to_dict())
    model = build_model(
        "sasrec",
        ds.num_items,
        max_len=20,
        embed_dim=16,
        num_blocks=1,
        ffn="moe",
        ffn_options={"num_experts": 4, "top_k": 2, "impl": "xla"},
        rngs=nnx.Rngs(params=0, dropout=1),
    )
    tcfg = train_config(config.train)
    trainer = Trainer(model, NextItemTask.from_config(leave_one_out(ds), tcfg, max_len=20), tcfg, tmp_path)
    before = jax.device_get(trainer.state.params)
    batch = next(batching.batches(trainer.task.train_examples, 64, shuffle=True, seed=0, epoch=0))
    state, metrics = trainer.train_step(trainer.state, mesh_lib.shard_batch(batch, trainer.mesh))
    params = jax.device_get(state.params)
    assert float(metrics["moe_aux_loss"]) > 0 and np.isfinite(float(metrics["loss"]))
    assert 1.0 <= float(metrics["moe_max_load_ratio"]) <= 4.0  # 4 experts: at most all tokens on one
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), before, params)
    router_moved = [
        v for path, v in jax.tree_util.tree_leaves_with_path(moved) if "router" in jax.tree_util.keystr(path)
    ]
    assert router_moved and all(router_moved)
