"""Serving and retrieval metrics of experiments/silvertorch_pipeline.py: user embeddings of the frozen
tower, the exact-search baseline, serving every test context through ``UnifiedRetrieval``, recall, and the
``--index ivf`` comparison (the main table in an int8 IVF, per nprobe, beside int8 brute force).

Letters: C contexts, L sequence length, D dim, K candidates, N results, M targets per context, H history
width, V item ids.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recjax.ops.ann import probe_clusters
from recjax.ops.topk import topk_inner_product
from recjax.retrieval import multitask_data as mt
from recjax.retrieval import unified_ivf
from recjax.retrieval.ivf import assign_clusters
from recjax.retrieval.unified import UnifiedConfig, UnifiedModel, UnifiedRetrieval


def recall_at(ids_CxN: np.ndarray, targets_CxM: np.ndarray) -> float:
    """Mean over contexts of the fraction of a context's targets (ids > 0) found in its ids."""
    hits = [
        np.isin(t[t > 0], ids).sum() / max((t > 0).sum(), 1)
        for ids, t in zip(ids_CxN, targets_CxM, strict=True)
    ]
    return float(np.mean(hits))


def pad_batch(x: np.ndarray, batch: int) -> np.ndarray:
    """A copy of ``x`` padded with zero rows to ``batch`` rows (static shapes: one compilation)."""
    if len(x) == batch:
        return x.copy()
    return np.concatenate([x, np.zeros((batch - len(x), *x.shape[1:]), x.dtype)])


def user_embeddings(tower: nnx.Module, inputs_CxL: np.ndarray, mask_CxL: np.ndarray, batch: int = 256):
    """(C, D) numpy: the eval-mode tower's user embedding of each context."""
    graphdef, state = nnx.split(tower)
    fn = jax.jit(lambda s, x, m: (lambda t: t.user_embedding(t(x, m)))(nnx.merge(graphdef, s)))
    out = []
    for i in range(0, len(inputs_CxL), batch):
        x, mk = pad_batch(inputs_CxL[i : i + batch], batch), pad_batch(mask_CxL[i : i + batch], batch)
        mk[:, -1] |= ~mk.any(1)  # padding rows: one (padding) item so every row is well-defined
        out.append(np.asarray(fn(state, jnp.asarray(x), jnp.asarray(mk)))[: min(batch, len(inputs_CxL) - i)])
    return np.concatenate(out)


def exact_topk(queries, index, k: int, exclude_CxH, allowed_V=None, batch: int = 256) -> np.ndarray:
    """Tower-only retrieval baseline: exact search over the main table, history (and, with ``allowed_V``,
    every disallowed id) excluded; the 0-padding of ``exclude_CxH`` excludes the padding item 0."""
    table = index.main.emb_NxD
    ex = exclude_CxH
    if allowed_V is not None:
        blocked = np.flatnonzero(~allowed_V).astype(np.int32)
        ex = np.concatenate([ex, np.broadcast_to(blocked, (len(ex), len(blocked)))], axis=1)
    fn = jax.jit(lambda q, e: topk_inner_product(q, table, k, exclude_BxH=e, impl="xla")[1])
    out = []
    for i in range(0, len(queries), batch):
        q, e = pad_batch(queries[i : i + batch], batch), pad_batch(ex[i : i + batch], batch)
        out.append(np.asarray(fn(jnp.asarray(q), jnp.asarray(e)))[: min(batch, len(queries) - i)])
    return np.concatenate(out)


def serve_all(
    ur: UnifiedRetrieval,
    index,
    ex: mt.MultiTaskExamples,
    user_side_C: np.ndarray,
    allowed=None,
    batch: int = 128,
    ivf=None,
) -> tuple[np.ndarray, np.ndarray]:
    """(final ids C x N, candidate ids C x K) of every context of ``ex`` through the unified model."""
    ids, cands = [], []
    c = ex.num_contexts
    for i in range(0, c, batch):
        sl = slice(i, i + batch)
        x, mk = pad_batch(ex.inputs_CxL[sl], batch), pad_batch(ex.mask_CxL[sl], batch)
        mk[:, -1] |= ~mk.any(1)
        out = ur(
            index, x, mk, allowed=allowed, exclude_BxH=pad_batch(ex.history_CxH[sl], batch),
            user_side_BxU=pad_batch(user_side_C[sl], batch), ivf=ivf,
        )  # fmt: skip
        n = min(batch, c - i)
        ids.append(np.asarray(out.ids_BxN)[:n])
        cands.append(np.asarray(out.candidate_ids_BxK)[:n])
    return np.concatenate(ids), np.concatenate(cands)


def ivf_results(
    args: Any,
    model: UnifiedModel,
    index,
    split_index,
    ex: mt.MultiTaskExamples,
    us_test: np.ndarray,
    u_test: np.ndarray,
    exact_k: np.ndarray,
    cands8: np.ndarray,
    ids8: np.ndarray,
    allowed: np.ndarray,
) -> dict:
    """The unified model with the main table in an int8 IVF, per ``args.nprobe``, beside int8 brute force
    (``cands8`` / ``ids8``); ``split_index``: the main + fresh index, served with IVF at the largest
    nprobe."""
    t = time.time()
    main_ivf = unified_ivf.build_main_ivf(index, args.clusters, seed=args.seed)
    valid = np.asarray(index.main.ids_N) >= 0
    cents = main_ivf.ivf.centroids_LxD
    size_L = np.bincount(
        np.asarray(assign_clusters(index.main.emb_NxD, cents))[valid], minlength=args.clusters
    )
    k, n = args.k, args.n_final
    target_f = np.where(allowed[ex.targets_CxM], ex.targets_CxM, 0)
    out = {
        "clusters": args.clusters,
        "cluster_size_min_median_max": f"{size_L.min()} / {int(np.median(size_L))} / {size_L.max()}",
        "build_seconds": round(time.time() - t, 1),
        f"int8_brute_force_pipeline@{n}": recall_at(ids8, ex.targets_CxM),
    }
    for p in args.nprobe:
        ur = UnifiedRetrieval(model, UnifiedConfig(k=k, n_final=n, index="ivf", nprobe=p, ann_impl="xla"))
        ids, cands = serve_all(ur, index, ex, us_test, ivf=main_ivf)
        probes = np.asarray(probe_clusters(u_test, cents, p))
        ids_f, _ = serve_all(ur, index, ex, us_test, allowed=allowed, ivf=main_ivf)
        out |= {
            f"nprobe={p}: items_scanned_fraction": float(size_L[probes].sum(1).mean() / valid.sum()),
            f"nprobe={p}: pipeline_recall@{n}": recall_at(ids, ex.targets_CxM),
            f"nprobe={p}: candidates_in_exact_top{k}": float(
                np.mean([np.isin(a, b).mean() for a, b in zip(cands, exact_k, strict=True)])
            ),
            f"nprobe={p}: candidates_in_int8_brute_top{k}": float(
                np.mean([np.isin(a, b).mean() for a, b in zip(cands, cands8, strict=True)])
            ),
            f"nprobe={p}: comedy_violations": int((~allowed[ids_f[ids_f >= 0]]).sum()),
            f"nprobe={p}: comedy_recall@{n}": recall_at(ids_f, target_f),
        }
    # main + fresh (10% of the items fresh) with the IVF over the reduced main table, largest nprobe
    p = max(args.nprobe)
    split_ivf = unified_ivf.build_main_ivf(split_index, args.clusters, seed=args.seed)
    ur = UnifiedRetrieval(model, UnifiedConfig(k=k, n_final=n, index="ivf", nprobe=p, ann_impl="xla"))
    ids_s, _ = serve_all(ur, split_index, ex, us_test, ivf=split_ivf)
    out[f"main+fresh, nprobe={p}: pipeline_recall@{n}"] = recall_at(ids_s, ex.targets_CxM)
    return out
