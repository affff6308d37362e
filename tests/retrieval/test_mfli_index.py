"""MFLI index and serving: CSR consistency after splits, merges and deltas, balance bounds, fresh items
retrievable right after their delta, serving against a plain-numpy reference, bad input rejected."""

from collections import Counter

import jax
import numpy as np
import pytest

from recjax.retrieval import mfli_index as mi
from recjax.retrieval import mfli_rebalance as mr
from recjax.retrieval import mfli_serving as ms

N, D, M, L = 400, 16, 4, 2


def skewed_codes(rng, n=N, f=2, m=M, l=L):
    """Zipf-like code usage: a few codes hold most items, several hold one or two."""
    p = 1.0 / np.arange(1, m + 1) ** 1.5
    return rng.choice(m, size=(n, f, l), p=p / p.sum()).astype(np.int32)


def make_index(rng, f=2, upper=30, lower=8, n=N, extra_rows=50):
    emb = rng.normal(size=(n, D)).astype(np.float32)
    codes = skewed_codes(rng, n, f)
    cfg = mi.RebalanceConfig(upper_bound=upper, lower_bound=lower, seed=3)
    index = mi.build_snapshot(emb, codes, config=cfg, row_capacity=n + extra_rows, id_capacity=2 * n)
    return index, emb, codes


def sizes(index, f):
    return index.counts_FxC[f, : index.facets[f].num_clusters]


def csr_members(index, f, c):
    s, n = index.offsets_FxC[f, c], index.counts_FxC[f, c]
    return index.items_FxR[f, s : s + n]


def assert_csr_matches_table(index):
    mi.check_consistent(index)
    for f in range(index.num_facets):  # independent of check_consistent: cluster by cluster
        table = index.cluster_RxF[: index.num_rows, f]
        for c in range(index.facets[f].num_clusters):
            np.testing.assert_array_equal(csr_members(index, f, c), np.flatnonzero(table == c))


# ------------------------------------------------------------------------------------------ building


def test_split_and_merge_bounds_and_csr(rng):
    index, _, _ = make_index(rng, upper=30, lower=8)
    assert_csr_matches_table(index)
    for f in range(index.num_facets):
        s = sizes(index, f)
        assert s.max() <= 30 and s.min() >= 8, s
        assert index.stats_before[f].max_size > 30 and index.stats_before[f].min_size < 8  # work was done
        assert index.stats_after[f].max_size == s.max() and index.stats_after[f].num_clusters == len(s)
        assert index.stats_after[f].gini < index.stats_before[f].gini
        # pair table: every cluster is reachable from some code key
        assert set(index.facets[f].pair_cluster_P.tolist()) == set(range(len(s)))


def test_no_rebalance_clusters_are_the_code_tuples(rng):
    emb = rng.normal(size=(N, D)).astype(np.float32)
    codes = skewed_codes(rng)
    index = mi.build_snapshot(emb, codes)
    assert_csr_matches_table(index)
    for f in range(2):
        keys = codes[:, f, 0] * M + codes[:, f, 1]
        assert index.facets[f].num_clusters == len(np.unique(keys))
        for c in range(index.facets[f].num_clusters):  # one key per cluster, centroid = member mean
            members = csr_members(index, f, c)
            assert len(np.unique(keys[members])) == 1
            np.testing.assert_allclose(index.facets[f].centroids_CxD[c], emb[members].mean(0), atol=1e-5)
    one_level = mi.build_snapshot(emb, codes, levels=1)
    assert one_level.facets[0].num_clusters == len(np.unique(codes[:, 0, 0]))


def test_split_of_identical_items_and_balance_stats():
    emb = np.ones((100, 4), np.float32)  # k-means cannot separate them: equal chunks
    index = mi.build_snapshot(emb, np.zeros((100, 1, 1), np.int32), config=mi.RebalanceConfig(upper_bound=7))
    assert sizes(index, 0).max() <= 7 and sizes(index, 0).sum() == 100
    assert_csr_matches_table(index)
    s = mr.balance_stats([1, 1, 1, 1])
    assert s.gini == 0 and s.max_over_mean == 1
    s = mr.balance_stats([0, 0, 0, 10])  # empty clusters are not counted
    assert s.num_clusters == 1 and s.gini == 0
    assert abs(mr.balance_stats([1, 3]).gini - 0.25) < 1e-12  # (2-2-1)*1 + (4-2-1)*3 = 2; 2 / (2*4)


def test_merge_respects_upper_bound(rng):
    emb = rng.normal(size=(60, D)).astype(np.float32)
    codes = np.zeros((60, 1, 1), np.int32)
    codes[:3, 0, 0] = 1  # a cluster of 3 below lower=5, the other has 57 > upper - 3: must stay
    index = mi.build_snapshot(
        emb, codes, num_codes=2, config=mi.RebalanceConfig(upper_bound=58, lower_bound=5)
    )
    assert sorted(sizes(index, 0).tolist()) == [3, 57]
    index = mi.build_snapshot(
        emb, codes, num_codes=2, config=mi.RebalanceConfig(upper_bound=60, lower_bound=5)
    )
    assert sizes(index, 0).tolist() == [60]
    assert sorted(index.facets[0].pair_key_P.tolist()) == [0, 1]  # both keys map to the merged cluster


def test_facet_embeddings_drive_the_cluster_geometry(rng):
    emb = rng.normal(size=(N, D)).astype(np.float32)
    proj = rng.normal(size=(2, D, D)).astype(np.float32)
    facet = np.einsum("nd,fde->nfe", emb, proj)
    codes = skewed_codes(rng)
    cfg = mi.RebalanceConfig(upper_bound=40, lower_bound=5)
    index = mi.build_snapshot(emb, codes, facet_emb_NxFxD=facet, config=cfg, row_capacity=N + 5)
    assert_csr_matches_table(index)
    for f in range(2):
        for c in range(index.facets[f].num_clusters):
            members = csr_members(index, f, c)
            np.testing.assert_allclose(
                index.facets[f].centroids_CxD[c], facet[members, f].mean(0), rtol=1e-4, atol=1e-3
            )
    new = rng.normal(size=(2, D)).astype(np.float32)
    with pytest.raises(ValueError, match="facet_emb_AxFxD"):
        mi.add_items(index, np.array([N, N + 1]), new)
    new_facet = np.einsum("nd,fde->nfe", new, proj)
    index2 = mi.add_items(index, np.array([N, N + 1]), new, facet_emb_AxFxD=new_facet)
    assert_csr_matches_table(index2)
    for f in range(2):
        cents = index.facets[f].centroids_CxD
        want = np.argmin(((cents[None] - new_facet[:, f, None]) ** 2).sum(-1), axis=1)
        np.testing.assert_array_equal(index2.cluster_RxF[N : N + 2, f], want)
    with pytest.raises(ValueError, match="facet_emb_NxFxD"):
        mi.build_snapshot(emb, codes, facet_emb_NxFxD=facet[:, :1])


# ------------------------------------------------------------------------------------------- deltas


def test_deltas_keep_csr_consistent_and_map_codes(rng):
    index, _, codes = make_index(rng)
    new_ids = np.array([401, 777, 402])
    index2 = mi.add_items(index, new_ids, rng.normal(size=(3, D)).astype(np.float32))
    assert index2.num_rows == N + 3 and index2.delta == 1 and index.num_rows == N  # old snapshot unchanged
    assert_csr_matches_table(index2)
    np.testing.assert_array_equal(index2.row_of_id_V[new_ids], [N, N + 1, N + 2])
    # with codes: each new item lands in a cluster its key maps to (keys of existing items all have one)
    new_codes = codes[:5]
    emb = rng.normal(size=(5, D)).astype(np.float32)
    index3 = mi.add_items(index2, np.arange(500, 505), emb, codes_AxFxL=new_codes)
    assert_csr_matches_table(index3)
    for f in range(2):
        table = index3.facets[f]
        for a in range(5):
            key = new_codes[a, f, 0] * M + new_codes[a, f, 1]
            allowed = table.pair_cluster_P[table.pair_key_P == key]
            got = index3.cluster_RxF[N + 3 + a, f]
            assert got in allowed
            cents = table.centroids_CxD[allowed]
            assert got == allowed[np.argmin(((cents - emb[a]) ** 2).sum(1))]
    assert (index3.counts_FxC.sum(1) == N + 8).all()
    assert index3.counts_FxC.shape == index.counts_FxC.shape  # fixed shapes across deltas


def test_new_item_retrievable_right_after_delta(rng):
    index, _, _ = make_index(rng)
    q = rng.normal(size=(1, D)).astype(np.float32)
    new_emb = 10 * q / np.linalg.norm(q)  # scores far above every existing item
    index2 = mi.add_items(index, np.array([654]), new_emb)
    arrays = mi.serving_arrays(index2)
    got = ms.retrieve(arrays, 5, k_clusters=2, max_candidates=200, queries_BxD=q)
    assert int(got.ids_Bxk[0, 0]) == 654
    got = ms.retrieve(arrays, 5, k_clusters=1, max_candidates=200, trigger_ids_BxT=np.array([[654, -1]]))
    assert int(got.ids_Bxk[0, 0]) == 654
    before = ms.retrieve(mi.serving_arrays(index), 5, k_clusters=2, max_candidates=200, queries_BxD=q)
    assert 654 not in np.asarray(before.ids_Bxk)


# ------------------------------------------------------------------------------------------ serving


def reference_retrieve(index, k, k_clusters, max_candidates, queries=None, triggers=None):
    """Plain numpy, straight from the definition in mfli_serving's docstring (cluster members read from the
    item -> cluster table, not the CSR)."""
    n, f_num = index.num_rows, index.num_facets
    table = index.cluster_RxF[:n]
    emb = index.emb_RxD[:n].astype(np.float64)
    b = len(queries) if queries is not None else len(triggers)
    ids, scores, counts = np.full((b, k), -1), np.full((b, k), -np.inf), np.zeros(b, int)
    for i in range(b):
        trig = [] if triggers is None else [index.row_of_id_V[t] for t in triggers[i] if t >= 0]
        q = np.asarray(queries[i], np.float64) if queries is not None else emb[trig].mean(0) if trig else None
        chosen = []
        for f in range(f_num):
            if triggers is None:
                s = index.facets[f].centroids_CxD.astype(np.float64) @ q
                order = list(np.argsort(-s, kind="stable")[:k_clusters])
            else:
                cl = [int(table[r, f]) for r in trig]
                cnt = Counter(cl)
                order = sorted(cnt, key=lambda c, cl=cl, cnt=cnt: (-cnt[c], cl.index(c)))[:k_clusters]
            chosen.append(order + [-1] * (k_clusters - len(order)))
        buf = []
        for r in range(k_clusters):
            for f in range(f_num):
                if chosen[f][r] >= 0:
                    buf += np.flatnonzero(table[:, f] == chosen[f][r]).tolist()
        buf = list(dict.fromkeys(buf[:max_candidates]))  # first occurrence kept, in order
        counts[i] = len(buf)
        if not buf:
            continue
        s = emb[buf] @ q
        top = sorted(range(len(buf)), key=lambda p, s=s: (-s[p], p))[:k]
        ids[i, : len(top)] = index.ids_R[np.asarray(buf)[top]]
        scores[i, : len(top)] = s[top]
    return ids, scores, counts


def check_against_reference(got, want):
    ids, scores, counts = want
    np.testing.assert_array_equal(np.asarray(got.num_candidates_B), counts)
    np.testing.assert_array_equal(np.asarray(got.ids_Bxk), ids)
    np.testing.assert_allclose(np.asarray(got.scores_Bxk), scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("facets", [1, 3])
def test_serving_by_queries_matches_numpy(rng, facets):
    index, _, _ = make_index(rng, f=facets)
    index = mi.add_items(index, np.arange(600, 620), rng.normal(size=(20, D)).astype(np.float32))
    arrays = mi.serving_arrays(index)
    q = rng.normal(size=(5, D)).astype(np.float32)
    for kc, cap, k in ((3, 60, 10), (2, 500, 40), (1, 7, 7)):  # truncated, roomy, tiny buffers
        got = ms.retrieve(arrays, k, k_clusters=kc, max_candidates=cap, queries_BxD=q, impl="xla")
        check_against_reference(got, reference_retrieve(index, k, kc, cap, queries=q))


def test_serving_by_triggers_matches_numpy(rng):
    index, _, _ = make_index(rng, f=2)
    arrays = mi.serving_arrays(index)
    trig = rng.integers(0, N, (6, 8))
    trig[1, 3:] = -1
    trig[2, :] = trig[2, 0]  # one distinct cluster < k_clusters: -1 slots
    trig[3, :] = -1  # no triggers: nothing found
    for kc, cap in ((2, 50), (4, 300)):
        got = ms.retrieve(arrays, 12, k_clusters=kc, max_candidates=cap, trigger_ids_BxT=trig, impl="xla")
        check_against_reference(got, reference_retrieve(index, 12, kc, cap, triggers=trig))
    assert (np.asarray(got.ids_Bxk)[3] == -1).all()


def test_serving_pallas_interpret_matches_xla(rng):
    index, _, _ = make_index(rng, f=2)
    arrays = mi.serving_arrays(index)
    q = rng.normal(size=(3, D)).astype(np.float32)
    got = ms.retrieve(arrays, 10, k_clusters=2, max_candidates=100, queries_BxD=q, impl="pallas")
    check_against_reference(got, reference_retrieve(index, 10, 2, 100, queries=q))


def test_sampled_trigger_clusters(rng):
    index, _, _ = make_index(rng, f=1)
    arrays = mi.serving_arrays(index)
    trig = rng.integers(0, N, (4, 10))
    trig_clusters = index.cluster_RxF[trig, 0]
    for seed in range(3):
        clusters = ms.select_by_triggers(arrays, jax.numpy.asarray(trig), 3, jax.random.key(seed))
        for b in range(4):
            c = np.asarray(clusters[b, 0])
            c = c[c >= 0]
            assert len(set(c.tolist())) == len(c) == min(3, len(set(trig_clusters[b].tolist())))
            assert set(c.tolist()) <= set(trig_clusters[b].tolist())
    got = ms.retrieve(
        arrays, 5, k_clusters=1, max_candidates=100, trigger_ids_BxT=trig[:, :1] * 0 + trig[:1, :1]
    )
    assert (np.asarray(got.num_candidates_B) == index.counts_FxC[0, trig_clusters[0, 0]]).all()


# ---------------------------------------------------------------------------------------- bad input


def test_bad_input_rejected(rng):
    emb = rng.normal(size=(20, D)).astype(np.float32)
    codes = rng.integers(0, M, (20, 2, L)).astype(np.int32)
    with pytest.raises(ValueError, match="lower_bound"):
        mi.RebalanceConfig(upper_bound=4, lower_bound=5)
    with pytest.raises(ValueError, match="upper_bound"):
        mi.RebalanceConfig(upper_bound=0)
    with pytest.raises(ValueError, match="codes_NxFxL.*facet"):
        mi.build_snapshot(emb, codes[:, :0])
    with pytest.raises(ValueError, match="codes_NxFxL.*level"):
        mi.build_snapshot(emb, codes[:, :, :0])
    with pytest.raises(ValueError, match="codes_NxFxL"):
        mi.build_snapshot(emb, codes[:10])
    with pytest.raises(TypeError, match="codes_NxFxL"):
        mi.build_snapshot(emb, codes.astype(np.float32))
    with pytest.raises(ValueError, match="codes_NxFxL"):
        mi.build_snapshot(emb, codes, num_codes=2)
    with pytest.raises(ValueError, match="levels"):
        mi.build_snapshot(emb, codes, levels=3)
    bad = emb.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="emb_NxD"):
        mi.build_snapshot(bad, codes)
    with pytest.raises(TypeError, match="emb_NxD"):
        mi.build_snapshot(emb.astype(np.int32), codes)
    with pytest.raises(ValueError, match="ids_N"):
        mi.build_snapshot(emb, codes, ids_N=np.r_[np.arange(19), 0])
    with pytest.raises(ValueError, match="ids_N"):
        mi.build_snapshot(emb, codes, ids_N=np.arange(20) + 5)  # id_capacity defaults to 20
    index = mi.build_snapshot(emb, codes, row_capacity=23, id_capacity=30)
    new = rng.normal(size=(2, D)).astype(np.float32)
    for ids, what in (([25, 25], "repeated"), ([25, 30], r"\[0, 30\)"), ([3, 25], "already indexed")):
        with pytest.raises(ValueError, match=f"ids_A.*{what}"):
            mi.add_items(index, np.array(ids), new)
    with pytest.raises(ValueError, match="ids_A.*capacity"):
        mi.add_items(index, np.arange(24, 28), rng.normal(size=(4, D)).astype(np.float32))
    with pytest.raises(ValueError, match="emb_AxD"):
        mi.add_items(index, np.array([25, 26]), new[:, :3])
    with pytest.raises(ValueError, match="emb_AxD"):
        mi.add_items(index, np.array([25, 26]), bad[:2, :] * np.nan)
    with pytest.raises(ValueError, match="codes_AxFxL"):
        mi.add_items(index, np.array([25, 26]), new, codes_AxFxL=codes[:2, :1])
    arrays = mi.serving_arrays(index)
    q = rng.normal(size=(2, D)).astype(np.float32)
    with pytest.raises(ValueError, match="queries_BxD"):
        ms.retrieve(arrays, 3, k_clusters=1, max_candidates=10, queries_BxD=q[:, :4])
    with pytest.raises(ValueError, match="queries_BxD"):
        ms.retrieve(arrays, 3, k_clusters=1, max_candidates=10, queries_BxD=q * np.nan)
    with pytest.raises(ValueError, match="k:"):
        ms.retrieve(arrays, 11, k_clusters=1, max_candidates=10, queries_BxD=q)
    with pytest.raises(ValueError, match="k_clusters"):
        ms.retrieve(arrays, 3, k_clusters=0, max_candidates=10, queries_BxD=q)
    with pytest.raises(ValueError, match="trigger_ids_BxT.*25"):
        ms.retrieve(arrays, 3, k_clusters=1, max_candidates=10, trigger_ids_BxT=np.array([[1, 25]]))
    with pytest.raises(ValueError, match="trigger_ids_BxT"):
        ms.retrieve(arrays, 3, k_clusters=1, max_candidates=10, trigger_ids_BxT=np.array([[1, 99]]))
    with pytest.raises(ValueError, match="queries_BxD, trigger_ids_BxT"):
        ms.retrieve(arrays, 3, k_clusters=1, max_candidates=10)
