"""SASRec on MovieLens-1M (sequential form), max length 200, d=50, 2 blocks, sampled softmax
(128 uniform negatives per position, temperature 0.05), 101 epochs, best validation NDCG@10 kept.

Command: python -m experiments.run --config=experiments/configs/sasrec_ml1m.py
Reference (generative-recommenders README): HR@10 0.2853, NDCG@10 0.1603.
Reached (2026-11-27, one NVIDIA H100 80GB HBM3, jax 0.11.2, --config.data.pipeline=numpy): test HR@10 0.2960,
NDCG@10 0.1692, MRR 0.1457; best validation epoch 98 of 101; 0.16 s per training epoch, 80 s wall for the
whole run (101 epochs + per-epoch validation). Details: benchmarks/RESULTS.md, section "Foundation".
"""

from experiments.configs import base


def get_config():
    config = base.experiment(
        base.data_config("ml-1m"), base.sasrec_model(), base.train_config(num_epochs=101, patience=20)
    )
    # generative-recommenders draws the 128 negatives per position (LocalNegativesSampler).
    config.train.loss.negatives = "uniform_per_position"
    return config
