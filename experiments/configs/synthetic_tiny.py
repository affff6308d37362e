"""A seconds-long run on a small synthetic dataset: used by the tests, the quickstart notebook and smoke
checks. Command: python -m experiments.run --config=experiments/configs/synthetic_tiny.py
"""

from experiments.configs import base


def get_config():
    data = base.data_config("synthetic", max_len=20)
    data.synthetic.num_users, data.synthetic.num_items = 1000, 300
    model = base.sasrec_model(embed_dim=16, num_blocks=1, dropout=0.1)
    train = base.train_config(
        batch_size=64,
        num_epochs=15,
        learning_rate=3e-3,
        patience=0,
        eval_batch_size=64,
        ks=(10, 50),
        num_devices=1,
        progress=False,
    )
    train.loss.num_negatives = 32
    return base.experiment(data, model, train)
