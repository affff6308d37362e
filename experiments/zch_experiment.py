"""MPZCH vs modulo hashing at equal table size, on raw item IDs (issue 3, item 4), through the Trainer.

Every setting trains a recjax model (``--model sasrec|hstu``, several with commas) with
``Trainer(model, RemappedTask(NextItemTask(...), ItemIdRemapper(...)), ...)``: the remap, the reset of
re-assigned rows (embedding + Adam moments) and the unchanged loss step run in the trainer's jitted step;
evaluation goes through the read-only remap; the remap state is checkpointed with the parameters (a killed
run resumes from ``<out>/runs/<setting>`` when rerun with ``--resume``).

Datasets (raw IDs, no dense vocabulary; fixed by ``--data-seed``, the same for every training seed):
- ``ml-1m``: MovieLens-1M (SASRec form) mapped back to the original MovieLens movie IDs through
  ``sas_to_original_items.txt``; a subset of users (``--users``), shuffled epochs.
- ``churn``: a synthetic stream with ID churn (``churn_dataset``): random 31-bit item IDs, a fixed-size pool
  of active items per period, ``churn`` new IDs arriving and as many going stale each period; users' sequences
  follow item clusters (learnable) and advance in time. Trained in time order (each epoch replays the stream
  oldest first) and evaluated on the most recent 30 % of users, as a served model would be.

Per dataset, model, table size (``--factors`` x the number of distinct item IDs), method and seed
(``--seeds``; the table shows mean +- std over seeds):
- ``coll``: collision rate. modulo: distinct IDs sharing their row with another distinct ID (static);
  MPZCH: ID occurrences in the last epoch with no own row (fallback).
- ``evict``: MPZCH evictions per ID occurrence in the last epoch (an evicted ID comes back fresh).
- ``inherit``: freshness violations per ID occurrence in the last epoch: occurrences that arrive on a row
  last trained for another ID without a reset (they start from the other ID's embedding and Adam moments).
  modulo: > 0 as soon as IDs share rows; MPZCH: 0 by construction (a new owner's row is always reset).
- ``unknown``: test targets with no row at evaluation (MPZCH read-only lookup; counted as misses).
- ``hr@10`` / ``ndcg@10``: leave-one-out test metrics, full ranking over the model's rows (unused rows
  included).

    PYTHONPATH=. python experiments/zch_experiment.py --out /tmp/zch_exp [--small] [--model sasrec,hstu]
        [--seeds 0,1,2] [--datasets ml-1m,churn] [--factors 0.5,1,2]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import platform
import shutil
import sys
import time

import jax
import numpy as np
from flax import nnx

from recjax.data import batching, movielens
from recjax.data.paths import data_dir
from recjax.data.splits import leave_one_out
from recjax.data.types import SequenceDataset
from recjax.embeddings import zch_remap as zr
from recjax.models.registry import build_model
from recjax.sharding import embedding as embedding_lib
from recjax.sharding import mesh as mesh_lib
from recjax.train.remap_hook import RemappedTask
from recjax.train.tasks import LossConfig, NextItemTask
from recjax.train.trainer import TrainConfig, Trainer

MODELS = ("sasrec", "hstu")
METRICS = ("coll", "evict", "inherit", "unknown", "hr@10", "ndcg@10")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: str = "sasrec"
    embed_dim: int = 32
    max_len: int = 50
    num_blocks: int = 1
    batch_size: int = 128
    epochs: int = 10
    learning_rate: float = 2e-3
    num_negatives: int = 64
    max_probe: int = 64
    eviction: str = "lru"
    probing: str = "two_choice"  # MPZCH probing: "two_choice" (default) or "linear"
    seed: int = 0  # model init, dropout and batch order
    data_seed: int = 0  # the ML-1M user subset / the churn stream
    devices: int = 1  # data-parallel devices (0: all)
    # FreeScale placement of the remapped item table (docs/FREESCALE.md): "" (replicated, the 1-d data mesh),
    # "row" / "table" on a data x model mesh with model_parallel devices on "model"
    placement: str = ""
    model_parallel: int = 1
    impl: str = "auto"  # remap implementation (auto: Pallas on a supporting GPU, XLA elsewhere)

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"RunConfig.model: expected one of {MODELS}, got {self.model!r}")


# ----------------------------------------------------------------------------------------------- data
def ml1m_raw(num_users: int, seed: int = 0) -> tuple[SequenceDataset, np.ndarray]:
    """A user subset of ML-1M with original MovieLens movie IDs. -> (dataset, per-user order key)."""
    ds = movielens.load_ml1m_sequential()
    root = data_dir(None, required="ml-1m/sas_to_original_items.txt") / "ml-1m"
    item_map = movielens._read_id_map(root / "sas_to_original_items.txt")  # a[sas_id] = movie id
    users = np.random.default_rng(seed).permutation(ds.num_users)[:num_users]
    seqs = tuple(item_map[ds.sequences[u]].astype(np.int32) for u in np.sort(users))
    raw = SequenceDataset("ml-1m-raw", seqs, int(max(s.max() for s in seqs)))
    return raw, np.zeros(len(seqs))


def churn_dataset(
    num_users: int = 1000,
    seq_len: int = 40,
    pool: int = 600,
    churn: int = 60,
    periods: int = 12,
    items_per_period: int = 8,
    num_clusters: int = 20,
    stay: float = 0.8,
    seed: int = 0,
) -> tuple[SequenceDataset, np.ndarray]:
    """Synthetic stream with ID churn: item k is born at period max(0, (k - pool) // churn + 1) and stale
    ``pool // churn`` periods later, so about ``pool`` items are active at once and ``churn`` arrive (and
    as many leave) per period. User u starts at a random period and moves one period every
    ``items_per_period`` items; the next item stays in the current cluster with probability ``stay``, drawn
    Zipf-like among that cluster's active items. Raw IDs are distinct random integers in [1, 2**31).
    -> (dataset, start period per user)."""
    rng = np.random.default_rng(seed)
    n_items = pool + churn * (periods - 1)
    raw = np.unique(rng.integers(1, 2**31 - 1, 2 * n_items))[:n_items]
    raw = rng.permutation(raw).astype(np.int64)
    birth = np.maximum(0, (np.arange(n_items) - pool) // churn + 1)
    death = birth + pool // churn
    cluster = rng.integers(0, num_clusters, n_items)
    span = -(-seq_len // items_per_period)
    start = rng.integers(0, max(1, periods - span + 1), num_users)
    seqs = []
    for u in range(num_users):
        c, out = rng.integers(num_clusters), []
        for j in range(seq_len):
            t = start[u] + j // items_per_period
            if rng.random() > stay:
                c = rng.integers(num_clusters)
            cand = np.flatnonzero((birth <= t) & (t < death) & (cluster == c))
            if not cand.size:
                cand = np.flatnonzero((birth <= t) & (t < death))
            w = 1.0 / np.arange(1, cand.size + 1)  # Zipf over the cluster's items, oldest first
            out.append(raw[rng.choice(cand, p=w / w.sum())])
        seqs.append(np.asarray(out, np.int32))
    order = np.argsort(start, kind="stable")
    return SequenceDataset("churn", tuple(seqs[i] for i in order), int(raw.max())), start[order]


# ------------------------------------------------------------------------------------------- training
_COMPILED: dict = {}  # settings that differ only in the seed share jitted functions (one compilation)


def _in_time_order(examples, batch_size, *, shuffle, seed, epoch, drop_remainder):
    """The Trainer's batch iterator for a stream: every epoch replays the examples oldest first."""
    del shuffle
    return batching.batches(
        examples, batch_size, shuffle=False, seed=seed, epoch=epoch, drop_remainder=drop_remainder
    )


def _model_kw(cfg: RunConfig) -> dict:
    kw = dict(max_len=cfg.max_len, embed_dim=cfg.embed_dim, num_blocks=cfg.num_blocks)
    if cfg.model == "sasrec":
        return kw | dict(ffn_hidden_dim=cfg.embed_dim)
    return kw | dict(attention_dim=cfg.embed_dim, linear_dim=cfg.embed_dim)


def make_remapper(table_size: int, method: str, cfg: RunConfig) -> zr.ItemIdRemapper:
    return zr.ItemIdRemapper(
        zr.RemapConfig(
            table_size,
            method=method,
            max_probe=cfg.max_probe,
            eviction=cfg.eviction,
            probing=cfg.probing,
            impl=cfg.impl,
        )
    )


def make_trainer(
    split, table_size: int, method: str, cfg: RunConfig, workdir, *, time_ordered: bool, eval_rows=None
):
    """A Trainer of ``cfg.model`` on raw IDs through an MPZCH / modulo remapper of ``table_size`` rows."""
    remapper = make_remapper(table_size, method, cfg)
    model = build_model(
        cfg.model, remapper.num_items, rngs=nnx.Rngs(params=cfg.seed, dropout=cfg.seed + 1), **_model_kw(cfg)
    )
    tcfg = TrainConfig(
        batch_size=cfg.batch_size,
        num_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        b2=0.98,
        seed=cfg.seed,
        eval_every_epochs=cfg.epochs,  # validation once, at the end (early stopping off)
        patience=0,
        early_stop_metric="hr@10",
        ks=(10,),
        eval_batch_size=256,
        num_devices=cfg.devices,
        progress=False,
        loss=LossConfig(num_negatives=cfg.num_negatives),
    )
    inner = NextItemTask.from_config(
        split, tcfg, max_len=cfg.max_len, batch_iter=_in_time_order if time_ordered else None
    )
    if eval_rows is not None:  # churn: the most recent users only
        inner.examples["test"] = eval_rows
    mesh = plan = None
    if cfg.placement:  # the remapper's rows are the model's table rows: they shard like any table
        mesh = mesh_lib.make_nd_mesh(mesh_lib.MeshConfig(model=cfg.model_parallel, num_devices=cfg.devices))
        plan = embedding_lib.EmbeddingPlan.from_config({"items": cfg.placement})
    trainer = Trainer(model, RemappedTask(inner, remapper), tcfg, workdir, mesh=mesh, embedding_plan=plan)
    key = (dataclasses.replace(cfg, seed=0), table_size, method, time_ordered)
    shared = _COMPILED.get(key)
    if shared is not None and shared[0] == trainer.graphdef:
        trainer.train_step, trainer.task._eval_remap = shared[1]
    else:
        _COMPILED[key] = (trainer.graphdef, (trainer.train_step, trainer.task._eval_remap))
    return trainer


def train_and_eval(
    split, table_size: int, method: str, cfg: RunConfig, *, time_ordered: bool, eval_rows, workdir
) -> dict:
    trainer = make_trainer(
        split, table_size, method, cfg, workdir, time_ordered=time_ordered, eval_rows=eval_rows
    )
    res = trainer.fit()
    test = res["test"]
    return _id_metrics(split, table_size, method, res["last_epoch"], test["unknown_target_rate"]) | {
        "hr@10": test["hr@10"],
        "ndcg@10": test["ndcg@10"],
        "steps": res["steps"],
    }


def _id_metrics(split, table_size: int, method: str, last: dict, unknown: float) -> dict:
    """Collision (modulo: distinct IDs sharing a row; MPZCH: fallbacks), eviction, inherited, unknown."""
    if method == "modulo":
        coll = zr.modulo_collision_rate(np.concatenate(split.dataset.sequences), table_size)
    else:
        coll = last["fallback_rate"]
    return {
        "coll": coll,
        "evict": last["eviction_rate"],
        "inherit": last["inherited_rate"],
        "unknown": unknown,
    }


def remap_only(split, table_size: int, method: str, cfg: RunConfig, *, time_ordered: bool, eval_rows, **_):
    """The ID-side metrics without a model (seconds): the training stream (the Trainer's batch order)
    goes through the remapper only (one jitted remap), then a read-only lookup of the test targets.
    HR@10 is NaN."""
    remapper = make_remapper(table_size, method, cfg)

    @jax.jit
    def fn(st, totals, b, step):
        _, st, _, stats = remapper.remap(st, b, step)
        return st, {k: totals[k] + stats[k] for k in totals}

    state, step = remapper.init_state(), 0
    train = split.train_examples(cfg.max_len)
    for epoch in range(cfg.epochs):
        totals = {k: np.int32(0) for k in zr.COUNTERS}
        for b in batching.batches(
            train, cfg.batch_size, shuffle=not time_ordered, seed=cfg.seed, epoch=epoch
        ):
            state, totals = fn(state, totals, {k: b[k] for k in ("inputs", "targets")}, step)
            step += 1
    last = {k: float(v) for k, v in jax.device_get(remapper.rates(totals, state)).items()}
    ev, _, _, _ = remapper.remap(state, {"target": eval_rows["target"]}, step, training=False)
    unknown = float(1.0 - np.asarray(ev["target_known"]).mean())
    return _id_metrics(split, table_size, method, last, unknown) | {
        "hr@10": float("nan"),
        "ndcg@10": float("nan"),
        "steps": step,
    }


def run(
    dataset: str,
    factors,
    cfg: RunConfig,
    *,
    users: int,
    small: bool,
    train_model: bool = True,
    out: pathlib.Path | None = None,
    resume: bool = False,
) -> list[dict]:
    """Both methods at each table factor for one model and seed; one result dict per setting."""
    if dataset == "ml-1m":
        ds, _ = ml1m_raw(users, cfg.data_seed)
        time_ordered = False
    else:
        kw = dict(num_users=users, pool=150, churn=15, num_clusters=8) if small else dict(num_users=users)
        ds, _ = churn_dataset(seed=cfg.data_seed, **kw)
        time_ordered = True
    split = leave_one_out(ds)
    test = split.eval_examples("test", cfg.max_len)
    if time_ordered:  # the most recent 30 % of users (users are sorted by start period)
        keep = test["user"] >= int(0.7 * ds.num_users)
        test = {k: v[keep] for k, v in test.items()}
    distinct = len(np.unique(np.concatenate(ds.sequences)))
    runs_dir = pathlib.Path(out or "/tmp/zch_experiment") / "runs"
    results = []
    for f in factors:
        size = max(int(round(f * distinct)), cfg.max_probe)
        for method in ("modulo", "mpzch"):
            t0 = time.time()
            workdir = runs_dir / f"{dataset}-{cfg.model}-{method}-{f}x-seed{cfg.seed}"
            if workdir.exists() and not resume:
                shutil.rmtree(workdir)  # a stale run of other settings must not be resumed
            fn = train_and_eval if train_model else remap_only
            r = fn(split, size, method, cfg, time_ordered=time_ordered, eval_rows=test, workdir=workdir)
            r.update(
                dataset=dataset,
                model=cfg.model if train_model else "-",
                seed=cfg.seed,
                distinct=distinct,
                factor=f,
                table=size,
                method=method,
                s=time.time() - t0,
            )
            print(json.dumps(r), flush=True)
            results.append(r)
    return results


def aggregate(results: list[dict]) -> list[dict]:
    """Mean and standard deviation (ddof=1; 0 for one seed) over seeds of each setting."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["model"], r["factor"], r["method"]), []).append(r)
    out = []
    for rs in groups.values():
        row = {k: rs[0][k] for k in ("dataset", "model", "factor", "method", "distinct", "table")}
        row["seeds"] = len(rs)
        for m in METRICS:
            v = np.asarray([r[m] for r in rs], np.float64)
            row[m] = float(v.mean())
            row[m + "_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        out.append(row)
    return out


def markdown(results: list[dict]) -> str:
    head = (
        "| dataset | model | distinct IDs | table | method | seeds | collision | eviction | inherited | "
        "unknown | HR@10 | NDCG@10 |"
    )
    lines = [head, "|---" * 12 + "|"]
    for r in aggregate(results):
        cells = [f"{r[m]:.3f} ± {r[m + '_std']:.3f}" for m in METRICS[:4]]
        cells += [f"{r[m]:.4f} ± {r[m + '_std']:.4f}" for m in METRICS[4:]]
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['distinct']} | {r['table']} ({r['factor']}x) | "
            f"{r['method']} | {r['seeds']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(results)
    datasets = sorted({r["dataset"] for r in agg})
    fig, axes = plt.subplots(len(datasets), 3, figsize=(12, 3.2 * len(datasets)), squeeze=False)
    for row, d in zip(axes, datasets, strict=True):
        for model in sorted({r["model"] for r in agg if r["dataset"] == d}):
            for method, style in (("modulo", "o--"), ("mpzch", "s-")):
                rs = sorted(
                    (r for r in agg if (r["dataset"], r["model"], r["method"]) == (d, model, method)),
                    key=lambda r: r["factor"],
                )
                x = [r["factor"] for r in rs]
                for ax, key, title in zip(
                    row,
                    ("hr@10", "coll", "inherit"),
                    ("test HR@10", "collision rate", "occurrences on another ID's row"),
                    strict=True,
                ):
                    ax.errorbar(
                        x,
                        [r[key] for r in rs],
                        yerr=[r[key + "_std"] for r in rs],
                        fmt=style,
                        label=f"{model} {method}",
                        capsize=3,
                    )
                    ax.set_title(f"{d}: {title}")
                    ax.set_xlabel("table size / distinct IDs")
                    ax.set_xscale("log", base=2)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/zch_experiment")
    p.add_argument("--datasets", default="ml-1m,churn")
    p.add_argument("--model", default="sasrec", help="sasrec, hstu or both (comma-separated)")
    p.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1,2 (mean +- std in the table)")
    p.add_argument("--factors", default="0.5,1,2")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=RunConfig.learning_rate)
    p.add_argument("--dim", type=int, default=RunConfig.embed_dim)
    p.add_argument("--blocks", type=int, default=RunConfig.num_blocks)
    p.add_argument("--max-len", type=int, default=RunConfig.max_len)
    p.add_argument("--batch-size", type=int, default=RunConfig.batch_size)
    p.add_argument("--devices", type=int, default=1, help="data-parallel devices (0: all)")
    p.add_argument("--impl", default="auto", help="remap implementation: auto | pallas | xla")
    p.add_argument("--probing", default=RunConfig.probing, help="MPZCH probing: two_choice | linear")
    p.add_argument("--ids-only", action="store_true", help="no model: the remap stream's ID metrics only")
    p.add_argument("--resume", action="store_true", help="continue runs found in <out>/runs")
    p.add_argument("--small", action="store_true", help="seconds-long smoke setting")
    a = p.parse_args(argv)
    models = a.model.split(",")
    cfg = RunConfig(
        model=models[0],
        epochs=a.epochs,
        learning_rate=a.lr,
        embed_dim=a.dim,
        num_blocks=a.blocks,
        max_len=a.max_len,
        batch_size=a.batch_size,
        devices=a.devices,
        impl=a.impl,
        probing=a.probing,
    )
    users = a.users
    if a.small:
        cfg = dataclasses.replace(
            cfg, epochs=1, embed_dim=8, max_len=10, max_probe=16, num_negatives=16, batch_size=64
        )
        users = min(users, 120)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    factors = [float(f) for f in a.factors.split(",")]
    t0 = time.time()
    results = []
    for d in a.datasets.split(","):
        for model in models if not a.ids_only else models[:1]:
            for seed in _ints(a.seeds):
                c = dataclasses.replace(cfg, model=model, seed=seed)
                results += run(
                    d,
                    factors,
                    c,
                    users=users,
                    small=a.small,
                    train_model=not a.ids_only,
                    out=out,
                    resume=a.resume,
                )
    table = markdown(results)
    print(table)
    meta = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=f"{platform.processor() or platform.machine()}, {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}",
        config=dataclasses.asdict(cfg),
        models=models,
        seeds=_ints(a.seeds),
        users=users,
        command="PYTHONPATH=. python experiments/zch_experiment.py " + " ".join(argv or sys.argv[1:]),
        wall_s=time.time() - t0,
    )
    (out / "results.json").write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    (out / "results.md").write_text(table + "\n")
    plot(results, out / "zch_modulo_vs_mpzch.png")
    print(f"wrote {out}/results.json, results.md, zch_modulo_vs_mpzch.png ({meta['wall_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
