"""SilverTorch unified retrieval on MovieLens: user tower -> filtered top-K -> OverArch -> heads ->
Value Model -> top-N, trained and evaluated end to end on CPU in a few minutes.

    PYTHONPATH=. python experiments/silvertorch_pipeline.py [--tower sasrec|hstu] [--dataset ml-100k|ml-1m]
        [--index brute|ivf --clusters L --nprobe 1,2,4] [--small] [--out DIR]

Steps:
1. Multi-task split (recjax/retrieval/multitask_data.py): per user the last 5 interactions are the test
   window, up to 3 windows before it are training windows (ML-1M in the SASRec form has no ratings:
   click-only labels).
2. User tower (SASRec by default) trained with sampled softmax on every user's sequence minus its test
   window and (``--tower-holdout train+test``, default) the training windows, so the OverArch learns on
   contexts the tower has not fitted, as at test time.
3. Index over the tower's (normalised) item table + genre / year side features. Training examples follow
   the serving distribution (``--negatives candidates``, default): negatives drawn from the tower's top-K
   (the candidates the OverArch re-ranks), positives outside the top-K masked out of click / long-watch.
   ``--negatives mixed``: uniform + top-100 negatives, all positives (re-ranking is then biased towards
   low retrieval scores, see docs/SILVERTORCH_MODEL.md).
4. OverArch + heads (click, rating, long-watch) + learned linear Value Model trained jointly (optax Adam,
   one jitted train step over nnx.split state) on precomputed user embeddings of the frozen tower.
5. Evaluation on the test windows: click / long-watch AUC, rating RMSE (beside the train-mean baseline),
   recall@N of the test items for exact search and for the full pipeline (exact and int8 retrieval),
   ANN recall of the int8 candidates vs exact top-K, a re-rank ablation, a genre-filtered run checked
   against an exact filter, and a main + fresh index split that must reproduce the single-index results.
6. ``--index ivf``: the same unified model with the main table in an int8 IVF (``unified_ivf.MainIVF``,
   ``--clusters`` k-means clusters) for each ``--nprobe``: recall@N of the pipeline, its candidates vs the
   exact and the int8 brute-force top-K, the fraction of items scanned, the genre filter inside the IVF
   search (violations, filtered recall) and the main + fresh split served with IVF.
Prints a table; ``--out`` also writes results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recjax.data.movielens import GENRES, load_ml1m_sequential, load_ml100k
from recjax.models.registry import build_model
from recjax.ops.ann import probe_clusters
from recjax.ops.topk import topk_inner_product
from recjax.retrieval import fresh_index as fi
from recjax.retrieval import multitask_data as mt
from recjax.retrieval import unified_ivf
from recjax.retrieval.ivf import assign_clusters
from recjax.retrieval.overarch import OverArch, OverArchConfig, task_predictions
from recjax.retrieval.unified import (
    Scorer,
    UnifiedConfig,
    UnifiedModel,
    UnifiedRetrieval,
    make_scorer_train_step,
    tower_index,
)
from recjax.retrieval.value_model import ValueModel, ValueModelConfig
from recjax.train.trainer import LossConfig, make_train_step


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tower", default="sasrec", choices=["sasrec", "hstu"])
    p.add_argument(
        "--dataset", default="ml-100k", choices=["ml-100k", "ml-1m"],
        help="ml-1m: the SASRec form (no ratings): click-only labels, value = click",
    )  # fmt: skip
    p.add_argument(
        "--tower-holdout", default="train+test", choices=["train+test", "test"],
        help="windows the tower is not trained on (test: it also fits the OverArch's training windows)",
    )  # fmt: skip
    p.add_argument("--small", action="store_true", help="tiny run (a few epochs, 200 users) for tests")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--tower-epochs", type=int, default=30)
    p.add_argument("--scorer-epochs", type=int, default=8)
    p.add_argument("--k", type=int, default=300, help="candidates retrieved per user")
    p.add_argument("--n-final", type=int, default=100)
    p.add_argument("--hard", type=int, default=30, help="hard negatives per context from the tower's top-K")
    p.add_argument("--uniform-negatives", type=int, default=0, help="uniform negatives per training positive")
    p.add_argument(
        "--negatives", default="candidates", choices=["mixed", "candidates"],
        help="mixed: uniform + --hard from the top-100; candidates: --hard from the top-K, positives "
        "outside the top-K masked for click / long-watch (use with --uniform-negatives 0)",
    )  # fmt: skip
    p.add_argument(
        "--index", default="brute", choices=["brute", "ivf"],
        help="ivf: also serve with the main table in an int8 IVF (--clusters, --nprobe) and compare",
    )  # fmt: skip
    p.add_argument("--clusters", type=int, default=32, help="IVF k-means clusters (--index ivf)")
    p.add_argument("--nprobe", default="1,2,4,8", help="comma-separated clusters probed per query")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.small:
        args.tower_epochs, args.scorer_epochs, args.k, args.n_final = 2, 1, 50, 20
    args.nprobe = [int(x) for x in str(args.nprobe).split(",")]
    return args


# ------------------------------------------------------------------------------------------- metrics


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by average ranks (ties count half)."""
    labels = labels.astype(bool)
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def recall_at(ids_CxN: np.ndarray, targets_CxM: np.ndarray) -> float:
    hits = [
        np.isin(t[t > 0], ids).sum() / max((t > 0).sum(), 1)
        for ids, t in zip(ids_CxN, targets_CxM, strict=True)
    ]
    return float(np.mean(hits))


# --------------------------------------------------------------------------------------------- tower


def train_tower(args, dataset, holdout: int):
    """Sampled-softmax next-item training on each user's sequence minus its last ``holdout`` items (the
    test window, and by default the OverArch's training windows too, so that the OverArch learns on
    contexts the tower has not fitted, as at test time)."""
    if args.tower == "sasrec":
        extra = {"ffn_hidden_dim": args.dim}
    else:
        extra = {"attention_dim": args.dim, "linear_dim": args.dim}
    model = build_model(
        args.tower, dataset.num_items, rngs=nnx.Rngs(params=args.seed, dropout=args.seed + 1),
        max_len=args.max_len, embed_dim=args.dim, **extra,
    )  # fmt: skip
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = optax.adamw(1e-3)
    opt_state = opt.init(params)
    seqs = [s[: max(2, len(s) - holdout)] for s in dataset.sequences]
    length = args.max_len + 1

    step = make_train_step(graphdef, opt, LossConfig(num_negatives=128))  # the library's jitted step
    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed)
    batch = 128
    loss = float("nan")
    for _ in range(args.tower_epochs):
        # one random window (ending anywhere past the first item) per user per epoch, left-padded
        windows = np.zeros((len(seqs), length), np.int32)
        for u, s in enumerate(seqs):
            end = int(rng.integers(min(len(s), 2), len(s) + 1))
            w = s[max(0, end - length) : end]
            windows[u, length - len(w) :] = w
        perm = rng.permutation(len(seqs))
        for i in range(0, len(perm) - batch + 1, batch):
            key, sub = jax.random.split(key)
            w = windows[perm[i : i + batch]]
            inputs, targets = w[:, :-1], w[:, 1:]
            data = {"inputs": inputs, "targets": targets, "mask": (inputs > 0) & (targets > 0)}
            params, rest, opt_state, metrics = step(params, rest, opt_state, data, sub)
            loss = metrics["loss"]
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    return model, float(loss)


def user_embeddings(tower, inputs_CxL, mask_CxL, batch: int = 256) -> np.ndarray:
    graphdef, state = nnx.split(tower)
    fn = jax.jit(lambda s, x, m: (lambda t: t.user_embedding(t(x, m)))(nnx.merge(graphdef, s)))
    out = []
    for i in range(0, len(inputs_CxL), batch):
        x, mk = _pad_batch(inputs_CxL[i : i + batch], batch), _pad_batch(mask_CxL[i : i + batch], batch)
        mk[:, -1] |= ~mk.any(1)  # padding rows: one (padding) item so every row is well-defined
        out.append(np.asarray(fn(state, jnp.asarray(x), jnp.asarray(mk)))[: min(batch, len(inputs_CxL) - i)])
    return np.concatenate(out)


def _pad_batch(x: np.ndarray, batch: int) -> np.ndarray:
    if len(x) == batch:
        return x.copy()
    return np.concatenate([x, np.zeros((batch - len(x), *x.shape[1:]), x.dtype)])


def exact_topk(queries, index, k, exclude_CxH, allowed_V=None, batch=256) -> np.ndarray:
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
        q, e = _pad_batch(queries[i : i + batch], batch), _pad_batch(ex[i : i + batch], batch)
        out.append(np.asarray(fn(jnp.asarray(q), jnp.asarray(e)))[: min(batch, len(queries) - i)])
    return np.concatenate(out)


# -------------------------------------------------------------------------------------------- scorer


def scorer_batches(ex: mt.MultiTaskExamples, user_emb, user_side_C, item_table, item_side):
    return {
        "user_emb": user_emb[ex.context_E],
        "item_emb": item_table[ex.items_E],
        "item_side": item_side[ex.items_E],
        "user_side": user_side_C[ex.context_E],
        "labels": ex.labels_ExT,
        "label_mask": ex.label_mask_ExT,
        "value_target": ex.value_target_E,
    }


def train_scorer(args, scorer: Scorer, data: dict, batch: int = 1024):
    graphdef, params, rest = nnx.split(scorer, nnx.Param, ...)
    e = len(data["labels"])
    steps = args.scorer_epochs * (e // batch)
    opt = optax.adam(optax.cosine_decay_schedule(3e-3, max(steps, 1)))
    opt_state = opt.init(params)
    step = make_scorer_train_step(graphdef, opt, task_weights=(1.0, 0.25, 1.0), value_weight=1.0)
    rng = np.random.default_rng(args.seed + 7)
    metrics = {}
    for _ in range(args.scorer_epochs):
        perm = rng.permutation(e)
        for i in range(0, e - batch + 1, batch):
            b = {k: jnp.asarray(v[perm[i : i + batch]]) for k, v in data.items()}
            params, opt_state, metrics = step(params, rest, opt_state, b)
    return nnx.merge(graphdef, params, rest), {k: float(v) for k, v in metrics.items()}


def predict(scorer: Scorer, data: dict, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    graphdef, state = nnx.split(scorer)

    @jax.jit
    def fn(s, u, it, si, us):
        sc = nnx.merge(graphdef, s)
        logits = sc.overarch(u, it[:, None], si[:, None], us)[:, 0]
        preds = task_predictions(logits, sc.tasks)
        return preds, sc.value_model(preds)

    preds, values = [], []
    n = len(data["labels"])
    for i in range(0, n, batch):
        args = [
            _pad_batch(data[k][i : i + batch], batch)
            for k in ("user_emb", "item_emb", "item_side", "user_side")
        ]
        p, v = fn(state, *map(jnp.asarray, args))
        preds.append(np.asarray(p)[: min(batch, n - i)])
        values.append(np.asarray(v)[: min(batch, n - i)])
    return np.concatenate(preds), np.concatenate(values)


def rerank_ablation(scorer, cands_CxK, u_test, us_test, table, item_side, ex, n: int, rated: bool) -> dict:
    """recall@n when the K retrieved candidates are ordered by one task prediction or by the value."""
    c, k = cands_CxK.shape
    ctx = np.repeat(np.arange(c), k)
    items = np.maximum(cands_CxK.reshape(-1), 0)
    data = {
        "user_emb": u_test[ctx], "item_emb": table[items], "item_side": item_side[items],
        "user_side": us_test[ctx], "labels": np.zeros((c * k, 3), np.float32),
    }  # fmt: skip
    preds, values = predict(scorer, data)
    out = {}
    orders = [("click", preds[:, 0]), ("value_model", values)]
    if rated:  # the rating / long-watch heads are trained only on rated data
        orders += [("rating", preds[:, 1]), ("long_watch", preds[:, 2])]
    for name, score in orders:
        score = np.where(cands_CxK.reshape(-1) > 0, score, -np.inf).reshape(c, k)
        top = np.take_along_axis(cands_CxK, np.argsort(-score, axis=1, kind="stable")[:, :n], axis=1)
        out[f"recall@{n}_{name}"] = recall_at(top, ex.targets_CxM)
    out[f"recall@{n}_retrieval_score"] = recall_at(cands_CxK[:, :n], ex.targets_CxM)
    return out


def task_metrics(preds, ex: mt.MultiTaskExamples, rating_baseline: float) -> dict:
    out = {"click_auc": auc(preds[:, 0], ex.labels_ExT[:, 0])}
    if not ex.label_mask_ExT[:, 1].any():  # no ratings in the dataset: click only
        return out
    observed = ex.labels_ExT[:, 0] > 0
    r_pred, r_true = preds[observed, 1], ex.labels_ExT[observed, 1]
    return {
        **out,
        "long_watch_auc": auc(preds[:, 2], ex.labels_ExT[:, 2]),
        "long_watch_auc_observed": auc(preds[observed, 2], ex.labels_ExT[observed, 2]),
        "rating_rmse": float(np.sqrt(np.mean((r_pred - r_true) ** 2))),
        "rating_rmse_mean_baseline": float(np.sqrt(np.mean((rating_baseline - r_true) ** 2))),
    }


# ------------------------------------------------------------------------------------------- serving


def serve_all(
    ur: UnifiedRetrieval, index, ex: mt.MultiTaskExamples, user_side_C, allowed=None, batch=128, ivf=None
):
    ids, cands = [], []
    c = ex.num_contexts
    for i in range(0, c, batch):
        sl = slice(i, i + batch)
        x, mk = _pad_batch(ex.inputs_CxL[sl], batch), _pad_batch(ex.mask_CxL[sl], batch)
        mk[:, -1] |= ~mk.any(1)
        out = ur(
            index, x, mk, allowed=allowed, exclude_BxH=_pad_batch(ex.history_CxH[sl], batch),
            user_side_BxU=_pad_batch(user_side_C[sl], batch), ivf=ivf,
        )  # fmt: skip
        n = min(batch, c - i)
        ids.append(np.asarray(out.ids_BxN)[:n])
        cands.append(np.asarray(out.candidate_ids_BxK)[:n])
    return np.concatenate(ids), np.concatenate(cands)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    load = load_ml100k if args.dataset == "ml-100k" else load_ml1m_sequential
    dataset = load(args.data_dir)
    if args.small:
        cut = lambda x: None if x is None else x[:200]  # noqa: E731
        dataset = dataclasses.replace(
            dataset, sequences=dataset.sequences[:200], ratings=cut(dataset.ratings),
            timestamps=cut(dataset.timestamps),
            user_features={k: v[:200] for k, v in dataset.user_features.items()},
        )  # fmt: skip
    split_cfg = mt.MultiTaskSplitConfig(
        max_len=args.max_len, num_negatives=args.uniform_negatives, num_test_negatives=4, seed=args.seed
    )
    train_ex, test_ex = mt.build_multitask_split(dataset, split_cfg)
    item_side = mt.item_side_features(dataset)
    user_side = mt.user_side_features(dataset)
    print(
        f"[{time.time() - t0:6.1f}s] {train_ex.num_contexts} train contexts / {train_ex.num_examples} "
        f"examples, {test_ex.num_contexts} test contexts / {test_ex.num_examples} examples"
    )

    m = split_cfg.targets_per_window
    holdout = m * (1 + split_cfg.train_windows) if args.tower_holdout == "train+test" else m
    tower, tower_loss = train_tower(args, dataset, holdout)
    index = tower_index(tower, side_NxS=item_side, quantize=True)
    table = np.asarray(index.main.emb_NxD)
    print(
        f"[{time.time() - t0:6.1f}s] tower trained ({args.tower}, last sampled-softmax loss {tower_loss:.3f})"
    )

    u_train = user_embeddings(tower, train_ex.inputs_CxL, train_ex.mask_CxL)
    u_test = user_embeddings(tower, test_ex.inputs_CxL, test_ex.mask_CxL)
    if args.negatives == "candidates":
        # train on the serving distribution: negatives from the tower's top-K, and positives outside the
        # top-K are dropped from the click / long-watch losses (else "low retrieval score" would look like
        # a positive, a selection bias the OverArch learns and then applies to the top-K)
        pool = exact_topk(u_train, index, args.k, train_ex.history_CxH)
        in_pool = np.asarray(
            [np.isin(i, pool[c]) for c, i in zip(train_ex.context_E, train_ex.items_E, strict=True)]
        )
        keep = in_pool | (train_ex.labels_ExT[:, 0] == 0)
        lmask = train_ex.label_mask_ExT.copy()
        lmask[~keep, 0] = lmask[~keep, 2] = False
        train_ex = dataclasses.replace(train_ex, label_mask_ExT=lmask)
    else:
        pool = exact_topk(u_train, index, 100, train_ex.history_CxH)
    train_ex = mt.add_negatives(train_ex, dataset, pool, args.hard, seed=args.seed)
    test_pool = exact_topk(u_test, index, 100, test_ex.history_CxH)
    test_hard = mt.add_negatives(test_ex, dataset, test_pool, args.hard, seed=args.seed + 1)

    tasks = mt.TASKS
    rated = train_ex.label_mask_ExT[:, 1]
    rating_mean = float(train_ex.labels_ExT[rated, 1].mean()) if rated.any() else 0.0
    oa_cfg = OverArchConfig(
        args.dim, tasks, item_side_dim=item_side.shape[1], user_side_dim=user_side.shape[1],
        hidden_dims=(128, 64), head_dim=32,
    )  # fmt: skip
    if rated.any():
        vm_cfg = ValueModelConfig((1.0, 0.2, 0.5), offsets=(0.0, rating_mean, 0.0), mode="linear")
    else:  # click-only data: the rating / long-watch heads are never trained, so they get weight 0
        vm_cfg = ValueModelConfig((1.0, 0.0, 0.0), mode="fixed")
    scorer = nnx.jit(
        lambda: Scorer(OverArch(oa_cfg, rngs=nnx.Rngs(args.seed)), ValueModel(vm_cfg, rngs=nnx.Rngs(0)))
    )()
    us_train, us_test = user_side[train_ex.user_C], user_side[test_ex.user_C]
    data = scorer_batches(train_ex, u_train, us_train, table, item_side)
    scorer, last = train_scorer(args, scorer, data)
    print(f"[{time.time() - t0:6.1f}s] scorer trained: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items()))
    w = np.asarray(scorer.value_model.w_T[...]).tolist()
    value_formula = (f"value = {float(scorer.value_model.b[...]):+.3f} + {w[0]:+.3f} p_click "
                     f"{w[1]:+.3f} (rating - {rating_mean:.2f}) {w[2]:+.3f} p_long_watch")  # fmt: skip

    results: dict = {"value_model": value_formula}
    for name, ex in (("test_uniform_negatives", test_ex), ("test_with_retrieved_negatives", test_hard)):
        preds, _ = predict(scorer, scorer_batches(ex, u_test, us_test, table, item_side))
        results[name] = task_metrics(preds, ex, rating_mean)

    # --- the unified model: tower -> top-K -> OverArch -> heads -> value -> top-N
    model = UnifiedModel(tower, scorer)
    k, n = args.k, args.n_final
    ur = UnifiedRetrieval(model, UnifiedConfig(k=k, n_final=n, topk_impl="xla"))
    ur8 = UnifiedRetrieval(model, UnifiedConfig(k=k, n_final=n, retrieval="int8", ann_impl="xla"))
    exact_n = exact_topk(u_test, index, n, test_ex.history_CxH)
    exact_k = exact_topk(u_test, index, k, test_ex.history_CxH)
    ids, cands = serve_all(ur, index, test_ex, us_test)
    ids8, cands8 = serve_all(ur8, index, test_ex, us_test)
    ann_recall = np.mean([np.isin(a, b).mean() for a, b in zip(cands8, exact_k, strict=True)])
    results["recall"] = {
        f"exact_search@{n}": recall_at(exact_n, test_ex.targets_CxM),
        f"exact_search@{k}": recall_at(exact_k, test_ex.targets_CxM),
        f"pipeline_exact_retrieval@{n}": recall_at(ids, test_ex.targets_CxM),
        f"pipeline_int8_retrieval@{n}": recall_at(ids8, test_ex.targets_CxM),
        f"int8_candidates_vs_exact_top{k}": float(ann_recall),
        "pipeline_candidates_equal_exact_topk": bool((cands == exact_k).all()),
    }
    results["rerank_by"] = rerank_ablation(
        scorer, cands, u_test, us_test, table, item_side, test_ex, n, bool(rated.any())
    )

    # --- genre filter: every user asks for one genre; check against the exact filter
    genre = GENRES.index("Comedy")
    allowed = dataset.item_features["genres"][:, genre] > 0
    allowed[0] = False
    ids_f, cands_f = serve_all(ur, index, test_ex, us_test, allowed=allowed)
    got = ids_f[ids_f >= 0]
    exact_f = exact_topk(u_test, index, k, test_ex.history_CxH, allowed_V=allowed)
    overlap = np.mean([np.isin(a[a >= 0], b[b >= 0]).mean() for a, b in zip(cands_f, exact_f, strict=True)])
    results["filter_comedy"] = {
        "returned_items_violating_filter": int((~allowed[got]).sum()),
        "allowed_items": int(allowed.sum()),
        f"candidates_in_exact_filtered_top{k}": float(overlap),
        f"recall@{n}_comedy_targets": recall_at(
            ids_f, np.where(allowed[test_ex.targets_CxM], test_ex.targets_CxM, 0)
        ),
    }

    # --- main + fresh: hold 10% of the items out of the main table, add them as fresh items
    rng = np.random.default_rng(args.seed)
    held = rng.choice(np.arange(1, dataset.num_items + 1), size=dataset.num_items // 10, replace=False)
    main_ids = np.arange(dataset.num_items + 1, dtype=np.int32)
    main_ids[0] = -1
    main_ids[held] = -1
    split_index = fi.build_index(table, side_NxS=item_side, ids_N=main_ids, fresh_capacity=len(held) + 8,
                                 id_capacity=dataset.num_items + 1)  # fmt: skip
    split_index = fi.add_items(split_index, held.astype(np.int32), table[held], item_side[held])
    ids_s, _ = serve_all(ur, split_index, test_ex, us_test)
    results["fresh_index"] = {
        "fresh_items": int(len(held)),
        "results_equal_single_index": bool((ids_s == ids).all()),
        "fraction_of_results_from_fresh": float(np.isin(ids_s, held).mean()),
        "trace_count": ur.trace_count,
    }
    if args.index == "ivf":
        results["ivf"] = ivf_results(
            args, model, index, split_index, test_ex, us_test, u_test, exact_k, cands8, ids8, allowed
        )
    results["seconds"] = round(time.time() - t0, 1)
    results["command"] = " ".join([sys.executable, *sys.argv])
    results["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    results["device"] = str(jax.devices()[0])
    print_table(results)
    if args.out:
        path = pathlib.Path(args.out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "results.json").write_text(json.dumps(results, indent=2))
    return results


def ivf_results(args, model, index, split_index, ex, us_test, u_test, exact_k, cands8, ids8, allowed) -> dict:
    """The unified model with the main table in an int8 IVF, per nprobe, beside int8 brute force."""
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


def print_table(results: dict) -> None:
    print()
    for section, values in results.items():
        if isinstance(values, dict):
            print(f"{section}:")
            for k, v in values.items():
                print(f"  {k:<44} {v:.4f}" if isinstance(v, float) else f"  {k:<44} {v}")
        else:
            print(f"{section}: {values}")


if __name__ == "__main__":
    main()
