"""Inference latency of LIME vs target-attention baselines, against the number of candidates and the history
length (the LIME paper's Figure 1 setting), in one run; a table (markdown + CSV) and a plot.

Per request: the user's history (L items) and C candidate item ids -> C scores. Models (random weights,
eval mode, float32, the same width D, layers and heads):
- ``lime_xor``: LIME-XOR personalization (O(R L) per layer) + scoring through the item cache (O(R D) per
  candidate; the cache is built once outside the timed region, as in serving);
- ``lime_mha``: LIME-MHA (links attend over the history with softmax MHA) + the same scoring;
- ``hstu_target``: HSTU over the history (causal, O(L^2)) with the candidates appended, each attending to
  the history and itself (``HSTU.with_candidates``, O(C L) per layer: the efficient form, no dense mask);
- ``full_mha``: softmax transformer (SASRec blocks) over the joint sequence [history; candidates] with the
  same mask written densely, O((L + C)^2) per layer (what a plain target-attention transformer costs).
A row whose inputs do not fit (or that fails) prints ``-`` with the reason; each model has a deadline.

Usage: python experiments/bench/lime.py [--small] [--out DIR] [--models a,b] [--inner N]
(--small: a CPU-sized grid for the tests). ``ms``: median wall of single jitted calls (what a request waits,
dispatch included); ``--inner N`` adds ``ms in loop``: N calls inside one jitted loop
(``common.timed_in_loop``), the device time of a call without the per-call dispatch -- it tells launch
overhead from kernel time.
FLOPs beside each row: the matmul FLOPs of one forward (2 per multiply-add), counted from the shapes.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from experiments.bench.common import timed, timed_in_loop  # noqa: E402
from recjax.layers.target_aware import candidate_attention_mask  # noqa: E402
from recjax.models.hstu import HSTU, HSTUConfig  # noqa: E402
from recjax.models.lime import LIME, LimeConfig  # noqa: E402
from recjax.models.sasrec import SASRec, SASRecConfig  # noqa: E402

MODELS = ("lime_xor", "lime_mha", "hstu_target", "full_mha")
EXTRA_MODELS = ("lime_xor_pallas",)  # LIME-XOR with the links' read through pallas_kernels.lime_xor


@dataclasses.dataclass(frozen=True)
class Grid:
    batch: int = 4
    dim: int = 64
    heads: int = 2
    layers: int = 2
    links: int = 16
    num_items: int = 1 << 20
    candidates: tuple[int, ...] = tuple(1 << k for k in range(6, 16))  # at history `fixed_history`
    histories: tuple[int, ...] = tuple(1 << k for k in range(6, 15))  # at `fixed_candidates`
    fixed_history: int = 1024
    fixed_candidates: int = 1024
    reps: int = 10
    deadline_s: float = 60.0  # per model
    inner: int = 0  # calls per jitted loop for "ms in loop" (0: not measured)


SMALL = Grid(
    batch=2, dim=16, heads=1, layers=1, links=4, num_items=512, candidates=(8, 64), histories=(16, 64),
    fixed_history=32, fixed_candidates=16, reps=2, deadline_s=60.0,
)  # fmt: skip


def flops(model: str, g: Grid, L: int, C: int) -> float:
    """Matmul FLOPs of one forward of the batch (projections + attention + scoring)."""
    D, R, B, n = g.dim, g.links, g.batch, g.layers
    proj = 2 * D * 4 * D + 2 * D * D  # uvqk / qkv+o (per token, per layer), then W_o / FFN-sized
    if model.startswith("lime_xor"):
        per_layer = (L + R) * proj + 2 * 2 * (2 * R * L * D)
        return B * (n * per_layer + C * 2 * R * D + C * 2 * D)
    if model == "lime_mha":
        per_layer = R * proj + L * 2 * D * 2 * D + 2 * (2 * R * L * D)
        return B * (n * per_layer + C * 2 * R * D + C * 2 * D)
    if model == "hstu_target":
        per_layer = (L + C) * proj + 2 * (2 * L * L * D) + 2 * (2 * C * L * D)  # dense L x L as executed
        return B * (n * per_layer + C * 2 * D)
    T = L + C
    return B * (n * (T * proj + 2 * (2 * T * T * D)) + C * 2 * D)


def build(model: str, g: Grid, max_len: int):
    rngs = nnx.Rngs(0)
    if model.startswith("lime"):
        cfg = LimeConfig(
            num_items=g.num_items, max_len=max_len, embed_dim=g.dim, num_links=g.links,
            attention=model.removeprefix("lime_").removesuffix("_pallas"), num_layers=g.layers,
            num_heads=g.heads, xor_impl="pallas" if model.endswith("_pallas") else "auto",
            attention_dim=g.dim // g.heads, linear_dim=g.dim // g.heads, ffn_hidden_dim=g.dim, dropout=0.0,
        )  # fmt: skip
        m = LIME(cfg, rngs=rngs)
        m.eval()
        graphdef, state = nnx.split(m)
        cache = jax.jit(lambda s: nnx.merge(graphdef, s).build_item_cache())(state)

        # The cache rides with the parameters as an argument, not a closed-over constant (a 1M-row constant
        # would be compiled in, and inside timed_in_loop work on it could be hoisted out of the loop).
        @jax.jit
        def run_cached(state_and_cache, hist, mask, cand):
            state, cache = state_and_cache
            mm = nnx.merge(graphdef, state)
            return mm.score_cached(mm(hist, mask), cache, cand)

        return run_cached, (state, cache)
    if model == "hstu_target":
        cfg = HSTUConfig(
            num_items=g.num_items, max_len=max_len, embed_dim=g.dim, num_blocks=g.layers, num_heads=g.heads,
            attention_dim=g.dim // g.heads, linear_dim=g.dim // g.heads, dropout=0.0,
            num_position_buckets=min(max_len, 1024),
        )  # fmt: skip
        m = HSTU(cfg, rngs=rngs)
        m.eval()
        graphdef, state = nnx.split(m)

        @jax.jit
        def run(state, hist, mask, cand):
            mm = nnx.merge(graphdef, state)
            _, c = mm.with_candidates(hist, mask, cand)
            return jnp.sum(mm.normalize(c) * mm.candidate_embeddings()[cand], axis=-1)

        return run, state
    cfg = SASRecConfig(
        num_items=g.num_items, max_len=max_len, embed_dim=g.dim, num_blocks=g.layers, num_heads=g.heads,
        ffn_hidden_dim=g.dim, dropout=0.0,
    )  # fmt: skip
    m = SASRec(cfg, rngs=rngs)
    m.eval()
    graphdef, state = nnx.split(m)

    @jax.jit
    def run(state, hist, mask, cand):
        mm = nnx.merge(graphdef, state)
        L = hist.shape[1]
        ids = jnp.concatenate([hist, cand], axis=1)
        valid = jnp.concatenate([mask, jnp.ones_like(cand, bool)], axis=1)
        # history causal; candidate rows see the history and themselves only (written densely)
        allowed = candidate_attention_mask(mask, jnp.ones_like(cand, bool))
        x = mm.embedding(ids, valid)
        for block in mm.blocks:
            x = block(x, valid, allowed)
        c = mm.normalize(x[:, L:])
        return jnp.sum(c * mm.candidate_embeddings()[cand], axis=-1)

    return run, state


def measure(model: str, g: Grid, points: list[tuple[int, int]]) -> list[dict]:
    rows, start = [], time.perf_counter()
    max_len = max(L + C for L, C in points) if model == "full_mha" else max(L for L, _ in points)
    run, state = build(model, g, max_len)
    rng = np.random.default_rng(0)
    for L, C in points:
        row = {"model": model, "history": L, "candidates": C, "gflop": flops(model, g, L, C) / 1e9}
        if time.perf_counter() - start > g.deadline_s:
            rows.append({**row, "ms": None, "note": "deadline"})
            print(_line(rows[-1]), flush=True)
            continue
        hist = jnp.asarray(rng.integers(1, g.num_items + 1, (g.batch, L)), jnp.int32)
        cand = jnp.asarray(rng.integers(1, g.num_items + 1, (g.batch, C)), jnp.int32)
        mask = jnp.ones((g.batch, L), bool)
        try:
            t = timed(lambda h=hist, m=mask, c=cand: run(state, h, m, c), g.reps)
            ms = float(np.median(t) * 1e3)
            rows.append({**row, "ms": ms, "tflops": row["gflop"] / ms, "note": ""})
        except Exception as e:  # noqa: BLE001 -- a row that does not fit is reported, the sweep goes on
            rows.append({**row, "ms": None, "note": _error(e)})
        if g.inner and rows[-1]["ms"] is not None:
            try:  # a failing loop keeps the row's per-call time
                loop = timed_in_loop(run, (state, hist, mask, cand), g.reps, g.inner)
                rows[-1]["ms_loop"] = float(np.median(loop) * 1e3)
            except Exception as e:  # noqa: BLE001
                rows[-1]["note"] = "in loop: " + _error(e)
        print(_line(rows[-1]), flush=True)
    return rows


def _error(e: Exception) -> str:
    return type(e).__name__ + ": " + str(e).splitlines()[0][:80]


def _line(r: dict) -> str:
    ms = "-" if r["ms"] is None else f"{r['ms']:.3f}"
    loop = "-" if r.get("ms_loop") is None else f"{r['ms_loop']:.4f}"
    tf = "-" if r.get("tflops") is None else f"{r['tflops']:.2f}"
    cells = (r["model"], r["history"], r["candidates"], ms, loop, f"{r['gflop']:.3f}", tf, r["note"])
    return "| " + " | ".join(str(c) for c in cells) + " |"


def plot(rows: list[dict], g: Grid, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, fixed, fixed_val) in zip(
        axes, (("candidates", "history", g.fixed_history), ("history", "candidates", g.fixed_candidates))
    ):
        for model in MODELS + EXTRA_MODELS:
            pts = [
                (r[key], r["ms"]) for r in rows if r["model"] == model and r[fixed] == fixed_val and r["ms"]
            ]
            pts = sorted(set(pts))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        what = f"{key} ({fixed} {fixed_val})"
        ax.set_xlabel(f"number of {what}")
        ax.set_ylabel("latency per batch (ms)")
        ax.legend()
    fig.suptitle(
        f"{jax.devices()[0].device_kind}: batch {g.batch}, d {g.dim}, {g.layers} layers, {g.links} links"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--models", default=",".join(MODELS), help=f"of {MODELS + EXTRA_MODELS}")
    ap.add_argument("--inner", type=int, default=0, help="calls per jitted loop for 'ms in loop' (0: off)")
    args = ap.parse_args(argv)
    if args.inner < 0:
        ap.error(f"--inner: expected >= 0 calls per loop, got {args.inner}")
    unknown = sorted(set(args.models.split(",")) - set(MODELS + EXTRA_MODELS))
    if unknown:
        ap.error(f"--models: unknown {unknown}; expected names of {MODELS + EXTRA_MODELS}")
    g = dataclasses.replace(SMALL if args.small else Grid(), inner=args.inner)
    points = sorted(
        {(g.fixed_history, c) for c in g.candidates} | {(h, g.fixed_candidates) for h in g.histories}
    )
    print(f"device {jax.devices()[0].device_kind}; {g}")
    print("| model | history | candidates | ms | ms in loop | GFLOP | TFLOP/s | note |\n" + "|---" * 8 + "|")
    rows = []
    for model in args.models.split(","):
        rows += measure(model, g, points)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "small" if args.small else "full"
    with open(out / f"lime_latency_{tag}.csv", "w", newline="") as f:
        fields = ["model", "history", "candidates", "ms", "ms_loop", "gflop", "tflops", "note"]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: r.get(k) for k in w.fieldnames} for r in rows)
    plot(rows, g, out / "plots" / f"lime_latency_{tag}.png")
    return rows


if __name__ == "__main__":
    main()
