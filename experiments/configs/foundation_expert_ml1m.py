"""Foundation–Expert with HyperCast on MovieLens-1M: five genre-group surfaces (recjax.data.surfaces), next
item within the surface, leave-one-out, full-surface ranking (HR@10 / NDCG@10 / MRR) and NE on the target
plus 4 sampled negatives. FMs of 2 and 8 HSTU blocks (d=50, 2 heads of 25), experts per surface, 3 seeds.

Command (GPU, one H200): python -m experiments.foundation_expert \
    --config experiments/configs/foundation_expert_ml1m.py --workdir runs/fe_ml1m
Reached (H200, 3 seeds, benchmarks/RESULTS.md "Foundation–Expert", fifth session): expert + FM8 TAE at the
FM's HR@10 on every surface; transfer ratio FM2 -> FM8 pooled over the surfaces 0.98. The GPU recipe (FMs as
parallel --fm-only processes first): docs/FOUNDATION_EXPERT.md "Results".
"""

import ml_collections


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.data = dict(
        name="ml-1m", max_len=200, num_negatives=4, positions_per_user=32, expert_positions_per_user=32
    )
    c.fm = dict(embed_dim=50, num_heads=2, attention_dim=25, linear_dim=25, dropout=0.2)
    c.fm_blocks = (2, 8)  # FM1 (small), FM2 (large): the transfer ratio compares them
    c.fm_train = dict(
        # 512 requests a step (lr 2e-3, the square-root rule from 128 / 1e-3): at 128 an epoch of 32
        # positions per user is 1,502 small launch-bound steps on a GPU
        batch_size=512,
        num_epochs=30,
        learning_rate=2e-3,
        patience=5,
        eval_candidates=256,
        eval_batch_size=64,
        max_valid_rows=1000,
        max_train_seconds=0.0,  # per FM training run; 0: no wall-clock budget (TrainConfig)
    )
    c.expert = dict(embed_dim=32, hidden_dim=64, history_len=10)
    c.expert_train = dict(
        batch_size=512, num_epochs=20, learning_rate=1e-3, patience=3, max_train_seconds=0.0
    )
    c.seeds = (0, 1, 2)
    c.flops_candidates = 256  # candidates per request for the FLOPs column
    c.tae_dtype = "float16"
    return c
