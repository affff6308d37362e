import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recjax.eval import ranking


def _batch(target, exclude, valid=None, scoreable=None):
    target = np.asarray(target, np.int32)
    out = {
        "target": target,
        "exclude": np.asarray(exclude, np.int32),
        "valid": np.ones(len(target), bool) if valid is None else np.asarray(valid),
    }
    if scoreable is not None:
        out["scoreable"] = np.asarray(scoreable)
    return out


def _reference_ranks(scores_BxN, target_B, exclude_BxH):
    """Brute-force pessimistic rank: 1 + candidates scoring >= the target; NaN is below everything."""
    ranks = []
    for i, t in enumerate(target_B):
        ex = (set(exclude_BxH[i].tolist()) | {0}) - {int(t)}
        st = scores_BxN[i, t]
        rank = 1
        for j in range(scores_BxN.shape[1]):
            if j in ex or j == t:
                continue
            sj = scores_BxN[i, j]
            rank += bool(np.isnan(st) or (not np.isnan(sj) and sj >= st))
        ranks.append(rank)
    return np.asarray(ranks)


def _metrics(ranks, ks):
    ranks = np.asarray(ranks, np.float64)
    out = {"mrr": np.mean(1 / ranks)}
    for k in ks:
        out[f"hr@{k}"] = np.mean(ranks <= k)
        out[f"ndcg@{k}"] = np.mean(np.where(ranks <= k, 1 / np.log2(ranks + 1), 0.0))
    return out


def _assert_metrics(m, ranks, ks, abs=1e-6):
    want = _metrics(ranks, ks)
    assert set(m) == set(want)
    for name, v in want.items():
        assert m[name] == pytest.approx(v, abs=abs), name


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
        cand = [j for j in range(n + 1) if j not in ex and j != target[i]]
        rank = 1 + sum(scores[i, j] >= scores[i, target[i]] for j in cand)  # ties count against
        hr10.append(rank <= 10)
        ndcg50.append(1 / np.log2(rank + 1) if rank <= 50 else 0.0)
        rr.append(1 / rank)
    assert m["hr@10"] == pytest.approx(np.mean(hr10), abs=1e-6)
    assert m["ndcg@50"] == pytest.approx(np.mean(ndcg50), abs=1e-5)
    assert m["mrr"] == pytest.approx(np.mean(rr), abs=1e-5)


def test_popularity_baseline():
    train = [np.array([1, 1, 2]), np.array([1, 3])]
    m = ranking.evaluate_popularity(train, 3, [_batch([1, 3], [[0], [0]])], ks=(1, 3))
    assert m["hr@1"] == pytest.approx(0.5)  # item 1 is most popular; item 3 ties with item 2 -> rank 3
    assert m["hr@3"] == 1.0
    assert m["mrr"] == pytest.approx((1 + 1 / 3) / 2)


def test_bad_inputs():
    items = jnp.ones((5, 2))
    with pytest.raises(ValueError, match="ks"):
        ranking.evaluate(lambda b: jnp.ones((1, 2)), items, [_batch([1], [[0]])], ks=(10,))
    with pytest.raises(ValueError, match="target"):
        ranking.evaluate(lambda b: jnp.ones((1, 2)), items, [_batch([7], [[0]])], ks=(1,))
    with pytest.raises(ValueError, match="no valid"):
        ranking.evaluate(lambda b: jnp.ones((1, 2)), items, [_batch([1], [[0]], valid=[False])], ks=(1,))
    with pytest.raises(ValueError, match="no valid"):
        ranking.evaluate(lambda b: jnp.ones((1, 2)), items, [], ks=(1,))
    with pytest.raises(ValueError, match="ks"):
        ranking.evaluate(lambda b: jnp.ones((1, 2)), items, [_batch([1], [[0]])], ks=(0,))
    with pytest.raises(ValueError, match="exclude"):
        ranking.evaluate(lambda b: jnp.ones((1, 2)), items, [_batch([1], [[5]])], ks=(1,))
    with pytest.raises(ValueError, match="impl"):
        ranking.evaluate(lambda b: jnp.ones((1, 2)), items, [_batch([1], [[0]])], ks=(1,), impl="pallas")
    with pytest.raises(ValueError, match="query_fn"):
        ranking.evaluate(lambda b: jnp.ones((2, 2)), items, [_batch([1], [[0]])], ks=(1,))
    with pytest.raises(ValueError, match="scoreable"):
        ranking.evaluate(lambda b: jnp.ones((1, 2)), items, [_batch([1], [[0]], scoreable=[1, 1])], ks=(1,))
    # Out-of-range ids on rows that do not count are ignored.
    m = ranking.evaluate(
        lambda b: jnp.ones((2, 2)), items, [_batch([1, 9], [[0], [9]], valid=[True, False])], ks=(1,)
    )
    assert m["mrr"] == pytest.approx(1 / 4)  # all four items tie


def test_reference_impl_matches_xla(rng):
    q = rng.normal(size=(16, 8)).astype(np.float32)
    items = rng.normal(size=(50, 8)).astype(np.float32)
    batch = _batch(rng.integers(1, 50, size=16), rng.integers(0, 50, size=(16, 5)))
    ranks = _reference_ranks(
        q.astype(np.float64) @ items.T.astype(np.float64), batch["target"], batch["exclude"]
    )
    for impl in ("auto", "xla", "reference"):
        m = ranking.evaluate(lambda _: jnp.asarray(q), jnp.asarray(items), [batch], ks=(1, 10), impl=impl)
        _assert_metrics(m, ranks, (1, 10), abs=1e-5)


def test_forced_ties_match_brute_force():
    # Small-integer embeddings: every score is an exact small integer, so ties are frequent and exact.
    rng = np.random.default_rng(0)
    b, n, d, h = 40, 60, 2, 9
    q = rng.integers(-1, 2, size=(b, d)).astype(np.float32)
    q[:3] = 0.0  # zero queries: every item ties
    items = rng.integers(-2, 3, size=(n + 1, d)).astype(np.float32)
    target = rng.integers(1, n + 1, size=b).astype(np.int32)
    exclude = rng.integers(0, n + 1, size=(b, h)).astype(np.int32)
    exclude[:5, 0] = target[:5]  # the target in its own history stays ranked
    ranks = _reference_ranks(q @ items.T, target, exclude)
    assert len(np.unique(ranks)) > 5  # the case is not degenerate
    ks = (1, 5, 20, n)
    m = ranking.evaluate(lambda _: jnp.asarray(q), jnp.asarray(items), [_batch(target, exclude)], ks=ks)
    _assert_metrics(m, ranks, ks)
    got = ranking.pessimistic_rank(jnp.asarray(q @ items.T), jnp.asarray(target), jnp.asarray(exclude))
    np.testing.assert_array_equal(np.asarray(got), ranks)


def test_every_metric_from_one_rank():
    # Per row (batches of one), each metric is the function of the same rank.
    rng = np.random.default_rng(0)
    b, n, ks = 12, 30, (1, 3, 10)
    q = rng.integers(-1, 2, size=(b, 2)).astype(np.float32)
    items = rng.integers(-2, 3, size=(n + 1, 2)).astype(np.float32)
    target = rng.integers(1, n + 1, size=b).astype(np.int32)
    exclude = rng.integers(0, n + 1, size=(b, 4)).astype(np.int32)
    ranks = _reference_ranks(q @ items.T, target, exclude)
    for i in range(b):
        batch = _batch(target[i : i + 1], exclude[i : i + 1])
        m = ranking.evaluate(lambda _, i=i: jnp.asarray(q[i : i + 1]), jnp.asarray(items), [batch], ks=ks)
        r = ranks[i]
        assert m["mrr"] == pytest.approx(1 / r)
        for k in ks:
            assert m[f"hr@{k}"] == float(r <= k)
            assert m[f"ndcg@{k}"] == pytest.approx(1 / np.log2(r + 1) if r <= k else 0.0)


def test_constant_scores_get_the_worst_rank():
    # Every item scores the same (a zero query, or a constant table): the rank is the number of candidates.
    n = 8
    items = jnp.asarray(np.random.default_rng(0).normal(size=(n + 1, 4)), jnp.float32)
    batch = _batch([3, 5], [[1, 2, 0], [0, 0, 0]])  # row 0: 6 candidates (3..8); row 1: all 8
    for q, table in [(jnp.zeros((2, 4)), items), (jnp.ones((2, 4)), jnp.ones((n + 1, 4)))]:
        m = ranking.evaluate(lambda _, q=q: q, table, [batch], ks=tuple(range(1, n + 1)))
        _assert_metrics(m, [6, 8], range(1, n + 1))
        assert m["hr@5"] == 0.0 and m["hr@6"] == 0.5 and m["hr@8"] == 1.0
        assert m["mrr"] == pytest.approx((1 / 6 + 1 / 8) / 2)


def test_nan_is_the_worst_score():
    # q = 1: item i scores s[i]; items 3 and 5 score NaN.
    s = np.asarray([0.0, 6.0, 5.0, np.nan, 3.0, np.nan, 1.0], np.float32)
    items = jnp.asarray(s[:, None])
    one = lambda b: jnp.ones((len(b["target"]), 1))  # noqa: E731
    # target 4 (3.0): only items 1, 2 beat it, the NaN items do not -> rank 3.
    # target 3 (NaN): below all 5 other candidates, tied with NaN item 5 (counts against) -> rank 6.
    # target 5 (NaN), item 1 excluded: 4 other candidates -> rank 5.
    batch = _batch([4, 3, 5], [[0], [0], [1]])
    m = ranking.evaluate(one, items, [batch], ks=(1, 3, 5, 6))
    _assert_metrics(m, [3, 6, 5], (1, 3, 5, 6))
    np.testing.assert_array_equal(
        _reference_ranks(s[None].repeat(3, 0), batch["target"], batch["exclude"]), [3, 6, 5]
    )
    # +-inf are ordinary scores, still above NaN: a -inf target loses only to finite items, never to NaN.
    t = jnp.asarray([[0.0], [np.nan], [-np.inf], [np.inf], [np.nan]])
    m = ranking.evaluate(one, t, [_batch([2, 3], [[0], [0]])], ks=(1, 4))
    _assert_metrics(m, [2, 1], (1, 4))  # -inf target: +inf beats it; +inf target: rank 1
    # A NaN query (diverging model): every score NaN -> the worst rank, not rank 1.
    m = ranking.evaluate(lambda b: jnp.full((2, 1), jnp.nan), items, [_batch([1, 2], [[0], [6]])], ks=(1, 5))
    _assert_metrics(m, [6, 5], (1, 5))


def test_scoreable_rows_are_misses_and_invalid_rows_do_not_count():
    items = jnp.asarray([[0.0], [6.0], [5.0], [4.0], [3.0]])
    one = lambda b: jnp.ones((len(b["target"]), 1))  # noqa: E731
    # ranks 1, 2, 3, 4; row 1 valid but not scoreable (a miss); row 3 invalid (ignored).
    batch = _batch(
        [1, 2, 3, 4], [[0]] * 4, valid=[True, True, True, False], scoreable=[True, False, True, True]
    )
    m = ranking.evaluate(one, items, [batch], ks=(1, 2, 4), row_rates=("scoreable",))
    want = _metrics([1, 3], (1, 2, 4))
    for name, v in want.items():  # 2 scored rows over 3 valid ones
        assert m[name] == pytest.approx(v * 2 / 3), name
    assert m["scoreable_rate"] == pytest.approx(2 / 3)
    # rank_batch: sums over valid & scoreable rows, count = valid rows.
    args = [jnp.asarray(batch[k]) for k in ("target", "exclude", "valid")]
    sums = ranking.rank_batch(one(batch), items, *args, jnp.asarray(batch["scoreable"]), ks=(1, 2, 4))
    sums = jax.device_get(sums)
    assert sums["count"] == 3.0
    assert sums["mrr"] == pytest.approx(1 + 1 / 3) and sums["hr@2"] == 1.0
    # Without scoreable every valid row is scored (the call remap_hook makes, with `known` as valid).
    sums = jax.device_get(ranking.rank_batch(one(batch), items, *args, ks=(1, 2, 4)))
    assert sums["count"] == 3.0 and sums["mrr"] == pytest.approx(1 + 1 / 2 + 1 / 3)
    # All valid rows unscoreable: metrics 0, not an error.
    m = ranking.evaluate(one, items, [dict(batch, scoreable=np.zeros(4, bool))], ks=(1,))
    assert m == {"hr@1": 0.0, "ndcg@1": 0.0, "mrr": 0.0}


def test_device_batches():
    # Device arrays (e.g. remapped batches) work and are range-checked on device.
    items = jnp.asarray([[0.0], [3.0], [2.0], [1.0]])
    batch = {k: jnp.asarray(v) for k, v in _batch([2, 3], [[0], [1]], scoreable=[True, True]).items()}
    m = ranking.evaluate(lambda b: jnp.ones((2, 1)), items, [batch], ks=(1, 2))
    _assert_metrics(m, [2, 2], (1, 2))
    with pytest.raises(ValueError, match=r"batch\['exclude'\].*9"):
        ranking.evaluate(
            lambda b: jnp.ones((2, 1)), items, [dict(batch, exclude=jnp.asarray([[0], [9]]))], ks=(1,)
        )


def test_popularity_ties_are_pessimistic():
    # Item 1 seen 3 times, items 2..5 once each (tied), item 6 never.
    train = [np.array([1, 1, 2, 3]), np.array([1, 4, 5])]
    batch = _batch([1, 3, 6, 4], [[0, 0], [0, 0], [0, 0], [2, 3]])
    m = ranking.evaluate_popularity(train, 6, [batch], ks=(1, 2, 5))
    # target 3 ties with 2, 4, 5 -> rank 5; target 6 (count 0) -> rank 6;
    # target 4 with 2, 3 excluded ties with 5 -> rank 3.
    _assert_metrics(m, [1, 5, 6, 3], (1, 2, 5))
    assert m["hr@2"] == 0.25
