"""Main + fresh index: merged search equals an exact filtered search over the union; fresh items are
retrievable immediately (no retrace); int8 main path respects the filter; bad inputs rejected."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recjax.retrieval import fresh_index as fi

N, D, S, F, V = 37, 16, 3, 8, 50  # main rows (row 0 = padding), dim, side width, fresh slots, id space


def _index(rng, quantize=False):
    emb = rng.normal(size=(N, D)).astype(np.float32)
    side = rng.random((N, S)).astype(np.float32)
    return fi.build_index(emb, side_NxS=side, fresh_capacity=F, id_capacity=V, quantize=quantize)


def _add(rng, index, ids):
    a = len(ids)
    emb = rng.normal(size=(a, D)).astype(np.float32)
    return fi.add_items(index, np.asarray(ids, np.int32), emb, rng.random((a, S)).astype(np.float32)), emb


def _exact(index, q, allowed, k):
    """numpy reference over the union of all valid rows."""
    used = int(index.num_fresh)
    emb = np.concatenate([np.asarray(index.main.emb_NxD), np.asarray(index.fresh.emb_NxD)[:used]])
    side = np.concatenate([np.asarray(index.main.side_NxS), np.asarray(index.fresh.side_NxS)[:used]])
    ids = np.concatenate([np.asarray(index.main.ids_N), np.asarray(index.fresh.ids_N)[:used]])
    scores = q.astype(np.float64) @ emb.T.astype(np.float64)
    ok = (ids >= 0)[None, :] & allowed[:, np.maximum(ids, 0)]
    scores = np.where(ok, scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, 1)
    return top, np.where(np.isinf(top), -1, ids[order]), emb[order], side[order]


@functools.partial(jax.jit, static_argnames=("k", "impl"))
def _search(index, q, allowed, k, impl="exact"):
    _search.traces += 1
    return fi.search(index, q, k, allowed=allowed, impl=impl, topk_impl="xla", ann_impl="xla")


_search.traces = 0


def test_merged_search_equals_exact_filtered_search_over_union(rng):
    index, _ = _add(rng, _index(rng), [37, 45, 40, 49, 38])
    b, k = 4, 10
    q = rng.normal(size=(b, D)).astype(np.float32)
    allowed = rng.random((b, V)) < 0.5
    allowed[0] = False
    allowed[0, [3, 41, 45]] = True  # fewer allowed than k: padded with -1 / -inf
    got = _search(index, jnp.asarray(q), jnp.asarray(allowed), k)
    top, ids, emb, side = _exact(index, q, allowed, k)
    np.testing.assert_array_equal(np.asarray(got.ids_BxK), ids)
    np.testing.assert_allclose(np.asarray(got.scores_BxK), top, rtol=1e-4, atol=1e-4)
    present = ids >= 0
    np.testing.assert_allclose(np.asarray(got.emb_BxKxD)[present], emb[present], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got.side_BxKxS)[present], side[present], rtol=1e-6)
    assert (ids[0] >= 0).sum() == 2  # id 41 is not indexed
    out = np.asarray(got.ids_BxK)
    rows = np.repeat(np.arange(b)[:, None], k, 1)
    assert allowed[rows[out >= 0], out[out >= 0]].all(), "a filtered item was returned"
    assert not (out == 0).any(), "the padding row was returned"


def test_fresh_items_retrievable_immediately_without_retrace(rng):
    index = _index(rng)
    q = rng.normal(size=(2, D)).astype(np.float32)
    allowed = jnp.ones((V,), bool)
    before = _search(index, jnp.asarray(q), allowed, 5)
    traces = _search.traces
    new_emb = (
        10.0 * q / np.linalg.norm(q, axis=1, keepdims=True) * np.abs(np.asarray(before.scores_BxK)).max()
    )
    index = fi.add_items(index, np.array([44, 39], np.int32), new_emb, rng.random((2, S)).astype(np.float32))
    after = _search(index, jnp.asarray(q), allowed, 5)
    np.testing.assert_array_equal(np.asarray(after.ids_BxK)[:, 0], [44, 39])
    for a, bf in zip(np.asarray(after.ids_BxK), np.asarray(before.ids_BxK), strict=True):
        old = a[~np.isin(a, [44, 39])]  # the main items keep their order behind the new ones
        np.testing.assert_array_equal(old, bf[: len(old)])
    assert _search.traces == traces, "adding items must not change shapes (no recompilation)"
    # filtering applies to fresh items too
    blocked = np.ones(V, bool)
    blocked[44] = False
    ids = np.asarray(_search(index, jnp.asarray(q), jnp.asarray(blocked), 5).ids_BxK)
    assert 44 not in ids and ids[1, 0] == 39
    # the periodic rebuild keeps the results
    merged = fi.merge_fresh(index)
    assert merged.main.num_rows == N + 2 and int(merged.num_fresh) == 0
    again = fi.search(merged, jnp.asarray(q), 5, allowed=allowed, topk_impl="xla")
    np.testing.assert_array_equal(np.asarray(again.ids_BxK), np.asarray(after.ids_BxK))


def test_int8_main_path_respects_filter_and_matches_exact(rng):
    index, _ = _add(rng, _index(rng, quantize=True), [41, 42])
    b, k = 8, 8
    q = rng.normal(size=(b, D)).astype(np.float32)
    allowed = rng.random((b, V)) < 0.6
    got = np.asarray(_search(index, jnp.asarray(q), jnp.asarray(allowed), k, impl="int8").ids_BxK)
    _, want, _, _ = _exact(index, q, allowed, k)
    rows = np.repeat(np.arange(b)[:, None], k, 1)
    assert allowed[rows[got >= 0], got[got >= 0]].all(), "a filtered item was returned"
    recall = np.mean([len(np.intersect1d(g, w)) / k for g, w in zip(got, want, strict=True)])
    assert recall >= 0.85, recall


def test_candidate_fn_hook_replaces_main_search(rng):
    index = _index(rng)
    calls = []

    def first_allowed_rows(queries_BxD, table, allowed_BxN, k):
        calls.append(allowed_BxN.shape)
        rows = jnp.argsort(~allowed_BxN, axis=1, stable=True)[:, :k].astype(jnp.int32)
        return jnp.zeros(rows.shape, jnp.float32), rows

    q = jnp.asarray(rng.normal(size=(2, D)), jnp.float32)
    got = fi.search(index, q, 3, candidate_fn=first_allowed_rows)
    assert calls == [(2, N)]
    np.testing.assert_array_equal(np.asarray(got.ids_BxK), [[1, 2, 3], [1, 2, 3]])


def test_bad_inputs(rng):
    emb = rng.normal(size=(N, D)).astype(np.float32)
    bad = emb.copy()
    bad[5, 2] = np.nan
    with pytest.raises(ValueError, match="main_emb_NxD.*finite"):
        fi.build_index(bad)
    with pytest.raises(TypeError, match="main_emb_NxD"):
        fi.build_index(emb.astype(np.int32))
    with pytest.raises(ValueError, match="duplicates"):
        fi.build_index(emb[:3], ids_N=np.array([1, 2, 1]))
    with pytest.raises(ValueError, match="side_NxS"):
        fi.build_index(emb, side_NxS=np.zeros((N - 1, 2), np.float32))
    index = _index(rng)
    new = rng.normal(size=(2, D)).astype(np.float32)
    side = np.zeros((2, S), np.float32)
    with pytest.raises(ValueError, match="already indexed"):
        fi.add_items(index, np.array([7, 40]), new, side)
    with pytest.raises(ValueError, match="ids_A"):
        fi.add_items(index, np.array([40, V]), new, side)
    nan = new.copy()
    nan[1, 0] = np.inf
    with pytest.raises(ValueError, match="emb_AxD.*finite"):
        fi.add_items(index, np.array([40, 41]), nan, side)
    with pytest.raises(ValueError, match="emb_AxD"):
        fi.add_items(index, np.array([40, 41]), new[:, :4], side)
    with pytest.raises(ValueError, match="side_AxS"):
        fi.add_items(index, np.array([40, 41]), new, None)
    with pytest.raises(ValueError, match="fresh table full"):
        fi.add_items(index, np.arange(40, 40 + F + 1), rng.normal(size=(F + 1, D)).astype(np.float32),
                     np.zeros((F + 1, S), np.float32))  # fmt: skip
    with pytest.raises(ValueError, match="k: expected"):
        fi.check_search_inputs(index, N + 1, batch=2)
    with pytest.raises(ValueError, match="allowed"):
        fi.check_search_inputs(index, 5, batch=2, allowed=np.ones((2, V - 1), bool))
    with pytest.raises(TypeError, match="allowed"):
        fi.check_search_inputs(index, 5, batch=2, allowed=np.ones((V,), np.int32))
    with pytest.raises(ValueError, match="quantize=True"):
        fi.check_search_inputs(index, 5, batch=2, impl="int8")
    with pytest.raises(ValueError, match="queries_BxD.*finite"):
        fi.check_search_inputs(index, 5, batch=1, queries_BxD=np.full((1, D), np.nan, np.float32))
