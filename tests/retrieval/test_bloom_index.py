"""Bloom index: parsing, compilation, no false negatives for AND/OR, FPR vs the analytic rate, NOT modes."""

import numpy as np
import pytest

from recjax.ops import bloom as bloom_op
from recjax.retrieval import bloom


def _features(rng, n):
    genre = rng.integers(0, 18, (n, 3))
    genre[rng.random((n, 3)) < 0.3] = -1
    year = rng.integers(1990, 2000, (n, 1))
    return bloom.item_features({"genre": genre, "year": year})


QUERIES = [
    "genre:3 AND (year:1995 OR year:1996)",
    "genre:1 or genre:2 or genre:17",
    "(genre:4 OR genre:5) AND (year:1991 OR year:1992 OR genre:9) AND genre:0",
    "",
    "year:2050",
    "NOT genre:2",
    "genre:1 OR genre:2 AND NOT (year:1991 OR genre:7)",
]


def test_and_or_queries_have_no_false_negatives_and_pallas_matches_reference(rng):
    n = 700  # not a multiple of 32
    feats = _features(rng, n)
    index = bloom.build_bloom_index(feats, bloom_op.BloomConfig(bits_per_item=48, num_hashes=3))
    for mode in ("bloom", "superset"):
        plan = bloom.compile_queries(index, QUERIES, not_mode=mode)
        words = bloom_op.filter_words(index, plan, impl="pallas")
        np.testing.assert_array_equal(
            np.asarray(words), np.asarray(bloom_op.filter_words(index, plan, impl="reference"))
        )
        got = bloom.unpack_words(words, n)
        for i, q in enumerate(QUERIES):
            exact = bloom.exact_filter(feats, q)
            if "NOT" not in q or mode == "superset":
                assert not (exact & ~got[i]).any(), (q, mode)  # no false negatives
            assert (got[i] & ~exact).mean() < 0.2
    assert bloom.unpack_words(words, n)[3].all() and bloom.exact_filter(feats, "").all()


def test_term_false_positive_rate_within_analytic_bound(rng):
    n, terms, vocab = 4096, 8, 1000
    tags = np.argsort(rng.random((n, vocab)), axis=1)[:, :terms]
    feats = bloom.item_features({"tag": tags})
    config = bloom_op.BloomConfig(bits_per_item=64, num_hashes=3)
    index = bloom.build_bloom_index(feats, config)
    absent = [f"tag:{v}" for v in range(vocab, vocab + 40)]  # values no item has
    plan = bloom.compile_queries(index, absent)
    got = bloom.unpack_words(bloom_op.filter_words(index, plan, impl="reference"), n)
    measured = got.mean()
    bound = bloom.analytic_term_fpr(config, terms)
    assert 0.3 * bound < measured <= bound * 1.15 + 0.003, (measured, bound)
    present = bloom.compile_queries(index, [f"tag:{v}" for v in range(40)])
    got = bloom.unpack_words(bloom_op.filter_words(index, present, impl="reference"), n)
    for i in range(40):
        assert got[i][(tags == i).any(1)].all()


def test_not_false_negatives_bounded_and_superset_mode(rng):
    n = 2048
    tags = rng.integers(0, 50, (n, 6))
    feats = bloom.item_features({"tag": tags})
    index = bloom.build_bloom_index(feats, bloom_op.BloomConfig(bits_per_item=32, num_hashes=2))
    q = ["NOT tag:3"]
    exact = bloom.exact_filter(feats, q[0])
    strict = bloom.unpack_words(
        bloom_op.filter_words(index, bloom.compile_queries(index, q), impl="reference"), n
    )[0]
    superset_plan = bloom.compile_queries(index, q, not_mode="superset")
    superset = bloom.unpack_words(bloom_op.filter_words(index, superset_plan, impl="reference"), n)[0]
    assert not (strict & ~exact).any()  # NOT(test) never admits an item that has the value
    assert (exact & ~strict).mean() <= 2 * bloom.analytic_term_fpr(index.config, 6) + 0.01
    assert superset.all()  # negated literal -> TRUE: no false negatives


def test_probed_filter_matches_full_filter_on_ivf_layout(rng):
    n, block_n = 300, 32
    feats = _features(rng, n)
    sizes = np.array([70, 0, 100, 130])
    tiles = -(-sizes // block_n)
    tile_start = np.cumsum(tiles) - tiles
    order = np.full(int(tiles.sum()) * block_n, -1)
    perm = rng.permutation(n)
    pos = 0
    for c, s in enumerate(sizes):
        order[tile_start[c] * block_n : tile_start[c] * block_n + s] = perm[pos : pos + s]
        pos += s
    v = int(tiles.max()) * block_n // 32
    index = bloom.build_bloom_index(feats, bloom_op.BloomConfig(64, 3), item_order=order, pad_words=v)
    plan = bloom.compile_queries(index, QUERIES[:3])
    probes = np.array([[0, 2], [3, 1], [2, 3]], np.int32)
    probed = bloom_op.filter_words_probed(
        index, plan, probes, tile_start, block_n=block_n, max_tiles=int(tiles.max()), impl="pallas"
    )
    full = bloom.unpack_words(bloom_op.filter_words(index, plan, impl="reference"), len(order))
    bits = bloom.unpack_words(probed, v * 32)
    for b in range(3):
        for j, c in enumerate(probes[b]):
            r0 = tile_start[c] * block_n
            np.testing.assert_array_equal(bits[b, j, : sizes[c]], full[b, r0 : r0 + sizes[c]])


@pytest.mark.parametrize(
    "query,pos",
    [
        ("genre:1 AND", 11),
        ("genre:1 (", 8),
        ("(genre:1", 8),
        ("foo:1", 0),
        ("genre1", 0),
        ("genre:1 OR OR genre:2", 11),
        ("genre:1 AND )", 12),
    ],
)
def test_malformed_queries_name_the_position(rng, query, pos):
    index = bloom.build_bloom_index(_features(rng, 40), bloom_op.BloomConfig(32, 2))
    with pytest.raises(bloom.BloomQueryError, match=f"at position {pos}"):
        bloom.compile_queries(index, [query])


def test_bad_config_and_plan_shape(rng):
    feats = _features(rng, 40)
    with pytest.raises(ValueError, match="bits_per_item: expected > 0"):
        bloom.build_bloom_index(feats, bloom_op.BloomConfig(0, 2))
    index = bloom.build_bloom_index(feats, bloom_op.BloomConfig(32, 2))
    with pytest.raises(bloom.BloomQueryError, match="plan shape"):
        bloom.compile_queries(index, ["genre:1 AND genre:2 AND genre:3"], max_clauses=2)
    with pytest.raises(ValueError, match="not_mode"):
        bloom.compile_queries(index, ["genre:1"], not_mode="exact")


def test_two_stage_evaluation_equals_single_stage(rng):
    n = 500
    feats = _features(rng, n)
    index = bloom.build_bloom_index(feats, bloom_op.BloomConfig(bits_per_item=48, num_hashes=3))
    batch = QUERIES + [QUERIES[0], "genre:3 OR genre:4", "genre:3 AND year:1995"]  # shared terms
    plan = bloom.compile_queries(index, batch)
    assert plan.num_distinct_terms < np.prod(plan.kinds_BxCxT.shape)
    two = bloom_op.filter_words(index, plan, impl="pallas", two_stage=True)
    np.testing.assert_array_equal(
        np.asarray(two), np.asarray(bloom_op.filter_words(index, plan, impl="reference"))
    )
