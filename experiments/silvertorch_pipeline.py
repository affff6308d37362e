"""SilverTorch unified retrieval on MovieLens: user tower -> filtered top-K -> OverArch -> heads ->
Value Model -> top-N, trained and evaluated end to end on CPU in a few minutes.

    PYTHONPATH=. python experiments/silvertorch_pipeline.py [--tower sasrec|hstu] [--dataset ml-100k|ml-1m]
        [--index brute|ivf --clusters L --nprobe 1,2,4] [--small] [--out DIR] [--workdir DIR]

Steps:
1. Multi-task split (recjax/retrieval/multitask_data.py): per user the last 5 interactions are the test
   window, up to 3 windows before it are training windows (ML-1M in the SASRec form has no ratings:
   click-only labels).
2. User tower (SASRec by default) trained by the ``Trainer`` (``WindowTask``: sampled softmax on one random
   window per user per epoch) on every user's sequence minus its test window and (``--tower-holdout
   train+test``, default) the training windows, so the OverArch learns on contexts the tower has not
   fitted, as at test time. Its own test: next-item ranking (HR/NDCG@K, MRR) of the held-out item right
   after its training sequence.
3. Index over the tower's (normalised) item table + genre / year side features. Training examples follow
   the serving distribution (``--negatives candidates``, default): negatives drawn from the tower's top-K
   (the candidates the OverArch re-ranks), positives outside the top-K masked out of click / long-watch.
   ``--negatives mixed``: uniform + top-100 negatives, all positives (re-ranking is then biased towards
   low retrieval scores, see docs/SILVERTORCH_MODEL.md).
4. OverArch + heads (click, rating, long-watch) + learned linear Value Model trained jointly by the same
   ``Trainer`` (``recjax.models.silvertorch_scorer.ScorerTask``, optax Adam with cosine decay) on
   precomputed user embeddings of the frozen tower.
5. Evaluation on the test windows: click / long-watch AUC, rating RMSE (beside the train-mean baseline),
   recall@N of the test items for exact search and for the full pipeline (exact and int8 retrieval),
   ANN recall of the int8 candidates vs exact top-K, a re-rank ablation, a genre-filtered run checked
   against an exact filter, and a main + fresh index split that must reproduce the single-index results.
6. ``--index ivf``: the same unified model with the main table in an int8 IVF (``unified_ivf.MainIVF``,
   ``--clusters`` k-means clusters) for each ``--nprobe`` (experiments/silvertorch_serving.py): recall@N of
   the pipeline, its candidates vs the exact and the int8 brute-force top-K, the fraction of items scanned,
   the genre filter inside the IVF search (violations, filtered recall) and the main + fresh split served
   with IVF.
Prints a table; ``--out`` also writes results.json. Both trainers run in a temporary directory, or with
``--workdir`` in ``DIR/tower`` and ``DIR/scorer`` (checkpoints each epoch; a re-run with the same training
flags resumes, other training flags are refused).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys
import tempfile
import time
from collections.abc import Iterator

import jax
import numpy as np
import optax
from flax import nnx

from experiments.silvertorch_serving import exact_topk, ivf_results, recall_at, serve_all, user_embeddings
from experiments.train_lib import ordered_metrics
from recjax.data import batching
from recjax.data.movielens import GENRES, load_ml1m_sequential, load_ml100k
from recjax.data.splits import LeaveOneOut
from recjax.data.types import SequenceDataset
from recjax.eval.classification import auc
from recjax.models.registry import build_model
from recjax.models.silvertorch_scorer import ScorerTask, predict, scorer_examples
from recjax.retrieval import fresh_index as fi
from recjax.retrieval import multitask_data as mt
from recjax.retrieval.overarch import OverArch, OverArchConfig
from recjax.retrieval.unified import Scorer, UnifiedConfig, UnifiedModel, UnifiedRetrieval, tower_index
from recjax.retrieval.value_model import ValueModel, ValueModelConfig
from recjax.train import workdir as workdir_lib
from recjax.train.tasks import LossConfig, NextItemTask
from recjax.train.trainer import TrainConfig, Trainer

# Flags that change what is trained: a --workdir resume refuses a change of any of them.
TRAINING_FLAGS = (
    "tower", "dataset", "tower_holdout", "small", "max_len", "dim", "tower_epochs", "scorer_epochs", "k",
    "hard", "uniform_negatives", "negatives", "seed",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    p.add_argument("--workdir", default=None, help="trainers' checkpoints and metrics (default: temporary)")
    args = p.parse_args(argv)
    if args.small:
        args.tower_epochs, args.scorer_epochs, args.k, args.n_final = 2, 1, 50, 20
    args.nprobe = [int(x) for x in str(args.nprobe).split(",")]
    return args


# --------------------------------------------------------------------------------------------- tower


class WindowTask(NextItemTask):
    """Next-item training on one random window per user per epoch (ending anywhere past the user's first
    item, at most ``max_len + 1`` items, left-padded) of the split's training sequences; the windows and
    the batch order are pure functions of (seed, epoch), so a resumed run sees the same batches. Validation
    and test: ``NextItemTask``'s full-corpus ranking."""

    def __init__(self, split: LeaveOneOut, **kwargs):
        super().__init__(split, **kwargs)
        self.sequences = [s for s in split.train if len(s) >= 2]  # shorter ones have no next item

    def num_train_batches(self) -> int:
        return batching.num_batches(len(self.sequences), self.batch_size, drop_remainder=False)

    def train_batches(self, epoch: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 1]))  # 1: not the order's stream
        length = self.max_len + 1
        windows = np.zeros((len(self.sequences), length), np.int32)
        for u, s in enumerate(self.sequences):
            end = int(rng.integers(2, len(s) + 1))
            w = s[max(0, end - length) : end]
            windows[u, length - len(w) :] = w
        inputs, targets = windows[:, :-1], windows[:, 1:]
        examples = {"inputs": inputs, "targets": targets, "mask": inputs > 0}
        return batching.batches(examples, self.batch_size, shuffle=True, seed=seed, epoch=epoch)


def tower_split(dataset: SequenceDataset, holdout: int) -> LeaveOneOut:
    """The tower's data: each user's sequence minus its last ``holdout`` items (at least 2 kept) is its
    training sequence; the next item (never trained on) is the validation target and the one after it the
    test target (history: the training sequence and the validation item), for the users that have both."""
    train, users, v_in, v_t, t_in, t_t = [], [], [], [], [], []
    for u, seq in enumerate(dataset.sequences):
        s = np.asarray(seq, np.int32)
        n = max(2, len(s) - holdout)
        train.append(s[:n])
        if len(s) >= n + 2:
            users.append(u)
            v_in.append(s[:n])
            v_t.append(s[n])
            t_in.append(s[: n + 1])
            t_t.append(s[n + 1])
    return LeaveOneOut(
        dataset, tuple(train), np.asarray(users, np.int32), tuple(v_in), np.asarray(v_t, np.int32),
        tuple(t_in), np.asarray(t_t, np.int32),
    )  # fmt: skip


def train_tower(
    args: argparse.Namespace, dataset: SequenceDataset, holdout: int, workdir: pathlib.Path
) -> tuple[nnx.Module, dict[str, float]]:
    """-> (eval-mode tower, its test ranking metrics). Fixed epochs, AdamW 1e-3, batch 128, sampled softmax
    with 128 uniform negatives; no validation (the last parameters are kept), then the test ranking."""
    if args.tower == "sasrec":
        extra = {"ffn_hidden_dim": args.dim}
    else:
        extra = {"attention_dim": args.dim, "linear_dim": args.dim}
    model = build_model(
        args.tower, dataset.num_items, rngs=nnx.Rngs(params=args.seed, dropout=args.seed + 1),
        max_len=args.max_len, embed_dim=args.dim, **extra,
    )  # fmt: skip
    # b2 / weight_decay: optax.adamw's defaults (the optimizer the tower had before the Trainer)
    cfg = TrainConfig(
        batch_size=128, num_epochs=args.tower_epochs, learning_rate=1e-3, b2=0.999, weight_decay=1e-4,
        seed=args.seed, eval_every_epochs=0, checkpoint_every_epochs=int(args.workdir is not None),
        progress=False, eval_impl="xla", loss=LossConfig(num_negatives=128),
    )  # fmt: skip
    task = WindowTask(
        tower_split(dataset, holdout), max_len=args.max_len, batch_size=cfg.batch_size, loss=cfg.loss,
        eval_batch_size=cfg.eval_batch_size, ks=cfg.ks, eval_impl=cfg.eval_impl,
    )  # fmt: skip
    trainer = Trainer(model, task, cfg, workdir)
    result = trainer.fit()
    test = result["test"]
    return trainer.best_model(), {k: test[k] for k in ordered_metrics(test)}


# -------------------------------------------------------------------------------------------- scorer


def train_scorer(
    args: argparse.Namespace, scorer: Scorer, train: dict, test: dict, workdir: pathlib.Path
) -> tuple[Scorer, dict[str, float]]:
    """-> (trained scorer, its head metrics on ``test``). Fixed epochs of batch 1024, Adam with cosine decay
    from 3e-3; no validation (the schedule runs to the last step, whose parameters are kept)."""
    cfg = TrainConfig(
        batch_size=1024, num_epochs=args.scorer_epochs, learning_rate=3e-3, seed=args.seed + 7,
        eval_every_epochs=0, checkpoint_every_epochs=int(args.workdir is not None), eval_batch_size=4096,
        progress=False,
    )  # fmt: skip
    task = ScorerTask(
        mt.TASKS, train, {"test": test}, batch_size=cfg.batch_size, task_weights=(1.0, 0.25, 1.0),
        value_weight=1.0, early_stop_metric="click_auc", eval_batch_size=cfg.eval_batch_size,
    )  # fmt: skip
    steps = cfg.num_epochs * task.num_train_batches()
    opt = optax.adam(optax.cosine_decay_schedule(cfg.learning_rate, max(steps, 1)))
    trainer = Trainer(scorer, task, cfg, workdir, optimizer=opt)
    result = trainer.fit()
    return trainer.best_model(), result["test"]


def rerank_ablation(scorer, cands_CxK, u_test, us_test, table, item_side, ex, n: int, rated: bool) -> dict:
    """recall@n when the K retrieved candidates are ordered by one task prediction or by the value."""
    c, k = cands_CxK.shape
    ctx = np.repeat(np.arange(c), k)
    items = np.maximum(cands_CxK.reshape(-1), 0)
    data = {"user_emb": u_test[ctx], "item_emb": table[items], "item_side": item_side[items],
            "user_side": us_test[ctx]}  # fmt: skip
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


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="silvertorch-") as tmp:
            return run(args, pathlib.Path(tmp))
    training = {k: getattr(args, k) for k in TRAINING_FLAGS}
    for part in ("tower", "scorer"):
        workdir_lib.check_resume_config(pathlib.Path(args.workdir) / part, training)
    return run(args, pathlib.Path(args.workdir))


def _show(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def run(args: argparse.Namespace, workdir: pathlib.Path) -> dict:
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
    tower, tower_test = train_tower(args, dataset, holdout, workdir / "tower")
    index = tower_index(tower, side_NxS=item_side, quantize=True)
    table = np.asarray(index.main.emb_NxD)
    print(f"[{time.time() - t0:6.1f}s] tower trained ({args.tower}); next held-out item: {_show(tower_test)}")

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
    test_sets = {
        "test_uniform_negatives": (test_ex, scorer_examples(test_ex, u_test, table, us_test, item_side)),
        "test_with_retrieved_negatives": (
            test_hard, scorer_examples(test_hard, u_test, table, us_test, item_side),
        ),
    }  # fmt: skip
    train_data = scorer_examples(train_ex, u_train, table, us_train, item_side)
    scorer, scorer_test = train_scorer(
        args, scorer, train_data, test_sets["test_uniform_negatives"][1], workdir / "scorer"
    )
    print(f"[{time.time() - t0:6.1f}s] scorer trained; test (uniform negatives): {_show(scorer_test)}")
    w = np.asarray(scorer.value_model.w_T[...]).tolist()
    value_formula = (f"value = {float(scorer.value_model.b[...]):+.3f} + {w[0]:+.3f} p_click "
                     f"{w[1]:+.3f} (rating - {rating_mean:.2f}) {w[2]:+.3f} p_long_watch")  # fmt: skip

    results: dict = {"tower_next_item": tower_test, "value_model": value_formula}
    for name, (ex, data) in test_sets.items():
        preds, _ = predict(scorer, data)
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
