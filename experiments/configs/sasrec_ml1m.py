"""SASRec on MovieLens-1M (sequential form), max length 200, d=50, 2 blocks, sampled softmax (128 negatives).

Command: python -m experiments.run --config=experiments/configs/sasrec_ml1m.py
Reference (generative-recommenders README): HR@10 0.2853, NDCG@10 0.1603.
Reached here: see benchmarks/RESULTS.md, section "Foundation".
"""

from experiments.configs import base


def get_config():
    return base.experiment(base.data_config("ml-1m"), base.sasrec_model(), base.train_config())
