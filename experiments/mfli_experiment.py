"""MFLI end to end (issue 10): train through the one Trainer from a config, build the MFLI index from the best
model, and compare, on the test users, MFLI serving vs brute force vs our IVF index at equal candidate count.

Per seed (``--seeds``): the config's dataset, leave-one-out split, ``MFLI`` + ``MFLITask`` (exactly as
``experiments.run`` builds them), ``Trainer(...).fit()`` in ``WORKDIR/s<seed>``, then from
``Trainer.best_model()``:
- codes of the item table at the best model's active levels (``MFLI.item_codes``), the index
  (``mfli_index.build_snapshot`` over the quantizer's facet views, split/merge by ``--upper`` / ``--lower``);
- the test users' query = the model's user embedding (as ``NextItemTask.rank``);
- methods, each returning a ranked list of K' = max(k) + H ids (H = the exclusion width of the test rows):
  ``mfli``: ``mfli_serving.retrieve`` (user-embedding mode, ``--k-clusters`` per facet, a candidate buffer of
  ``--candidates``); ``brute``: exact float32 top-K' over all items (``ops.topk``); ``ivf``:
  ``ops.ann.ivf_search`` over ``retrieval.ivf`` (``--ivf-clusters`` k-means lists, int8 scores), nprobe such
  that nprobe N / L equals MFLI's mean distinct candidate count (equal candidate count);
- recall@k = HR@k: the fraction of test users whose held-out item is in the top k after the user's history is
  removed from the list, as ``recjax.eval.ranking`` excludes it (padding and history ids, never the target);
  brute force therefore equals ranking's HR@k up to score ties (ranking counts ties against the target);
- cold recall: the same restricted to test users whose target is a cold item (the ``--cold`` fraction of items
  with the fewest training interactions, ties by lower id);
- code balance per facet before and after split/merge (clusters, max/mean size, Gini) and the code usage
  metrics of ``MFLITask.code_metrics``.
Writes ``WORKDIR/results.json`` and ``WORKDIR/table.md`` (mean ± std over seeds) and prints the table.

    python -m experiments.mfli_experiment --workdir runs/mfli_ml1m [--config experiments/configs/mfli_ml1m.py]
        [--seeds 0,1,2] [--set train.num_epochs=50 ...]
    python -m experiments.mfli_experiment --workdir /tmp/mfli_small --small   # mfli_tiny, CPU, < 1 min
    python -m experiments.mfli_experiment --workdir runs/mfli --merge runs/mfli_s0,runs/mfli_s1  # join seeds

Letters: U test users, D dim, N items (row 0 = padding), H excluded ids per user, K list length.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import overrides, parallel, train_lib
from recjax.data import batching
from recjax.data.splits import leave_one_out
from recjax.models.registry import build_model
from recjax.ops import ann, topk
from recjax.ops.topk import exclusion_mask
from recjax.retrieval import ivf, mfli_index, mfli_serving
from recjax.train.trainer import Trainer

KS = (50, 100, 200)
METHODS = ("mfli", "brute", "ivf")
DEFAULT_CONFIG = "experiments/configs/mfli_ml1m.py"
SMALL_CONFIG = "experiments/configs/mfli_tiny.py"


@dataclasses.dataclass
class SeedRun:
    result: dict[str, Any]
    model: nnx.Module
    task: Any


def parse_args(argv=None) -> argparse.Namespace:
    from experiments.configs import base

    d = base.mfli_serving()  # the one set of serving defaults (experiments.run uses the same section)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--config", default=None, help=f"default {DEFAULT_CONFIG} ({SMALL_CONFIG} with --small)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--upper", type=int, default=d.upper, help="split clusters above this size")
    ap.add_argument("--lower", type=int, default=d.lower, help="merge clusters below this size")
    ap.add_argument(
        "--no-rebalance", dest="rebalance", action="store_false", help="no split/merge (clusters as trained)"
    )
    ap.add_argument("--k-clusters", type=int, default=d.k_clusters, help="clusters selected per facet")
    ap.add_argument("--candidates", type=int, default=d.candidates, help="candidate buffer (raised to K')")
    ap.add_argument("--ivf-clusters", type=int, default=d.ivf_clusters)
    ap.add_argument("--cold", type=float, default=d.cold, help="fraction of items counted as cold")
    ap.add_argument("--small", action="store_true", help="mfli_tiny, 2 epochs, small index: CPU, < 1 min")
    ap.add_argument("--merge", default="", metavar="DIR,DIR,...", help=train_lib.MERGE_HELP)
    a = ap.parse_args(argv)
    if a.small:
        a.config = a.config or SMALL_CONFIG
        # 2 epochs of 16 steps: level 0 from step 8, level 1 from step 16; one eval batch shape
        small = ["train.num_epochs=2", "model.start_step=8", "model.level_interval=8"]
        a.set = [*small, "train.eval_batch_size=500", "train.checkpoint_every_epochs=0", *a.set]
        a.upper, a.lower, a.k_clusters, a.candidates, a.ivf_clusters = 32, 2, 4, 256, 16
    a.config = a.config or DEFAULT_CONFIG
    if not 0 < a.cold < 1:
        ap.error(f"--cold: expected a fraction in (0, 1), got {a.cold}")
    return a


def load_config(a: argparse.Namespace):
    config = overrides.load_config(a.config)
    for item in a.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set {item!r}: expected KEY=VALUE")
        try:
            overrides.set_value(config, key, raw)
        except (KeyError, ValueError) as e:
            raise SystemExit(f"error: --set {key}: {e}") from None
    if config.model.name != "mfli":
        raise SystemExit(
            f"error: --config: expected an MFLI config (model.name 'mfli'), got {config.model.name!r}"
        )
    overrides.validate(config)
    return config


def cold_items(train_sequences, num_items: int, fraction: float) -> np.ndarray:
    """(num_items + 1,) bool: the ``fraction`` of items 1..num_items with the fewest training interactions
    (ties: lower id first); padding row 0 is never cold."""
    counts = np.zeros(num_items + 1, np.int64)
    for seq in train_sequences:
        np.add.at(counts, np.asarray(seq), 1)
    order = np.argsort(counts[1:], kind="stable") + 1
    cold = np.zeros(num_items + 1, bool)
    cold[order[: int(np.ceil(fraction * num_items))]] = True
    return cold


def hits_from_lists(ids_UxK, target_U, exclude_UxH, ks, num_rows: int) -> dict[int, np.ndarray]:
    """Per user and cutoff k: is the target among the first k ids left after removing padding / missing ids
    (<= 0) and the user's excluded ids other than the target (``ranking``'s exclusion, through its
    ``exclusion_mask`` over ``num_rows`` = N ids)?"""
    ids, target = np.asarray(ids_UxK), np.asarray(target_U)
    listed_UxN = np.asarray(exclusion_mask(jnp.asarray(exclude_UxH), num_rows))
    excluded = (ids <= 0) | (np.take_along_axis(listed_UxN, np.maximum(ids, 0), 1) & (ids != target[:, None]))
    pos = np.cumsum(~excluded, axis=1)  # 1-based position in the filtered list
    at_target = (ids == target[:, None]) & ~excluded
    rank = np.where(at_target, pos, np.iinfo(np.int64).max).min(1)  # max: not in the list
    return {k: rank <= k for k in ks}


@functools.partial(jax.jit, static_argnums=0)
def _user_queries(graphdef, state, inputs_BxL, mask_BxL):
    model = nnx.merge(graphdef, state)
    return model.user_embedding(model(inputs_BxL, mask_BxL))


def build_index(model, a) -> tuple[mfli_index.MFLIIndex, int]:
    """The MFLI snapshot over items 1..N-1 (ids = item ids) at the model's active levels (docs/MFLI.md)."""
    items, _ = model.quantizer_inputs()
    levels = int(model.quantizer.active_levels())
    codes = np.asarray(model.item_codes())[1:]
    facet = np.asarray(model.quantizer.facet_inputs(items))[1:]
    n = items.shape[0]
    if a.rebalance:
        cfg = mfli_index.RebalanceConfig(upper_bound=a.upper, lower_bound=a.lower)
    else:  # the split/merge ablation: clusters exactly as the codes make them
        cfg = mfli_index.RebalanceConfig(upper_bound=None, lower_bound=0)
    index = mfli_index.build_snapshot(
        np.asarray(items)[1:], codes, facet_emb_NxFxD=facet, ids_N=np.arange(1, n),
        num_codes=model.config.codebook_size, levels=max(levels, 1), config=cfg, id_capacity=n,
    )  # fmt: skip
    return index, levels


def retrieval_metrics(model, task, split, a) -> dict[str, Any]:
    """Recall (HR@k), cold recall, candidate counts of MFLI / brute force / IVF on the test users."""
    graphdef, state = nnx.split(model)
    items_NxD = jnp.asarray(model.candidate_embeddings(), jnp.float32)
    n = items_NxD.shape[0]
    examples = task.examples["test"]
    k_list = min(max(KS) + examples["exclude"].shape[1], n - 1)  # K': room for the removed history
    index, levels = build_index(model, a)
    arrays = mfli_index.serving_arrays(index)
    k_clusters = min(a.k_clusters, index.cluster_capacity)
    max_cands = max(a.candidates, k_list)
    cents = ivf.kmeans(items_NxD[1:], ivf.KMeansConfig(num_clusters=a.ivf_clusters, seed=0))
    block_n = 64 if n >= 64 * a.ivf_clusters else 32
    ivf_index = ivf.build_ivf_index(items_NxD[1:], cents, block_n=block_n)
    cold = cold_items(split.train, n - 1, a.cold)
    mfli_fn = jax.jit(
        lambda q: mfli_serving.retrieve(
            arrays, k_list, k_clusters=k_clusters, max_candidates=max_cands, queries_BxD=q
        )
    )
    brute_fn = jax.jit(lambda q: topk.topk_inner_product(q, items_NxD[1:], k_list, impl="xla")[1] + 1)
    rows = {m: {k: [] for k in KS} for m in METHODS}
    targets, valids, mfli_counts, batches = [], [], [], []
    for b in batching.batches(examples, task.eval_batch_size, shuffle=False):
        q = _user_queries(graphdef, state, jnp.asarray(b["inputs"]), jnp.asarray(b["mask"]))
        batches.append((q, b))
        out = mfli_fn(q)
        mfli_counts.append(np.asarray(out.num_candidates_B)[np.asarray(b["valid"], bool)])
        lists = {"mfli": out.ids_Bxk, "brute": brute_fn(q)}
        for m, ids in lists.items():
            for k, h in hits_from_lists(ids, b["target"], b["exclude"], KS, n).items():
                rows[m][k].append(h)
        targets.append(np.asarray(b["target"]))
        valids.append(np.asarray(b["valid"], bool))
    mean_cands = float(np.concatenate(mfli_counts).mean())
    nprobe = int(np.clip(round(mean_cands * a.ivf_clusters / (n - 1)), 1, a.ivf_clusters))
    ivf_fn = jax.jit(lambda q: ann.ivf_search(q, ivf_index, k_list, nprobe, impl="auto"))
    for q, b in batches:
        _, ids = ivf_fn(q)
        ids = jnp.where(ids >= 0, ids + 1, 0)
        for k, h in hits_from_lists(ids, b["target"], b["exclude"], KS, n).items():
            rows["ivf"][k].append(h)
    valid, target = np.concatenate(valids), np.concatenate(targets)
    is_cold = valid & cold[target]
    out: dict[str, Any] = {
        "users": int(valid.sum()),
        "cold_users": int(is_cold.sum()),
        "list_length": k_list,
        "active_levels": levels,
        "k_clusters": k_clusters,
        "max_candidates": max_cands,
        "ivf_nprobe": nprobe,
    }
    scanned = {"mfli": mean_cands, "brute": float(n - 1), "ivf": nprobe * (n - 1) / a.ivf_clusters}
    for m in METHODS:
        hit = {k: np.concatenate(rows[m][k]) for k in KS}
        out[m] = {
            "candidates": scanned[m],
            **{f"recall@{k}": float(hit[k][valid].mean()) for k in KS},
            **{f"cold_recall@{k}": float(hit[k][is_cold].mean()) if is_cold.any() else None for k in KS},
        }
    out["balance"] = [
        {"before": dataclasses.asdict(s0), "after": dataclasses.asdict(s1)}
        for s0, s1 in zip(index.stats_before, index.stats_after, strict=True)
    ]
    out["rebalance"] = bool(a.rebalance)  # without it no bound was applied
    out["upper_bound"], out["lower_bound"] = (a.upper, a.lower) if a.rebalance else (None, None)
    return out


def run_seed(config, seed: int, workdir: pathlib.Path, a) -> SeedRun:
    """Trains one seed as ``train_lib.run_experiment`` does (same dataset, model, task, Trainer options) and
    evaluates retrieval on its best model."""
    config = config.copy_and_resolve_references()
    config.train.seed = seed
    tcfg = train_lib.train_config(config.train)
    model_cfg = config.model.to_dict()
    model_name = model_cfg.pop("name")
    mesh, plan, batch_iter = parallel.setup(config, train_lib.batch_iterator(config.data.pipeline))
    dataset = train_lib.load_dataset(config.data)
    split = leave_one_out(dataset)
    model = build_model(
        model_name, dataset.num_items, max_len=config.data.max_len,
        rngs=nnx.Rngs(params=seed, dropout=seed + 1), **model_cfg,
    )  # fmt: skip
    task = train_lib.TASK_BUILDERS[model_name](split, tcfg, config, batch_iter)
    options = parallel.trainer_options(config, tcfg)
    t0 = time.perf_counter()
    trainer = Trainer(model, task, tcfg, workdir, mesh=mesh, embedding_plan=plan, **options)
    fit = trainer.fit()
    best = trainer.best_model()
    t1 = time.perf_counter()
    result = {"seed": seed, "train_s": t1 - t0, "test": fit["test"], "best_epoch": fit.get("best_epoch")}
    result.update(epochs=fit["epochs"], out_of_time=bool(fit.get("out_of_time")))
    result["code_metrics"] = task.code_metrics(best)
    result.update(retrieval_metrics(best, task, split, a))
    result["retrieval_s"] = time.perf_counter() - t1
    return SeedRun(result, best, task)


def serving_test_metrics(model: nnx.Module, task, split, serving) -> dict[str, float | None]:
    """``retrieval_metrics`` with the settings of a config's ``serving`` section (``base.mfli_serving``),
    flattened to test metrics: ``{method}_recall@k``, ``{method}_cold_recall@k`` (None without cold users),
    ``{method}_candidates`` for method in mfli / brute / ivf (reported by ``experiments.run``, the sweep)."""
    r = retrieval_metrics(model, task, split, argparse.Namespace(**dict(serving)))
    out = {}
    for m in METHODS:
        for name, v in r[m].items():
            out[f"{m}_{name}"] = None if v is None else float(v)
    return out


def _cell(values, digits: int = 4) -> str:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if not len(v):
        return "-"
    return f"{v.mean():.{digits}f}" if len(v) == 1 else f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def format_tables(results: list[dict]) -> str:
    head = "| method | candidates | " + " | ".join(f"R@{k}" for k in KS)
    head += " | " + " | ".join(f"cold R@{k}" for k in KS) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(KS))]
    for m in METHODS:
        cells = [_cell([r[m]["candidates"] for r in results], 1)]
        cells += [_cell([r[m][f"recall@{k}"] for r in results]) for k in KS]
        cells += [_cell([r[m][f"cold_recall@{k}"] for r in results]) for k in KS]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    r0 = results[0]
    lines.append(
        f"\n{r0['users']} test users ({r0['cold_users']} with a cold target), seeds "
        f"{[r['seed'] for r in results]}; MFLI: {r0['active_levels']} active levels, "
        f"{r0['k_clusters']} clusters per facet, buffer {r0['max_candidates']}; "
        f"IVF nprobe {r0['ivf_nprobe']}; lists of {r0['list_length']} before history removal."
    )
    trained = [f"{r['seed']}: best epoch {r.get('best_epoch')} of {r.get('epochs', '?')}" for r in results]
    cut = [str(r["seed"]) for r in results if r.get("out_of_time")]
    lines.append(
        f"Training per seed ({'; '.join(trained)})"
        + (f"; stopped by train.max_train_seconds: seeds {', '.join(cut)}." if cut else ".")
    )
    lines += ["", "| facet | clusters | max/mean | Gini | max size (upper bound) |", "|---|---|---|---|---|"]
    bound = r0["upper_bound"] if r0.get("rebalance", True) else "no split/merge"
    for f in range(len(r0["balance"])):
        b = [r["balance"][f] for r in results]

        def pair(field, digits=3, b=b):
            before, after = ([x[when][field] for x in b] for when in ("before", "after"))
            return f"{_cell(before, digits)} -> {_cell(after, digits)}"

        lines.append(
            f"| {f} | {pair('num_clusters', 0)} | {pair('max_over_mean')} | {pair('gini')} | "
            f"{pair('max_size', 0)} ({bound}) |"
        )
    return "\n".join(lines)


def run_settings(a) -> dict[str, Any]:
    """What must agree between workdirs joined by --merge: the config, its overrides, the index flags."""
    args = {k: v for k, v in vars(a).items() if k not in ("workdir", "seeds", "merge")}
    return {"config": a.config, "set": a.set, "args": args}


def write_outputs(workdir: pathlib.Path, a, results: list[dict], settings: dict | None = None) -> str:
    table = format_tables(results)
    workdir.mkdir(parents=True, exist_ok=True)
    summary = {**(settings or run_settings(a)), "per_seed": results}
    (workdir / "results.json").write_text(json.dumps(summary, indent=1, default=float))
    (workdir / "table.md").write_text(table + "\n")
    return table


def run(a) -> list[SeedRun]:
    config = load_config(a)
    workdir = pathlib.Path(a.workdir)
    return [run_seed(config, int(s), workdir / f"s{s}", a) for s in a.seeds.split(",")]


def main(argv=None) -> dict:
    a = parse_args(argv)
    settings = None
    if a.merge:
        dirs = [d for d in a.merge.split(",") if d]
        pairs, settings = train_lib.merged_per_seed(dirs, ("config", "set", "args"))
        results = [r for _, r in pairs]
    else:
        results = [r.result for r in run(a)]
    print(write_outputs(pathlib.Path(a.workdir), a, results, settings), flush=True)
    return {"per_seed": results}


if __name__ == "__main__":
    main()
