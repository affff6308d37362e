"""Grouped GEMM microbenchmark of experiments/bench/moe.py (``--micro``): Triton-lowering and Mosaic GPU
kernels beside torch._grouped_mm, sort + ragged_dot and a dense einsum on equal groups (the issue's
reference shape T=32768, H=2048, F=1024, E=64); ``--check-mosaic`` checks the Mosaic kernel on ragged groups.
Split out of moe.py to keep modules small; run it through moe.py's CLI.
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import grouped_matmul as gm
from pallas_kernels import grouped_matmul_mgpu as gm_mgpu
from recjax.ops import dispatch

MICRO_BEST = dict(bm=128, bn=256, num_warps=8, num_stages=3)  # best Triton config of the H200 runs
MICRO_TILES = (
    {},
    dict(bm=128, bn=128, num_warps=8, num_stages=3),
    dict(bm=128, bn=128, num_warps=4, num_stages=4),
    dict(bm=64, bn=128, num_warps=4, num_stages=4),
    MICRO_BEST,
)


def _time_back_to_back(fn, *args, warmup=2, iters=20):
    """Mean time of ``iters`` calls queued back to back with one sync at the end (as the torch micro row
    is timed): per-call dispatch/sync overhead (tens of us) would be ~10 % of a 0.25 ms kernel."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    outs = [fn(*args) for _ in range(iters)]
    jax.block_until_ready(outs)
    return (time.perf_counter() - t0) / iters


MICRO_IMPLS = ("torch", "mosaic", "fused", "ragged", "dense")
DEFAULT_MOSAIC_TILES = (gm_mgpu.WS_TILES, gm_mgpu.MgpuTiles())
# Rough seconds per micro row on an H100/H200 (compile + runs): a row starts only if it fits the deadline.
MICRO_ROW_COST_S = {"check": 5.0, "torch": 3.0, "mosaic": 5.0, "fused": 15.0, "ragged": 5.0, "dense": 3.0}


def parse_mosaic_tiles(spec: str) -> gm_mgpu.MgpuTiles:
    """'128x256x64s3c2w8': bm x bn x bk, s pipeline stages (4), c compute warpgroups (1; 2 = warp-specialised
    with a TMA warpgroup), w column tiles per L2 band (8)."""
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)(?:s(\d+))?(?:c(\d+))?(?:w(\d+))?", spec)
    if match is None:
        raise ValueError(f"--mosaic-tiles: expected e.g. 128x256x64s3c2w8, got {spec!r}")
    bm, bn, bk, stages, wgs, width = match.groups()
    return gm_mgpu.MgpuTiles(
        bm=int(bm),
        bn=int(bn),
        bk=int(bk),
        max_concurrent_steps=int(stages or 4),
        compute_wgs=int(wgs or 1),
        grid_tile_width=int(width or 8),
    )


def _torch_grouped_mm_time(t, h, f, e, iters):
    import torch  # noqa: PLC0415 - only on the GPU image

    tx = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    tw = torch.randn(e, f, h, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    offs = torch.arange(1, e + 1, device="cuda", dtype=torch.int32) * (t // e)
    for _ in range(3):
        torch._grouped_mm(tx, tw, offs=offs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        torch._grouped_mm(tx, tw, offs=offs)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def check_mosaic(tiles, interpret):
    """Mosaic grouped GEMM vs the float32 reference: empty groups (first, middle, last), a total that is
    neither M nor a multiple of the row tile, M not a multiple of the row tile."""
    m, k, n = (200, 128, 128) if interpret else (1000, 256, 256)
    sizes = jnp.asarray([0, 37, 0, 300, 1, 210, 0] if not interpret else [0, 37, 0, 60, 1, 70, 0], jnp.int32)
    x = jax.random.normal(jax.random.key(2), (m, k), jnp.bfloat16)
    w = (jax.random.normal(jax.random.key(3), (7, k, n), jnp.float32) * k**-0.5).astype(jnp.bfloat16)
    y = np.asarray(gm_mgpu.grouped_matmul_mgpu(x, w, sizes, tiles=tiles, interpret=interpret), np.float32)
    ref = np.asarray(gm.grouped_matmul_reference(x, w, sizes))
    err = float(np.abs(y - ref).max() / np.abs(ref).max())
    tail_zero = bool((y[int(sizes.sum()) :] == 0).all())
    ok = err < 2e-2 and tail_zero
    print(
        f"CHECK MOSAIC {'PASS' if ok else 'FAIL'} M={m} K={k} N={n} G=7 "
        f"tiles {tiles.bm}x{tiles.bn}x{tiles.bk} c{tiles.compute_wgs}: max|err|/max|ref| = {err:.2e} "
        f"(tol 2e-2), rows past the groups zero: {tail_zero}",
        flush=True,
    )
    return ok


def run_mosaic_checks(mosaic_tiles, on_gpu):
    """check_mosaic on the first timed config on the card; on both kernel variants in interpret mode."""
    ok = True
    small_ws = gm_mgpu.MgpuTiles(64, 128, 64, 2, 2, compute_wgs=2)
    for tiles in mosaic_tiles[:1] if on_gpu else [gm_mgpu.MgpuTiles(64, 64, 64, 2, 2), small_ws]:
        try:
            ok = check_mosaic(tiles, interpret=not on_gpu) and ok
        except Exception as err:  # noqa: BLE001 - a failed compile must not cost the timings
            print(f"CHECK MOSAIC ERROR {tiles}: {type(err).__name__}: {str(err)[:1500]}", flush=True)
            ok = False
    return ok


def bench_micro(
    t,
    h,
    f,
    e,
    blocks,
    dtype,
    ceiling,
    iters,
    has_torch,
    micro_tiles=({},),
    impls=MICRO_IMPLS,
    mosaic_tiles=DEFAULT_MOSAIC_TILES,
    deadline=None,
):
    """One row per implementation, in the order of ``impls`` (put the important ones first). With a
    ``deadline`` (a time.perf_counter() value) a row starts only if its typical cost (MICRO_ROW_COST_S)
    still fits before it; the others are printed as skipped."""
    flops = 2 * t * h * f
    bytes_ = (t * h + e * h * f + t * f) * jnp.dtype(dtype).itemsize
    print(
        f"\n# grouped GEMM T={t} H={h} F={f} E={e} equal groups, {dtype.__name__}: "
        f"{flops / 1e9:.1f} GFLOP, {bytes_ / 2**20:.0f} MiB min traffic, {flops / bytes_:.0f} FLOP/B"
    )
    x = jax.random.normal(jax.random.key(0), (t, h), dtype)
    w = (jax.random.normal(jax.random.key(1), (e, h, f), jnp.float32) * h**-0.5).astype(dtype)
    sizes = jnp.full((e,), t // e, jnp.int32)
    ids = (jnp.arange(t) // (t // e)).astype(jnp.int32)[:, None]
    interpret = not dispatch.pallas_supported()
    torch_tf = None

    def report(name, sec):
        tf = flops / sec / 1e12
        vs = f"{100 * tf / torch_tf:6.1f}% of torch" if torch_tf else ""
        print(
            f"{name:34s} {sec * 1e6:9.1f} us {tf:7.1f} TFLOP/s {100 * tf / ceiling:5.1f}% of ceiling {vs}",
            flush=True,
        )
        return tf

    dense_ref, bad = [], []

    def verify_against_dense(name, y):
        """The timed output itself vs a float32 batched einsum (equal groups): no extra kernel compile."""
        if not dense_ref:
            xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
            ref = jnp.einsum("egh,ehf->egf", xb.reshape(e, t // e, h), wb, preferred_element_type=jnp.float32)
            dense_ref.append(np.asarray(ref.reshape(t, f)))
        ref = dense_ref[0]
        err = float(np.abs(np.asarray(y, np.float32) - ref).max() / np.abs(ref).max())
        verdict = "ok" if err < 2e-2 else "BAD"
        bad.extend([] if verdict == "ok" else [name])
        print(f"{'':34s} output vs dense einsum: max|err|/max|ref| = {err:.2e} ({verdict})", flush=True)

    def jax_rows(impl):  # (name, jitted fn of (x, w)) built lazily: building compiles nothing yet
        if impl == "fused":  # gather-by-index Triton kernel, activation "linear"
            for tiles in micro_tiles:
                b = dataclasses.replace(blocks, **tiles)
                plan = jax.jit(gm.make_dispatch_plan, static_argnums=(2, 3))(ids, jnp.ones((t, 1)), e, b.bm)

                def up(x, w, plan=plan, b=b):
                    return gm.expert_up(plan, x, w, None, blocks=b, activation="linear", interpret=interpret)

                yield f"fused {b.bm}x{b.bn}x{b.bk} w{b.num_warps}s{b.num_stages}", jax.jit(up)
        elif impl.startswith("mosaic"):  # contiguous groups, TMA + wgmma (x already in group order, as torch)
            mosaic_interpret = jax.devices()[0].platform != "gpu"
            spec = impl.partition(":")[2]
            for mt in [parse_mosaic_tiles(spec)] if spec else mosaic_tiles:

                def mm(x, w, mt=mt):  # bf16 always (wgmma operands); a no-op cast on the real micro
                    x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
                    return gm_mgpu.grouped_matmul_mgpu(x, w, sizes, tiles=mt, interpret=mosaic_interpret)

                name = (
                    f"mosaic {mt.bm}x{mt.bn}x{mt.bk} s{mt.max_concurrent_steps} c{mt.compute_wgs} "
                    f"w{mt.grid_tile_width}"
                )
                yield name, jax.jit(mm)
        elif impl == "ragged":
            yield "jax.lax.ragged_dot", jax.jit(lambda x, w: jax.lax.ragged_dot(x, w, sizes))
        elif impl == "dense":
            yield (
                "dense batched einsum",
                jax.jit(lambda x, w: jnp.einsum("egh,ehf->egf", x.reshape(e, t // e, h), w)),
            )
        else:
            raise ValueError(f"--micro-impls: unknown {impl!r}, expected some of {MICRO_IMPLS}")

    def out_of_time(impl):
        cost = MICRO_ROW_COST_S.get(impl.partition(":")[0], 5.0)
        return deadline is not None and time.perf_counter() + cost > deadline

    results = {}
    for impl in impls:
        if out_of_time(impl):
            print(f"{impl:34s} skipped (would pass --deadline)", flush=True)
            continue
        try:
            if impl == "check":
                bad.extend([] if run_mosaic_checks(mosaic_tiles, on_gpu=not interpret) else ["check"])
                continue
            if impl == "torch":
                if not has_torch:
                    print(f"{'torch._grouped_mm':34s} - (no torch here)", flush=True)
                else:
                    torch_tf = results["torch._grouped_mm"] = report(
                        "torch._grouped_mm", _torch_grouped_mm_time(t, h, f, e, iters)
                    )
                continue
            for name, fn in jax_rows(impl):
                if out_of_time(impl):
                    print(f"{name:34s} skipped (would pass --deadline)", flush=True)
                    continue
                results[name] = report(name, _time_back_to_back(fn, x, w, iters=iters))
                if impl.startswith("mosaic"):
                    verify_against_dense(name, fn(x, w))
        except Exception as err:  # noqa: BLE001 - report and keep going
            print(f"{impl:34s} ERR {type(err).__name__}: {str(err)[:600]}", flush=True)
    return results, not bad
