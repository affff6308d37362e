"""MFLI serving vs brute force vs IVF: latency at batch 1 and 1024, recall@{50,100,200}, roofline bytes.

Data: the Gaussian mixture of ``experiments/bench/ann.py`` (N items, B queries, dim D). MFLI codes: the
residual quantizer's k-means initialization (``recjax.layers.residual_quantizer.kmeans_level`` level by
level, then ``assign_codes``; F facets differing by their seeds, L levels of M codes): the codes an
untrained MFLI starts from, so the recall here measures the index and serving, not co-training. Index:
``mfli_index.build_snapshot`` with the split/merge bounds (balance stats before/after printed per facet).

Methods (one row each, per batch size):
- ``brute-f32``: ``ops.topk.topk_inner_product`` (xla, exact float32), ``brute-int8``: ``ops.ann.int8_search``
  (auto: the fused int8 kernel on a GPU); the recall reference is ``ann.exact_float_topk`` (HIGHEST
  precision, chunked). Brute force runs last in each batch: an XLA top-k over 1M columns can compile for
  minutes (benchmarks/NOTES.md), and ``--deadline`` skips what is left;
- ``mfli-<impl>``: ``mfli_serving.serve`` by user embedding (top ``--k-clusters`` clusters per facet,
  ``--candidates`` buffer), rerank through ``ops.gather_score`` with ``impl`` xla or pallas;
- ``mfli-triggers``: the paper's mode, ``--triggers`` random trigger items per query (latency only);
- ``ivf-int8 nprobe=P``: ``ops.ann.ivf_search`` over our int8 IVF index (``--ivf-clusters`` k-means lists),
  P chosen so that P N / L_ivf equals MFLI's mean distinct candidate count (equal candidate count);
- ``gather-score <impl>``: the rerank op alone on MFLI's candidate rows (the kernel's roofline check).
Columns: p50 / p99 ms, recall@50/100/200 vs exact float32, candidates per query, MB = bytes a query batch
must move at least (centroids + gathered candidate rows + ids; brute force: the item table; IVF: the probed
int8 rows), floor ms = MB / HBM bandwidth of the card (H200 4.8 TB/s, H100 3.35 TB/s), x floor = p50 /
floor.

  PYTHONPATH=. python experiments/bench/mfli.py --small        # CPU, seconds (pallas in interpret mode)
  PYTHONPATH=. python experiments/bench/mfli.py --n 1000000 --d 128 --b 1 1024 --deadline 480
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import ann as ann_bench
from experiments.bench.common import timed
from recjax.layers import residual_quantizer as rq
from recjax.ops import ann, dispatch, gather_score, quantize, topk
from recjax.retrieval import ivf, mfli_index, mfli_serving

HBM_TBPS = {"H200": 4.8, "H100": 3.35}


def bandwidth() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for name, v in HBM_TBPS.items() if name in kind), None)


def make_codes(items_NxD, facets: int, levels: int, num_codes: int, seed: int, chunk: int = 1 << 16):
    """Residual k-means codes per facet (the quantizer's k-means init), assigned in row chunks."""
    n, d = items_NxD.shape
    x = rq.facet_inputs(items_NxD, facets)
    valid = jnp.ones((n,), bool)
    cb = jnp.zeros((facets, levels, num_codes, d), jnp.float32)
    key = jax.random.key(seed)
    level_fn = jax.jit(rq.kmeans_level, static_argnames=("level", "iterations", "sample"))
    for level in range(levels):
        cb = level_fn(cb, x, valid, level, jax.random.fold_in(key, level), 10, 256 * num_codes)
    codes = [rq.assign_codes(items_NxD[s : s + chunk], cb, levels) for s in range(0, n, chunk)]
    return np.concatenate([np.asarray(c) for c in codes])


def recalls(ids_BxK, truth_BxK, cutoffs) -> list[float]:
    return [ann_bench.recall(np.asarray(ids_BxK)[:, :c], truth_BxK[:, :c]) for c in cutoffs]


def print_header():
    print(
        f"# card: {jax.devices()[0].device_kind}  backend: {jax.default_backend()}  HBM TB/s: {bandwidth()}"
    )
    print(
        "| method | B | N | D | cand/query | p50 ms | p99 ms | R@50 | R@100 | R@200 | MB | floor ms "
        "| x floor |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def row(method, b, n, d, cands, t, recs, nbytes):
    p50, p99 = np.percentile(t, 50) * 1e3, np.percentile(t, 99) * 1e3
    bw = bandwidth()
    floor = nbytes / (bw * 1e12) * 1e3 if bw else None
    rec = " | ".join("-" if r is None else f"{r:.4f}" for r in recs)
    fl = f"{floor:.4f} | {p50 / floor:.1f}" if floor else "- | -"
    print(
        f"| {method} | {b} | {n} | {d} | {cands:.0f} | {p50:.3f} | {p99:.3f} | {rec} | "
        f"{nbytes / 1e6:.1f} | {fl} |"
    )


def run(a):
    cutoffs = (50, 100, 200)
    k = max(cutoffs)
    bmax = max(a.b)
    items, queries_all = jax.jit(ann_bench.make_data, static_argnums=(0, 1, 2, 3))(a.n, a.d, bmax, a.seed)
    t0 = time.perf_counter()
    codes = make_codes(items, a.facets, a.levels, a.codes, a.seed)
    t1 = time.perf_counter()
    cfg = mfli_index.RebalanceConfig(upper_bound=a.upper, lower_bound=a.lower, seed=a.seed)
    index = mfli_index.build_snapshot(np.asarray(items), codes, config=cfg)
    arrays = mfli_index.serving_arrays(index)
    print(f"# N={a.n} D={a.d}: codes {t1 - t0:.1f} s, index build {time.perf_counter() - t1:.1f} s")
    for f, (s0, s1) in enumerate(zip(index.stats_before, index.stats_after, strict=True)):
        print(
            f"# facet {f}: clusters {s0.num_clusters} -> {s1.num_clusters}, max/mean "
            f"{s0.max_over_mean:.2f} -> {s1.max_over_mean:.2f}, Gini {s0.gini:.3f} -> {s1.gini:.3f}, "
            f"sizes [{s0.min_size}, {s0.max_size}] -> [{s1.min_size}, {s1.max_size}]"
        )
    t0 = time.perf_counter()
    cents = ivf.kmeans(items, ivf.KMeansConfig(num_clusters=a.ivf_clusters, iterations=10, seed=a.seed))
    ivf_index = ivf.build_ivf_index(items, cents, block_n=64 if a.n >= 64 * a.ivf_clusters else 32)
    print(f"# IVF L={a.ivf_clusters}: k-means + build {time.perf_counter() - t0:.1f} s")
    r = min(a.recall_queries, bmax)
    truth = ann_bench.exact_float_topk(queries_all[:r], items, k)
    items8 = quantize.quantize_items(items)
    f_num, c_cap, d = index.num_facets, index.cluster_capacity, a.d
    runnable = dispatch.pallas_supported() or a.small  # off a GPU only small sizes (interpret mode)
    impls = [i for i in a.impls if i != "pallas" or (runnable and not d & (d - 1))]
    print_header()
    for b in a.b:
        q = queries_all[:b]
        rr = min(r, b)
        common = dict(k=k, k_clusters=a.k_clusters, max_candidates=a.candidates)

        def measure(method, fn, arg, nbytes, cands=None, with_recall=True, b=b, rr=rr):
            """One row: ``fn(arg)`` jitted, timed; recall from its ids; ``cands`` a number or a function of
            the output. Failures and the deadline skip the row (ann bench's guard)."""

            def one():
                out = fn(arg)
                ids = out.ids_Bxk if hasattr(out, "ids_Bxk") else out[1]
                recs = recalls(ids[:rr], truth[:rr], cutoffs) if with_recall else (None,) * 3
                c = cands(out) if callable(cands) else cands
                row(method, b, a.n, d, c, timed(lambda: fn(arg), a.reps), recs, nbytes(c))

            ann_bench.guarded(f"{method} b={b}", one)

        mfli_cands = [float(a.candidates)]

        def count(out, keep=mfli_cands):
            keep[0] = float(np.mean(np.asarray(out.num_candidates_B)))
            return keep[0]

        for impl in impls:
            fn = functools.partial(
                mfli_serving.serve,
                arrays,
                trigger_rows_BxT=None,
                key=None,
                impl=impl,
                mode="queries",
                **common,
            )
            mfli_bytes = lambda c, b=b: 4 * (f_num * c_cap * d + b * (d + c * (d + 2)))  # noqa: E731
            measure(f"mfli-{impl}", fn, q, mfli_bytes, count)
        trig = jax.random.randint(jax.random.key(a.seed + 1), (b, a.triggers), 0, a.n, jnp.int32)
        fn = functools.partial(
            mfli_serving.serve, arrays, None, key=None, impl="auto", mode="triggers", **common
        )
        trig_bytes = lambda c, b=b: 4 * b * (a.triggers * (f_num + d) + c * (d + 2))  # noqa: E731
        measure(
            "mfli-triggers",
            lambda t, fn=fn: fn(trigger_rows_BxT=t),
            trig,
            trig_bytes,
            lambda out: float(np.mean(np.asarray(out.num_candidates_B))),
            with_recall=False,
        )
        nprobe = int(np.clip(round(mfli_cands[0] * a.ivf_clusters / a.n), 1, a.ivf_clusters))
        fn = jax.jit(lambda q, p=nprobe: ann.ivf_search(q, ivf_index, k, p, impl="auto"))
        scanned = nprobe * a.n / a.ivf_clusters
        ivf_bytes = lambda c, b=b: 4 * a.ivf_clusters * d + b * (c * (d + 8) + 4 * d)  # noqa: E731
        measure(f"ivf-int8 nprobe={nprobe}", fn, q, ivf_bytes, scanned)
        select = jax.jit(lambda q: mfli_serving.select_by_queries(arrays, q, a.k_clusters))
        rows = jax.jit(mfli_serving.gather_candidates, static_argnums=2)(arrays, select(q), a.candidates)
        for impl in impls:
            fn = jax.jit(
                lambda q, impl=impl, rows=rows: gather_score.gather_score(q, arrays.emb_RxD, rows, impl=impl)
            )
            gs_bytes = lambda c, b=b: 4 * b * (d + c * (d + 2))  # noqa: E731
            measure(f"gather-score {impl}", fn, q, gs_bytes, a.candidates, with_recall=False)
        # brute force last: an XLA top-k over 1M columns can compile for minutes (benchmarks/NOTES.md)
        fn = jax.jit(lambda q: ann.int8_search(q, items8, k, impl="auto"))
        measure("brute-int8", fn, q, lambda c, b=b: a.n * (d + 4) + 4 * b * d, a.n)
        fn = jax.jit(lambda q: topk.topk_inner_product(q, items, k, impl="xla"))
        measure("brute-f32", fn, q, lambda c, b=b: 4 * (a.n * d + b * d), a.n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny sizes for CPU (seconds)")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--b", type=int, nargs="+", default=None, help="batch sizes (default 1 1024; small 1 8)")
    ap.add_argument("--facets", type=int, default=3)
    ap.add_argument("--levels", type=int, default=2)
    ap.add_argument("--codes", type=int, default=64, help="M codes per level")
    ap.add_argument("--upper", type=int, default=1024, help="split clusters above this size")
    ap.add_argument("--lower", type=int, default=32, help="merge clusters below this size")
    ap.add_argument("--k-clusters", type=int, default=8, help="clusters selected per facet")
    ap.add_argument("--candidates", type=int, default=8192, help="candidate buffer per query")
    ap.add_argument("--triggers", type=int, default=32)
    ap.add_argument("--impls", nargs="+", default=["xla", "pallas"], help="rerank (gather-score) impls")
    ap.add_argument("--ivf-clusters", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--recall-queries", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline", type=float, default=float("inf"), help="seconds; later rows are skipped")
    a = ap.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # rows survive a timeout kill
    if a.small:
        a.n, a.d, a.b, a.facets, a.codes, a.upper, a.lower = 3000, 32, a.b or [1, 8], 2, 8, 50, 20
        a.k_clusters, a.candidates, a.triggers, a.ivf_clusters, a.reps, a.recall_queries = (
            3,
            512,
            8,
            30,
            2,
            16,
        )
    a.b = a.b or [1, 1024]
    ann_bench.DEADLINE[0] = a.deadline
    run(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
