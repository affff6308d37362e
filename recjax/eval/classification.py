"""Metrics of scored (user, item, label) impressions: ROC AUC, GAUC and normalized entropy (numpy, host).

- :func:`auc`: ROC AUC by average ranks (ties count half); NaN without both classes.
- :func:`gauc`: per-group AUC averaged with the groups' impression counts as weights, over the groups that
  have both classes (the "group AUC" of CTR papers, groups = users); NaN when no group has both.
- :func:`normalized_entropy`: mean BCE of ``sigmoid(logits)`` over the entropy of the base rate (lower is
  better; 1 = predicting the base rate); NaN without both classes.

Letters: E impressions.
"""

from __future__ import annotations

import numpy as np


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores)
    if scores.shape != labels.shape:
        raise ValueError(f"scores: expected the shape of labels {labels.shape}, got {scores.shape}")
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts - 1) / 2.0 + 1, counts)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def gauc(scores_E: np.ndarray, labels_E: np.ndarray, groups_E: np.ndarray) -> float:
    scores_E, labels_E, groups_E = (
        np.asarray(scores_E),
        np.asarray(labels_E).astype(bool),
        np.asarray(groups_E),
    )
    if not scores_E.shape == labels_E.shape == groups_E.shape:
        raise ValueError(
            f"scores_E / labels_E / groups_E: expected one shape, got {scores_E.shape} / {labels_E.shape} / "
            f"{groups_E.shape}"
        )
    order = np.argsort(groups_E, kind="stable")
    bounds = np.flatnonzero(np.diff(groups_E[order])) + 1
    total, weight = 0.0, 0
    for idx in np.split(order, bounds):
        lab = labels_E[idx]
        if lab.all() or not lab.any():
            continue
        total += len(idx) * auc(scores_E[idx], lab)
        weight += len(idx)
    return float(total / weight) if weight else float("nan")


def normalized_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
    if not len(labels):
        return float("nan")
    p = labels.mean()
    if p in (0.0, 1.0):
        return float("nan")
    bce = np.mean(np.logaddexp(0, logits) - labels * logits)
    return float(bce / -(p * np.log(p) + (1 - p) * np.log(1 - p)))
