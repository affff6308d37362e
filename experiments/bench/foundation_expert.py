"""Latency per request of Foundation–Expert serving paths: the FM (history of L items + C candidates, dense
target-aware HSTU) at 2 and 8 blocks, and a surface expert scoring the same C candidates with and without a
TAE input (the TAE read from the store is not timed: HyperCast precomputes it). Prints one table row per
(model, C, requests per call): ms per call, ms per request, FLOPs per request and achieved TFLOP/s.

    python -m experiments.bench.foundation_expert            # GPU sizes (ML-1M: L=200, D=50)
    python -m experiments.bench.foundation_expert --small    # seconds on a CPU
"""

from __future__ import annotations

import argparse
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.bench.common import timed
from recjax.models import experts as X
from recjax.models import foundation as F


@partial(jax.jit, static_argnums=0)
def _fm(graphdef, state, h, hm, c, cm):
    fm = nnx.merge(graphdef, state)
    return fm.logits(fm(h, hm, c, cm))


@partial(jax.jit, static_argnums=0)
def _expert(graphdef, state, items, hist, item_side, user_side, tae):
    return nnx.merge(graphdef, state)(items, hist, item_side, user_side, tae)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true")
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args(argv)
    N, L, D = (200, 20, 16) if a.small else (3416, 200, 50)
    cands = (8, 32) if a.small else (16, 64, 256, 1024)
    batches = (1, 4) if a.small else (1, 64)
    blocks_list = (1, 2) if a.small else (2, 8)
    reps = 3 if a.small else a.reps
    rng = np.random.default_rng(0)
    rows = []
    print(f"device {jax.devices()[0].device_kind}; L={L}, D={D}, items={N}")
    head = ("model", "C", "req/call", "ms/call", "ms/req", "MFLOP/req", "TFLOP/s")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (14, 5, 8, 9, 9, 10, 8), strict=True)))
    for B in batches:
        for C in cands:
            h = jnp.asarray(rng.integers(1, N + 1, (B, L)), jnp.int32)
            c = jnp.asarray(rng.integers(1, N + 1, (B, C)), jnp.int32)
            ones_h, ones_c = jnp.ones((B, L), bool), jnp.ones((B, C), bool)
            for blocks in blocks_list:
                cfg = F.FoundationConfig(
                    num_items=N,
                    num_surfaces=5,
                    max_len=L,
                    embed_dim=D,
                    num_blocks=blocks,
                    num_heads=2,
                    attention_dim=D // 2,
                    linear_dim=D // 2,
                    dropout=0.0,
                )
                fm = F.FoundationModel(cfg, rngs=nnx.Rngs(0))
                fm.eval()
                g, s = nnx.split(fm)
                t = float(np.median(timed(partial(_fm, g, s, h, ones_h, c, ones_c), reps)))
                fl = F.fm_flops_per_request(cfg, L, C)
                rows.append(dict(model=f"fm{blocks}", C=C, B=B, s=t, flops=fl))
            for tae_dim in (0, D):
                ecfg = X.ExpertConfig(num_items=N, tae_dim=tae_dim, item_side_dim=29, user_side_dim=33)
                ex = X.Expert(ecfg, rngs=nnx.Rngs(0))
                g, s = nnx.split(ex)
                n = B * C
                args = (
                    jnp.asarray(rng.integers(1, N + 1, n), jnp.int32),
                    jnp.zeros((n, 10), jnp.int32),
                    jnp.zeros((n, 29)),
                    jnp.zeros((n, 33)),
                    jnp.zeros((n, tae_dim)) if tae_dim else None,
                )
                t = float(np.median(timed(partial(_expert, g, s, *args), reps)))
                rows.append(
                    dict(
                        model="expert+tae" if tae_dim else "expert",
                        C=C,
                        B=B,
                        s=t,
                        flops=X.expert_flops_per_request(ecfg, C),
                    )
                )
            for r in rows[-(len(blocks_list) + 2) :]:
                tf = r["flops"] * r["B"] / r["s"] / 1e12
                ms = r["s"] * 1e3
                print(
                    f"{r['model']:>14} {r['C']:>5} {r['B']:>8} {ms:>9.3f} {ms / r['B']:>9.4f} "
                    f"{r['flops'] / 1e6:>10.2f} {tf:>8.3f}"
                )
    return rows


if __name__ == "__main__":
    main()
