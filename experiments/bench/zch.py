"""MPZCH remap benchmark: IDs/s of lookup and insert-or-find, Pallas kernel beside the plain-JAX reference.

For each table size S (slots) and load factor L the table is first filled with round(L S) distinct random
62-bit IDs by the kernel in batches (the number of IDs that found their window full on the way is the
measured *collision count*: with max_probe=128 it should be 0 up to L = 0.9). Then, per batch size N and ID
stream (``zipf``: exponent 1.05 over the stored IDs by rank; ``uniform`` over the stored IDs), it times:
- lookup (read only) of N stored IDs;
- insert-or-find of N IDs of which ``--new-frac`` are new (the table is donated and fed back, each rep
  inserting fresh IDs, so the load creeps up by new_frac N / S per rep);
for the Pallas kernel and the reference (``--ref-max-n`` caps the reference's batch: it is O(N log N) per
probe round).

Bytes model (printed GB/s and fraction of the card's HBM peak): per ID 8 B read (ID) + 4 B written (slot) +
one 32 B sector of the identity table (the minimum a probe touches; more probes touch more, Zipf streams are
partly served from L2), + 4 B status and, for inserts, 8 B written per new ID. The fraction is that traffic
over the time, against 3.35 TB/s (H100 SXM) / 4.8 TB/s (H200); on CPU it prints n/a.

  PYTHONPATH=. python experiments/bench/zch.py --small
  PYTHONPATH=. python experiments/bench/zch.py --slots 1000000 100000000 --loads 0.5 0.9 0.95 \\
      --batches 1024 1048576
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import zch as kz

PEAK_TBPS = {"H100": 3.35, "H200": 4.8}


def peak_bandwidth():
    kind = jax.devices()[0].device_kind
    for name, tbps in PEAK_TBPS.items():
        if name in kind:
            return kind, tbps * 1e12
    return kind, None


def timed(fn, reps, warmup=1):
    for _ in range(warmup):
        jax.block_until_ready(fn(0))
    out = []
    for r in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(r + 1))
        out.append(time.perf_counter() - t0)
    return float(np.median(out))


def call(fn, table, q, rep):
    del rep
    return fn(table, q)


def fresh_ids(rng, n):
    return rng.integers(0, 2**62, size=n, dtype=np.int64)


def stream(rng, stored, n, dist):
    if dist == "uniform":
        return stored[rng.integers(0, len(stored), n)]
    ranks = rng.zipf(1.05, size=n) - 1
    return stored[ranks[ranks < len(stored)].tolist() + [0] * int((ranks >= len(stored)).sum())]


def check(interpret, block):
    """Kernel (compiled on GPU) vs invariants and the reference on a batch with repeats; raises on failure."""
    rng = np.random.default_rng(1)
    n_slots, kw = 1 << 14, dict(num_buckets=4, max_probe=64)
    table = jnp.full((n_slots,), kz.EMPTY, jnp.int64)
    for n in (5000, 7001):
        ids = rng.integers(0, 2**62, n // 2, dtype=np.int64)[rng.integers(0, n // 2, n)]
        new, slot, status = kz.insert_or_find_i64(
            table, jnp.asarray(ids), block=block, interpret=interpret, **kw
        )
        new, slot, status = np.asarray(new), np.asarray(slot), np.asarray(status)
        assert (slot >= 0).all() and (new[slot] == ids).all(), "slot does not hold its ID"
        order = np.argsort(ids, kind="stable")
        same = ids[order][1:] == ids[order][:-1]
        assert (slot[order][1:][same] == slot[order][:-1][same]).all(), "one ID, two slots"
        assert len(np.unique(slot)) == len(np.unique(ids)), "distinct IDs share a slot"
        assert (new != kz.EMPTY).sum() == len(
            np.unique(np.concatenate([ids, np.asarray(table)[np.asarray(table) != kz.EMPTY]]))
        )
        ref = np.asarray(kz.lookup_reference_i64(jnp.asarray(new), jnp.asarray(ids), **kw))
        got = np.asarray(
            kz.lookup_i64(jnp.asarray(new), jnp.asarray(ids), block=block, interpret=interpret, **kw)
        )
        assert np.array_equal(ref, slot) and np.array_equal(got, slot), "lookup != insert slots"
        table = jnp.asarray(new)
    print("# check: kernel invariants hold (repeats, two batches, lookup == reference lookup)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny sizes, CPU interpret mode, seconds")
    ap.add_argument("--slots", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000])
    ap.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.9, 0.95])
    ap.add_argument("--batches", type=int, nargs="+", default=[1024, 65536, 1048576])
    ap.add_argument("--dists", nargs="+", default=["zipf", "uniform"])
    ap.add_argument("--max-probe", type=int, default=128)
    ap.add_argument("--bucket-size", type=int, default=65536)
    ap.add_argument("--new-frac", type=float, default=0.01)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ref-max-n", type=int, default=65536)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--width", type=int, default=8, help="probes read per lane per step (power of 2)")
    args = ap.parse_args()
    interpret = jax.devices()[0].platform != "gpu"
    if args.small:
        args.slots, args.loads, args.batches, args.reps = [4096], [0.5, 0.9], [256], 1
        args.bucket_size, args.max_probe, args.block = 1024, 128, 64
    kind, peak = peak_bandwidth()
    with jax.enable_x64(True):
        check(interpret, args.block)
    print(
        f"# device: {kind}; interpret={interpret}; max_probe={args.max_probe}; bucket_size={args.bucket_size}"
    )
    print("| op | impl | S | load | N | dist | ms | M IDs/s | GB/s (model) | frac HBM |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    fill_report = []
    with jax.enable_x64(True):
        for n_slots in args.slots:
            bucket_size = min(args.bucket_size, n_slots)
            num_buckets = n_slots // bucket_size
            kw = dict(num_buckets=num_buckets, max_probe=args.max_probe)
            kkw = dict(kw, block=args.block, width=args.width, num_warps=args.num_warps, interpret=interpret)
            ins = jax.jit(functools.partial(kz.insert_or_find_i64, **kkw), donate_argnums=0)
            ins_ref = jax.jit(functools.partial(kz.insert_or_find_reference_i64, **kw), donate_argnums=0)
            look = jax.jit(functools.partial(kz.lookup_i64, **kkw))
            look_ref = jax.jit(functools.partial(kz.lookup_reference_i64, **kw))
            table = jnp.full((n_slots,), kz.EMPTY, jnp.int64)
            stored, n_full = np.zeros((0,), np.int64), 0
            for load in sorted(args.loads):
                todo, parts = int(round(load * n_slots)) - len(stored), [stored]
                while todo > 0:  # fill with the kernel, counting IDs that found their window full
                    chunk = fresh_ids(rng, min(todo, 1 << 20))
                    table, slot, status = ins(table, jnp.asarray(chunk))
                    status = np.asarray(status)
                    n_full += int((status == kz.STATUS_FULL).sum())
                    parts.append(chunk[status == kz.STATUS_INSERTED])
                    todo -= len(chunk)
                stored = np.concatenate(parts)
                real_load = float(jnp.sum(table != kz.EMPTY)) / n_slots
                fill_report.append((n_slots, load, real_load, n_full))
                for n in args.batches:
                    for dist in args.dists:
                        q = jnp.asarray(stream(rng, stored, n, dist))
                        ops = [("lookup", "pallas", functools.partial(call, look, table, q))]
                        if n <= args.ref_max_n:
                            ops.append(("lookup", "reference", functools.partial(call, look_ref, table, q)))
                        for op, impl, fn in ops:
                            t = timed(fn, args.reps)
                            report(op, impl, n_slots, real_load, n, dist, t, n * (8 + 4 + 32), peak)
                        n_new = max(1, int(args.new_frac * n))
                        news = [jnp.asarray(fresh_ids(rng, n_new)) for _ in range(args.reps + 1)]
                        impls = [("pallas", ins)] + ([("reference", ins_ref)] if n <= args.ref_max_n else [])
                        for impl, fn_ins in impls:
                            holder = {"t": table.copy()}

                            def run(r, fn_ins=fn_ins, holder=holder, q=q, n=n, n_new=n_new, news=news):
                                batch = jnp.concatenate([q[: n - n_new], news[r]])
                                holder["t"], s, _ = fn_ins(holder["t"], batch)
                                return s

                            t = timed(run, args.reps)
                            byts = n * (8 + 4 + 4 + 32) + n_new * 8
                            report("insert_or_find", impl, n_slots, real_load, n, dist, t, byts, peak)
                            del holder
    print(
        f"\n| S | target load | load | collisions while filling (window full, max_probe={args.max_probe}) |"
    )
    print("|---|---|---|---|")
    for n_slots, load, real, n_full in fill_report:
        print(f"| {n_slots} | {load} | {real:.4f} | {n_full} |")


def report(op, impl, n_slots, load, n, dist, t, byts, peak):
    gbs = byts / t / 1e9
    frac = f"{byts / t / peak:.3f}" if peak else "n/a"
    print(
        f"| {op} | {impl} | {n_slots} | {load:.3f} | {n} | {dist} | {t * 1e3:.3f} | {n / t / 1e6:.1f} | "
        f"{gbs:.1f} | {frac} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
