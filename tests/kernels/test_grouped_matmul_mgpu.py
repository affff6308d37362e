"""Mosaic GPU grouped GEMM in GPU interpret mode (CPU) against the plain-JAX reference, its tile schedule,
its input checks, and its lowering for CUDA (Mosaic GPU lowering + layout inference run on CPU)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import grouped_matmul as gm
from pallas_kernels import grouped_matmul_mgpu as mg

K, N = 128, 128
TILES = mg.MgpuTiles(bm=64, bn=64, bk=64, max_concurrent_steps=2, grid_tile_width=2)
WS_TILES = mg.MgpuTiles(bm=64, bn=128, bk=64, max_concurrent_steps=2, grid_tile_width=2, compute_wgs=2)


def _sizes(rng, kind, m, g):
    if kind == "random_with_empty":  # a few empty groups anywhere, all rows used
        cuts = np.sort(rng.integers(0, m + 1, size=g - 1))
        sizes = np.diff(np.concatenate([[0], cuts, [m]]))
        sizes[rng.permutation(g)[:2]] = 0
        sizes[-1] += m - sizes.sum()
    elif kind == "one_group_all_rows":
        sizes = np.zeros(g, np.int64)
        sizes[rng.integers(g)] = m
    elif kind == "partial_total":  # sum < M and not a multiple of the tile: the tail rows come out zero
        total = int(rng.integers(m // 2, m - 3))
        total -= total % TILES.bm == 0
        cuts = np.sort(rng.integers(0, total + 1, size=g - 1))
        sizes = np.diff(np.concatenate([[0], cuts, [total]]))
    elif kind == "empty_ends":  # empty first and last groups, small groups inside one row tile
        sizes = np.zeros(g, np.int64)
        sizes[1:-1] = rng.integers(1, 9, size=g - 2)
        sizes[g // 2] += m - sizes.sum()
    elif kind == "aligned_then_ragged":  # tiles inside one group (stored straight) next to boundary tiles
        sizes = np.asarray([2 * TILES.bm, TILES.bm, 0, m - 3 * TILES.bm - 5] + [0] * (g - 4))
    else:
        raise ValueError(kind)
    assert sizes.min() >= 0 and sizes.sum() <= m
    return jnp.asarray(sizes, jnp.int32)


@pytest.mark.parametrize(
    "kind,m,g,dtype,tiles",
    [
        ("random_with_empty", 256, 6, jnp.bfloat16, TILES),
        ("one_group_all_rows", 192, 4, jnp.bfloat16, TILES),
        ("partial_total", 200, 5, jnp.bfloat16, TILES),  # M not a multiple of bm (padded in the wrapper)
        ("empty_ends", 130, 7, jnp.float16, TILES),
        ("aligned_then_ragged", 300, 4, jnp.bfloat16, TILES),
        ("random_with_empty", 200, 5, jnp.bfloat16, WS_TILES),  # warp-specialised, 2 compute warpgroups
    ],
    ids=[
        "random_with_empty",
        "one_group_all_rows",
        "partial_total",
        "empty_ends_f16",
        "aligned_then_ragged",
        "ws_random_with_empty",
    ],
)
def test_matches_reference(rng, kind, m, g, dtype, tiles):
    n = tiles.bn
    x = jnp.asarray(rng.normal(size=(m, K)), dtype)
    w = jnp.asarray(rng.normal(size=(g, K, n)) / np.sqrt(K), dtype)
    sizes = _sizes(rng, kind, m, g)
    y = mg.grouped_matmul_mgpu(x, w, sizes, tiles=tiles, interpret=True)
    assert y.shape == (m, n) and y.dtype == dtype
    ref = np.asarray(gm.grouped_matmul_reference(x, w, sizes))
    y = np.asarray(y, np.float32)
    np.testing.assert_allclose(y, ref, atol=2e-2 * np.abs(ref).max(), rtol=1e-2)
    total = int(sizes.sum())
    assert (y[total:] == 0).all()  # rows past the groups are exactly zero
    assert (np.abs(y[:total]).max(axis=1) > 0).all()  # and every owned row is written


@pytest.mark.parametrize(
    "kind", ["random_with_empty", "one_group_all_rows", "partial_total", "empty_ends", "aligned_then_ragged"]
)
def test_tile_schedule_covers_each_row_once(rng, kind):
    m, g, bm = 200, 7, 16
    sizes = _sizes(rng, kind, m, g)
    tile_groups, bounds = (np.asarray(a) for a in mg.tile_schedule(sizes, m, bm))
    group_of_row = np.full(m, -1)  # -1: a row past the last group, owned by nobody
    group_of_row[: int(sizes.sum())] = np.repeat(np.arange(g), np.asarray(sizes))
    for t, (first, count) in enumerate(tile_groups):
        rows = np.arange(t * bm, min(t * bm + bm, m))
        owner = np.full(len(rows), -1)
        for gg in range(first, first + count):
            mine = (rows >= bounds[gg, 0]) & (rows < bounds[gg, 1])
            assert (owner[mine] == -1).all()
            owner[mine] = gg
        np.testing.assert_array_equal(owner, group_of_row[rows])


@pytest.mark.parametrize("tiles", [mg.MgpuTiles(), mg.WS_TILES], ids=["v1_128x128", "ws_128x256"])
def test_lowers_for_cuda_at_hopper_tiles(tiles):
    """The benchmarked tiles at a small ragged shape lower through Mosaic GPU (layout inference and dialect
    lowering included) for CUDA without a GPU; PTX compilation itself only happens on the card."""
    x = jax.ShapeDtypeStruct((1000, 256), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4, 256, 256), jnp.bfloat16)
    s = jax.ShapeDtypeStruct((4,), jnp.int32)
    tiles = dataclasses.replace(tiles, num_ctas=132)
    fn = jax.jit(lambda x, w, s: mg.grouped_matmul_mgpu(x, w, s, tiles=tiles))
    text = fn.trace(x, w, s).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_bad_inputs(rng):
    x = jnp.asarray(rng.normal(size=(64, K)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(2, K, N)), jnp.bfloat16)
    sizes = jnp.asarray([30, 34], jnp.int32)
    run = mg.grouped_matmul_mgpu
    with pytest.raises(TypeError, match="x_MxK: expected bfloat16 or float16"):
        run(x.astype(jnp.float32), w.astype(jnp.float32), sizes, tiles=TILES, interpret=True)
    with pytest.raises(TypeError, match="w_GxKxN: expected x's dtype"):
        run(x, w.astype(jnp.float16), sizes, tiles=TILES, interpret=True)
    with pytest.raises(ValueError, match=r"w_GxKxN: expected shape \(G, 128, N\)"):
        run(x, w[:, :64], sizes, tiles=TILES, interpret=True)
    with pytest.raises(ValueError, match=r"group_sizes_G: expected shape \(2,\)"):
        run(x, w, sizes[:1], tiles=TILES, interpret=True)
    with pytest.raises(TypeError, match="group_sizes_G: expected an integer dtype"):
        run(x, w, sizes.astype(jnp.float32), tiles=TILES, interpret=True)
    with pytest.raises(ValueError, match="K: expected a multiple of bk=64"):
        run(x[:, :96], w[:, :96], sizes, tiles=TILES, interpret=True)
    with pytest.raises(ValueError, match="N: expected a multiple of bn=64"):
        run(x, w[:, :, :96], sizes, tiles=TILES, interpret=True)
    with pytest.raises(ValueError, match="x_MxK: expected 2 dims"):
        run(x[None], w, sizes, tiles=TILES, interpret=True)
    big = mg.MgpuTiles(bm=256, bn=256, bk=64, max_concurrent_steps=4)
    with pytest.raises(ValueError, match="shared memory"):
        run(x, jnp.zeros((2, K, 256), jnp.bfloat16), sizes, tiles=big, interpret=True)
    with pytest.raises(ValueError, match="compute_wgs 1, or 2 with bn % 128"):
        run(x, w, sizes, tiles=mg.MgpuTiles(bm=64, bn=64, compute_wgs=2), interpret=True)


def test_ops_dispatch_mosaic(rng):
    """recjax.ops.grouped_matmul(impl="mosaic") reaches this kernel (interpret mode off a GPU)."""
    from recjax.ops import grouped_matmul as ops  # noqa: PLC0415 - the op layer, only for this test

    m, g = 96, 3
    x = jnp.asarray(rng.normal(size=(m, K)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(g, K, N)) / np.sqrt(K), jnp.bfloat16)
    sizes = jnp.asarray([40, 0, 50], jnp.int32)
    y = np.asarray(ops.grouped_matmul(x, w, sizes, impl="mosaic", mosaic_tiles=TILES), np.float32)
    ref = np.asarray(ops.grouped_matmul(x, w, sizes, impl="reference"))
    np.testing.assert_allclose(y, ref, atol=2e-2 * np.abs(ref).max(), rtol=1e-2)


def test_bench_tile_spec():
    """The benchmark's --mosaic-tiles / mosaic:SPEC syntax (the GPU command depends on it)."""
    from experiments.bench import moe as moe_bench  # noqa: PLC0415

    assert moe_bench.parse_mosaic_tiles("128x256x64s3c2") == mg.WS_TILES
    assert moe_bench.parse_mosaic_tiles("128x128x64") == mg.MgpuTiles()
    with pytest.raises(ValueError, match="--mosaic-tiles: expected"):
        moe_bench.parse_mosaic_tiles("128x128")
