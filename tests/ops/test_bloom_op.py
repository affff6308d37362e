"""recjax.ops.bloom dispatcher: every impl gives the reference's words (full and probed), impl errors."""

import numpy as np
import pytest

from recjax.ops import bloom as bloom_op
from recjax.retrieval import bloom

QUERIES = ["tag:1 OR tag:2", "tag:3 AND NOT tag:4", "", "(tag:0 OR tag:5) AND tag:6"]


@pytest.fixture
def index_and_plan(rng):
    n = 333  # not a multiple of 32
    feats = bloom.item_features({"tag": rng.integers(0, 8, (n, 3))})
    index = bloom.build_bloom_index(feats, bloom_op.BloomConfig(48, 3), pad_words=8)
    return index, bloom.compile_queries(index, QUERIES)


def test_filter_words_impls_agree(index_and_plan):
    index, plan = index_and_plan
    want = np.asarray(bloom_op.filter_words(index, plan, impl="reference"))
    assert want.shape == (len(QUERIES), index.num_words)
    for impl in ("auto", "xla", "pallas"):
        np.testing.assert_array_equal(np.asarray(bloom_op.filter_words(index, plan, impl=impl)), want)
    two = bloom_op.filter_words(index, plan, impl="pallas", two_stage=True)
    np.testing.assert_array_equal(np.asarray(two), want)


def test_filter_words_probed_impls_agree(index_and_plan):
    index, plan = index_and_plan
    tile_start_L = np.array([0, 2, 4, 6], np.int32)  # 4 "clusters" of 2 tiles of 32 items (2 words each)
    probes_BxP = np.array([[0, 3], [1, 2], [3, 3], [2, 0]], np.int32)
    kw = dict(block_n=32, max_tiles=2)
    probed = bloom_op.filter_words_probed(index, plan, probes_BxP, tile_start_L, impl="reference", **kw)
    want = np.asarray(probed)
    full = np.asarray(bloom_op.filter_words(index, plan, impl="reference"))
    for b, p in np.ndindex(probes_BxP.shape):
        start = tile_start_L[probes_BxP[b, p]]
        np.testing.assert_array_equal(want[b, p], full[b, start : start + 2])
    for impl in ("auto", "xla", "pallas"):
        got = bloom_op.filter_words_probed(index, plan, probes_BxP, tile_start_L, impl=impl, **kw)
        np.testing.assert_array_equal(np.asarray(got), want)


def test_bad_impl_and_plan(index_and_plan):
    index, plan = index_and_plan
    assert bloom_op.resolve_impl("auto") == "xla"  # CPU: no Pallas GPU
    with pytest.raises(ValueError, match="impl: expected one of"):
        bloom_op.filter_words(index, plan, impl="triton")
    bare = bloom_op.BloomPlan(plan.rows_BxCxTxK, plan.kinds_BxCxT)
    with pytest.raises(ValueError, match="plan: two_stage needs a plan from compile_queries"):
        bloom_op.filter_words(index, bare, impl="pallas", two_stage=True)
