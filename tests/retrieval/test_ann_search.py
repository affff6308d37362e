"""recjax.ops.ann: pallas (interpret) vs xla vs reference, Bloom-filtered, IVF probe-then-filter, errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from recjax.ops import ann, quantize, topk
from recjax.ops import bloom as bloom_op
from recjax.retrieval import bloom, ivf


def test_int8_search_impls_agree_with_mask(rng, assert_same_topk):
    n, d, b, k = 333, 20, 6, 15
    items = quantize.quantize_items(rng.normal(size=(n, d)).astype(np.float32))
    queries = rng.normal(size=(b, d)).astype(np.float32)
    mask = ann.pack_mask(rng.random((b, n)) < 0.4)
    for m in (None, mask):
        ref = ann.int8_search(queries, items, k, mask_BxW=m, impl="reference")
        assert_same_topk(ann.int8_search(queries, items, k, mask_BxW=m, impl="xla"), ref)
        assert_same_topk(ann.int8_search(queries, items, k, mask_BxW=m, impl="pallas", exact=True), ref)
    vals, _, certified = ann.int8_search(queries, items, k, impl="xla", return_exact=True)
    assert np.asarray(certified).all()  # the kernel's certificate is tested in tests/kernels


def test_filtered_search_returns_only_allowed_items(rng, assert_same_topk):
    n, d, b, k = 300, 16, 3, 10
    genre = rng.integers(0, 8, (n, 2))
    feats = bloom.item_features({"genre": genre})
    index = bloom.build_bloom_index(feats, bloom_op.BloomConfig(64, 3))
    queries_text = ["genre:1 OR genre:2", "genre:3 AND genre:4", "NOT genre:0"]
    plan = bloom.compile_queries(index, queries_text)
    items = quantize.quantize_items(rng.normal(size=(n, d)).astype(np.float32))
    queries = rng.normal(size=(b, d)).astype(np.float32)
    got = ann.filtered_search(queries, items, k, index, plan, impl="pallas", exact=True)
    ref = ann.filtered_search(queries, items, k, index, plan, impl="reference")
    assert_same_topk(got, ref)
    allowed = bloom.unpack_words(bloom_op.filter_words(index, plan, impl="reference"), n)
    ids = np.asarray(got[1])
    for r in range(b):
        real = ids[r][ids[r] >= 0]
        assert allowed[r, real].all()
        assert len(real) == min(k, allowed[r].sum())


def test_ivf_search_pallas_matches_dense_definition_with_probe_then_filter(rng, assert_same_topk):
    n, d, b, k, nprobe = 400, 16, 5, 12, 2
    x = rng.normal(size=(n, d)).astype(np.float32)
    cents = ivf.kmeans(x, ivf.KMeansConfig(num_clusters=6, iterations=3, seed=1))
    index = ivf.build_ivf_index(x, cents, block_n=128)
    if index.max_tiles > 2:
        pytest.skip("a cluster above 2 tiles: the kernel's bins would be approximate")
    queries = rng.normal(size=(b, d)).astype(np.float32)
    ref = ann.ivf_search(queries, index, k, nprobe, impl="reference")
    assert_same_topk(ann.ivf_search(queries, index, k, nprobe, impl="pallas"), ref)
    # results lie in the probed clusters
    probes = np.asarray(ann.probe_clusters(queries, index.centroids_LxD, nprobe))
    assign = np.asarray(ivf.assign_clusters(x, index.centroids_LxD))
    ids = np.asarray(ref[1])
    assert all(np.isin(assign[ids[r]], probes[r]).all() for r in range(b))

    feats = bloom.item_features({"tag": rng.integers(0, 5, (n, 2))})
    v = index.max_tiles * index.block_n // 32
    bidx = bloom.build_bloom_index(
        feats, bloom_op.BloomConfig(64, 3), item_order=np.asarray(index.ids_sorted), pad_words=v
    )
    plan = bloom.compile_queries(bidx, ["tag:1", "tag:2 OR tag:3", "NOT tag:4", "", "tag:0 AND tag:1"])
    ref = ann.ivf_search(queries, index, k, nprobe, bloom_index=bidx, plan=plan, impl="reference")
    assert_same_topk(
        ann.ivf_search(queries, index, k, nprobe, bloom_index=bidx, plan=plan, impl="pallas"), ref
    )
    exact_tag1 = bloom.exact_filter(feats, "tag:1")
    ids = np.asarray(ref[1])[0]
    assert exact_tag1[ids[ids >= 0]].mean() > 0.8  # mostly true matches (Bloom false positives possible)


def test_topk_pallas_impl(rng):
    n, d, b, k = 200, 16, 4, 10
    items = rng.normal(size=(n, d)).astype(np.float32)
    queries = rng.normal(size=(b, d)).astype(np.float32)
    exclude = rng.integers(-1, n, (b, 5)).astype(np.int32)
    assert "pallas" in topk.available_impls()
    vals, ids = topk.topk_inner_product(queries, items, k, exclude_BxH=exclude, impl="pallas")
    _, want = topk.topk_inner_product(queries, items, k, exclude_BxH=exclude, impl="reference")
    ids = np.asarray(ids)
    for r in range(b):
        assert not np.isin(ids[r], exclude[r][exclude[r] >= 0]).any()
    recall = np.mean([len(set(a) & set(w)) / k for a, w in zip(ids, np.asarray(want), strict=True)])
    assert recall >= 0.8  # int8 quantization only


def test_bad_inputs_are_rejected(rng):
    items = quantize.quantize_items(rng.normal(size=(50, 8)).astype(np.float32))
    q = rng.normal(size=(2, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="k: expected 1 <= k <= N=50"):
        ann.int8_search(q, items, 51)
    bad = q.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="queries_BxD: expected finite"):
        ann.int8_search(bad, items, 5)
    with pytest.raises(ValueError, match="queries_BxD: expected shape"):
        ann.int8_search(q[:, :4], items, 5)
    with pytest.raises(ValueError, match="impl: expected one of"):
        ann.int8_search(q, items, 5, impl="cuda")
    with pytest.raises(ValueError, match="mask_BxW: expected shape"):
        ann.int8_search(q, items, 5, mask_BxW=jnp.zeros((2, 1), jnp.uint32))
    with pytest.raises(TypeError, match="mask_BxW: expected 32-bit"):
        ann.int8_search(q, items, 5, mask_BxW=jnp.zeros((2, 2), jnp.int8))
    wide = quantize.quantize_items(rng.normal(size=(4, 2048)).astype(np.float32))
    with pytest.raises(ValueError, match="d: expected 1 <= d <= 1024"):
        ann.int8_search(rng.normal(size=(1, 2048)).astype(np.float32), wide, 1)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    index = ivf.build_ivf_index(x, x[:3], block_n=32)
    with pytest.raises(ValueError, match="nprobe: expected 1 <= nprobe <= L=3"):
        ann.ivf_search(q, index, 5, 4)
