"""k-means and the int8 IVF index (SilverTorch): items stored sorted by cluster, each cluster padded to whole
kernel tiles, probed by inner product with the centroids. This module trains the centroids and builds the
index; the index type (``IVFIndex``), the probe (``probe_clusters``) and the search are ``recjax.ops.ann``.

Letters: N items, D dim, L clusters, B queries, T items per tile (block_n).

k-means: Lloyd iterations (jit, assignments in row chunks so N x L is never materialised) on a random
sample of at most ``sample_per_cluster * L`` items, initialised by k-means++ seeding on at most 32 L of
them; an empty cluster keeps its previous centroid. Deviation: SilverTorch trains k-means offline
(faiss); we train with the library itself, L2 objective, and probe by inner product <q, c> like a faiss
IVF-IP coarse quantizer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from recjax import validation
from recjax.ops import ann, quantize

_ASSIGN_CHUNK = 16384


@dataclass(frozen=True)
class KMeansConfig:
    num_clusters: int
    iterations: int = 10
    sample_per_cluster: int = 256
    seed: int = 0


def _assign_chunk(x_CxD, centroids_LxD):
    # argmin |x - c|^2 = argmax 2 x.c - |c|^2
    sim = 2 * jnp.dot(x_CxD, centroids_LxD.T, preferred_element_type=jnp.float32)
    sim = sim - jnp.sum(centroids_LxD * centroids_LxD, axis=1)[None, :]
    return jnp.argmax(sim, axis=1).astype(jnp.int32)


@jax.jit
def assign_clusters(x_NxD: jax.Array, centroids_LxD: jax.Array) -> jax.Array:
    """Nearest centroid (L2) per row, computed in chunks of rows."""
    n, d = x_NxD.shape
    chunk = min(_ASSIGN_CHUNK, n)
    num = -(-n // chunk)
    x = jnp.pad(x_NxD.astype(jnp.float32), ((0, num * chunk - n), (0, 0)))
    out = jax.lax.map(lambda xc: _assign_chunk(xc, centroids_LxD), x.reshape(num, chunk, d))
    return out.reshape(-1)[:n]


@functools.partial(jax.jit, static_argnames=("iterations",))
def _lloyd(x_NxD, init_LxD, iterations):
    num_clusters = init_LxD.shape[0]

    def step(_, c):
        assign = assign_clusters(x_NxD, c)
        sums = jax.ops.segment_sum(x_NxD, assign, num_segments=num_clusters)
        counts = jax.ops.segment_sum(
            jnp.ones((x_NxD.shape[0],), jnp.float32), assign, num_segments=num_clusters
        )
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], c)

    return jax.lax.fori_loop(0, iterations, step, init_LxD)


@functools.partial(jax.jit, static_argnames=("num_clusters",))
def _kmeans_pp(x_SxD, key, num_clusters):
    """k-means++ seeding: each next centroid drawn with probability proportional to squared distance."""
    s = x_SxD.shape[0]
    first = x_SxD[jax.random.randint(key, (), 0, s)]
    init = jnp.zeros((num_clusters, x_SxD.shape[1]), jnp.float32).at[0].set(first)
    dist = jnp.sum((x_SxD - first) ** 2, axis=1)

    def step(i, carry):
        cents, dist = carry
        pick = jax.random.categorical(jax.random.fold_in(key, i), jnp.log(jnp.maximum(dist, 1e-30)))
        c = x_SxD[pick]
        return cents.at[i].set(c), jnp.minimum(dist, jnp.sum((x_SxD - c) ** 2, axis=1))

    return jax.lax.fori_loop(1, num_clusters, step, (init, dist))[0]


def kmeans(x_NxD: jax.Array, config: KMeansConfig) -> jax.Array:
    """Returns centroids_LxD (float32)."""
    validation.check_shape("x_NxD", x_NxD, (None, None))
    validation.check_dtype("x_NxD", x_NxD, "f")
    validation.check_finite("x_NxD", x_NxD)
    validation.check_positive("num_clusters", config.num_clusters)
    validation.check_positive("iterations", config.iterations, allow_zero=True)
    n = x_NxD.shape[0]
    if config.num_clusters > n:
        raise ValueError(f"num_clusters: expected <= N={n}, got {config.num_clusters}")
    rng = np.random.default_rng(config.seed)
    sample = min(n, config.sample_per_cluster * config.num_clusters)
    sample_ids = rng.choice(n, sample, replace=False)
    x = jnp.asarray(x_NxD, jnp.float32)[sample_ids]
    seed_rows = x[: min(sample, 32 * config.num_clusters)]  # x is a random sample already
    init = _kmeans_pp(seed_rows, jax.random.key(config.seed), config.num_clusters)
    return _lloyd(x, init, config.iterations)


def build_ivf_index(items_NxD: jax.Array, centroids_LxD: jax.Array, *, block_n: int = 64) -> ann.IVFIndex:
    """Quantizes the items (per-item scales), assigns them to the nearest centroid and lays them out sorted
    by cluster, each cluster padded to a multiple of ``block_n`` rows."""
    validation.check_shape("centroids_LxD", centroids_LxD, (None, np.shape(items_NxD)[1]))
    validation.check_finite("centroids_LxD", centroids_LxD)
    if block_n % 32 or block_n & (block_n - 1):
        raise ValueError(f"block_n: expected a power of two >= 32, got {block_n}")
    q = quantize.quantize_items(items_NxD)  # validates items (shape, dtype, NaN)
    n = q.num_rows
    assign_N = assign_clusters(jnp.asarray(items_NxD, jnp.float32), jnp.asarray(centroids_LxD, jnp.float32))
    num_clusters = centroids_LxD.shape[0]
    counts = np.asarray(jnp.bincount(assign_N, length=num_clusters))
    tiles = -(-counts // block_n)
    tile_start = np.cumsum(tiles) - tiles
    rows = int(tiles.sum()) * block_n
    order = jnp.argsort(assign_N, stable=True)
    sorted_c = assign_N[order]
    starts = jnp.asarray(np.cumsum(counts) - counts)
    rank = jnp.arange(n) - starts[sorted_c]
    row_sorted = jnp.asarray(tile_start)[sorted_c] * block_n + rank
    sorted_row_N = jnp.zeros((n,), jnp.int32).at[order].set(row_sorted.astype(jnp.int32))
    values = jnp.zeros((rows, q.dim), jnp.int8).at[sorted_row_N].set(q.values_NxD)
    scales = jnp.ones((rows,), jnp.float32).at[sorted_row_N].set(q.scales_N)
    ids = jnp.full((rows,), -1, jnp.int32).at[sorted_row_N].set(jnp.arange(n, dtype=jnp.int32))
    return ann.IVFIndex(
        centroids_LxD=jnp.asarray(centroids_LxD, jnp.float32),
        items=quantize.Int8Embeddings(values, scales),
        ids_sorted=ids,
        tile_start_L=jnp.asarray(tile_start, jnp.int32),
        num_tiles_L=jnp.asarray(tiles, jnp.int32),
        sorted_row_N=sorted_row_N,
        block_n=block_n,
        max_tiles=int(tiles.max()),
        num_items=n,
    )
