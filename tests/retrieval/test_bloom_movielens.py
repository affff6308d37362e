"""Bloom filtering on real MovieLens-1M item features (genres, release-year bucket) vs the exact filter."""

import numpy as np
import pytest

from recjax.ops import ann, quantize
from recjax.ops import bloom as bloom_op
from recjax.retrieval import bloom

QUERIES = [
    "genres:Comedy AND NOT genres:Horror",
    "(genres:Sci-Fi OR genres:Fantasy) AND (year_bucket:9 OR year_bucket:10)",
    "genres:Children's AND genres:Animation",
    "genres:Film-Noir OR genres:Western OR genres:War",
    "year_bucket:1",
]


@pytest.fixture(scope="module")
def ml1m_features(data_dir):
    from recjax.data import movielens

    ds = movielens.load_ml1m_sequential(data_dir)
    feats = {k: v[1:] for k, v in ds.item_features.items()}  # drop the padding row: item id i -> row i - 1
    return bloom.features_from_multi_hot(feats, {"genres": movielens.GENRES})


def test_movielens_bloom_no_false_negatives_and_low_fpr(ml1m_features):
    n = ml1m_features.num_items
    assert n == 3416
    config = bloom_op.BloomConfig(bits_per_item=64, num_hashes=3)
    index = bloom.build_bloom_index(ml1m_features, config)
    plan = bloom.compile_queries(index, QUERIES, not_mode="superset")
    got = bloom.unpack_words(bloom_op.filter_words(index, plan, impl="pallas"), n)
    for i, q in enumerate(QUERIES):
        exact = bloom.exact_filter(ml1m_features, q)
        assert exact.any() and not (exact & ~got[i]).any(), q
    # per-term FPR on absent values, against the analytic rate for the largest item (<= 6 genres + year)
    absent = bloom.compile_queries(index, [f"genres:NotAGenre{j}" for j in range(30)])
    fpr = bloom.unpack_words(bloom_op.filter_words(index, absent, impl="reference"), n).mean()
    assert fpr <= bloom.analytic_term_fpr(config, index.max_terms_per_item)


def test_movielens_filtered_retrieval_matches_exact_filter(ml1m_features, rng):
    n = ml1m_features.num_items
    index = bloom.build_bloom_index(ml1m_features, bloom_op.BloomConfig(bits_per_item=256, num_hashes=4))
    plan = bloom.compile_queries(index, QUERIES[1:4])
    items = quantize.quantize_items(rng.normal(size=(n, 16)).astype(np.float32))
    queries = rng.normal(size=(3, 16)).astype(np.float32)
    k = 20
    _, ids = ann.filtered_search(queries, items, k, index, plan, impl="pallas", exact=True)
    ids = np.asarray(ids)
    for r, q in enumerate(QUERIES[1:4]):
        exact = bloom.exact_filter(ml1m_features, q)
        want = ann.int8_search(queries[r : r + 1], items, k, mask_BxW=ann.pack_mask(exact[None]), impl="xla")[
            1
        ]
        want = np.asarray(want)[0]
        got = ids[r][ids[r] >= 0]
        assert exact[got].mean() >= 0.9  # Bloom false positives may take a few slots
        assert len(set(got) & set(want[want >= 0])) >= 0.9 * len(want[want >= 0])
