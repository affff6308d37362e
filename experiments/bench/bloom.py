"""Bloom filter benchmark (SilverTorch): bit-sliced index, compiled CNF plans, Pallas evaluation.

Index like the issue's reference point: N items, F features x 5 values per item (vocabulary of ``--vocab``
values per feature), M = ``--bits`` Bloom bits per item, K = ``--hashes``. Queries AND ``--groups``
OR-groups of 5 values (one feature per group). Prints p50 / p99 of one batch, item-tests/s (B N / p50),
bytes read through the cache (B W C T K 4) and from HBM (M W 4 once), the measured false-positive rate
against the exact filter on the first ``--fpr-items`` items beside the analytic per-term rate, and the XLA
(gather) reference on a small batch.

  PYTHONPATH=. python experiments/bench/bloom.py --small
  PYTHONPATH=. python experiments/bench/bloom.py --check --n 10000000 --b 1 1024 --groups 2 10
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.common import timed
from pallas_kernels import bloom as bloom_kernel
from recjax.ops import bloom as bloom_op
from recjax.retrieval import bloom


def make_features(n, num_features, values_per_item, vocab, seed=0):
    rng = np.random.default_rng(seed)
    codes = {
        f"f{i}": rng.integers(0, vocab, (n, values_per_item), dtype=np.int32) for i in range(num_features)
    }
    return bloom.ItemFeatures(codes, {name: tuple(str(v) for v in range(vocab)) for name in codes})


def make_queries(b, groups, num_features, vocab, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(b):
        feats = rng.choice(num_features, groups, replace=False)
        parts = []
        for f in feats:
            vals = rng.choice(vocab, 5, replace=False)
            parts.append("(" + " OR ".join(f"f{f}:{v}" for v in vals) + ")")
        out.append(" AND ".join(parts))
    return out


def check(interpret):
    rng = np.random.default_rng(0)
    m, w = 64, 3000
    index = jnp.asarray(rng.integers(-(2**31), 2**31, (m, w), dtype=np.int64).astype(np.int32))
    rows = rng.integers(0, m, (9, 3, 5, 4)).astype(np.int32)
    kinds = rng.integers(0, 4, (9, 3, 5)).astype(np.int32)
    offsets = jnp.asarray(rng.integers(0, 500, 9).astype(np.int32))
    for off, nw, bw in ((None, 2900, 256), (offsets, 1000, 128)):
        got = bloom_kernel.bloom_filter_words(
            index, rows, kinds, off, num_words=nw, block_w=bw, interpret=interpret
        )
        want = bloom_kernel.bloom_filter_words_reference(index, rows, kinds, off, num_words=nw)
        good = np.array_equal(np.asarray(got), np.asarray(want))
        print(f"# check bloom offsets={off is not None} words={nw}: {'OK' if good else 'FAIL'}", flush=True)
        if not good:
            raise SystemExit("bloom kernel check FAILED")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--features", type=int, default=10)
    ap.add_argument("--vocab", type=int, default=100)
    ap.add_argument("--bits", type=int, default=512)
    ap.add_argument("--hashes", type=int, default=5)
    ap.add_argument("--b", type=int, nargs="+", default=[1, 1024])
    ap.add_argument("--groups", type=int, nargs="+", default=[2, 10])
    ap.add_argument("--block-w", type=int, nargs="+", default=[256, 0], help="0 = two-stage evaluation")
    ap.add_argument("--deadline", type=float, default=float("inf"), help="seconds; later parts are skipped")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--fpr-items", type=int, default=1_000_000)
    a = ap.parse_args()
    interpret = jax.default_backend() != "gpu"
    if a.small:
        a.n, a.b, a.reps, a.fpr_items, a.block_w = 20_000, [1, 8], 3, 20_000, [64, 0]
    if a.check:
        check(interpret)
    print(f"# card: {jax.devices()[0].device_kind}  backend: {jax.default_backend()}")
    t0 = time.perf_counter()
    feats = make_features(a.n, a.features, 5, a.vocab)
    config = bloom_op.BloomConfig(bits_per_item=a.bits, num_hashes=a.hashes)
    index = bloom.build_bloom_index(feats, config, chunk_words=4096)
    jax.block_until_ready(index.words_MxW)
    terms = a.features * 5
    print(
        f"# index: N={a.n} M={a.bits} K={a.hashes} {terms} terms/item, {index.words_MxW.nbytes / 1e6:.0f} MB,"
        " "
        f"built in {time.perf_counter() - t0:.1f} s; analytic per-term FPR "
        f"{bloom.analytic_term_fpr(config, terms):.4f}"
    )
    print(
        "| impl | B | groups | p50 ms | p99 ms | G item-tests/s | cache GB read | HBM GB | FPR | exact sel |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    w = index.num_words
    start = time.perf_counter()

    def one(groups, b, block_w):
        queries = make_queries(b, groups, a.features, a.vocab)
        plan = bloom.compile_queries(index, queries)
        label = f"pallas block_w={block_w}"
        if block_w == 0:  # two-stage: distinct terms first, then the CNF over the term table
            label = f"pallas 2-stage U={plan.num_distinct_terms}"
            fn = jax.jit(lambda: bloom_op.filter_words(index, plan, impl="pallas", two_stage=True))
        else:
            fn = jax.jit(
                lambda: bloom_kernel.bloom_filter_words(
                    index.words_MxW,
                    plan.rows_BxCxTxK,
                    plan.kinds_BxCxT,
                    num_words=w,
                    block_w=block_w,
                    interpret=interpret,
                )
            )
        words = fn()
        # FPR on the first fpr_items items of up to 8 queries
        nf = min(a.fpr_items, a.n)
        got = bloom.unpack_words(np.asarray(words[:8, : -(-nf // 32)]), nf)
        sub = bloom.ItemFeatures({k: v[:nf] for k, v in feats.codes.items()}, feats.vocab)
        exact = np.stack([bloom.exact_filter(sub, q) for q in queries[:8]])
        assert not (exact & ~got).any(), "false negative in an AND/OR query"
        fpr = (got & ~exact).sum() / max(1, (~exact).sum())
        t = timed(fn, a.reps)
        p50 = np.percentile(t, 50)
        c, tt, k = plan.rows_BxCxTxK.shape[1:]
        rows_read = (plan.num_distinct_terms * k + b * c * tt) if block_w == 0 else b * c * tt * k
        print(
            f"| {label} | {b} | {groups} | {p50 * 1e3:.3f} | "
            f"{np.percentile(t, 99) * 1e3:.3f} | "
            f"{b * a.n / p50 / 1e9:.1f} | {rows_read * w * 4 / 1e9:.1f} | "
            f"{index.words_MxW.nbytes / 1e9:.2f} | {fpr:.4f} | {exact.mean():.4f} |",
            flush=True,
        )

    def xla(groups):
        bx = min(16, max(a.b))
        small = bloom.compile_queries(index, make_queries(bx, groups, a.features, a.vocab))
        ref = jax.jit(
            lambda: bloom_kernel.bloom_filter_words_reference(
                index.words_MxW, small.rows_BxCxTxK, small.kinds_BxCxT, num_words=w
            )
        )
        t = timed(ref, max(2, a.reps // 3))
        p50 = np.percentile(t, 50)
        print(
            f"| xla-gather | {bx} | {groups} | {p50 * 1e3:.3f} | {np.percentile(t, 99) * 1e3:.3f} | "
            f"{bx * a.n / p50 / 1e9:.1f} | - | - | - | - |",
            flush=True,
        )

    for groups in a.groups:
        parts = [
            (f"groups={groups} b={b} block_w={bw}", one, (groups, b, bw)) for b in a.b for bw in a.block_w
        ]
        for label, fn, args in [*parts, (f"xla groups={groups}", xla, (groups,))]:
            if time.perf_counter() - start > a.deadline:
                print(f"# skipped (deadline): {label}", flush=True)
                continue
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - report and continue
                print(f"# FAILED {label}: {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
