"""Device memory of the Trainer's step: donated state + host best copy (now) vs not donated + a device best
copy (before issue 8), from ``jax.jit(...).lower(...).compile().memory_analysis()``.

For each setting it builds the real ``Trainer`` (SASRec, NextItemTask) and reports the bytes of params + Adam
state, and the compiled step's argument / output / aliased / temporary bytes. Peak of a step ~= arguments +
outputs - aliased + temporaries; without donation the old state and the new one coexist (outputs are not
aliased to the arguments), and the old trainer also kept ``best_params`` on the device (+ params bytes).

  PYTHONPATH=. python experiments/bench/train_state_memory.py            # ML-1M-sized and a 2M-row table
  PYTHONPATH=. python experiments/bench/train_state_memory.py --small    # seconds, CPU smoke run
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import numpy as np
from flax import nnx

from recjax.data.splits import leave_one_out
from recjax.data.types import SequenceDataset
from recjax.models.registry import build_model
from recjax.sharding import mesh as mesh_lib
from recjax.train.tasks import LossConfig, NextItemTask
from recjax.train.trainer import TrainConfig, Trainer

MIB = 2**20


def _dataset(num_items: int, num_users: int, length: int, seed: int = 0) -> SequenceDataset:
    rng = np.random.default_rng(seed)
    seqs = tuple(rng.integers(1, num_items + 1, size=length).astype(np.int32) for _ in range(num_users))
    return SequenceDataset("random", seqs, num_items)


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(num_items: int, dim: int, max_len: int, batch: int, donate: bool) -> dict:
    split = leave_one_out(_dataset(num_items, num_users=2 * batch, length=max_len + 3))
    cfg = TrainConfig(batch_size=batch, eval_batch_size=batch, num_devices=1, progress=False, donate=donate,
                      ks=(10,), loss=LossConfig(num_negatives=128))  # fmt: skip
    model = build_model("sasrec", num_items, max_len=max_len, embed_dim=dim, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(model, NextItemTask.from_config(split, cfg, max_len=max_len), cfg, workdir)
        host_batch = next(iter(trainer.task.train_batches(0, 0)))
        compiled = trainer.train_step.lower(trainer.state, mesh_lib.shard_batch(host_batch, trainer.mesh))
        mem = compiled.compile().memory_analysis()
        params, adam = _bytes(trainer.state.params), _bytes(trainer.state.opt_state)
    args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    peak = args + outs - alias + temp
    best_on_device = 0 if donate else params  # the old trainer's best_params stayed on the device
    return dict(params=params, adam=adam, args=args, outs=outs, alias=alias, temp=temp, peak=peak,
                total=peak + best_on_device)  # fmt: skip


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    args = p.parse_args(argv)
    settings = [("ml-1m sized", 3416, 50, 200, 128), ("2M-row table", 2_000_000, 64, 50, 128)]
    if args.small:
        settings = [("tiny", 1000, 16, 20, 32)]
    rows = []
    print(f"devices: {jax.devices()[0].device_kind}")
    print("| setting | design | params MiB | Adam MiB | step args | outputs | aliased | temp | step peak | "
          "+ device best copy | total MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, n, d, length, b in settings:
        for donate in (False, True):
            r = measure(n, d, length, b, donate) | {"setting": name, "donate": donate}
            rows.append(r)
            design = "donated, host best (now)" if donate else "not donated, device best (before)"
            print(
                f"| {name} | {design} | {r['params'] / MIB:.1f} | {r['adam'] / MIB:.1f} | "
                f"{r['args'] / MIB:.1f} | {r['outs'] / MIB:.1f} | {r['alias'] / MIB:.1f} | "
                f"{r['temp'] / MIB:.1f} | {r['peak'] / MIB:.1f} | {(r['total'] - r['peak']) / MIB:.1f} | "
                f"{r['total'] / MIB:.1f} |"
            )
    return rows


if __name__ == "__main__":
    main()
