"""SASRec on MovieLens-1M (sequential form), max length 200, d=50, 2 blocks, sampled softmax
(128 uniform negatives per position, temperature 0.05), 101 epochs, best validation NDCG@10 kept.

Command: python -m experiments.run --config=experiments/configs/sasrec_ml1m.py
Reference (generative-recommenders README): HR@10 0.2853, NDCG@10 0.1603.
Reached (2026-12-02, one NVIDIA H200, jax 0.11.2, --config.data.pipeline=numpy, pessimistic ranking): test
HR@10 0.2972, NDCG@10 0.1711, MRR 0.1478; best validation epoch 101 of 101; 90 s wall sharing the card with
two other runs (alone on an H100, 2026-11-27: 80 s). Details: benchmarks/RESULTS.md, section "Foundation".
"""

from experiments.configs import base


def get_config():
    config = base.experiment(
        base.data_config("ml-1m"), base.sasrec_model(), base.train_config(num_epochs=101, patience=20)
    )
    # generative-recommenders draws the 128 negatives per position (LocalNegativesSampler).
    config.train.loss.negatives = "uniform_per_position"
    return config
