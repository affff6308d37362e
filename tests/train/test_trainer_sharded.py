"""The Trainer on data x model meshes with a row-sharded item table (all-to-all lookups): the same loss
curve, parameters and Adam moments as one device; a table 4x one device's share trains."""

import jax
import numpy as np
import pytest
from flax import nnx

from recjax.data import synthetic
from recjax.data.splits import leave_one_out
from recjax.models.registry import build_model
from recjax.sharding import embedding as E
from recjax.sharding import mesh as mesh_lib
from recjax.train.tasks import NextItemTask
from recjax.train.trainer import TrainConfig, Trainer

STEPS = 3


def _split(num_items):
    return leave_one_out(synthetic.make_synthetic(num_users=96, num_items=num_items, min_len=5, max_len=12))


def _run(tmp_path, split, mesh, plan, *, model_name="sasrec"):
    cfg = TrainConfig(
        batch_size=32, eval_batch_size=32, num_epochs=1, ks=(5,), early_stop_metric="hr@5", progress=False,
        num_devices=1 if mesh is None else 0, eval_every_epochs=0,
    )  # fmt: skip
    task = NextItemTask.from_config(split, cfg, max_len=10)
    model = build_model(model_name, split.num_items, max_len=10, rngs=nnx.Rngs(0), embed_dim=8, num_blocks=1,
                        dropout=0.0)  # fmt: skip
    trainer = Trainer(model, task, cfg, tmp_path, mesh=mesh, embedding_plan=plan)
    losses, state = [], trainer.state
    for i, batch in enumerate(task.train_batches(0, 0)):
        if i == STEPS:
            break
        state, metrics = trainer.train_step(state, mesh_lib.shard_batch(batch, trainer.mesh))
        losses.append(float(metrics["loss"]))
    trainer.close()
    return trainer, state, np.array(losses)


def test_row_sharded_meshes_match_one_device(tmp_path, model_name="sasrec"):
    """HSTU shares SequenceEmbedding (the lookup); its padding-independence is tested with the buckets."""
    split = _split(num_items=63)  # 64 rows
    _, ref_state, ref_losses = _run(tmp_path / "one", split, None, None, model_name=model_name)
    ref = jax.device_get((ref_state.params, ref_state.opt_state))
    # 8x1: rows over the data axis (every device a data shard and a row block, TorchRec's layout)
    meshes = (
        ((8, 1, "data"), (4, 2, "model"), (2, 4, "model")) if model_name == "sasrec" else ((2, 4, "model"),)
    )
    for data, model, axis in meshes:
        plan = E.EmbeddingPlan.from_config({"items": "row"}, axis=axis)
        mesh = mesh_lib.make_nd_mesh(mesh_lib.MeshConfig(data=data, model=model))
        trainer, state, losses = _run(tmp_path / f"{data}x{model}", split, mesh, plan, model_name=model_name)
        spec = trainer.state_shardings.params["embedding"]["items"].spec
        assert spec == jax.sharding.PartitionSpec(axis, None)
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, err_msg=f"{data}x{model}")
        got = jax.device_get((state.params, state.opt_state))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=f"{data}x{model}")


def test_table_placed_table_matches_one_device(tmp_path):
    """placement="table": every lookup served by model rank ``owner`` (storage replicated)."""
    split = _split(num_items=63)
    _, ref_state, ref_losses = _run(tmp_path / "one", split, None, None)
    mesh = mesh_lib.make_nd_mesh(mesh_lib.MeshConfig(data=2, model=4))
    plan = E.EmbeddingPlan((E.TablePlacement("items", "table", owner=3),))
    trainer, state, losses = _run(tmp_path / "table", split, mesh, plan)
    assert trainer.state_shardings.params["embedding"]["items"].spec == jax.sharding.PartitionSpec(None, None)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    got, ref = jax.device_get(state.params), jax.device_get(ref_state.params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_table_four_times_one_devices_share_trains(tmp_path):
    """Budget: one device may hold 1/4 of the table (+ its moments); on model=8 each holds 1/8."""
    split = _split(num_items=4095)  # 4096 rows
    mesh = mesh_lib.make_nd_mesh(mesh_lib.MeshConfig(data=1, model=8))
    trainer, state, losses = _run(tmp_path, split, mesh, E.EmbeddingPlan.from_config({"items": "row"}))
    table = state.params["embedding"]["items"]
    budget_rows = table.shape[0] // 4
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == table.shape]
    assert len(moments) == 2
    for x in [table, *moments]:
        assert {s.data.shape[0] for s in x.addressable_shards} == {table.shape[0] // 8}
    assert table.shape[0] // 8 <= budget_rows
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_trainer_refuses_bad_rules_and_uneven_rows(tmp_path):
    split = _split(num_items=62)  # 63 rows: not a multiple of 2
    mesh = mesh_lib.make_nd_mesh(mesh_lib.MeshConfig(model=2))
    with pytest.raises(ValueError, match=r"\['embedding'\]\['items'\].*63 does not divide over 2"):
        _run(tmp_path / "a", split, mesh, E.EmbeddingPlan.from_config({"items": "row"}))
    cfg = TrainConfig(batch_size=32, eval_batch_size=32, ks=(5,), early_stop_metric="hr@5", num_devices=1)
    task = NextItemTask.from_config(split, cfg, max_len=10)
    model = build_model("sasrec", split.num_items, max_len=10, rngs=nnx.Rngs(0), embed_dim=8, num_blocks=1)
    with pytest.raises(ValueError, match=r"rules\['vocab'\]: unknown mesh axis 'rows'"):
        Trainer(model, task, cfg, tmp_path / "b", rules={**mesh_lib.DEFAULT_RULES, "vocab": "rows"})
