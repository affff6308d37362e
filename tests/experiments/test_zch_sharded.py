"""The ZCH experiment's remapped item table placed by the FreeScale plan (RunConfig.placement): MPZCH on a
4 x 2 data x model mesh with a row-sharded table gives the losses, remap state and table of one device."""

import jax
import numpy as np

from experiments import zch_experiment as zx
from recjax.data.splits import leave_one_out

STEPS = 3


def _run(tmp_path, **kw):
    dataset, _ = zx.churn_dataset(num_users=96, seq_len=12, pool=100, churn=10, periods=4, seed=0)
    split = leave_one_out(dataset)
    cfg = zx.RunConfig(embed_dim=8, max_len=10, batch_size=32, epochs=1, num_negatives=16, max_probe=8, **kw)
    # 63 managed rows + padding row 0: 64 table rows, divisible over model=2
    trainer = zx.make_trainer(split, 63, "mpzch", cfg, tmp_path, time_ordered=False)
    state, losses = trainer.state, []
    for i, b in enumerate(trainer.task.train_batches(0, 0)):
        if i == STEPS:
            break
        state, m = trainer.train_step(state, zx.mesh_lib.shard_batch(b, trainer.mesh))
        losses.append(float(m["loss"]))
    spec = trainer.state_shardings.params["embedding"]["items"].spec
    trainer.close()
    return losses, jax.device_get((state.params, state.task_state)), spec


def test_mpzch_row_sharded_matches_one_device(tmp_path):
    zx._COMPILED.clear()
    ref_losses, ref, _ = _run(tmp_path / "one", devices=1)
    losses, got, spec = _run(tmp_path / "row", devices=8, placement="row", model_parallel=2)
    assert spec == jax.sharding.PartitionSpec("model", None)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
