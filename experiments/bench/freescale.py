"""FreeScale benchmarks: load balance on the MovieLens-1M length distribution, training throughput 1 -> N
devices with a row-sharded item table, straggler idle fraction with and without balancing, input prefetch
on/off. Prints markdown tables (for benchmarks/RESULTS.md).

  python -m experiments.bench.freescale --part=balance            # CPU: max/mean per device, ML-1M
  python -m experiments.bench.freescale --part=throughput --devices=1,2 --balance=none,zigzag --prefetch=0,1
  python -m experiments.bench.freescale --part=straggler --devices=2 --balance=none,zigzag,variable
  python -m experiments.bench.freescale --part=throughput --devices=2 --lookups=sync,prioritized --sparse=1 \
      --lhs=0,1                                                    # prioritized lookups x latency hiding
  python -m experiments.bench.freescale --small                   # every part, tiny synthetic, CPU

throughput: steps of the Trainer's jitted step (HSTU, ``freescale.table_rows`` item rows row-sharded over
the ``data`` axis with the all-to-all lookups, length buckets, balancing), sequences/s and tokens/s over
``freescale.steps`` steps after 5 warm-up steps. Prefetch: the next batch is put on the devices while the
current step runs (a one-batch device queue); off: put right before its step. Lookups: ``sync`` (the
plain step) or ``prioritized`` (recjax/sharding/prefetch.py: the next batch's rows looked up during the
step, collision rows after the update; columns: mean collision fraction, fraction of steps that fell back to
the full lookup). ``--sparse=1``: the item table's Adam is row-sparse (``prefetch.lazy_rows``; with dense
Adam almost every id collides). ``--lhs=0,1``: XLA's latency-hiding scheduler off / on (GPU flags,
docs/FREESCALE.md), each value in its own process (XLA reads its flags once).

straggler: under one SPMD program every device runs the same padded shape, so imbalance only costs where
compute follows each device's own data. This part measures that case: each device's rows of a step, cut to
their own length bucket, run one forward+backward on one device, timed per device; the idle fraction of a
step is ``1 - mean_d(t_d) / max_d(t_d)`` (time the others wait for the slowest), averaged over steps.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from experiments.bench.common import timed
from experiments.configs import freescale_hstu_ml1m
from recjax.data import balancing, batching, registry, synthetic
from recjax.data.splits import leave_one_out
from recjax.models.registry import build_model
from recjax.sharding import embedding as embedding_lib
from recjax.sharding import mesh as mesh_lib
from recjax.sharding import prefetch as prefetch_lib
from recjax.train.tasks import NextItemTask, next_item_loss
from recjax.train.trainer import TrainConfig, Trainer, make_optimizer

# XLA_FLAGS of --lhs (GPU; recognised and ignored on CPU): the latency-hiding scheduler overlaps the
# all-to-alls with compute, the high-priority stream keeps collectives from queueing behind compute kernels.
LHS_FLAGS = {
    "0": "--xla_gpu_enable_latency_hiding_scheduler=false",
    "1": "--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_highest_priority_async_stream=true",
}


class LargeTableTask(NextItemTask):
    """NextItemTask accepting an item table larger than the dataset (rows past num_items never appear as
    inputs or targets; they are drawn as uniform negatives). For throughput only."""

    def check_model(self, model: nnx.Module) -> None:
        if model.item_embeddings().shape[0] < self.split.num_items + 1:
            super().check_model(model)


def _split(small: bool):
    if small:
        return leave_one_out(synthetic.make_synthetic(num_users=256, num_items=200, min_len=5, max_len=60))
    return leave_one_out(registry.load({"name": "ml-1m"}))


def _settings(small: bool) -> dict[str, Any]:
    cfg = freescale_hstu_ml1m.get_config()
    fs = dict(cfg.freescale)
    fs["max_len"], fs["model"] = cfg.data.max_len, dict(cfg.model)
    fs.update(placement=cfg.embeddings.tables["items"], plan_axis=cfg.embeddings.axis,
              capacity=cfg.embeddings.prefetch_capacity,
              alpha=cfg.data.balance.alpha, min_width=cfg.data.length_buckets.min_width)  # fmt: skip
    if small:
        fs.update(table_rows=1024, per_device_batch=8, steps=4, max_len=32)
        fs["model"].update(embed_dim=8, attention_dim=8, linear_dim=8, num_blocks=1)
    return fs


def balance_table(split, fs, devices=(2, 8)) -> list[str]:
    """Max/mean per device of tokens (alpha 1) and of sum L^2 (alpha 2), averaged over one epoch."""
    ex = split.train_examples(fs["max_len"])
    rows = [
        "| devices | per-device batch | load | none | zigzag | variable |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for d in devices:
        gb = fs["per_device_batch"] * d
        for load, alpha in (("tokens", 1.0), ("sum L^2", 2.0)):
            ratios = collections.defaultdict(list)
            for b in batching.batches(ex, gb, shuffle=True, seed=0, epoch=0, drop_remainder=True):
                for mode in balancing.MODES:
                    x = balancing.device_loads(balancing.balance_batch(b, d, mode, alpha), d, alpha)["cost"]
                    ratios[mode].append(x.max() / x.mean())
            cells = " | ".join(f"{np.mean(ratios[m]):.3f}" for m in balancing.MODES)
            rows.append(f"| {d} | {fs['per_device_batch']} | max/mean {load} | {cells} |")
    return rows


def _model(fs, rows: int):
    return build_model("hstu", rows - 1, max_len=fs["max_len"], rngs=nnx.Rngs(0),
                       **{k: v for k, v in fs["model"].items() if k != "name"})  # fmt: skip


def _batch_iter(fs, d: int, mode: str):
    it = balancing.length_bucketed(batching.batches, fs["max_len"], fs["min_width"])
    return balancing.balanced(it, d, mode, fs["alpha"]) if mode != "none" else it


def throughput(
    split, fs, d: int, mode: str, prefetch: bool, workdir: str, lookups: str = "sync", sparse: bool = False
) -> dict[str, float]:
    mesh = mesh_lib.make_nd_mesh(mesh_lib.MeshConfig(data=d, num_devices=d))
    rows = fs["table_rows"] - fs["table_rows"] % d
    plan = embedding_lib.EmbeddingPlan.from_config({"items": fs["placement"]}, axis=fs["plan_axis"])
    cfg = TrainConfig(batch_size=fs["per_device_batch"] * d, num_epochs=1, eval_every_epochs=0,
                      progress=False, ks=(10,), checkpoint_every_epochs=0, num_devices=d)  # fmt: skip
    task = LargeTableTask.from_config(split, cfg, max_len=fs["max_len"], batch_iter=_batch_iter(fs, d, mode))
    opt = prefetch_lib.lazy_rows(make_optimizer(cfg), [("embedding", "items")]) if sparse else None
    pf_cfg = prefetch_lib.PrefetchConfig(capacity=fs["capacity"]) if lookups == "prioritized" else None
    trainer = Trainer(_model(fs, rows), task, cfg, workdir, optimizer=opt, mesh=mesh, embedding_plan=plan,
                      prefetch=pf_cfg)  # fmt: skip
    state, n_seq, n_tok, t0, stats = trainer.state, 0, 0, None, []
    it = (b for _ in range(100) for b in task.train_batches(0, 0))
    # one batch ahead: the input queue (prefetch) and the prioritized lookups both need the next batch
    nxt = next(it)
    queued = mesh_lib.shard_batch(nxt, mesh) if prefetch else None
    for i in range(fs["steps"] + 5):
        if i == 5:
            jax.block_until_ready(state)
            t0 = time.perf_counter()
        host, nxt = nxt, next(it)
        if prefetch:  # the next batch is transferred while this step runs
            cur, queued = queued, mesh_lib.shard_batch(nxt, mesh)
        else:
            cur = mesh_lib.shard_batch(host, mesh)
        if trainer.prefetcher is not None:
            state, m = trainer.prefetcher.step(state, host, nxt, device_batch=cur)
            stats.append((m["prefetch/collision_fraction"], m["prefetch/fallback"]))
        else:
            state, _ = trainer.train_step(state, cur)
        if i >= 5:
            n_seq += int(host["mask"].any(axis=1).sum())
            n_tok += int(host["mask"].sum())
    jax.block_until_ready(state)
    dt = time.perf_counter() - t0
    trainer.close()
    coll = np.asarray(jax.device_get(stats)).mean(axis=0) if stats else (np.nan, np.nan)
    return {"seq_per_s": n_seq / dt, "tok_per_s": n_tok / dt, "ms_per_step": 1e3 * dt / fs["steps"],
            "collision": float(coll[0]), "fallback": float(coll[1])}  # fmt: skip


def straggler(split, fs, d: int, mode: str) -> dict[str, float]:
    model = _model(fs, split.num_items + 1)  # a dense gradient of a large table would hide the compute
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    cfg = TrainConfig().loss

    @jax.jit
    def fwd_bwd(params, batch):
        def f(p):
            return next_item_loss(cfg, nnx.merge(graphdef, p, rest), batch, jax.random.key(0))[0]

        return jax.grad(f)(params)

    ex = split.train_examples(fs["max_len"])
    idle, c = [], fs["per_device_batch"]
    for i, b in enumerate(batching.batches(ex, c * d, shuffle=True, seed=0, epoch=0, drop_remainder=True)):
        if i == fs["steps"]:
            break
        b = balancing.balance_batch(b, d, mode, fs["alpha"])
        rows = len(b["mask"]) // d
        times = []
        for k in range(d):
            part = {key: v[k * rows : (k + 1) * rows] for key, v in b.items()}
            part = balancing.trim_to_bucket(part, fs["max_len"], fs["min_width"])
            times.append(np.median(timed(lambda p=part: fwd_bwd(params, p), reps=3, warmup=1)))
        idle.append(1 - np.mean(times) / np.max(times))
    return {"idle_fraction": float(np.mean(idle))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", default="all", choices=("all", "balance", "throughput", "straggler"))
    p.add_argument("--devices", default="1,2")
    p.add_argument("--balance", default="none,zigzag")
    p.add_argument("--prefetch", default="0,1")
    p.add_argument("--lookups", default="sync", help="sync,prioritized (recjax/sharding/prefetch.py)")
    p.add_argument("--sparse", default="0", help="0,1: row-sparse Adam on the item table")
    p.add_argument("--capacity", type=float, default=None, help="prioritized: critical-path slots / ids")
    p.add_argument("--lhs", default="", help="0,1: latency-hiding scheduler off/on (GPU), one process each")
    p.add_argument("--workdir", default="/tmp/freescale_bench")
    p.add_argument("--small", action="store_true", help="tiny synthetic data (CPU check)")
    a = p.parse_args(argv)
    if "," in a.lhs:  # XLA reads its flags once per process: one child process per value
        for v in a.lhs.split(","):
            args = [x for x in (sys.argv[1:] if argv is None else argv) if not x.startswith("--lhs")]
            cmd = [sys.executable, "-m", "experiments.bench.freescale", *args, f"--lhs={v}"]
            subprocess.run(cmd, check=True)
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if a.small and "device_count" not in flags:  # two simulated CPU devices (read when the backend starts)
        os.environ["XLA_FLAGS"] = flags = f"{flags} --xla_force_host_platform_device_count=2".strip()
    if a.lhs:
        if a.lhs not in LHS_FLAGS:
            raise SystemExit(f"--lhs: expected 0 or 1, got {a.lhs!r}")
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {LHS_FLAGS[a.lhs]}".strip()
    split, fs = _split(a.small), _settings(a.small)
    fs["capacity"] = a.capacity or fs["capacity"]
    devices = [int(x) for x in a.devices.split(",")]
    modes = a.balance.split(",")
    kind = jax.devices()[0].device_kind
    print(f"jax {jax.__version__}, {jax.device_count()} x {kind}, lhs={a.lhs or 'default'}")
    if a.part in ("all", "balance"):
        print("\n".join(balance_table(split, fs, devices=(2, 8) if not a.small else (2,))))
    if a.part in ("all", "throughput"):
        cols = ["devices", "balance", "prefetch", "lookups", "sparse", "lhs", "seq/s", "tokens/s", "ms/step",
                "collision", "fallback"]  # fmt: skip
        print("| " + " | ".join(cols) + " |\n" + "| --- " * len(cols) + "|")
        grid = itertools.product(
            devices, modes, a.prefetch.split(","), a.lookups.split(","), a.sparse.split(",")
        )
        for d, mode, pf, lk, sp in grid:
            wd = f"{a.workdir}/{d}_{mode}_{pf}_{lk}_{sp}_{time.time_ns()}"
            r = throughput(split, fs, d, mode, pf == "1", wd, lookups=lk, sparse=sp == "1")
            cells = [d, mode, pf, lk, sp, a.lhs or "-", f"{r['seq_per_s']:.0f}", f"{r['tok_per_s']:.0f}",
                     f"{r['ms_per_step']:.2f}", f"{r['collision']:.3f}", f"{r['fallback']:.2f}"]  # fmt: skip
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    if a.part in ("all", "straggler"):
        print("| devices | balance | straggler idle fraction |\n| --- | --- | --- |")
        for d in [x for x in devices if x > 1]:
            for mode in modes:
                print(f"| {d} | {mode} | {straggler(split, fs, d, mode)['idle_fraction']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
