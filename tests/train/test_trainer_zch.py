"""Trainer with an ID remapper (raw IDs through MPZCH), data parallel over 2 devices: exact resume of
params, optimizer, remap state and epoch counters after a crash mid-epoch; freshness invariants; bad inputs.
Tiny shapes. HSTU and the modulo baseline through the Trainer: tests/experiments/test_zch_experiment.py."""

import jax
import numpy as np
import pytest
from flax import nnx

from recjax.data import batching, synthetic
from recjax.data.splits import leave_one_out
from recjax.data.types import SequenceDataset
from recjax.embeddings import zch_remap as zr
from recjax.models.registry import build_model
from recjax.sharding import mesh as mesh_lib
from recjax.train import tasks
from recjax.train.remap_hook import RemappedTask
from recjax.train.tasks import LossConfig, NextItemTask
from recjax.train.trainer import TrainConfig, Trainer

TABLE, MAX_LEN = 48, 10  # table rows < the 80 distinct items: collisions (modulo) and evictions (MPZCH)


def _raw_dataset(seed):
    """Synthetic sequences with each dense item ID replaced by a distinct random 31-bit raw ID."""
    ds = synthetic.make_synthetic(seed=seed, num_users=96, num_items=80, min_len=6, max_len=14)
    rng = np.random.default_rng(seed)
    raw = np.concatenate([[0], rng.choice(2**31 - 2, size=ds.num_items, replace=False) + 1])
    seqs = tuple(raw[s].astype(np.int32) for s in ds.sequences)
    return SequenceDataset("raw", seqs, int(raw.max()))


def _trainer(workdir, split, *, model="sasrec", method="mpzch", devices=2, epochs=2, batch_iter=None):
    remapper = zr.ItemIdRemapper(zr.RemapConfig(TABLE, method=method, max_probe=16, impl="xla"))
    cfg = TrainConfig(
        batch_size=16,
        num_epochs=epochs,
        learning_rate=3e-3,
        patience=0,
        eval_batch_size=16,
        ks=(10,),
        early_stop_metric="hr@10",
        checkpoint_every_steps=3,
        num_devices=devices,
        progress=False,
        loss=LossConfig(num_negatives=8),
    )
    kw = dict(embed_dim=8, num_blocks=1, dropout=0.1)
    kw |= dict(ffn_hidden_dim=8) if model == "sasrec" else dict(attention_dim=8, linear_dim=8)
    net = build_model(model, remapper.num_items, max_len=MAX_LEN, rngs=nnx.Rngs(params=0, dropout=1), **kw)
    task = RemappedTask(
        NextItemTask.from_config(split, cfg, max_len=MAX_LEN, batch_iter=batch_iter), remapper
    )
    return Trainer(net, task, cfg, workdir)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _share_compiled(dst, src):
    """Same config and mesh -> the same jitted functions; reusing them saves the compilations (CPU time)."""
    dst.train_step, dst.task._eval_remap = src.train_step, src.task._eval_remap
    return dst


def _check_queries(trainer):
    """Evaluation after the remap: every row that can score a hit has a non-zero query (a zero query ties
    every item at rank 1), and a sequence ending in an unknown ID gives the query of the same sequence
    without it (re-left-padded), as SASRec/HSTU read the last position."""
    graphdef, state = nnx.split(trainer.best_model())
    remap_state = trainer.best["task_state"]["remap"]
    eval_remap = trainer.task._eval_remap

    def query(ev):
        return np.asarray(tasks._queries(graphdef, state, ev["inputs"], ev["mask"]))

    unknown_id = 2**31 - 1  # _raw_dataset draws raw IDs in [1, 2**31 - 2]
    for raw in batching.batches(trainer.task.task.examples["test"], 16, shuffle=False):
        ev = eval_remap(remap_state, mesh_lib.shard_batch(raw, trainer.mesh))
        q = query(ev)
        known, no_input = np.asarray(ev["scoreable"]), np.asarray(ev["no_input"])
        assert (np.linalg.norm(q, axis=1)[known] > 1e-3).all()
        assert not (known & no_input).any()
        short = ~raw["mask"][:, 0] & raw["valid"]  # room to append one more input
        longer = dict(raw, inputs=raw["inputs"].copy(), mask=raw["mask"].copy())
        longer["inputs"][short] = np.concatenate(
            [raw["inputs"][short, 1:], np.full((short.sum(), 1), unknown_id, raw["inputs"].dtype)], axis=1
        )
        longer["mask"][short] = np.concatenate([raw["mask"][short, 1:], np.ones((short.sum(), 1), bool)], 1)
        q2 = query(eval_remap(remap_state, mesh_lib.shard_batch(longer, trainer.mesh)))
        np.testing.assert_allclose(q2[short], q[short], atol=1e-5)
    # A row with no known input left (all-False mask) can never score a hit: it is a miss.
    gone = dict(raw, inputs=np.where(raw["mask"], unknown_id, 0).astype(raw["inputs"].dtype))
    ev3 = eval_remap(remap_state, mesh_lib.shard_batch(gone, trainer.mesh))
    np.testing.assert_array_equal(np.asarray(ev3["no_input"]), raw["valid"])
    assert not np.asarray(ev3["scoreable"]).any() and not np.asarray(ev3["mask"]).any()


def test_resume_after_crash_is_exact(tmp_path):
    split = leave_one_out(_raw_dataset(0))
    full = _trainer(tmp_path / "full", split)  # 2 devices: data parallel, remap on the gathered batch
    res_full = full.fit()
    # MPZCH never lets an ID arrive on a row trained for another ID without resetting it.
    last = res_full["last_epoch"]
    assert last["inherited_rate"] == 0.0 and last["table_usage"] == 1.0  # 80 IDs through 48 rows
    assert 0 < last["eviction_rate"] <= last["insert_rate"]  # inserts include evicting ones
    assert last["hit_rate"] + last["insert_rate"] + last["fallback_rate"] <= 1.0
    assert 0 <= res_full["test"]["unknown_target_rate"] < 1
    _check_queries(full)
    t = res_full["test"]  # MRR <= HR@10 + (misses at rank > 10 contribute at most 1/11 each)
    assert t["mrr"] <= t["hr@10"] + (1 - t["hr@10"]) / 11 + 1e-6, t

    class Crash(Exception):
        pass

    def crashing(examples, batch_size, *, epoch, **kw):  # dies after the mid-epoch checkpoint of step 9
        for i, b in enumerate(batching.batches(examples, batch_size, epoch=epoch, **kw)):
            if epoch == 1 and i == 4:
                raise Crash
            yield b

    with pytest.raises(Crash):
        _share_compiled(_trainer(tmp_path / "killed", split, batch_iter=crashing), full).fit()
    resumed = _share_compiled(_trainer(tmp_path / "killed", split), full)
    assert resumed.resumed_from == 9 and resumed.loop["batch"] == 3  # mid-epoch 1
    res = resumed.fit()
    # params, optimizer, remap state and epoch counters (task_state), and the best copy with its remap state
    for key, a_tree, b_tree in (
        ("params", full.state.params, resumed.state.params),
        ("opt_state", full.state.opt_state, resumed.state.opt_state),
        ("task_state", full.state.task_state, resumed.state.task_state),
        ("best", full.best, resumed.best),
    ):
        for a, b in zip(_leaves(a_tree), _leaves(b_tree), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=key)
    assert res["test"] == res_full["test"] and res["last_epoch"] == res_full["last_epoch"]


def test_bad_inputs(tmp_path):
    split = leave_one_out(_raw_dataset(2))
    remapper = zr.ItemIdRemapper(zr.RemapConfig(TABLE, max_probe=16, impl="xla"))
    net = build_model("sasrec", TABLE + 5, max_len=MAX_LEN, rngs=nnx.Rngs(0), embed_dim=8, num_blocks=1)
    with pytest.raises(ValueError, match=f"id_remapper: the model has {TABLE + 6} item rows"):
        cfg = TrainConfig(num_devices=1, progress=False)
        Trainer(
            net, RemappedTask(NextItemTask.from_config(split, cfg, max_len=MAX_LEN), remapper), cfg, tmp_path
        )
    trainer = _trainer(tmp_path / "ok", split, devices=1)
    with pytest.raises(ValueError, match="params / task_state: pass both"):
        trainer.evaluate("test", params=trainer.state.params)
    with pytest.raises(ValueError, match="params / task_state: .* got params=None, task_state=given"):
        trainer.evaluate("valid", task_state=trainer.state.task_state)
    with pytest.raises(ValueError, match="split: expected one of"):
        trainer.evaluate("tset")
