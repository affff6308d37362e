"""LIME-XOR on the small synthetic dataset in seconds (the tests, smoke checks); same recipe as lime_ml1m.py.
Command: python -m experiments.run --config=experiments/configs/lime_tiny.py
"""

from experiments.configs import base, synthetic_tiny


def get_config():
    config = synthetic_tiny.get_config()
    config.model = base.lime_model(
        embed_dim=16,
        num_links=4,
        num_layers=1,
        attention_dim=16,
        linear_dim=16,
        ffn_hidden_dim=16,
        dropout=0.1,
    )
    config.task = base.lime_task(cuts_per_sequence=8)
    return config
