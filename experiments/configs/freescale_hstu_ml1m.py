"""FreeScale on 2 GPUs: HSTU on MovieLens-1M (max length 200, d=50, 2 blocks) with a large item table
row-sharded over the devices (``freescale.table_rows`` rows: ML-1M's 3,707 real rows plus unused ones, so
the table, its Adam moments and their all-to-all lookups have the size of a production table), sequences in
power-of-two length buckets, FreeScale balancing of each step's rows over the devices.

``python -m experiments.run --config=experiments/configs/freescale_hstu_ml1m.py`` trains with the mesh,
placement, buckets and balancing below (experiments/parallel.py); experiments/bench/freescale.py measures
throughput 1 -> 2 GPUs, straggler idle fraction with/without balancing, input prefetch on/off with the
large table; docs/FREESCALE.md. Negatives are "uniform" (shared by the batch): the one
sampler whose draws do not depend on the batch layout, so balanced and plain steps compute the same loss.
"""

import ml_collections

from experiments.configs import base


def get_config():
    config = base.experiment(
        base.data_config("ml-1m", max_len=200),
        base.hstu_model(dropout=0.0),
        base.train_config(batch_size=128),
    )
    config.train.loss.negatives = "uniform"
    # Read by experiments.run (experiments/parallel.py) and by the benchmark.
    config.mesh = ml_collections.ConfigDict({"data": 0, "model": 1, "expert": 1})  # all devices on data
    # rows over the data axis: every GPU a data shard and a row block (TorchRec's layout); "table" /
    # "replicated" are the other placements (recjax.sharding.embedding.PLACEMENTS)
    # sparse_updates: row-sparse Adam on the table (rows without gradient untouched); prefetch: FreeScale's
    # prioritized lookups (identical results; saves critical-path lookups only with sparse updates)
    config.embeddings = ml_collections.ConfigDict(
        {"axis": "data", "tables": {"items": "row"}, "owners": {"items": 0}, "sparse_updates": False,
         "prefetch": False, "prefetch_capacity": 0.25}
    )  # fmt: skip
    config.data.length_buckets = ml_collections.ConfigDict({"enabled": True, "min_width": 16})
    # "none", "zigzag", "variable" (recjax.data.balancing.MODES); alpha: L^alpha weights of "variable"
    config.data.balance = ml_collections.ConfigDict({"mode": "zigzag", "alpha": 1.0})
    # Benchmark only (experiments/bench/freescale.py): experiments.run trains ML-1M's own 3,708-row table.
    config.freescale = ml_collections.ConfigDict(
        {
            "table_rows": 1 << 22,  # 4,194,304 x 50 float32 = 0.8 GB (+ 1.6 GB Adam moments)
            "per_device_batch": 128,
            "steps": 200,
        }
    )
    return config
