"""Seconds-long Foundation–Expert run on the synthetic dataset (3 next-item surfaces from its item genre):
used by the notebook and the smoke test. Command: python -m experiments.foundation_expert \
    --config experiments/configs/foundation_expert_tiny.py --workdir /tmp/fe_tiny
"""

from experiments.configs import foundation_expert_ml1m


def get_config(arg: str = ""):
    c = foundation_expert_ml1m.get_config()
    c.data = dict(
        name="synthetic",
        max_len=20,
        num_negatives=4,
        positions_per_user=4,
        expert_positions_per_user=4,
        synthetic=dict(num_users=150, num_items=60, min_len=8, max_len=24, num_genres=6),
        surface_groups=3,
    )
    c.fm = dict(embed_dim=16, num_heads=2, attention_dim=8, linear_dim=8, dropout=0.1)
    c.fm_blocks = (1, 2)
    c.fm_train = dict(
        batch_size=32,
        num_epochs=2,
        learning_rate=3e-3,
        patience=0,
        eval_candidates=32,
        eval_batch_size=32,
        max_valid_rows=0,
        max_train_seconds=0.0,
    )
    c.expert = dict(embed_dim=8, hidden_dim=16, history_len=5)
    c.expert_train = dict(batch_size=32, num_epochs=2, learning_rate=3e-3, patience=0, max_train_seconds=0.0)
    c.seeds = (0,)
    c.flops_candidates = 32
    return c
