"""LIME on MovieLens-1M (sequential form), retrieval mode: full-corpus ranking of every item through the item
cache, leave-one-out, the same split, protocol and training recipe as hstu_ml1m.py (d=50, 2 layers, 1 head,
dqk = dv = 50, sampled softmax with 128 uniform negatives, temperature 0.05, AdamW lr 1e-3, b2 0.98,
batch 128, 101 epochs, best validation NDCG@10 kept). LIME-specific: 16 links, XOR attention, links
contextualized with the user's gender / age / occupation, a (prefix -> next item) request at every position
of each training sequence (task.cuts_per_sequence=0).

Command: python -m experiments.run --config=experiments/configs/lime_ml1m.py
  LIME-MHA: --config.model.attention=mha; links without context: --config.model.contextualize=False.
Reached: see benchmarks/RESULTS.md, section "LIME".
"""

from experiments.configs import base


def get_config():
    config = base.experiment(
        base.data_config("ml-1m"), base.lime_model(), base.train_config(num_epochs=101, patience=20)
    )
    config.task = base.lime_task()
    return config
