"""MPZCH remap benchmark: IDs/s of lookup and insert-or-find, Pallas kernel beside the plain-JAX reference,
for both probing schemes (``--probing two_choice linear``), and the measured collision count.

For each probing, table size S (slots) and load factor L the table is first filled with distinct random 62-bit
IDs in batches of ``--fill-batch`` until round(L S) slots are live (``--fill-impl``: the kernel on a GPU, the
reference on CPU where interpret mode is too slow). IDs that find every window full on the way (status FULL)
are the measured *collisions* (target: 0 up to L = 0.9 with max_probe = 128). Then, unless
``--collisions-only``, per batch size N and ID stream (``zipf``: exponent 1.05 over the stored IDs by rank;
``uniform`` over the stored IDs) it times:
- a plain random gather of N slots of the same table (``gather``: one random 8 B read per ID, the bar a
  lookup is judged against -- issue 16);
- lookup (read only) of N stored IDs (checked: every ID found, in a slot holding it);
- insert-or-find of N IDs of which ``--new-frac`` are new, at random lanes (the table is donated and fed back,
  each rep inserting fresh IDs, so the load creeps up by new_frac N / S per rep; the first rep is checked:
  same ID -> one slot, distinct IDs -> distinct slots, stored IDs HIT, new IDs INSERTED);
for the Pallas kernel and the reference (``--ref-max-n`` caps the reference's batch, ``--ref-probing`` its
schemes).

Bytes model (printed GB/s and fraction of the card's HBM peak): per ID 8 B read (ID) + 4 B written (slot) +
one 32 B sector of the identity table (the minimum a probe touches; more probes touch more, Zipf streams are
partly served from L2), + 4 B status and, for inserts, 8 B written per new ID. The fraction is that traffic
over the time, against 3.35 TB/s (H100 SXM) / 4.8 TB/s (H200); on CPU it prints n/a.

  PYTHONPATH=. python experiments/bench/zch.py --small
  PYTHONPATH=. python experiments/bench/zch.py --collisions-only --slots 1000000 \\
      --loads 0.7 0.8 0.85 0.9 0.95 --fill-batch 65536          # CPU: collision table of both schemes
  PYTHONPATH=. python experiments/bench/zch.py --slots 100000000 --loads 0.9 --batches 1048576 --reps 3
"""

from __future__ import annotations

import argparse
import functools
import time
import traceback

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


def fresh_ids(rng, n):
    return rng.integers(0, 2**62, size=n, dtype=np.int64)


def stream(rng, stored, n, dist):
    if dist == "uniform":
        return stored[rng.integers(0, len(stored), n)]
    ranks = rng.zipf(1.05, size=n) - 1
    return stored[np.where(ranks < len(stored), ranks, 0)]


def check_batch(ids, slot, status, table_ids_at_slot, stored_before):
    """Invariants of one insert-or-find batch (host side); returns a list of failure messages."""
    bad = []
    ok = slot >= 0
    if not (status[~ok] == kz.STATUS_FULL).all():
        bad.append("slot -1 without status FULL")
    if not (table_ids_at_slot[ok] == ids[ok]).all():
        bad.append("a slot does not hold its ID")
    u_ids, inv = np.unique(ids[ok], return_inverse=True)
    first_slot = np.full(len(u_ids), -1, np.int64)
    first_slot[inv] = slot[ok]
    if not (first_slot[inv] == slot[ok]).all():
        bad.append("one ID, two slots")
    if len(np.unique(slot[ok])) != len(u_ids):
        bad.append("distinct IDs share a slot")
    was = np.isin(ids, stored_before)
    if not (status[was] == kz.STATUS_HIT).all():
        bad.append("a stored ID was not a HIT")
    if (status == kz.STATUS_INSERTED).sum() != len(np.unique(ids[~was & ok])):
        bad.append("INSERTED count != new distinct IDs with a slot")
    return bad


def fill(ins, table, rng, target, batch, stored):
    """Insert fresh IDs (batches padded to one shape) until ``target`` slots are live -> (table, stored, FULL,
    offered)."""
    parts, n_live, n_full, offered = [stored], len(stored), 0, 0
    while n_live < target:
        n = min(target - n_live, batch)
        chunk = np.full(batch, kz.EMPTY, np.int64)
        chunk[:n] = fresh_ids(rng, n)
        table, _, status = ins(table, jnp.asarray(chunk))
        status = np.asarray(status)[:n]
        n_full += int((status == kz.STATUS_FULL).sum())
        parts.append(chunk[:n][status == kz.STATUS_INSERTED])
        n_live += int((status == kz.STATUS_INSERTED).sum())
        offered += n
    return table, np.concatenate(parts), n_full, offered


def report(op, impl, probing, n_slots, load, n, dist, t, byts, peak):
    gbs = byts / t / 1e9
    frac = f"{byts / t / peak:.3f}" if peak else "n/a"
    print(
        f"| {op} | {impl} | {probing} | {n_slots} | {load:.3f} | {n} | {dist} | {t * 1e3:.3f} | "
        f"{n / t / 1e6:.1f} | {gbs:.1f} | {frac} |",
        flush=True,
    )


def time_point(args, fns, table, stored, rng, probing, n_slots, load, peak):
    """Lookup and insert-or-find timings (with their checks) at one fill level."""
    look, look_ref, ins, ins_ref, look_widths = fns
    for n in args.batches:
        if past_deadline(args, f"timings {probing} N={n}"):
            return
        with_ref = n <= args.ref_max_n and probing in args.ref_probing
        for dist in args.dists:
            if past_deadline(args, f"timings {probing} N={n} {dist}"):
                return
            q = jnp.asarray(stream(rng, stored, n, dist))
            got = np.asarray(look(table, q))
            if not (got >= 0).all():
                print(f"# CHECK FAILED lookup {probing}: {int((got < 0).sum())} stored IDs not found")
            # the card's bar (issue 16): one random int64 read per ID from the same table, same batch size
            rows = jnp.asarray(rng.integers(0, n_slots, n), jnp.int32)
            ops = [("gather", "xla", lambda r, rows=rows: GATHER(table, rows))]
            ops += [("lookup", "pallas", lambda r, q=q: look(table, q))]
            ops += [
                (f"lookup w{w}", "pallas", lambda r, q=q, f=f: f(table, q)) for w, f in look_widths.items()
            ]
            if with_ref:
                ops.append(("lookup", "reference", lambda r, q=q: look_ref(table, q)))
            for op, impl, fn in ops:
                t = timed(fn, args.reps)
                report(op, impl, probing, n_slots, load, n, dist, t, n * (8 + 4 + 32), peak)
            n_new = max(1, int(args.new_frac * n))
            q_host = np.asarray(q)
            batches = []  # stored IDs + fresh IDs at random lanes, built outside the timed calls
            for _ in range(args.reps + 1):
                b = np.concatenate([q_host[: n - n_new], fresh_ids(rng, n_new)])
                batches.append(jnp.asarray(b[rng.permutation(n)]))
            impls = [("pallas", ins)] + ([("reference", ins_ref)] if with_ref else [])
            for impl, fn_ins in impls:
                holder = {"t": table.copy()}

                def run(r, fn_ins=fn_ins, holder=holder, q=q, batches=batches, impl=impl):
                    batch = batches[r]
                    holder["t"], s, st = fn_ins(holder["t"], batch)
                    if r == 0:  # the warm-up call: check its result
                        slot, status = np.asarray(s), np.asarray(st)
                        at = np.asarray(holder["t"][jnp.asarray(np.maximum(slot, 0))])
                        bad = check_batch(np.asarray(batch), slot, status, at, np.asarray(q))
                        print(f"# CHECK FAILED insert {impl} {probing}: {bad}" if bad else "", end="")
                    return s

                t = timed(run, args.reps)
                byts = n * (8 + 4 + 4 + 32) + n_new * 8
                report("insert_or_find", impl, probing, n_slots, load, n, dist, t, byts, peak)
                del holder


START = time.perf_counter()
GATHER = jax.jit(lambda table, rows: table[rows])  # a plain random gather: the per-ID floor of a lookup


def past_deadline(args, what: str) -> bool:
    """True (and says so) once ``--deadline`` seconds have passed since the start: the rest is skipped."""
    if args.deadline and time.perf_counter() - START > args.deadline:
        print(f"# SKIPPED (deadline {args.deadline} s): {what}", flush=True)
        return True
    return False


def measure(args, probing, n_slots, fill_impl, interpret, peak):
    """Fill one table level by level (counting FULL) and time at each level -> fill report rows."""
    rng = np.random.default_rng(args.seed)
    bucket_size = min(args.bucket_size, n_slots)
    num_buckets = n_slots // bucket_size
    kw = dict(num_buckets=num_buckets, max_probe=args.max_probe, probing=probing)
    kkw = dict(kw, block=args.block, width=args.width, num_warps=args.num_warps, interpret=interpret)
    ins = jax.jit(functools.partial(kz.insert_or_find_i64, **kkw), donate_argnums=0)
    ins_ref = jax.jit(functools.partial(kz.insert_or_find_reference_i64, **kw), donate_argnums=0)
    look = jax.jit(functools.partial(kz.lookup_i64, **kkw))
    look_ref = jax.jit(functools.partial(kz.lookup_reference_i64, **kw))
    widths = args.lookup_widths if probing == "two_choice" else []  # the scheme being tuned
    look_widths = {w: jax.jit(functools.partial(kz.lookup_i64, **dict(kkw, width=w))) for w in widths}
    table = jnp.full((n_slots,), kz.EMPTY, jnp.int64)
    stored, n_full, offered, rows = np.zeros((0,), np.int64), 0, 0, []
    for load in sorted(args.loads):
        if past_deadline(args, f"fill {probing} to {load}"):
            break
        t0 = time.perf_counter()
        fill_fn = ins if fill_impl == "pallas" else ins_ref
        target = int(round(load * n_slots))
        table, stored, full_here, offered_here = fill(fill_fn, table, rng, target, args.fill_batch, stored)
        n_full, offered = n_full + full_here, offered + offered_here
        real_load = float(jnp.sum(table != kz.EMPTY)) / n_slots
        if int(round(real_load * n_slots)) != len(stored):
            print(f"# CHECK FAILED fill {probing}: {len(stored)} inserted, {real_load} live")
        row = (probing, n_slots, load, real_load, n_full, offered, full_here, offered_here)
        rows.append(row + (time.perf_counter() - t0,))
        print(f"# filled {probing} S={n_slots} to {real_load:.4f}: FULL {n_full} of {offered}", flush=True)
        if not args.collisions_only:
            fns = (look, look_ref, ins, ins_ref, look_widths)
            time_point(args, fns, table, stored, rng, probing, n_slots, real_load, peak)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny sizes, CPU interpret mode, seconds")
    ap.add_argument("--slots", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000])
    ap.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.9, 0.95])
    ap.add_argument("--batches", type=int, nargs="+", default=[1024, 65536, 1048576])
    ap.add_argument("--dists", nargs="+", default=["zipf", "uniform"])
    ap.add_argument("--probing", nargs="+", default=list(kz.PROBINGS), choices=kz.PROBINGS)
    ap.add_argument("--ref-probing", nargs="*", default=None, help="schemes timed for the reference (all)")
    ap.add_argument("--max-probe", type=int, default=128)
    ap.add_argument("--bucket-size", type=int, default=65536)
    ap.add_argument("--new-frac", type=float, default=0.01)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ref-max-n", type=int, default=65536)
    ap.add_argument("--block", type=int, default=None, help="lanes per program (default per scheme)")
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--width", type=int, default=8, help="probes read per window per lane per step")
    ap.add_argument("--fill-batch", type=int, default=1 << 20)
    ap.add_argument("--fill-impl", choices=["auto", "pallas", "reference"], default="auto")
    ap.add_argument("--collisions-only", action="store_true", help="fill and count FULL, no timings")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--lookup-widths", type=int, nargs="*", default=[], help="extra lookup widths (two_choice)"
    )
    ap.add_argument("--deadline", type=float, default=0, help="seconds; later steps are skipped (0: none)")
    args = ap.parse_args()
    interpret = jax.devices()[0].platform != "gpu"
    if args.small:
        args.slots, args.loads, args.batches, args.reps = [4096], [0.5, 0.9], [256], 1
        args.bucket_size, args.max_probe, args.block, args.fill_batch = 1024, 128, 64, 1024
    if args.ref_probing is None:
        args.ref_probing = args.probing
    fill_impl = args.fill_impl
    if fill_impl == "auto":
        fill_impl = "pallas" if not interpret or args.small else "reference"
    kind, peak = peak_bandwidth()
    print(
        f"# device: {kind}; interpret={interpret}; max_probe={args.max_probe}; "
        f"bucket_size={args.bucket_size}; fill: {fill_impl}, batch {args.fill_batch}; "
        f"block={args.block or kz.DEFAULT_BLOCK}; "
        f"width={args.width}"
    )
    if not args.collisions_only:
        print("| op | impl | probing | S | load | N | dist | ms | M IDs/s | GB/s (model) | frac HBM |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    fill_report = []
    with jax.enable_x64(True):
        for probing in args.probing:
            for n_slots in args.slots:
                if past_deadline(args, f"{probing} S={n_slots}"):
                    continue
                try:
                    fill_report += measure(args, probing, n_slots, fill_impl, interpret, peak)
                except Exception as e:  # one scheme failing (e.g. a Triton error) must not lose the other
                    traceback.print_exc()
                    print(f"# FAILED {probing} S={n_slots}: {e!r}", flush=True)
    print(
        f"\n| probing | S | target load | load | FULL (cumulative) | IDs offered | FULL / offered | "
        f"FULL since previous load | fraction there | fill s |  (max_probe={args.max_probe}, "
        f"bucket {args.bucket_size}, fill batch {args.fill_batch}, {fill_impl})"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for probing, n_slots, load, real, n_full, offered, full_here, off_here, secs in fill_report:
        print(
            f"| {probing} | {n_slots} | {load} | {real:.4f} | {n_full} | {offered} | "
            f"{n_full / max(offered, 1):.2e} | {full_here} | {full_here / max(off_here, 1):.2e} | "
            f"{secs:.1f} |"
        )


if __name__ == "__main__":
    main()
