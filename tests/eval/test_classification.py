"""AUC / GAUC / NE against brute-force definitions."""

import numpy as np
import pytest

from recjax.eval.classification import auc, gauc, normalized_entropy


def _pairwise_auc(s, y):
    pos, neg = s[y], s[~y]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_auc_and_gauc_match_pairwise_counts():
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=300), 1)  # ties on purpose
    y = rng.random(300) < 0.4
    g = rng.integers(0, 7, 300)
    assert auc(s, y) == pytest.approx(_pairwise_auc(s, y))
    want_num = want_den = 0.0
    for k in range(7):
        m = g == k
        if y[m].all() or not y[m].any():
            continue
        want_num += m.sum() * _pairwise_auc(s[m], y[m])
        want_den += m.sum()
    assert gauc(s, y, g) == pytest.approx(want_num / want_den)
    # a group with one class only is left out (not counted as 0.5 or NaN)
    g2 = g.copy()
    g2[:5], y2 = 50, y.copy()
    y2[:5] = True
    assert np.isfinite(gauc(s, y2, g2))
    assert np.isnan(auc(s, np.ones(300, bool)))
    with pytest.raises(ValueError, match="groups_E"):
        gauc(s, y, g[:-1])


def test_normalized_entropy_of_the_base_rate_is_one():
    y = np.asarray([1, 0, 0, 1, 0], np.float64)
    p = y.mean()
    assert normalized_entropy(np.full(5, np.log(p / (1 - p))), y) == pytest.approx(1.0)
    assert normalized_entropy(np.where(y > 0, 20.0, -20.0), y) < 1e-6
