"""MoE layer benchmark (MoEBlaze, issue 4): forward+backward time and peak activation memory.

Implementations of one dropless top-k MoE layer (router + experts + combine, SwiGLU, FFN width 4d):
  fused   recjax MoEBlaze index dispatch (Pallas kernels, recjax.ops.grouped_matmul impl="pallas")
  ragged  sort + permute + jax.lax.ragged_dot + unpermute (MaxText style, impl="xla")
  gshard  GShard dense capacity einsum (groups of 1024 tokens, capacity factor 1.25, overflow dropped)
  torch   MegaBlocks-style PyTorch layer: sort, permute, torch._grouped_mm, unpermute, autograd
Plus a grouped-GEMM microbenchmark (T=32768, H=2048, F=1024, E=64 equal groups, --micro): our Triton
gather-GEMM kernel (expert_up, activation "linear"), the Mosaic GPU TMA + wgmma grouped GEMM on contiguous
groups (pallas_kernels/grouped_matmul_mgpu.py, rows "mosaic ..."), jax.lax.ragged_dot, dense batched einsum
and torch._grouped_mm, each with TFLOP/s, % of the dense ceiling and % of torch; --micro-impls sets the
rows and their order ("check" = Mosaic vs reference on ragged groups), --deadline skips late rows.

FLOPs (fwd+bwd, experts only) = 3 * 2 * L*k * (3 d F) for SwiGLU (forward 3 GEMMs, backward 6).
Peak activation memory: JAX = compiled temp bytes of the jitted fwd+bwd (XLA memory analysis: every
intermediate alive at the peak, inputs/params/grads excluded); torch = max_memory_allocated during fwd+bwd
minus the memory held before it. Ceiling = measured dense bf16 8192^3 matmul TFLOP/s in the same run.

  PYTHONPATH=. python3 experiments/bench/moe.py --check --suite paper     # GPU
  python experiments/bench/moe.py --small                                 # CPU, seconds
  PYTHONPATH=. python3 experiments/bench/moe.py --suite none --micro --micro-impls \
      torch,check,mosaic,fused,mosaic:128x128x64s4 --mosaic-tiles 128x256x64s3c2 --micro-tiles best \
      --iters 20 --deadline 36                                            # GPU, Mosaic vs torch, < 45 s
torch is imported lazily (only the GPU image has it).
"""

from __future__ import annotations

import argparse
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.moe_micro import (  # noqa: F401 - parse_mosaic_tiles is part of this CLI's API
    MICRO_BEST,
    MICRO_IMPLS,
    MICRO_TILES,
    bench_micro,
    parse_mosaic_tiles,
    run_mosaic_checks,
)
from pallas_kernels import grouped_matmul as gm
from pallas_kernels import grouped_matmul_mgpu as gm_mgpu
from recjax.ops import dispatch
from recjax.ops import grouped_matmul as gmm_ops

ALT_BLOCKS = gm.Blocks(bm=64, bn=64, bk=64, bn_out=64, num_warps=4, num_stages=3)  # passed the GPU check
PAPER = [(d, e, k) for d in (512, 1024, 2048) for e in (4, 8, 16) for k in (1, 2, 4)] + [(1024, 64, 8)]


def _time(fn, *args, warmup=2, iters=5):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def _temp_bytes(fn, *args):
    try:
        ma = jax.jit(fn).lower(*args).compile().memory_analysis()
        return int(ma.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - some backends give no analysis
        return -1


def _route(x, wr, k):
    probs = jax.nn.softmax(jnp.dot(x.astype(jnp.float32), wr), axis=-1)
    top_p, ids = jax.lax.top_k(probs, k)
    return ids.astype(jnp.int32), top_p / jnp.sum(top_p, axis=-1, keepdims=True)


def _gshard(x, ids, w, wg, wu, w2, group=1024, cf=1.25):
    n_tok, d = x.shape
    e, k = wg.shape[0], ids.shape[1]
    g = max(n_tok // group, 1)
    s = n_tok // g
    cap = max(int(math.ceil(k * s / e * cf)), 1)
    ids_g, w_g, x_g = ids.reshape(g, s, k), w.reshape(g, s, k), x.reshape(g, s, d)
    onehot = jax.nn.one_hot(ids_g, e, dtype=jnp.int32)  # g s k e
    # position in the expert's buffer: slot-major cumulative count (GShard's priority order)
    flat = onehot.transpose(0, 2, 1, 3).reshape(g, k * s, e)
    pos = (jnp.cumsum(flat, axis=1) - 1).reshape(g, k, s, e).transpose(0, 2, 1, 3)
    keep = (pos < cap) & (onehot > 0)
    disp = jax.nn.one_hot(jnp.where(keep, pos, -1), cap, dtype=x.dtype)  # g s k e c
    combine = jnp.einsum("gskec,gsk->gsec", disp, w_g.astype(x.dtype))
    dispatch = jnp.sum(disp, axis=2)
    xe = jnp.einsum("gsec,gsd->egcd", dispatch, x_g)
    h = jax.nn.silu(jnp.einsum("egcd,edf->egcf", xe, wg)) * jnp.einsum("egcd,edf->egcf", xe, wu)
    ye = jnp.einsum("egcf,efd->egcd", h, w2)
    return jnp.einsum("gsec,egcd->gsd", combine, ye).reshape(n_tok, d)


def jax_layer(impl, k, blocks, recompute=True):
    def layer(x, wr, wg, wu, w2):
        ids, w = _route(x, wr, k)
        if impl == "gshard":
            return _gshard(x, ids, w, wg, wu, w2)
        return gmm_ops.moe_expert_ffn(x, ids, w, wg, wu, w2, impl=impl, blocks=blocks, recompute=recompute)

    return layer


def fwd_bwd(layer):
    def loss(x, wr, wg, wu, w2, cot):
        return jnp.sum(layer(x, wr, wg, wu, w2).astype(jnp.float32) * cot)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def make_inputs(n_tok, d, f, e, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (n_tok, d), dtype)
    wr = jax.random.normal(ks[1], (d, e), jnp.float32) * 0.02
    wg = (jax.random.normal(ks[2], (e, d, f), jnp.float32) * d**-0.5).astype(dtype)
    wu = (jax.random.normal(ks[3], (e, d, f), jnp.float32) * d**-0.5).astype(dtype)
    w2 = (jax.random.normal(ks[4], (e, f, d), jnp.float32) * f**-0.5).astype(dtype)
    cot = jax.random.normal(ks[5], (n_tok, d), jnp.float32)
    return x, wr, wg, wu, w2, cot


def torch_layer_time(x, wr, wg, wu, w2, cot, k, iters=5):
    """MegaBlocks-style layer in PyTorch with autograd; returns (seconds, peak activation bytes)."""
    import torch  # noqa: PLC0415 - only on the GPU image

    dev = "cuda"

    def t(a, grad=True):
        dt = torch.bfloat16 if a.dtype == jnp.bfloat16 else torch.float32
        return torch.from_numpy(np.asarray(a.astype(jnp.float32))).to(dev).to(dt).requires_grad_(grad)

    tx, twr, twg, twu, tw2 = (t(a) for a in (x, wr, wg, wu, w2))
    twr = twr.float().detach().requires_grad_(True)
    tcot = t(cot, False).float()
    e = twg.shape[0]
    twg_t, twu_t, tw2_t = (
        w.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True) for w in (twg, twu, tw2)
    )

    def step():
        probs = torch.softmax(tx.float() @ twr, dim=-1)
        top_p, ids = torch.topk(probs, k, dim=-1)
        w = top_p / top_p.sum(-1, keepdim=True)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=e)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        xs = tx[order // k]  # permute
        a = torch._grouped_mm(xs, twg_t, offs=offs)
        b = torch._grouped_mm(xs, twu_t, offs=offs)
        h = torch.nn.functional.silu(a) * b
        ys = torch._grouped_mm(h, tw2_t, offs=offs)
        ys = ys * w.reshape(-1)[order].to(ys.dtype)[:, None]
        y = torch.zeros_like(tx).index_add_(0, order // k, ys)  # unpermute + combine
        loss = (y.float() * tcot).sum()
        loss.backward()
        return loss

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    for p in (tx, twr, twg_t, twu_t, tw2_t):
        p.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(iters):
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        ts.append(start.elapsed_time(end) / 1e3)
    return float(np.median(ts)), int(peak)


def ceiling_tflops(small):
    n = 256 if small else 8192
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda a: a @ a)
    return 2 * n**3 / _time(f, a) / 1e12


def check(blocks, dtype, interpret_ok):
    """Fused kernels vs the float32 reference: outputs, all gradients; ragged, empty experts, dropped ids."""
    rng = np.random.default_rng(0)
    n_tok, d, f, e, k = (48, 32, 64, 4, 2) if interpret_ok else (3000, 256, 512, 8, 2)
    x, wr, wg, wu, w2, cot = make_inputs(n_tok, d, f, e, dtype)
    ids = np.stack([rng.permutation([0, 1, 3, e - 1] if e > 4 else [0, 1, 3])[:k] for _ in range(n_tok)])
    ids[: n_tok // 2, 0] = np.where(ids[: n_tok // 2, 1] == 0, ids[: n_tok // 2, 0], 0)
    ids[-5:, -1] = e  # dropped assignments
    ids = jnp.asarray(ids, jnp.int32)
    w = jnp.asarray(rng.random((n_tok, k)) + 0.1, jnp.float32)
    worst = 0.0
    for act, recompute in (("swiglu", True), ("silu", True), ("swiglu", False)):

        def loss(fn):
            return lambda x, w, wg, wu, w2: jnp.sum(fn(x, ids, w, wg, wu, w2).astype(jnp.float32) * cot)

        fused = functools.partial(
            gm.moe_ffn, activation=act, blocks=blocks, interpret=interpret_ok, recompute=recompute
        )
        ref = functools.partial(gm.moe_ffn_reference, activation=act)
        y, y_ref = fused(x, ids, w, wg, wu, w2), ref(x, ids, w, wg, wu, w2)
        g = jax.grad(loss(fused), argnums=(0, 1, 2, 3, 4))(x, w, wg, wu, w2)
        g_ref = jax.grad(loss(ref), argnums=(0, 1, 2, 3, 4))(x, w, wg, wu, w2)
        for name, a, b in zip(
            ["y", "dx", "dweights", "dw_gate", "dw_up", "dw_down"], [y, *g], [y_ref, *g_ref], strict=True
        ):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            err = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))
            worst = max(worst, err)
            print(f"check {act:6s} recompute={recompute!s:5s} {name:9s} max|err|/max|ref| = {err:.2e}")
    # float32 on a GPU: Triton's dots run in TF32 (10-bit mantissa, ~5e-4 relative per product; 5.3e-4
    # measured on an H200, 2026-12-02); interpret mode on a CPU runs full float32.
    tol = 3e-2 if dtype == jnp.bfloat16 else (1e-4 if interpret_ok else 2e-3)
    print(f"CHECK {'PASS' if worst < tol else 'FAIL'} worst {worst:.2e} (tol {tol})")
    return worst < tol


def bench_layer(configs, n_tok, impls, blocks, dtype, ceiling, iters, has_torch):
    print(
        f"\n# layer fwd+bwd, L={n_tok} tokens, SwiGLU, F=4d, {dtype.__name__}; ms | TFLOP/s | %ceil | act MiB"
    )
    print(f"{'d':>5} {'E':>3} {'k':>2} {'GFLOP':>8} " + " ".join(f"{i:>30}" for i in impls))
    for idx, (d, e, k) in enumerate(configs):
        f = 4 * d
        flops = 3 * 2 * n_tok * k * 3 * d * f
        args = make_inputs(n_tok, d, f, e, dtype)
        cells = []
        for impl in impls:
            if (impl == "torch" and not has_torch) or (impl == "pallas_alt" and idx > 0):
                cells.append(f"{'-':>30}")
                continue
            try:
                if impl == "torch":
                    sec, mem = torch_layer_time(*args, k, iters=iters)
                else:
                    b = ALT_BLOCKS if impl == "pallas_alt" else blocks
                    base = {"pallas_alt": "pallas", "pallas_saved": "pallas"}.get(impl, impl)
                    fn = fwd_bwd(jax_layer(base, k, b, recompute=impl != "pallas_saved"))
                    mem = _temp_bytes(fn, *args)
                    sec = _time(fn, *args, warmup=1, iters=iters)
                tf = flops / sec / 1e12
                cells.append(f"{sec * 1e3:9.2f} {tf:6.1f} {100 * tf / ceiling:5.1f}% {mem / 2**20:7.1f}")
            except Exception as err:  # noqa: BLE001 - report and keep going
                cells.append(f"{'ERR ' + type(err).__name__:>30}")
                print(f"  {impl} d={d} E={e} k={k}: {str(err)[:400]}")
        print(f"{d:5d} {e:3d} {k:2d} {flops / 1e9:8.2f} " + " ".join(cells), flush=True)


# Row order of --micro. "mosaic:128x128x64s5" = one extra config; "check" = run_mosaic_checks at that point
# (after torch, so a kernel that fails or hangs on the card cannot cost that number).


def bench_breakdown(n_tok, d, e, k, blocks, dtype, ceiling, iters):
    """Time of each fused stage (plan, up, combine, backward activation, weight grads, dx) on one config."""
    f = 4 * d
    x, wr, wg, wu, w2, cot = make_inputs(n_tok, d, f, e, dtype)
    ids, w = jax.jit(_route, static_argnums=2)(x, wr, k)
    interpret = not dispatch.pallas_supported()
    kw = dict(blocks=blocks, interpret=interpret)
    plan_fn = jax.jit(gm.make_dispatch_plan, static_argnums=(2, 3))
    plan = plan_fn(ids, w, e, blocks.bm)
    p_rows = plan.token_P.shape[0]
    up = jax.jit(lambda x, wg, wu: gm.expert_up(plan, x, wg, wu, activation="swiglu", **kw))
    h = up(x, wg, wu)
    dy = cot.astype(dtype)
    act = jax.jit(lambda x, dy: gm.expert_bwd_act(plan, x, dy, wg, wu, w2, activation="swiglu", **kw))
    (da, db), h2, _ = act(x, dy)
    a_f = n_tok * k * d * f * 2  # one GEMM over the routed rows
    stages = [
        ("plan (sort/search/gather)", jax.jit(lambda i, w: plan_fn(i, w, e, blocks.bm)), (ids, w), 0),
        ("up: gather + 2 GEMM + SwiGLU", up, (x, wg, wu), 2 * a_f),
        (
            "combine: GEMM + weight + scatter",
            jax.jit(lambda h: gm.expert_combine(plan, [h], [w2], n_tok, transpose_w=False, scale=True, **kw)),
            (h,),
            a_f,
        ),
        ("bwd act: 3 GEMM recompute", act, (x, dy), 3 * a_f),
        (
            "dW_down tgmm",
            jax.jit(
                lambda h, dy: gm.expert_tgmm(
                    plan,
                    h,
                    [dy],
                    n_tok,
                    e,
                    lhs_gather=False,
                    rhs_gather=True,
                    rhs_scale=True,
                    out_dtype=dtype,
                    **kw,
                )
            ),
            (h2, dy),
            a_f,
        ),
        (
            "dW_gate+dW_up tgmm",
            jax.jit(
                lambda x, da, db: gm.expert_tgmm(
                    plan,
                    x,
                    [da, db],
                    n_tok,
                    e,
                    lhs_gather=True,
                    rhs_gather=False,
                    rhs_scale=False,
                    out_dtype=dtype,
                    **kw,
                )
            ),
            (x, da, db),
            2 * a_f,
        ),
        (
            "dx combine: 2 GEMM",
            jax.jit(
                lambda da, db: gm.expert_combine(
                    plan, [da, db], [wg, wu], n_tok, transpose_w=True, scale=False, **kw
                )
            ),
            (da, db),
            2 * a_f,
        ),
    ]
    used = int((plan.tile_expert_T < e).sum()) * blocks.bm
    print(
        f"\n# fused stages, L={n_tok} d={d} E={e} k={k} F={f}: {p_rows} padded rows allocated, {used} in "
        f"expert tiles ({used / (n_tok * k):.3f}x the assignments); TFLOP/s over the routed rows"
    )
    total = 0.0
    for name, fn, args, flops in stages:
        sec = _time(fn, *args, iters=iters)
        total += sec
        tf = flops / sec / 1e12 if flops else 0.0
        print(f"{name:34s} {sec * 1e3:8.3f} ms {tf:7.1f} TFLOP/s {100 * tf / ceiling:5.1f}%", flush=True)
    print(f"{'sum':34s} {total * 1e3:8.3f} ms")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny sizes, runs on CPU in seconds")
    p.add_argument("--suite", default="subset", choices=["subset", "paper", "none"])
    p.add_argument("--impls", default="fused,ragged,gshard,torch")
    p.add_argument("--check", action="store_true", help="fused kernels vs reference first")
    p.add_argument("--skip-check", action="store_true", help="with --small: no correctness check")
    p.add_argument("--micro", action="store_true", help="grouped GEMM microbenchmark")
    p.add_argument("--breakdown", action="store_true", help="time each fused stage (d=1024, E=8, k=2)")
    p.add_argument("--tokens", type=int, default=32 * 1024)
    p.add_argument("--bm", type=int, default=128)
    p.add_argument("--bn", type=int, default=64)
    p.add_argument("--bk", type=int, default=64)
    p.add_argument("--bn-out", type=int, default=128)
    p.add_argument("--warps", type=int, default=8)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--micro-impls", default=",".join(MICRO_IMPLS), help="rows of --micro, in this order")
    p.add_argument(
        "--micro-tiles", default="all", choices=["all", "best"], help="Triton configs (best: 128x256)"
    )
    p.add_argument(
        "--mosaic-tiles", default="128x128x64s4", help="Mosaic configs, e.g. 128x128x64s4,64x256x64s4"
    )
    p.add_argument("--check-mosaic", action="store_true", help="Mosaic grouped GEMM vs reference first")
    p.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds from start: micro rows that would pass it are skipped",
    )
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    deadline = None if args.deadline is None else t_start + args.deadline
    dev = jax.devices()[0]
    has_torch = False
    if dev.platform == "gpu":
        try:
            import torch  # noqa: F401, PLC0415

            has_torch = True
        except ImportError:
            pass
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, torch: {has_torch}")
    impl_names = {
        "fused": "pallas",
        "fused_alt": "pallas_alt",
        "fused_saved": "pallas_saved",
        "ragged": "xla",
        "gshard": "gshard",
        "torch": "torch",
    }
    impls = [impl_names[i] for i in args.impls.split(",")]
    if args.small:
        blocks = gm.Blocks(bm=16, bn=16, bk=16, bn_out=16)
        dtype, n_tok = jnp.float32, 64
        configs = [] if args.suite == "none" else [(32, 4, 1), (32, 4, 2)]
        micro = (256, 64, 32, 4)
    else:
        blocks = gm.Blocks(
            bm=args.bm,
            bn=args.bn,
            bk=args.bk,
            bn_out=args.bn_out,
            num_warps=args.warps,
            num_stages=args.stages,
        )
        dtype, n_tok = jnp.bfloat16, args.tokens
        subset = [(1024, 8, 2), (512, 8, 2), (2048, 8, 2), (1024, 4, 1), (1024, 16, 4), (1024, 64, 8)]
        configs = PAPER if args.suite == "paper" else subset
        configs = [] if args.suite == "none" else configs
        micro = (32768, 2048, 1024, 64)
    print(f"blocks: {blocks}")
    ok = True
    if args.check or (args.small and not args.skip_check):
        ok = check(
            blocks if not args.small else gm.Blocks(8, 16, 16, 16), dtype, interpret_ok=dev.platform != "gpu"
        )
    mosaic_tiles = [parse_mosaic_tiles(v) for v in args.mosaic_tiles.split(",")]
    micro_impls = args.micro_impls.split(",")
    if args.small:  # interpret mode on CPU: tiles that fit the tiny micro (K=64, N=32), also for mosaic:SPEC
        mosaic_tiles = [gm_mgpu.MgpuTiles(bm=64, bn=32, bk=32, max_concurrent_steps=2, grid_tile_width=2)]
        micro_impls = [i.partition(":")[0] for i in micro_impls]
    if args.check_mosaic:
        ok = run_mosaic_checks(mosaic_tiles, on_gpu=dev.platform == "gpu") and ok
    ceiling = ceiling_tflops(args.small)
    print(f"ceiling: dense bf16 matmul {ceiling:.1f} TFLOP/s")
    if args.breakdown or args.small:
        cfg = (64, 32, 4, 2) if args.small else (n_tok, 1024, 8, 2)
        bench_breakdown(*cfg, blocks, dtype, ceiling, args.iters)
    if args.micro or args.small:
        tiles = ({},) if args.small else (MICRO_TILES if args.micro_tiles == "all" else (MICRO_BEST,))
        _, micro_ok = bench_micro(
            *micro,
            blocks,
            dtype,
            ceiling,
            args.iters,
            has_torch,
            tiles,
            impls=micro_impls,
            mosaic_tiles=mosaic_tiles,
            deadline=deadline,
        )
        ok = ok and micro_ok
    bench_layer(configs, n_tok, impls, blocks, dtype, ceiling, args.iters, has_torch)
    verdict = "ok" if ok else "FAILED"
    print(f"elapsed {time.perf_counter() - t_start:.1f} s since argument parsing; checks {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
