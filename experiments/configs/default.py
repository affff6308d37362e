"""The main job: SASRec, leave-one-out, full-corpus ranking (HR/NDCG@10/50/200, MRR) beside popularity.

``--config=experiments/configs/default.py`` (argument ``synthetic``, the default): the quick run on the
embedded synthetic dataset (2,000 users x 1,000 items, ~120k interactions, no files): SASRec d=50, 2 blocks,
max length 30, 128 shared uniform negatives, batch 64, 20 epochs. About a minute on 2 CPU cores; test
HR@10 0.201 against popularity's 0.120 (the generator's own scores put the next item in their top 10 for
0.29 of the users). Measured numbers in README.md.

``--config=experiments/configs/default.py:ml1m``: the full SASRec setting on MovieLens-1M (needs
RECJAX_DATA_DIR, see docs/DATA.md) = experiments/configs/sasrec_ml1m.py: max length 200, 101 epochs,
128 negatives per position; test HR@10 0.2960 / NDCG@10 0.1692 in 80 s on one H100 (benchmarks/RESULTS.md,
"Foundation"); about 2.5 hours on 2 CPU cores.
"""

import ml_collections

from experiments.configs import base, sasrec_ml1m

CHOICES = ("synthetic", "ml1m")


def get_config(arg: str = "synthetic") -> ml_collections.ConfigDict:
    if arg == "ml1m":
        return sasrec_ml1m.get_config()
    if arg != "synthetic":
        raise ValueError(f"default.py:{arg}: expected one of {CHOICES} (default.py alone = synthetic)")
    # Sequences are 20..100 long; the generator's taste follows the last few items, so the last 30 give the
    # test HR@10 the last 50 give (0.201 vs 0.200) in 55 s instead of 77 s.
    data = base.data_config("synthetic", max_len=30)
    model = base.sasrec_model()  # the ML-1M architecture: d=50, 2 blocks, 1 head, dropout 0.2
    # 64 per batch: twice the updates per epoch of 128, which is what a short run is short of. patience=0
    # runs all 20 epochs (a fixed duration); the best validation epoch is still the one tested.
    train = base.train_config(batch_size=64, num_epochs=20, patience=0)
    return base.experiment(data, model, train)
