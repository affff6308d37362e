"""Foundation–Expert with HyperCast on MovieLens-100K: five occupation-group surfaces, label rating >= 4,
leave-one-out (the last rating of each user is the test impression), AUC and NE per surface. FMs of 2 and 8
HSTU blocks, experts per surface, 3 seeds.

Command (GPU, one H200): python -m experiments.foundation_expert \
    --config experiments/configs/foundation_expert_ml100k.py --workdir runs/fe_ml100k
Reached: not run yet.
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
    c.expert_train.batch_size = 256
    c.flops_candidates = 16
    return c
