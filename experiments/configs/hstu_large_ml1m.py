"""HSTU-large on MovieLens-1M: generative-recommenders' ml-1m/hstu-sampled-softmax-n128-large-final.gin
(8 blocks, 2 heads, dqk = dv = 25 per head, d=50, dropout 0.2, sampled softmax with 128 negatives per
position, temperature 0.05, AdamW lr 1e-3, batch 128, max length 200, 101 epochs), best validation NDCG@10
kept.

Command: python -m experiments.run --config=experiments/configs/hstu_large_ml1m.py
Reference (generative-recommenders README): HR@10 0.3294, NDCG@10 0.1893 (their ranking; ours counts ties
against the target). Reached (2026-12-02, one NVIDIA H200, jax 0.11.2, --config.data.pipeline=numpy): test
HR@10 0.3305, NDCG@10 0.1907, MRR 0.1630; best validation epoch 88 of 101; 126 s wall sharing the card with
two other runs. Details: benchmarks/RESULTS.md, "Foundation".
"""

from experiments.configs import hstu_ml1m


def get_config():
    config = hstu_ml1m.get_config()
    config.model.update(num_blocks=8, num_heads=2, attention_dim=25, linear_dim=25)
    return config
