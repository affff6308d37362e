"""Grouped GEMM for Hopper in Mosaic GPU (Pallas ``plgpu``): TMA tile loads, a multi-stage pipeline, wgmma.

Letters: M rows of x, K contraction, N output columns, G groups; Tm = ceil(M / bm) row tiles, Tn = N / bn.

``y[rows of group g] = x[rows of g] @ w[g]``: the rows of x_MxK come in consecutive groups of sizes
``group_sizes_G`` (sorted by group, as after an expert sort; empty groups allowed; rows past the last group
give zeros). bf16 (or f16) in, float32 accumulation, x's dtype out.

Design:
- Row-tile ownership instead of per-(group, tile) work items: each (row tile, column tile) pair is one work
  item, owned by one CTA, written once by one TMA store. A row tile that straddles a group boundary loops
  over the groups it touches (``tile_groups_Tmx2`` from a plain-JAX prologue: first group, count); for
  each group it runs the whole K pipeline into a fresh wgmma accumulator and merges only that group's rows
  into the output tile in shared memory (a select on a row iota). So there are no overlapping stores, no
  masked TMA, and rows belonging to no group come out as zeros. Work = (Tm + boundaries) x Tn tile
  GEMMs, the same count as the usual "one item per (group, tile)" schedule; an aligned group (the micro:
  512 rows per expert) costs nothing extra.
- Persistent grid: one CTA per SM, ``plgpu.nd_loop`` strides over the Tm x Tn work items, ordered by
  ``plgpu.planar_snake`` (N minor, in bands of ``grid_tile_width`` column tiles) so the CTAs in flight share
  x row tiles and w[g] column bands in L2.
- Operand tiles: (bm, bk) of x and (bk, bn) of w[g] by TMA into 128-byte-swizzled shared memory, wgmma
  straight from shared memory into a float32 register accumulator.
- ``compute_wgs=1`` (v1, ``MgpuTiles()``, 128x128x64, 4 stages): one warpgroup runs ``plgpu.emit_pipeline``
  (TMA issue + wgmma); one async wgmma in flight, its buffers released a step late (``delay_release=1``);
  two output tiles in SMEM so the TMA store of item i overlaps item i + 1.
- ``compute_wgs=2`` (``WS_TILES``, 128x256x64, 3 stages): ``plgpu.emit_pipeline_warp_specialized``, a
  third warpgroup only issues TMA loads (40 registers) and runs ahead into the next group / item while the
  two wgmma warpgroups (bn/2 = 128 columns each, 128 accumulator registers) finish their epilogue.
- Epilogue: accumulator -> bf16 -> swizzled SMEM tile -> TMA store; a tile inside one group (the common
  case) is stored as is, a boundary tile is zero-filled first and each group's rows are selected into it.
- M not a multiple of bm: x is padded to whole row tiles in the wrapper (one copy of x) and the output
  sliced back; the micro shape (M = 32768) needs neither.

Not done (still only in the Triton kernels of ``grouped_matmul.py``): gathering rows by token index (TMA
cannot gather rows on Hopper; this kernel wants x already permuted into group order), the fused SwiGLU /
two-accumulator up projection, the weighted scatter combine, the backward (transposed grouped GEMM for
weight gradients); so the MoE layer does not use this kernel yet. Also not done: clusters / TMA multicast of
the shared w tile, a pipeline carried across work items (``pipeline_state``: no refill bubble per item),
async wgmma in the warp-specialised variant, a K / N tail (K and N must be multiples of bk and bn),
autotuning. Measured once on an H200 (benchmarks/RESULTS.md, "Mosaic GPU grouped GEMM"): correct on the
card (ragged groups checked with the warp-specialised tiles; v1 only on the tile-aligned micro), 274 TFLOP/s
(warp-specialised) and 319 (v1) = 42% / 49% of torch._grouped_mm, below the Triton kernel's 64%.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
SMEM_LIMIT = 227 * 1024  # opt-in shared memory per block on H100 / H200


@dataclasses.dataclass(frozen=True)
class MgpuTiles:
    """bm x bn output tile per work item (each compute warpgroup holds a bm x bn/compute_wgs float32
    accumulator: bm*bn/(128*compute_wgs) registers per thread), bk contraction step, TMA pipeline depth,
    column tiles per L2 band (planar_snake), CTAs (None: one per SM)."""

    bm: int = 128
    bn: int = 128
    bk: int = 64
    max_concurrent_steps: int = 4
    grid_tile_width: int = 8
    num_ctas: int | None = None
    compute_wgs: int = 1  # 2: warp-specialised (a TMA warpgroup + 2 wgmma warpgroups of bn/2 columns each)


WS_TILES = MgpuTiles(bn=256, max_concurrent_steps=3, compute_wgs=2)  # 128x256 CTA tile, 208 KiB of SMEM


def tile_schedule(group_sizes_G: jax.Array, m_rows: int, bm: int) -> tuple[jax.Array, jax.Array]:
    """(tile_groups_Tmx2 = [first group, number of groups] per row tile, bounds_Gx2 = [start, end) rows).

    A row tile's groups are the consecutive groups whose row ranges intersect it (empty groups in between
    are counted and skipped in the kernel); a tile past the last group has count 0 (zeros out)."""
    sizes = group_sizes_G.astype(jnp.int32)
    ends_G = jnp.cumsum(sizes)
    starts_G = ends_G - sizes
    total = ends_G[-1]
    n_tiles = -(-m_rows // bm)
    lo_T = jnp.arange(n_tiles, dtype=jnp.int32) * bm
    hi_T = jnp.minimum(jnp.minimum(lo_T + bm, m_rows), total)  # exclusive
    first_T = jnp.searchsorted(ends_G, lo_T, side="right").astype(jnp.int32)
    last_T = jnp.searchsorted(ends_G, hi_T - 1, side="right").astype(jnp.int32)
    count_T = jnp.where(hi_T > lo_T, last_T - first_T + 1, 0).astype(jnp.int32)
    g_max = sizes.shape[0] - 1
    tile_groups = jnp.stack([jnp.minimum(first_T, g_max), count_T], axis=1)
    return tile_groups, jnp.stack([starts_G, ends_G], axis=1).astype(jnp.int32)


def _swizzled(dtype, minor: int):
    swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
    elems = swizzle // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


def _inside_one_group(bounds_ref, first, count, row0, bm):
    """The row tile lies inside one group (every tile of a tile-aligned group, all of the micro's): the
    output tile is then written straight from the accumulator, without a zero fill and a row select."""
    start, end = bounds_ref[first, 0], bounds_ref[first, 1]
    return (count == 1) & (start <= row0) & (end >= row0 + bm)


def _merge_rows(y_ref, acc, whole, row0, start, end):
    """Write this group's rows [start, end) of the float32 tile ``acc`` into the SMEM output tile."""
    out = acc.astype(y_ref.dtype)

    @pl.when(whole)
    def _():
        y_ref[...] = out

    @pl.when(jnp.logical_not(whole))
    def _():
        rows = row0 + plgpu.broadcasted_iota(jnp.int32, out.shape, 0)
        mine = (rows >= start) & (rows < end)
        y_ref[...] = jnp.where(mine, out, y_ref[...])


def _kernel(tile_groups_ref, bounds_ref, x_gmem, w_gmem, y_gmem, y_smem2, *, tiles: MgpuTiles):
    bm, bn, bk = tiles.bm, tiles.bn, tiles.bk
    m_rows, k_dim = x_gmem.shape
    n_dim = y_gmem.shape[1]
    tm, tn = m_rows // bm, n_dim // bn
    in_transforms = _swizzled(x_gmem.dtype, bk)

    @plgpu.nd_loop((tm * tn,), collective_axes="sm")
    def _work_item(info: plgpu.NDLoopInfo):
        mi, ni = plgpu.planar_snake(info.index[0], (tm, tn), 1, tiles.grid_tile_width)
        first, count = tile_groups_ref[mi, 0], tile_groups_ref[mi, 1]
        row0 = mi * bm

        def tile_product(g, acc_ref):
            def step(_, x_smem, w_smem):
                plgpu.wgmma(acc_ref, x_smem, w_smem)
                plgpu.wgmma_wait(1)  # keep one MMA in flight; its buffers are released a step later

            plgpu.emit_pipeline(
                step,
                grid=(k_dim // bk,),
                in_specs=[
                    plgpu.BlockSpec((bm, bk), lambda k: (mi, k), transforms=in_transforms, delay_release=1),
                    plgpu.BlockSpec((bk, bn), lambda k: (k, ni), transforms=in_transforms, delay_release=1),
                ],
                max_concurrent_steps=tiles.max_concurrent_steps,
            )(x_gmem, w_gmem.at[g])
            return acc_ref[...]

        # Two output buffers: the TMA store of item i overlaps the K loop of item i + 1.
        y_smem = y_smem2.at[info.local_index % 2]
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the store that last read this buffer is done
        whole = _inside_one_group(bounds_ref, first, count, row0, bm)

        @pl.when(jnp.logical_not(whole))
        def _():
            y_smem[...] = jnp.zeros((bm, bn), y_gmem.dtype)  # rows of no group stay zero

        @pl.loop(0, count)
        def _group(j):
            g = first + j
            start, end = bounds_ref[g, 0], bounds_ref[g, 1]

            @pl.when(end > start)  # empty groups between two others
            def _():
                acc = pl.run_scoped(functools.partial(tile_product, g), plgpu.ACC((bm, bn), jnp.float32))
                _merge_rows(y_smem, acc, whole, row0, start, end)

        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(y_smem, y_gmem.at[pl.ds(row0, bm), pl.ds(ni * bn, bn)])

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _kernel_ws(tile_groups_ref, bounds_ref, x_gmem, w_gmem, y_gmem, *, tiles: MgpuTiles):
    """Warp-specialised variant: warpgroup 2 only issues TMA loads (and runs ahead into the next group /
    work item while the compute warpgroups finish their epilogue); warpgroups 0 and 1 each own bn/2 columns
    of the tile, with synchronous wgmma per step (the two interleave on the tensor cores)."""
    bm, bn, bk = tiles.bm, tiles.bn, tiles.bk
    n_wg = tiles.compute_wgs
    wn = bn // n_wg
    m_rows, k_dim = x_gmem.shape
    n_dim = y_gmem.shape[1]
    tm, tn = m_rows // bm, n_dim // bn
    in_transforms = _swizzled(x_gmem.dtype, bk)

    def make_pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_dim // bk,),
            memory_registers=40,  # the TMA warpgroup needs few registers: the rest go to the accumulators
            in_specs=[
                plgpu.BlockSpec((bm, bk), lambda k: (0, k), transforms=in_transforms),
                plgpu.BlockSpec((bk, bn), lambda k: (k, 0), transforms=in_transforms),
            ],
            wg_axis="wg",
            num_compute_wgs=n_wg,
            max_concurrent_steps=tiles.max_concurrent_steps,
            compute_context=context,
        )

    def unused(*_, **__):
        return None

    @functools.partial(
        pl.run_scoped,
        allocs=make_pipeline(unused, unused).get_allocations(x_gmem, w_gmem.at[0]),
        y_smem=plgpu.SMEM((n_wg, bm, wn), y_gmem.dtype, transforms=_swizzled(y_gmem.dtype, wn)),
        collective_axes="wg",
    )
    def _scope(allocs, y_smem):
        wg = jax.lax.axis_index("wg")
        is_compute = wg < n_wg

        @plgpu.nd_loop((tm * tn,), collective_axes="sm")
        def _work_item(info: plgpu.NDLoopInfo):
            mi, ni = plgpu.planar_snake(info.index[0], (tm, tn), 1, tiles.grid_tile_width)
            first, count = tile_groups_ref[mi, 0], tile_groups_ref[mi, 1]
            row0 = mi * bm
            y_wg = y_smem.at[jnp.minimum(wg, n_wg - 1)]  # touched by compute warpgroups only

            whole = _inside_one_group(bounds_ref, first, count, row0, bm)

            @pl.when(is_compute)
            def _():
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # this warpgroup's previous store

                @pl.when(jnp.logical_not(whole))
                def _():
                    y_wg[...] = jnp.zeros((bm, wn), y_gmem.dtype)

            @pl.loop(0, count)
            def _group(j):
                g = first + j
                start, end = bounds_ref[g, 0], bounds_ref[g, 1]

                def mma(_, x_smem, w_smem, acc_ref):
                    plgpu.wgmma(acc_ref, x_smem, w_smem.at[:, pl.ds(wg * wn, wn)])
                    plgpu.wgmma_wait(0)  # the slot is released right after this step
                    return acc_ref

                def context(run_k_loop):  # compute warpgroups only: accumulator, K loop, row merge
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((bm, wn), jnp.float32))
                    def _(acc_ref):
                        run_k_loop(acc_ref)
                        _merge_rows(y_wg, acc_ref[...], whole, row0, start, end)

                @pl.when(end > start)  # uniform over the warpgroups: all of them skip empty groups
                def _():
                    make_pipeline(mma, context)(
                        x_gmem.at[pl.ds(row0, bm), :],
                        w_gmem.at[g, :, pl.ds(ni * bn, bn)],
                        allocations=allocs,
                    )

            @pl.when(is_compute)
            def _():
                plgpu.commit_smem()
                cols = pl.ds(ni * bn + wg * wn, wn)
                plgpu.copy_smem_to_gmem(y_wg, y_gmem.at[pl.ds(row0, bm), cols])

        @pl.when(is_compute)
        def _():
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def smem_bytes(tiles: MgpuTiles, itemsize: int = 2) -> int:
    """Shared memory of one CTA: the pipeline's x and w stages plus the output tile(s) (barriers ignored)."""
    stages = tiles.max_concurrent_steps * (tiles.bm * tiles.bk + tiles.bk * tiles.bn) * itemsize
    out_buffers = 2 if tiles.compute_wgs == 1 else 1  # v1 double-buffers its single output tile
    return stages + out_buffers * tiles.bm * tiles.bn * itemsize


def check_inputs(x_MxK, w_GxKxN, group_sizes_G, tiles: MgpuTiles) -> None:
    """Shapes, dtypes and tile divisibility; raises with the argument name, expectation and value."""
    if x_MxK.ndim != 2:
        raise ValueError(f"x_MxK: expected 2 dims (M, K), got shape {x_MxK.shape}")
    if w_GxKxN.ndim != 3 or w_GxKxN.shape[1] != x_MxK.shape[1]:
        raise ValueError(f"w_GxKxN: expected shape (G, {x_MxK.shape[1]}, N), got {w_GxKxN.shape}")
    if group_sizes_G.shape != (w_GxKxN.shape[0],):
        raise ValueError(f"group_sizes_G: expected shape ({w_GxKxN.shape[0]},), got {group_sizes_G.shape}")
    if not jnp.issubdtype(group_sizes_G.dtype, jnp.integer):
        raise TypeError(f"group_sizes_G: expected an integer dtype, got {group_sizes_G.dtype}")
    for name, a in (("x_MxK", x_MxK), ("w_GxKxN", w_GxKxN)):
        if a.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: expected bfloat16 or float16 (wgmma operands), got {a.dtype}")
    if x_MxK.dtype != w_GxKxN.dtype:
        raise TypeError(f"w_GxKxN: expected x's dtype {x_MxK.dtype}, got {w_GxKxN.dtype}")
    k, n = w_GxKxN.shape[1:]
    if k % tiles.bk:
        raise ValueError(f"K: expected a multiple of bk={tiles.bk}, got {k}")
    if n % tiles.bn:
        raise ValueError(f"N: expected a multiple of bn={tiles.bn}, got {n}")
    if tiles.bm % 64 or tiles.bn % 8 or tiles.bk * jnp.dtype(x_MxK.dtype).itemsize % 32:
        raise ValueError(f"tiles: expected bm % 64 == 0, bn % 8 == 0, 16-bit bk % 16 == 0, got {tiles}")
    if tiles.compute_wgs not in (1, 2) or (tiles.compute_wgs == 2 and tiles.bn % 128):
        raise ValueError(f"tiles: expected compute_wgs 1, or 2 with bn % 128 == 0, got {tiles}")
    if smem_bytes(tiles) > SMEM_LIMIT:
        raise ValueError(
            f"tiles: need {smem_bytes(tiles)} B of shared memory, Hopper has {SMEM_LIMIT}: {tiles}"
        )


def _interpret_params(interpret):
    if isinstance(interpret, plgpu.InterpretGPUParams):
        return interpret
    return plgpu.InterpretGPUParams() if interpret else None


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def grouped_matmul_mgpu(
    x_MxK: jax.Array,
    w_GxKxN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    tiles: MgpuTiles = MgpuTiles(),
    interpret: bool | plgpu.InterpretGPUParams = False,
) -> jax.Array:
    """y_MxN (x's dtype) = x[rows of g] @ w[g] per consecutive group; rows past sum(group_sizes) are 0.

    Group sizes must be non-negative with sum <= M (not checked on device: they are traced values)."""
    check_inputs(x_MxK, w_GxKxN, group_sizes_G, tiles)
    m_rows = x_MxK.shape[0]
    n_dim = w_GxKxN.shape[2]
    tile_groups, bounds = tile_schedule(group_sizes_G, m_rows, tiles.bm)
    padded = -(-m_rows // tiles.bm) * tiles.bm
    x = jnp.pad(x_MxK, ((0, padded - m_rows), (0, 0))) if padded != m_rows else x_MxK
    if tiles.num_ctas is not None:
        num_ctas = tiles.num_ctas
    elif interpret:
        num_ctas = 2  # two simulated CTAs: each strides over several work items
    else:
        num_ctas = getattr(jax.devices()[0], "core_count", None) or 132  # SMs (132 on H100 / H200 SXM)
    common = dict(
        out_type=jax.ShapeDtypeStruct((padded, n_dim), x_MxK.dtype),
        grid=(num_ctas,),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret_params(interpret),
    )
    if tiles.compute_wgs == 1:
        y_smem_2xbmxbn = plgpu.SMEM(
            (2, tiles.bm, tiles.bn), x_MxK.dtype, transforms=_swizzled(x_MxK.dtype, tiles.bn)
        )
        kernel = plgpu.kernel(
            functools.partial(_kernel, tiles=tiles), scratch_types=[y_smem_2xbmxbn], **common
        )
    else:  # compute warpgroups + one TMA warpgroup
        kernel = plgpu.kernel(
            functools.partial(_kernel_ws, tiles=tiles),
            num_threads=tiles.compute_wgs + 1,
            thread_name="wg",
            **common,
        )
    y = kernel(tile_groups, bounds, x, w_GxKxN)
    return y[:m_rows] if padded != m_rows else y
