"""LIME-XOR links' read of the history, the op alone (issue 9, item 3): XLA vs the Pallas kernel against the
memory-bandwidth floor, at the history lengths the issue names (2^12..2^14) and the training shape.

``out[b, h, r] = sum_l valid[b, l] silu(q[b, h, r] . k[b, l, h] + bias[b, h, r, l]) / N v[b, l, h]``
(``recjax.ops.lime_xor``). Rows per point:
- ``xla``: the op's XLA form (two einsums, the (B, H, R, L) weights through HBM);
- ``pallas``: the op with ``impl="pallas"`` (includes its (B, L, H, .) -> (B, H, L, .) relayout);
- ``kernel bl=N``: ``pallas_kernels.lime_xor`` called on (B, H, L, .) inputs directly, block_l N.
Each row: median ms of ``--reps`` single jitted calls (``ms/call``: includes ~50 us of dispatch), ms per call
inside one jitted loop of ``--inner`` calls (``ms in loop``: the device time, compared with the floor), the
max relative error against the HIGHEST-precision reference,
bytes (k and v read once, + the bias when given, + q and the output) and the floor = bytes / HBM bandwidth
(``--hbm-tbs``, default the H200's 4.8 TB/s), ``x floor`` = ms / floor: the issue's criterion is <= 1.3.

    python experiments/bench/lime_xor_op.py [--small] [--bias 0,1] [--reps 20] [--deadline 240]

Letters: B requests, H heads, R links, L history, A q/k dim, V value dim.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from experiments.bench.common import timed, timed_in_loop  # noqa: E402
from pallas_kernels import lime_xor as kernel  # noqa: E402
from recjax.ops import dispatch  # noqa: E402
from recjax.ops.lime_xor import xor_link_attention  # noqa: E402

# (B, H, R, A = V, L): the latency bench's grid (4 requests, d 64 = 2 heads x 32) at long histories, and
# ML-1M training (128 sequences x 32 requests sharing a 200-item history is B = 4096 rows of the op).
POINTS = [(4, 2, 16, 32, L) for L in (1024, 4096, 8192, 16384)] + [(4096, 1, 16, 50, 200)]
SMALL_POINTS = [(2, 1, 4, 8, 64), (3, 2, 4, 8, 200)]


def _inputs(B, H, R, A, L, bias: bool, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (B, R, H, A), jnp.float32) / np.sqrt(A)
    k = jax.random.normal(keys[1], (B, L, H, A), jnp.float32)
    v = jax.random.normal(keys[2], (B, L, H, A), jnp.float32)
    lengths = jax.random.randint(keys[3], (B, 1), L // 2, L + 1)
    valid = jnp.arange(L)[None, :] < lengths
    b = 0.1 * jax.random.normal(keys[4], (B, H, R, L), jnp.float32) if bias else None
    return q, k, v, valid, b


def _bytes(B, H, R, A, L, bias: bool) -> int:
    n = 4 * (2 * B * L * H * A + B * R * H * A * 2) + B * L  # k, v, q, out (float32), valid (bool)
    return n + (4 * B * H * R * L if bias else 0)


def _impls(L: int, interpret: bool) -> dict:
    """name -> jitted fn(q, k, v, valid, bias); the ``kernel`` rows take k, v as (B, H, L, .)."""

    def op(impl):
        return jax.jit(lambda q, k, v, m, b: xor_link_attention(q, k, v, m, L, b, impl=impl))

    def direct(bl):
        def fn(q, k, v, m, b):
            q = jnp.moveaxis(q, 2, 1)
            out = kernel.xor_link_attention(q, k, v, m, b, norm_length=L, block_l=bl, interpret=interpret)
            return jnp.moveaxis(out, 1, 2)

        return jax.jit(fn)

    return {"xla": op("xla"), "pallas": op("pallas"), **{f"kernel bl={bl}": direct(bl) for bl in (128, 256)}}


def _row(fn, args, ref, reps: int, inner: int) -> dict:
    try:
        out = np.asarray(fn(*args))
        err = float(np.max(np.abs(out - ref)) / (np.max(np.abs(ref)) + 1e-30))
        ms = float(np.median(timed(lambda: fn(*args), reps)) * 1e3)
        loop_ms = float(np.median(timed_in_loop(fn, args, reps, inner)) * 1e3) if inner else None
        return {"ms": ms, "loop_ms": loop_ms, "rel_err": err, "note": ""}
    except Exception as e:  # noqa: BLE001 -- a failing row is reported, the sweep goes on
        return {"ms": None, "note": type(e).__name__ + ": " + str(e).splitlines()[0][:90]}


def measure(
    points, biases, reps: int, deadline_s: float, hbm_tbs: float, interpret: bool, inner: int = 50
) -> list[dict]:
    rows, start = [], time.perf_counter()
    for B, H, R, A, L in points:
        for bias in biases:
            q, k, v, valid, b = _inputs(B, H, R, A, L, bias)
            kt, vt = jnp.moveaxis(k, 2, 1), jnp.moveaxis(v, 2, 1)
            ref = kernel.xor_link_attention_reference(jnp.moveaxis(q, 2, 1), kt, vt, valid, b, norm_length=L)
            ref = np.asarray(jnp.moveaxis(ref, 1, 2))
            nbytes = _bytes(B, H, R, A, L, bias)
            floor_ms = nbytes / (hbm_tbs * 1e12) * 1e3
            for name, fn in _impls(L, interpret).items():
                row = {"impl": name, "B": B, "H": H, "R": R, "A": A, "L": L, "bias": int(bias)}
                row.update(mb=nbytes / 1e6, floor_ms=floor_ms)
                if time.perf_counter() - start > deadline_s:
                    row.update(ms=None, note="deadline")
                else:
                    args = (q, kt, vt, valid, b) if name.startswith("kernel") else (q, k, v, valid, b)
                    row.update(_row(fn, args, ref, reps, inner))
                rows.append(row)
                print(_line(row, floor_ms), flush=True)
    return rows


def _line(r: dict, floor_ms: float) -> str:
    ms = "-" if r.get("ms") is None else f"{r['ms']:.4f}"
    loop = "-" if r.get("loop_ms") is None else f"{r['loop_ms']:.4f}"
    ratio = "-" if r.get("loop_ms") is None else f"{r['loop_ms'] / floor_ms:.1f}"
    err = "-" if r.get("rel_err") is None else f"{r['rel_err']:.1e}"
    cells = (
        r["impl"], r["B"], r["H"], r["R"], r["A"], r["L"], r["bias"], f"{r['mb']:.1f}", f"{floor_ms:.4f}",
        ms, loop, ratio, err, r["note"],
    )  # fmt: skip
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU, interpret mode)")
    ap.add_argument("--bias", default="0,1", help="comma-separated 0/1: without / with the recency bias")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--deadline", type=float, default=240.0, help="seconds; later rows print 'deadline'")
    ap.add_argument("--hbm-tbs", type=float, default=4.8, help="HBM bandwidth for the floor, TB/s")
    ap.add_argument("--inner", type=int, default=50, help="calls per jitted loop for 'ms in loop' (0: off)")
    a = ap.parse_args(argv)
    interpret = not dispatch.pallas_supported()
    print(f"device {jax.devices()[0].device_kind}; interpret={interpret}; floor at {a.hbm_tbs} TB/s")
    head = ("impl", "B", "H", "R", "A=V", "L", "bias", "MB", "floor ms", "ms/call", "ms in loop", "x floor")
    print("| " + " | ".join(head + ("rel err", "note")) + " |")
    print("|---" * 14 + "|")
    biases = [bool(int(x)) for x in a.bias.split(",")]
    points = SMALL_POINTS if a.small else POINTS
    return measure(points, biases, a.reps, a.deadline, a.hbm_tbs, interpret, a.inner)


if __name__ == "__main__":
    main()
