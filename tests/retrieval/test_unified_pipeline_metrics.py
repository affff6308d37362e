"""Metrics of experiments/silvertorch_pipeline.py against brute-force definitions (no training run)."""

import numpy as np

from experiments.silvertorch_pipeline import auc, parse_args, recall_at


def test_auc_equals_pair_count(rng):
    scores = rng.integers(0, 6, size=40).astype(np.float64)  # many ties
    labels = rng.random(40) < 0.4
    pos, neg = scores[labels], scores[~labels]
    want = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert abs(auc(scores, labels) - want) < 1e-12
    assert np.isnan(auc(scores, np.zeros(40, bool)))


def test_recall_at_counts_targets_found():
    ids = np.array([[5, 7, 9, -1], [1, 2, 3, 4]])
    targets = np.array([[7, 8, 0], [4, 0, 0]])  # 0 = padding
    assert recall_at(ids, targets) == (0.5 + 1.0) / 2


def test_small_flag_shrinks_the_run():
    args = parse_args(["--small"])
    assert args.tower_epochs <= 2 and args.k <= 50 and args.n_final <= args.k
