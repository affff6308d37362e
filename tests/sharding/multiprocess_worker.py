"""One process of the 2-process CPU test (tests/sharding/test_multiprocess.py): a tiny HSTU with a row-sharded
item table on a 2 x 2 (data x model) mesh spanning the processes, trained for a few steps through the
Trainer's step, then evaluated; process 0 writes the losses, the metrics and the table to ``--out``.

Also the 1-process reference (``--num_processes=1``), run in the test process itself through :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

STEPS = 3


def run(workdir: pathlib.Path) -> dict:
    """Trains STEPS steps on the first 4 global devices; returns losses, valid metrics, the item table."""
    import numpy as np
    from flax import nnx

    from recjax.data import synthetic
    from recjax.data.splits import leave_one_out
    from recjax.models.registry import build_model
    from recjax.sharding import distributed, embedding
    from recjax.sharding import mesh as mesh_lib
    from recjax.train.tasks import NextItemTask
    from recjax.train.trainer import TrainConfig, Trainer

    split = leave_one_out(synthetic.make_synthetic(num_users=64, num_items=63, min_len=5, max_len=12))
    cfg = TrainConfig(batch_size=16, eval_batch_size=16, num_epochs=1, ks=(5,), early_stop_metric="hr@5",
                      progress=False, eval_every_epochs=0, checkpoint_every_epochs=0)  # fmt: skip
    task = NextItemTask.from_config(split, cfg, max_len=10)
    model = build_model("hstu", split.num_items, max_len=10, rngs=nnx.Rngs(0), embed_dim=8, attention_dim=8,
                        linear_dim=8, num_blocks=1, dropout=0.0)  # fmt: skip
    mesh = mesh_lib.make_nd_mesh(mesh_lib.MeshConfig(data=2, model=2, num_devices=4))
    plan = embedding.EmbeddingPlan.from_config({"items": "row"})
    trainer = Trainer(model, task, cfg, workdir, mesh=mesh, embedding_plan=plan)
    state, losses = trainer.state, []
    for i, batch in enumerate(task.train_batches(0, 0)):
        if i == STEPS:
            break
        state, metrics = trainer.train_step(state, mesh_lib.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    trainer.state = state
    valid = trainer.evaluate("valid")
    table = distributed.host_value(state.params["embedding"]["items"])  # all-gathered from both processes
    trainer.close()
    return {"losses": losses, "valid": valid, "table": np.asarray(table).tolist(),
            "processes": __import__("jax").process_count()}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--process_id", type=int, required=True)
    p.add_argument("--num_processes", type=int, default=2)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    # Two simulated CPU devices per process (read when the backend starts): 4 global devices.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax

    jax.config.update("jax_platforms", "cpu")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    from recjax.sharding import distributed

    distributed.initialize(
        distributed.DistributedConfig(
            enabled=True, coordinator=f"localhost:{a.port}", num_processes=a.num_processes,
            process_id=a.process_id,
        )
    )  # fmt: skip
    out = pathlib.Path(a.out)
    result = run(out / f"workdir_{a.process_id}")
    if a.process_id == 0:
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
