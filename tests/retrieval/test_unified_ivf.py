"""UnifiedRetrieval with index="ivf": probing every cluster equals int8 brute force (same top-N), the filter
(allowed mask, exclusions, Bloom plan evaluated probe-then-filter) holds for main and fresh items, and the
fused Pallas IVF kernel (interpret mode) serves inside the one jit; bad inputs rejected."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recjax.ops import ann
from recjax.ops import bloom as bloom_op
from recjax.retrieval import bloom as bl
from recjax.retrieval import fresh_index as fi
from recjax.retrieval import ivf as ivf_lib
from recjax.retrieval import unified_ivf
from recjax.retrieval.overarch import OverArch, OverArchConfig, TaskSpec
from recjax.retrieval.unified import Scorer, UnifiedConfig, UnifiedModel, UnifiedRetrieval, bloom_allowed
from recjax.retrieval.value_model import ValueModel, ValueModelConfig

NUM_ITEMS, D, L, B, F, CLUSTERS = 60, 8, 5, 4, 4, 4
V = NUM_ITEMS + 1 + F  # main ids 1..60 (row 0 = padding), fresh ids 61..64
TASKS = (TaskSpec("click", "binary"), TaskSpec("rating", "regression"))
BLOOM = bloom_op.BloomConfig(bits_per_item=256, num_hashes=4)  # ~1e-9 false positives: Bloom mask = exact


class MeanTower(nnx.Module):
    """Stand-in user tower: mean of the sequence's item embeddings, then a linear map."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.emb = nnx.Embed(NUM_ITEMS + 1, D, rngs=rngs)
        self.proj = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, inputs_BxL, mask_BxL):
        m = mask_BxL.astype(jnp.float32)[..., None]
        return self.proj(jnp.sum(self.emb(inputs_BxL) * m, axis=1, keepdims=True) / jnp.maximum(m.sum(1), 1))

    def user_embedding(self, hidden_BxLxD):
        return hidden_BxLxD[:, -1]

    def item_embeddings(self):
        return self.emb.embedding[...]


@pytest.fixture(scope="module")
def system():
    rng = np.random.default_rng(11)

    def make():
        rngs = nnx.Rngs(5)
        oa = OverArch(OverArchConfig(D, TASKS, hidden_dims=(8,), head_dim=0), rngs=rngs)
        vm = ValueModel(ValueModelConfig((1.0, 0.2), offsets=(0.0, 3.0)), rngs=rngs)
        return UnifiedModel(MeanTower(rngs=rngs), Scorer(oa, vm))

    model = nnx.jit(make)()
    index = fi.build_index(
        np.asarray(model.tower.item_embeddings()), fresh_capacity=F, id_capacity=V, quantize=True
    )
    new = rng.normal(size=(2, D)).astype(np.float32)
    index = fi.add_items(index, np.array([62, 61], np.int32), new)  # fresh items compete too
    codes = rng.integers(0, 4, size=(V, 2))
    codes[0] = -1
    features = bl.item_features({"genre": codes})
    main = unified_ivf.build_main_ivf(
        index, CLUSTERS, block_n=32, bloom_features=features, bloom_config=BLOOM
    )
    return model, index, main, features


def _requests(rng):
    inputs = rng.integers(1, NUM_ITEMS + 1, size=(B, L)).astype(np.int32)
    mask = rng.random((B, L)) < 0.8
    mask[:, -1] = True
    return np.where(mask, inputs, 0), mask, rng.random((B, V)) < 0.6


def _assert_same_results(a, b):
    np.testing.assert_array_equal(np.asarray(a.candidate_scores_BxK), np.asarray(b.candidate_scores_BxK))
    np.testing.assert_array_equal(np.asarray(a.ids_BxN), np.asarray(b.ids_BxN))


def test_ivf_all_clusters_equals_brute_force_and_filters(rng, system):
    model, index, main, _ = system
    inputs, mask, allowed = _requests(rng)
    allowed[0] = False
    allowed[0, [3, 61, 9]] = True  # fewer allowed than n_final
    kw = dict(allowed=allowed, exclude_BxH=inputs)
    brute = UnifiedRetrieval(model, UnifiedConfig(k=12, n_final=5, retrieval="int8", ann_impl="xla"))
    want = brute(index, inputs, mask, **kw)
    for impl in ("xla", "pallas"):
        ur = UnifiedRetrieval(
            model, UnifiedConfig(k=12, n_final=5, index="ivf", nprobe=CLUSTERS, ann_impl=impl)
        )
        _assert_same_results(ur(index, inputs, mask, ivf=main, **kw), want)
    got = np.asarray(want.ids_BxN)
    assert (got[0] >= 0).sum() == len(np.setdiff1d([3, 61, 9], inputs[0][mask[0]]))
    # fewer probes: results only from allowed, non-excluded items of the probed clusters or the fresh table
    ur = UnifiedRetrieval(model, UnifiedConfig(k=12, n_final=5, index="ivf", nprobe=1, ann_impl="xla"))
    out = ur(index, inputs, mask, ivf=main, **kw)
    user = np.asarray(model.tower.user_embedding(model.tower(jnp.asarray(inputs), jnp.asarray(mask))))
    probes = np.asarray(ann.probe_clusters(user, main.ivf.centroids_LxD, 1))[:, 0]
    cluster_of_row = np.asarray(ivf_lib.assign_clusters(index.main.emb_NxD, main.ivf.centroids_LxD))
    cand = np.asarray(out.candidate_ids_BxK)
    for r in range(B):
        real = cand[r][cand[r] >= 0]
        assert allowed[r, real].all() and not np.isin(real, inputs[r][mask[r]]).any()
        main_ids = real[real <= NUM_ITEMS]  # main row = id
        assert (cluster_of_row[main_ids] == probes[r]).all()


def test_ivf_with_bloom_plan_returns_only_allowed_items(rng, system):
    model, index, main, features = system
    inputs, mask, _ = _requests(rng)
    bloom_index = bl.build_bloom_index(features, BLOOM)
    queries = ["genre:1 OR genre:3", "genre:0 AND NOT genre:2", "NOT genre:1", ""]
    plan = bl.compile_queries(bloom_index, queries)
    exact = np.stack([bl.exact_filter(features, q) for q in queries])
    kw = dict(exclude_BxH=np.zeros((B, 1), np.int32), bloom=(bloom_index, plan))
    brute = UnifiedRetrieval(model, UnifiedConfig(k=12, n_final=5, retrieval="int8", ann_impl="xla"))
    ur = UnifiedRetrieval(model, UnifiedConfig(k=12, n_final=5, index="ivf", nprobe=CLUSTERS, ann_impl="xla"))
    out = ur(index, inputs, mask, ivf=main, **kw)
    _assert_same_results(out, brute(index, inputs, mask, **kw))
    cand = np.asarray(out.candidate_ids_BxK)
    assert all(exact[r, cand[r][cand[r] >= 0]].all() for r in range(B))
    # the fresh table's Bloom bits are evaluated on its ids' words only, equal to the full evaluation there
    from_fresh = np.asarray(unified_ivf.bloom_on_fresh(bloom_index, plan, index.fresh, None, V))
    full = np.asarray(bloom_allowed(bloom_index, plan, V, impl="reference"))
    np.testing.assert_array_equal(from_fresh[:, [61, 62]], full[:, [61, 62]])
    assert from_fresh[:, : NUM_ITEMS + 1].all()  # main ids are left to the probed evaluation
    assert not full[:, [61, 62]].all() and full[:, [61, 62]].any()


def test_ivf_with_shuffled_row_ids_equals_brute_force(rng, system):
    """Main rows that are not their ids (a shuffled id map, one empty row): IVF at nprobe = all clusters
    returns the brute-force candidates, and only allowed items passing the exact filter."""
    model, _, _, features = system
    emb = np.asarray(model.tower.item_embeddings())
    ids = np.full(emb.shape[0], -1, np.int32)
    ids[1:] = rng.permutation(np.arange(1, emb.shape[0]))
    ids[rng.integers(1, emb.shape[0])] = -1
    index = fi.build_index(emb, ids_N=ids, fresh_capacity=F, id_capacity=V, quantize=True)
    index = fi.add_items(index, np.array([62, 61], np.int32), rng.normal(size=(2, D)).astype(np.float32))
    main = unified_ivf.build_main_ivf(
        index, CLUSTERS, block_n=32, bloom_features=features, bloom_config=BLOOM
    )
    inputs, mask, allowed = _requests(rng)
    bloom_index = bl.build_bloom_index(features, BLOOM)
    queries = ["genre:1 OR genre:3", "genre:0 AND NOT genre:2", "NOT genre:1", ""]
    kw = dict(
        allowed=allowed, exclude_BxH=inputs, bloom=(bloom_index, bl.compile_queries(bloom_index, queries))
    )
    brute = UnifiedRetrieval(model, UnifiedConfig(k=12, n_final=5, retrieval="int8", ann_impl="xla"))
    want = brute(index, inputs, mask, **kw)
    exact = np.stack([bl.exact_filter(features, q) for q in queries]) & allowed
    for impl in ("xla", "pallas"):
        cfg = UnifiedConfig(k=12, n_final=5, index="ivf", nprobe=CLUSTERS, ann_impl=impl)
        got = UnifiedRetrieval(model, cfg)(index, inputs, mask, ivf=main, **kw)
        _assert_same_results(got, want)
        cand = np.asarray(got.candidate_ids_BxK)
        assert all(exact[r, cand[r][cand[r] >= 0]].all() for r in range(B)), impl


def test_ivf_bad_inputs(rng, system):
    model, index, main, features = system
    inputs, mask, _ = _requests(rng)
    ivf_cfg = UnifiedConfig(k=12, n_final=5, index="ivf", nprobe=2)
    with pytest.raises(ValueError, match="UnifiedConfig.index: expected"):
        UnifiedConfig(index="hnsw")
    with pytest.raises(ValueError, match="ivf: expected a MainIVF exactly when"):
        UnifiedRetrieval(model, ivf_cfg)(index, inputs, mask)
    with pytest.raises(ValueError, match="ivf: expected a MainIVF exactly when"):
        UnifiedRetrieval(model, UnifiedConfig(k=12, n_final=5))(index, inputs, mask, ivf=main)
    too_many = UnifiedConfig(k=12, n_final=5, index="ivf", nprobe=CLUSTERS + 1)
    with pytest.raises(ValueError, match="UnifiedConfig.nprobe: expected 1 <= nprobe <= L=4"):
        UnifiedRetrieval(model, too_many)(index, inputs, mask, ivf=main)
    bloom_index = bl.build_bloom_index(features, BLOOM)
    plan = bl.compile_queries(bloom_index, ["genre:1"] * B)
    with pytest.raises(ValueError, match="needs build_main_ivf"):
        UnifiedRetrieval(model, ivf_cfg)(
            index, inputs, mask, ivf=unified_ivf.MainIVF(main.ivf), bloom=(bloom_index, plan)
        )
    other = bl.build_bloom_index(features, bloom_op.BloomConfig(128, 3))
    plan = bl.compile_queries(other, ["genre:1"] * B)
    with pytest.raises(ValueError, match="the sorted Bloom index has"):
        UnifiedRetrieval(model, ivf_cfg)(index, inputs, mask, ivf=main, bloom=(other, plan))
    renamed = bl.ItemFeatures(
        {f"x_{k}": v for k, v in features.codes.items()}, {f"x_{k}": v for k, v in features.vocab.items()}
    )
    other = bl.build_bloom_index(renamed, BLOOM)
    plan = bl.compile_queries(other, ["x_genre:1"] * B)
    with pytest.raises(ValueError, match="the sorted Bloom index covers features"):
        UnifiedRetrieval(model, ivf_cfg)(index, inputs, mask, ivf=main, bloom=(other, plan))
    with pytest.raises(ValueError, match="candidate_fn: expected None"):
        UnifiedRetrieval(model, ivf_cfg, candidate_fn=lambda *a: a)
    merged = fi.merge_fresh(index)
    with pytest.raises(ValueError, match="rebuild it after merge_fresh"):
        UnifiedRetrieval(model, ivf_cfg)(merged, inputs, mask, ivf=main)
