"""SASRec on MovieLens-1M with a MoEBlaze feed-forward (dropless top-k MoE, SwiGLU experts) in every block.

Equal active parameters to the dense SASRec of sasrec_ml1m.py: each token goes through top_k=1 of 4 experts
whose hidden width equals the dense FFN's (50). Router load-balancing and z losses are added to the training
loss; expert balance is logged as ``train/moe_max_load_ratio`` (busiest expert over the mean).

Command: python -m experiments.run --config=experiments/configs/sasrec_moe_ml1m.py
Reached (2026-11-27, one H200, impl=xla): test HR@10 0.3055, NDCG@10 0.1752 (dense: 0.2960 / 0.1692);
benchmarks/RESULTS.md, "MoEBlaze integration".
"""

from experiments.configs import sasrec_ml1m


def get_config():
    config = sasrec_ml1m.get_config()
    config.model.ffn = "moe"
    config.model.ffn_options = {"num_experts": 4, "top_k": 1, "impl": "auto"}
    return config
