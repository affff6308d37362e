import jax.numpy as jnp
import numpy as np
import pytest

from recjax.eval import ranking


def _batch(target, exclude, valid=None):
    target = np.asarray(target, np.int32)
    return {
        "target": target,
        "exclude": np.asarray(exclude, np.int32),
        "valid": np.ones(len(target), bool) if valid is None else np.asarray(valid),
    }


def test_hand_computed_ranks():
    # 1-d embeddings: item i scores q * s[i]. Items 1..6 with scores 6,5,4,3,2,1 for q = 1.
    items = jnp.asarray([[0.0], [6.0], [5.0], [4.0], [3.0], [2.0], [1.0]])
    # user 0: target 3 (rank 3); user 1: target 3 with items 1,2 in history -> rank 1;
    # user 2: target 6 -> rank 6; user 3: padding row (ignored).
    batch = _batch([3, 3, 6, 1], [[0, 0], [1, 2], [0, 0], [0, 0]], valid=[True, True, True, False])
    m = ranking.evaluate(lambda b: jnp.ones((4, 1)), items, [batch], ks=(1, 2, 5))
    assert m["hr@1"] == pytest.approx(1 / 3)
    assert m["hr@2"] == pytest.approx(1 / 3)
    assert m["hr@5"] == pytest.approx(2 / 3)
    assert m["ndcg@5"] == pytest.approx((1 / np.log2(4) + 1.0) / 3)
    assert m["mrr"] == pytest.approx((1 / 3 + 1 + 1 / 6) / 3)


def test_target_in_history_is_still_ranked():
    items = jnp.asarray([[0.0], [3.0], [2.0], [1.0]])
    batch = _batch([2], [[2, 1]])  # target 2 also consumed before; item 1 excluded -> rank 1
    m = ranking.evaluate(lambda b: jnp.ones((1, 1)), items, [batch], ks=(1,))
    assert m["hr@1"] == 1.0 and m["mrr"] == 1.0


def test_matches_numpy_reference(rng):
    b, n, d, h = 37, 120, 8, 11
    q = rng.normal(size=(b, d)).astype(np.float32)
    items = rng.normal(size=(n + 1, d)).astype(np.float32)
    target = rng.integers(1, n + 1, size=b).astype(np.int32)
    exclude = rng.integers(0, n + 1, size=(b, h)).astype(np.int32)
    m = ranking.evaluate(lambda _: jnp.asarray(q), jnp.asarray(items), [_batch(target, exclude)], ks=(10, 50))
    scores = q @ items.T
    hr10, ndcg50, rr = [], [], []
    for i in range(b):
        ex = set(exclude[i].tolist()) | {0}
        ex.discard(int(target[i]))
        cand = [j for j in range(n + 1) if j not in ex]
        rank = 1 + sum(scores[i, j] > scores[i, target[i]] for j in cand)
        hr10.append(rank <= 10)
        ndcg50.append(1 / np.log2(rank + 1) if rank <= 50 else 0.0)
        rr.append(1 / rank)
    assert m["hr@10"] == pytest.approx(np.mean(hr10), abs=1e-6)
    assert m["ndcg@50"] == pytest.approx(np.mean(ndcg50), abs=1e-5)
    assert m["mrr"] == pytest.approx(np.mean(rr), abs=1e-5)


def test_popularity_baseline():
    train = [np.array([1, 1, 2]), np.array([1, 3])]
    m = ranking.evaluate_popularity(train, 3, [_batch([1, 3], [[0], [0]])], ks=(1, 3))
    assert m["hr@1"] == pytest.approx(0.5)  # item 1 is most popular; item 3 is tied for second
    assert m["hr@3"] == 1.0


def test_bad_inputs():
    items = jnp.ones((5, 2))
    with pytest.raises(ValueError, match="ks"):
        ranking.evaluate(lambda b: jnp.ones((1, 2)), items, [_batch([1], [[0]])], ks=(10,))
    with pytest.raises(ValueError, match="target"):
        ranking.evaluate(lambda b: jnp.ones((1, 2)), items, [_batch([7], [[0]])], ks=(1,))
    with pytest.raises(ValueError, match="no valid"):
        ranking.evaluate(lambda b: jnp.ones((1, 2)), items, [_batch([1], [[0]], valid=[False])], ks=(1,))
