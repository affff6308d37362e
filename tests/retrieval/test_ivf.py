"""k-means and the sorted/padded IVF layout."""

import numpy as np
import pytest

from recjax.ops import ann
from recjax.retrieval import ivf


def test_kmeans_recovers_separated_clusters(rng):
    centers = rng.normal(size=(4, 8)).astype(np.float32) * 20
    x = (centers[rng.integers(0, 4, 400)] + rng.normal(size=(400, 8))).astype(np.float32)
    c = np.asarray(
        ivf.kmeans(x, ivf.KMeansConfig(num_clusters=4, iterations=8, seed=int(rng.integers(1 << 30))))
    )
    # every true center has a learned centroid close to it (k-means++ seeding separates them)
    d = np.linalg.norm(centers[:, None] - c[None], axis=-1).min(1)
    assert (d < 1).all()


def test_ivf_index_layout(rng):
    n, d, block_n = 150, 16, 32
    x = rng.normal(size=(n, d)).astype(np.float32)
    cents = x[rng.choice(n, 6, replace=False)]
    index = ivf.build_ivf_index(x, cents, block_n=block_n)
    assign = np.asarray(ivf.assign_clusters(x, cents))
    ids = np.asarray(index.ids_sorted)
    starts, tiles = np.asarray(index.tile_start_L), np.asarray(index.num_tiles_L)
    assert ids.shape[0] == tiles.sum() * block_n and sorted(ids[ids >= 0].tolist()) == list(range(n))
    for c in range(6):
        seg = ids[starts[c] * block_n : (starts[c] + tiles[c]) * block_n]
        members = seg[seg >= 0]
        assert (assign[members] == c).all() and len(members) == (assign == c).sum()
    rows = np.asarray(index.sorted_row_N)
    np.testing.assert_array_equal(ids[rows], np.arange(n))
    np.testing.assert_array_equal(np.asarray(index.items.values_NxD)[ids < 0], 0)
    probes = np.asarray(ann.probe_clusters(x[:3], cents, 2))
    assert probes.shape == (3, 2) and (probes[:, 0] != probes[:, 1]).all()


def test_ivf_rejects_bad_input(rng):
    x = rng.normal(size=(10, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="num_clusters: expected <= N"):
        ivf.kmeans(x, ivf.KMeansConfig(num_clusters=11))
    with pytest.raises(ValueError, match="centroids_LxD: expected shape"):
        ivf.build_ivf_index(x, np.ones((2, 5), np.float32))
    x[1, 1] = np.nan
    with pytest.raises(ValueError, match="expected finite"):
        ivf.kmeans(x, ivf.KMeansConfig(num_clusters=2))
