"""MPZCH byte count (issue 16, item 1): the identity-table sectors one lookup and one insert-or-find of the
Pallas kernel actually read per ID, counted exactly from a real table (filled by the plain-JAX reference,
so the two-choice placement is the kernel's) -- no GPU needed; the counts are a property of the probe
pattern, the table state and the batch, not of the card.

The kernel (``pallas_kernels/zch.py``, pass 1) runs one program per ``block`` lanes; each step every lane
gathers ``width`` consecutive int64 slots of each of its K windows (K = 2 for two-choice: 2 x 64 B = 4
sectors of 32 B, aligned), and the program steps until *every* lane found its ID (lookups of stored IDs) or
the windows end. The loads are not masked once a lane has found its ID, so a lane pays its program's
slowest lane. Printed per (load, stream):
- ``steps lane`` / ``steps prog``: mean steps a lane needs vs mean steps its program runs;
- ``sectors/ID``: identity sectors the kernel reads per ID (program steps x K x 2), ``masked``: the same if
  each lane stopped at its own hit (lane steps x K x 2), ``ideal``: one sector per hit (an ID stored in the
  sector its probe reads first, the issue's target) and a sector per step to the windows' end for a miss;
- ``unique``: distinct sectors holding the batch's IDs, per ID (the ideal's DRAM traffic if L2 absorbs every
  repeat: Zipf);
- ``bytes/ID``: kernel sectors x 32 B + 8 B ID read + 4 B slot write.
``--home-groups`` adds the lookups of a candidate redesign replayed on the same table
(:func:`home_group_steps`: IDs placed from a hashed home group of the window instead of its start).
Insert-or-find with ``--new-frac`` new IDs at random lanes: the kernel runs on the batch's distinct IDs
(``distinct`` per ID: Zipf batches repeat), a program holding a new ID reads its windows to the end (a miss
scans everything) and runs a CAS round of one atomic per lane (``cas/ID``), plus the batch dedupe (stable
argsort of int64 keys; modelled, not counted: ``SORT_PASSES`` radix passes reading and writing 8 B key + 4 B
index, as XLA's GPU sort does for 64-bit keys -- an assumption to check against a profile). Two-choice only
(linear windows start anywhere, so their sector count per step differs).

  PYTHONPATH=. python experiments/bench/zch_bytes.py [--home-groups]       # 1M slots, loads 0.5 / 0.9
  PYTHONPATH=. python experiments/bench/zch_bytes.py --slots 65536 --bucket-size 16384 --batch 8192  # tests
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from experiments.bench.zch import fill, fresh_ids, stream  # noqa: E402
from pallas_kernels import zch as kz  # noqa: E402
from pallas_kernels import zch_reference as kzr  # noqa: E402

SECTOR = 32  # bytes
SLOT = 8  # int64 identity word
SORT_PASSES = 8  # radix passes of a 64-bit key sort (8-bit digits); modelled


def window_offsets(table, ids, *, num_buckets, max_probe, probing):
    """-> (offset of each ID in the window holding it, -1 if absent; K windows; window length; slot)."""
    bucket_size = table.shape[0] // num_buckets
    k_windows, length, _ = kzr.geometry(bucket_size, max_probe, probing)
    ids_j = jnp.asarray(ids)
    base, starts = kzr.probe_windows(ids_j, num_buckets, bucket_size, max_probe, probing)
    slot = np.asarray(kzr.lookup_reference_i64(table, ids_j, num_buckets=num_buckets, max_probe=max_probe,
                                               probing=probing))  # fmt: skip
    base, starts = np.asarray(base), [np.asarray(s) for s in starts]
    offset = np.full(len(ids), -1, np.int64)
    found = slot >= 0
    for s in starts:
        j = (slot - base - s) % bucket_size
        hit = found & (offset < 0) & (j < length)
        offset[hit] = j[hit]
    return offset, k_windows, length, slot


def count(offset, k_windows, length, *, block, width, ids_slots=None, batch=None):
    """Per-ID sector counts of one launch (its lanes in order, ``block`` per program; offset -1 = a miss),
    divided by ``batch`` (default: the lanes; the batch size when the launch runs on its distinct IDs)."""
    batch = batch or len(offset)
    full = -(-length // width)
    lane = np.where(offset >= 0, offset // width + 1, full)
    pad = (-len(lane)) % block
    prog = np.concatenate([lane, np.zeros(pad, lane.dtype)]).reshape(-1, block).max(axis=1)
    prog_per_lane = np.repeat(prog, block)[: len(lane)]
    per_step = k_windows * (width * SLOT // SECTOR)  # sectors a lane reads per step (aligned: two-choice)
    out = {
        "steps lane": lane.mean(),
        "steps prog": prog_per_lane.mean(),
        "sectors/ID": (prog_per_lane * per_step).sum() / batch,
        "masked": (lane * per_step).sum() / batch,
        # ideal: a hit costs the 1 sector holding the ID, a miss reads its windows one sector at a time
        "ideal": np.where(offset >= 0, 1.0, k_windows * length * SLOT / SECTOR).sum() / batch,
    }
    if ids_slots is not None:  # distinct sectors the batch touches (L2 absorbing every repeat)
        out["unique"] = len(np.unique(ids_slots // (SECTOR // SLOT))) / batch
    out["bytes/ID"] = out["sectors/ID"] * SECTOR + 8 + 4
    return out


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (numpy): the home group's own hash bits, independent of the windows'."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def home_group_steps(stored, offset, slot, *, length, width) -> dict[int, int]:
    """The redesign's lookup cost, replayed on the real table (NOTES "Bytes per ID" item 2): each window keeps
    its IDs (the two-choice window choice depends only on EMPTY counts, which intra-window placement does not
    change), but an ID is placed at the first EMPTY from its hashed home group of ``width`` slots, wrapping,
    instead of from the window start. Without evictions the current offsets are the arrival order, so the
    replay is exact. -> {ID: steps to reach it reading one group per window per step from the home group}."""
    groups = length // width
    window = slot - offset  # first slot of the window holding the ID (windows are aligned sub-blocks)
    home = (_mix(stored.astype(np.uint64)) % np.uint64(groups)).astype(np.int64)
    order = np.lexsort((offset, window))  # per window, in arrival order
    steps = {}
    occupied = None
    prev = None
    for i in order:
        if window[i] != prev:
            occupied, prev = np.zeros(length, bool), window[i]
        start = home[i] * width
        free = np.flatnonzero(~np.roll(occupied, -start))[0]  # first EMPTY from the home group, wrapping
        occupied[(start + free) % length] = True
        steps[int(stored[i])] = free // width + 1
    return steps


def measure(args) -> list[dict]:
    rows = []
    rng = np.random.default_rng(args.seed)
    num_buckets = args.slots // args.bucket_size
    kw = dict(num_buckets=num_buckets, max_probe=args.max_probe, probing=args.probing)
    ins = jax.jit(functools.partial(kz.insert_or_find_reference_i64, **kw), donate_argnums=0)
    table = jnp.full((args.slots,), kz.EMPTY, jnp.int64)
    stored = np.zeros((0,), np.int64)
    for load in sorted(args.loads):
        target = int(round(load * args.slots))
        table, stored, n_full, _ = fill(ins, table, rng, target, args.fill_batch, stored)
        real = len(stored) / args.slots
        home = None  # the home-group replay of this fill level (computed once)
        for dist in args.dists:
            q = stream(rng, stored, args.batch, dist)
            offset, k, length, slots = window_offsets(table, q, **kw)
            if (offset < 0).any():
                raise AssertionError(f"{dist} at load {real:.3f}: a stored ID was not found")
            c = count(offset, k, length, block=args.block, width=args.width, ids_slots=slots)
            rows.append({"op": "lookup", "load": real, "dist": dist, "full": n_full, **c})
            if args.home_groups:
                if home is None:
                    off_s, _, _, slot_s = window_offsets(table, stored, **kw)
                    home = home_group_steps(stored, off_s, slot_s, length=length, width=args.width)
                off_h = np.array([(home[int(i)] - 1) * args.width for i in q])
                c = count(off_h, k, length, block=args.block, width=args.width)
                rows.append(
                    {"op": "lookup, home group (replay)", "load": real, "dist": dist, "full": n_full, **c}
                )
            # insert-or-find: new IDs at random lanes; two-choice runs the kernel on the batch's distinct
            # IDs (ascending, compacted to the front: zch_reference.dedupe); a new one reads to the end
            new = rng.random(args.batch) < args.new_frac
            uniq = np.unique(np.where(new, fresh_ids(rng, args.batch), q))
            off_u, _, _, _ = window_offsets(table, uniq, **kw)
            c = count(off_u, k, length, block=args.block, width=args.width, batch=args.batch)
            # pass 2: a program with a pending (new) lane runs >= 1 CAS round in which every lane issues an
            # atomic on one slot (masked lanes CAS EMPTY -> EMPTY); counted as 1 round, 1 sector per lane
            pending = np.concatenate([off_u < 0, np.zeros((-len(uniq)) % args.block, bool)])
            c["cas/ID"] = pending.reshape(-1, args.block).any(axis=1).sum() * args.block / args.batch
            c["distinct"] = len(uniq) / args.batch
            # the batch dedupe before the kernel: sort passes over key + index, modelled
            c["sort B/ID"] = SORT_PASSES * 2 * (8 + 4)
            c["bytes/ID"] += c["cas/ID"] * SECTOR + c["sort B/ID"] + 8 * new.mean()  # + identity writes
            rows.append({"op": "insert-or-find", "load": real, "dist": dist, "full": n_full, **c})
    return rows


def print_table(rows, args) -> None:
    print(
        f"# slots {args.slots}, bucket {args.bucket_size}, max_probe {args.max_probe} ({args.probing}), "
        f"block {args.block} lanes, width {args.width} slots, batch {args.batch}, new {args.new_frac}"
    )
    cols = ["distinct", "steps lane", "steps prog", "sectors/ID", "masked", "ideal", "unique", "cas/ID"]
    cols += ["sort B/ID", "bytes/ID"]
    print("| op | load | dist | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 3) + "|")
    for r in rows:
        cells = [f"{r[c]:.2f}" if c in r else "-" for c in cols]
        print(f"| {r['op']} | {r['load']:.3f} | {r['dist']} | " + " | ".join(cells) + " |")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=1 << 20)
    ap.add_argument("--bucket-size", type=int, default=65536)
    ap.add_argument("--max-probe", type=int, default=128)
    # two-choice only: its windows start at multiples of 64 slots, so a step's 8 slots are 2 aligned sectors
    ap.add_argument("--probing", default="two_choice", choices=["two_choice"])
    ap.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.9])
    ap.add_argument("--dists", nargs="+", default=["uniform", "zipf"])
    ap.add_argument("--batch", type=int, default=1 << 16)
    ap.add_argument("--block", type=int, default=None, help="lanes per program (default: the kernel's)")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--new-frac", type=float, default=0.01)
    ap.add_argument("--fill-batch", type=int, default=1 << 16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--home-groups", action="store_true", help="also the home-group placement's lookups")
    args = ap.parse_args(argv)
    if args.slots % args.bucket_size:
        ap.error(f"--slots {args.slots}: expected a multiple of --bucket-size {args.bucket_size}")
    args.block = kz.default_block(args.probing, args.block)
    with jax.enable_x64(True):
        rows = measure(args)
    print_table(rows, args)
    return rows


if __name__ == "__main__":
    main()
