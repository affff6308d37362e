"""The main job: SASRec, leave-one-out, full-corpus ranking, on MovieLens-1M when RECJAX_DATA_DIR holds it,
otherwise on the embedded synthetic dataset.

Command: python -m experiments.run --config=experiments/configs/default.py
Settings are experiments/configs/sasrec_ml1m.py's (101 epochs, per-position negatives); on MovieLens-1M they
reached test HR@10 0.2960 / NDCG@10 0.1692 (2026-11-27, one H100, 80 s wall; benchmarks/RESULTS.md,
"Foundation"). On the synthetic default (no RECJAX_DATA_DIR) it trains the same model on 2,000 users x
1,000 items.
"""

from experiments.configs import sasrec_ml1m


def get_config():
    config = sasrec_ml1m.get_config()
    config.data.name = "auto"
    return config
