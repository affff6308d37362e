"""Fused Int8 ANN kernel (interpret mode on CPU) against the exact int32 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import int8_ann


def _random_int8(rng, b, n, d):
    q = rng.integers(-127, 128, (b, d)).astype(np.int8)
    qs = rng.uniform(0.5, 2.0, b).astype(np.float32)
    items = rng.integers(-127, 128, (n, d)).astype(np.int8)
    s = rng.uniform(0.5, 2.0, n).astype(np.float32)
    return q, qs, items, s


def _random_mask(rng, b, n, p_keep):
    bits = rng.random((b, -(-n // 32) * 32)) < p_keep
    return np.packbits(bits.reshape(b, -1, 32)[:, :, ::-1], axis=-1).view(">u4")[..., 0].astype(
        np.uint32
    ), bits[:, :n]


def _check(vals, ids, q, qs, items, s, allowed_BxN, k, *, exact: bool):
    vals, ids = np.asarray(vals), np.asarray(ids)
    scores = np.asarray(int8_ann.int8_scores_reference(q, items, s)) * qs[:, None]
    scores = np.where(allowed_BxN, scores, -np.inf)
    ref = -np.sort(-scores, axis=1)[:, :k]
    ref = np.pad(ref, ((0, 0), (0, k - ref.shape[1])), constant_values=-np.inf)  # k > N: -inf padding
    assert vals.shape == ids.shape == (q.shape[0], k)
    finite = np.where(np.isneginf(vals), np.finfo(np.float32).min, vals)
    assert (np.diff(finite, axis=1) <= 0).all()
    pad = np.isneginf(vals)
    assert ((ids == -1) == pad).all()
    assert (pad.sum(1) == np.maximum(k - allowed_BxN.sum(1), 0)).all()
    for r in range(q.shape[0]):
        got = ids[r][~pad[r]]
        assert len(set(got.tolist())) == len(got)
        np.testing.assert_array_equal(
            scores[r, got], vals[r][~pad[r]]
        )  # each score is its item's exact score
    if exact:
        np.testing.assert_array_equal(vals, ref)


@pytest.mark.parametrize("n,d,b", [(300, 24, 5), (257, 64, 19)])
def test_brute_exact_matches_reference_with_and_without_mask(rng, n, d, b):
    q, qs, items, s = _random_int8(rng, b, n, d)
    k = 9
    vals, ids = int8_ann.int8_ann_topk(
        q, qs, items, s, k=k, block_q=16, block_n=32, tiles_per_chunk=2, interpret=True
    )
    _check(vals, ids, q, qs, items, s, np.ones((b, n), bool), k, exact=True)
    rv, ri = int8_ann.int8_ann_reference(q, qs, items, s, k=k)
    np.testing.assert_array_equal(np.asarray(vals), np.asarray(rv))

    words, allowed = _random_mask(rng, b, n, 0.3)
    vals, ids = int8_ann.int8_ann_topk(
        q, qs, items, s, jnp.asarray(words), k=k, block_q=16, block_n=32, tiles_per_chunk=2, interpret=True
    )
    _check(vals, ids, q, qs, items, s, allowed, k, exact=True)
    rv, _ = int8_ann.int8_ann_reference(q, qs, items, s, jnp.asarray(words), k=k)
    np.testing.assert_array_equal(np.asarray(vals), np.asarray(rv))


def test_k_larger_than_allowed_items_pads_and_empty_filter(rng):
    b, n, d, k = 4, 200, 32, 20
    q, qs, items, s = _random_int8(rng, b, n, d)
    allowed = np.zeros((b, n), bool)
    allowed[0, rng.choice(n, 5, replace=False)] = True  # fewer than k
    allowed[1, rng.choice(n, 60, replace=False)] = True
    # row 2 empty filter, row 3 everything
    allowed[3] = True
    padded = np.zeros((b, 224), bool)
    padded[:, :n] = allowed
    words = np.packbits(padded.reshape(b, -1, 32)[:, :, ::-1], axis=-1).view(">u4")[..., 0].astype(np.uint32)
    vals, ids = int8_ann.int8_ann_topk(
        q, qs, items, s, jnp.asarray(words), k=k, block_q=16, block_n=32, tiles_per_chunk=2, interpret=True
    )
    _check(vals, ids, q, qs, items, s, allowed, k, exact=True)
    assert (np.asarray(ids)[2] == -1).all() and np.isneginf(np.asarray(vals)[2]).all()
    assert (np.asarray(ids)[0, 5:] == -1).all()


def test_large_k_and_binned_selection_recall(rng):
    b, n, d = 16, 2300, 32
    q, qs, items, s = _random_int8(rng, b, n, d)
    k = 1024
    vals, ids = int8_ann.int8_ann_topk(
        q, qs, items, s, k=k, block_q=16, block_n=128, tiles_per_chunk=2, interpret=True
    )
    _check(vals, ids, q, qs, items, s, np.ones((b, n), bool), k, exact=True)
    # bins of 8 items keeping 2: approximate, but every result is a true (item, score) pair, high recall
    k = 10
    vals, ids, exact_b = int8_ann.int8_ann_topk(
        q, qs, items, s, k=k, block_q=16, block_n=32, tiles_per_chunk=8, return_exact=True, interpret=True
    )
    _check(vals, ids, q, qs, items, s, np.ones((b, n), bool), k, exact=False)
    _, ref_ids = int8_ann.int8_ann_reference(q, qs, items, s, k=k)
    recall = np.mean(
        [len(set(a) & set(r)) / k for a, r in zip(np.asarray(ids), np.asarray(ref_ids), strict=True)]
    )
    assert recall >= 0.8
    # the certificate is sound: certified rows carry exactly the reference scores
    ref_vals, _ = int8_ann.int8_ann_reference(q, qs, items, s, k=k)
    cert = np.asarray(exact_b)
    assert cert.sum() >= b // 2  # most rows certified with 230 bins for k=10
    np.testing.assert_array_equal(np.asarray(vals)[cert], np.asarray(ref_vals)[cert])


def test_ivf_matches_reference_restricted_to_probed_clusters(rng):
    b, d, block_n, num_clusters, nprobe, k = 6, 32, 32, 5, 2, 12
    sizes = rng.integers(0, 3 * block_n // 2 + 1, num_clusters)  # some empty, some over one tile
    sizes[0] = 40
    n = int(sizes.sum())
    q, qs, items, s = _random_int8(rng, b, n, d)
    cluster_N = np.repeat(np.arange(num_clusters), sizes)
    tiles = -(-sizes // block_n)
    tile_start = np.cumsum(tiles) - tiles
    rows = int(tiles.sum()) * block_n
    ids_sorted = np.full(rows, -1, np.int32)
    for c in range(num_clusters):
        r0 = tile_start[c] * block_n
        ids_sorted[r0 : r0 + sizes[c]] = np.flatnonzero(cluster_N == c)
    real = ids_sorted >= 0
    items_sorted = np.zeros((rows, d), np.int8)
    items_sorted[real] = items[ids_sorted[real]]
    s_sorted = np.ones(rows, np.float32)
    s_sorted[real] = s[ids_sorted[real]]
    probes = np.stack([rng.choice(num_clusters, nprobe, replace=False) for _ in range(b)]).astype(np.int32)
    probes[0] = [0, 1]
    # per-(query, probe) mask over the probed cluster's words
    keep_BxN = rng.random((b, n)) < 0.5
    v = int(tiles.max()) * block_n // 32
    bits = np.zeros((b, nprobe, v * 32), bool)
    for r in range(b):
        for j, c in enumerate(probes[r]):
            members = np.flatnonzero(cluster_N == c)
            bits[r, j, : len(members)] = keep_BxN[r, members]
    words = (
        np.packbits(bits.reshape(b, nprobe, v, 32)[..., ::-1], axis=-1).view(">u4")[..., 0].astype(np.uint32)
    )

    def search(mask, k):
        layout = (items_sorted, s_sorted, ids_sorted, tile_start.astype(np.int32), tiles.astype(np.int32))
        return int8_ann.int8_ivf_topk(
            q, qs, probes, *layout, mask, k=k, block_q=16, block_n=block_n, interpret=True
        )

    for use_mask in (False, True):
        vals, ids = search(jnp.asarray(words) if use_mask else None, k)
        allowed = np.stack([np.isin(cluster_N, probes[r]) for r in range(b)])
        if use_mask:
            allowed &= keep_BxN
        _check(vals, ids, q, qs, items, s, allowed, k, exact=True)
    # k above the candidates of 2 probes (2 x 32 columns x 2 slots = 128): padded with -inf / -1
    vals, ids = search(None, 150)
    allowed = np.stack([np.isin(cluster_N, probes[r]) for r in range(b)])
    _check(vals, ids, q, qs, items, s, allowed, 150, exact=True)


def test_padded_dim_rejects_unsupported():
    assert int8_ann.padded_dim(24) == 32 and int8_ann.padded_dim(128) == 128
    with pytest.raises(ValueError, match="d: expected"):
        int8_ann.padded_dim(2048)


@pytest.mark.parametrize("d", [1024, 1025])  # the float32 GEMM's last exact width, and the int32 path
def test_scores_reference_is_exact_at_extreme_int8_values(d):
    rng = np.random.default_rng(0)
    q = rng.choice(np.array([-128, 127], np.int8), (3, d))
    q[0] = -128  # all-min row against an all-min item: |dot| = 128^2 d, the largest an int8 dot can be
    items = rng.choice(np.array([-128, 127], np.int8), (5, d))
    items[0] = -128
    want = q.astype(np.int64) @ items.astype(np.int64).T
    ref = lambda q, i: int8_ann.int8_scores_reference(q, i, jnp.ones(5, jnp.float32))  # noqa: E731
    got = ref(jnp.asarray(q), jnp.asarray(items))
    # the reference returns float32 scores: exact int32 dots, rounded once to float32
    np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))
    jaxpr = str(jax.make_jaxpr(ref)(jnp.asarray(q), jnp.asarray(items)))
    assert ("preferred_element_type=int32" in jaxpr) == (d > 1024)  # which branch ran
