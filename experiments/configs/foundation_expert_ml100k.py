"""Foundation–Expert with HyperCast on MovieLens-100K: five occupation-group surfaces, label rating >= 4,
leave-one-out (the last rating of each user is the test impression), AUC and NE per surface. FMs of 2 and 8
HSTU blocks, experts per surface, 3 seeds.

Command (GPU, one H200): python -m experiments.foundation_expert \
    --config experiments/configs/foundation_expert_ml100k.py --workdir runs/fe_ml100k
Reached: benchmarks/RESULTS.md "Foundation–Expert" (ML-100K, time-budgeted FMs).
"""

from experiments.configs import foundation_expert_ml1m


def get_config(arg: str = ""):
    c = foundation_expert_ml1m.get_config()
    c.data.name = "ml-100k"
    c.data.positions_per_user = 0  # 0: every training cut (the labels are the ratings themselves)
    c.data.expert_positions_per_user = 0
    c.fm_train.num_epochs = 40
    c.fm_train.max_valid_rows = 0
    c.fm_train.batch_size = 64
    c.fm_train.learning_rate = 1e-3  # as run on 2026-12-03 (the ML-1M base now uses 2e-3 at batch 512)
    c.expert_train.batch_size = 256
    c.flops_candidates = 16
    return c
