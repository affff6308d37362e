"""ops.ann.ivf_search with an allow-mask over original ids (and a Bloom plan): filtered items never compete.

pallas (interpret) == xla == reference on clusters of unequal sizes, N not a multiple of the tile, k above
the number of allowed items (-inf / -1 padding), an empty filter; the filtered result equals the exact
filter applied to the unfiltered IVF candidates.
"""

import jax
import numpy as np
import pytest

from recjax.ops import ann
from recjax.ops import bloom as bloom_op
from recjax.retrieval import bloom, ivf

SIZES = (5, 60, 41, 20, 49, 28)  # N = 203: not a multiple of block_n = 32; every cluster <= 2 tiles


@pytest.fixture
def setup(rng):
    d = 12
    centers = rng.normal(size=(len(SIZES), d)).astype(np.float32) * 6
    assign = np.repeat(np.arange(len(SIZES)), SIZES)
    rng.shuffle(assign)
    x = (centers[assign] + rng.normal(size=(len(assign), d))).astype(np.float32)
    index = ivf.build_ivf_index(x, centers, block_n=32)
    assert index.max_tiles == 2 and index.num_items == 203
    np.testing.assert_array_equal(np.asarray(ivf.assign_clusters(x, centers)), assign)
    return x, assign, index


def _allowed_ids(ids_BxK, allowed_BxN):
    return all(allowed_BxN[r, ids[ids >= 0]].all() for r, ids in enumerate(np.asarray(ids_BxK)))


def test_mask_impls_agree_and_padding(rng, setup, assert_same_topk):
    x, assign, index = setup
    n, b, k, nprobe = index.num_items, 5, 40, 2
    queries = rng.normal(size=(b, x.shape[1])).astype(np.float32)
    allowed = rng.random((b, n)) < 0.5
    allowed[1] = False  # empty filter for one query
    mask = ann.pack_mask(allowed)
    ref = ann.ivf_search(queries, index, k, nprobe, mask_BxW=mask, impl="reference")
    for impl in ("xla", "pallas"):
        assert_same_topk(ann.ivf_search(queries, index, k, nprobe, mask_BxW=mask, impl=impl), ref)
    vals, ids = (np.asarray(a) for a in ref)
    probes = np.asarray(ann.probe_clusters(queries, index.centroids_LxD, nprobe))
    for r in range(b):
        eligible = allowed[r] & np.isin(assign, probes[r])
        got = ids[r][ids[r] >= 0]
        assert len(got) == min(k, eligible.sum()) and eligible[got].all()
        assert np.isneginf(vals[r][len(got) :]).all() and (ids[r][len(got) :] == -1).all()
    assert (ids[1] == -1).all()
    # int32 words (the Bloom output dtype) are read the same as uint32
    words32 = jax.lax.bitcast_convert_type(mask, np.int32)
    assert_same_topk(ann.ivf_search(queries, index, k, nprobe, mask_BxW=words32, impl="xla"), ref)


def test_filtered_ivf_is_exact_filter_on_ivf_candidates(rng, setup):
    x, _, index = setup
    n, b, k, nprobe = index.num_items, 4, 10, 3
    queries = rng.normal(size=(b, x.shape[1])).astype(np.float32)
    allowed = rng.random((b, n)) < 0.3
    got = ann.ivf_search(queries, index, k, nprobe, mask_BxW=ann.pack_mask(allowed), impl="xla")
    # all candidates of the probed clusters, unfiltered, then the exact filter, then the first k
    all_vals, all_ids = (np.asarray(a) for a in ann.ivf_search(queries, index, n, nprobe, impl="xla"))
    for r in range(b):
        keep = (all_ids[r] >= 0) & allowed[r, np.maximum(all_ids[r], 0)]
        m = min(k, keep.sum())
        want_v, want_i = np.full(k, -np.inf, np.float32), np.full(k, -1, np.int32)
        want_v[:m], want_i[:m] = all_vals[r][keep][:m], all_ids[r][keep][:m]
        np.testing.assert_array_equal(np.asarray(got[0])[r], want_v)
        np.testing.assert_array_equal(np.asarray(got[1])[r], want_i)  # same tie order (same score matrix)


def test_mask_and_bloom_plan_combined(rng, setup, assert_same_topk):
    x, _, index = setup
    n, b, k, nprobe = index.num_items, 4, 30, 2
    queries = rng.normal(size=(b, x.shape[1])).astype(np.float32)
    feats = bloom.item_features({"tag": rng.integers(0, 5, (n, 2))})
    v = index.max_tiles * index.block_n // 32
    bidx = bloom.build_bloom_index(
        feats, bloom_op.BloomConfig(64, 3), item_order=np.asarray(index.ids_sorted), pad_words=v
    )
    plan = bloom.compile_queries(bidx, ["tag:1 OR tag:2", "", "NOT tag:0", "tag:3"])
    allowed = rng.random((b, n)) < 0.6
    kw = dict(mask_BxW=ann.pack_mask(allowed), bloom_index=bidx, plan=plan)
    ref = ann.ivf_search(queries, index, k, nprobe, impl="reference", **kw)
    for impl in ("xla", "pallas"):
        assert_same_topk(ann.ivf_search(queries, index, k, nprobe, impl=impl, **kw), ref)
    # Bloom over the id layout, read per item: the plan's bits AND the mask
    id_bloom = bloom.build_bloom_index(feats, bloom_op.BloomConfig(64, 3))
    bits = bloom.unpack_words(bloom_op.filter_words(id_bloom, plan, impl="reference"), n)
    assert _allowed_ids(ref[1], allowed & bits)
    assert (np.asarray(ref[1])[1] >= 0).sum() > 0  # the empty query matches everything


def test_mask_is_validated(rng, setup):
    x, _, index = setup
    q = rng.normal(size=(2, x.shape[1])).astype(np.float32)
    with pytest.raises(ValueError, match="mask_BxW: expected shape"):
        ann.ivf_search(q, index, 5, 2, mask_BxW=np.zeros((2, 3), np.uint32))
    with pytest.raises(TypeError, match="mask_BxW: expected 32-bit"):
        ann.ivf_search(q, index, 5, 2, mask_BxW=np.zeros((2, 7), np.int8))
