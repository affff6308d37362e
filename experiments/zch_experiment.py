"""MPZCH vs modulo hashing at equal table size, on raw item IDs (issue 3, item 4). CPU-sized.

Datasets (raw IDs, no dense vocabulary):
- ``ml-1m``: MovieLens-1M (SASRec form) mapped back to the original MovieLens movie IDs through
  ``sas_to_original_items.txt``; a subset of users (``--users``), shuffled epochs.
- ``churn``: a synthetic stream with ID churn (``churn_dataset``): random 31-bit item IDs, a fixed-size pool
  of active items per period, ``churn`` new IDs arriving and as many going stale each period; users' sequences
  follow item clusters (learnable) and advance in time. Trained in time order (each epoch replays the stream
  oldest first) and evaluated on the most recent 30 % of users, as a served model would be.

Per dataset and table size (``--factors`` x the number of distinct item IDs): SASRec (small) trained with
``recjax.train.trainer.make_train_step`` wrapped by ``zch_remap.make_zch_train_step``; reported:
- ``coll``: collision rate. modulo: distinct IDs sharing their row with another distinct ID (static);
  MPZCH: ID occurrences in the last epoch with no own row (fallback), i.e. sharing or losing a row.
- ``evict``: MPZCH evictions per ID occurrence in the last epoch (an evicted ID comes back fresh).
- ``inherit``: freshness - of the IDs seen for the first time during training, the fraction whose row had
  already been trained for another ID (modulo: by construction > 0; MPZCH: 0 unless the row reset failed).
- ``unknown``: test targets with no row at evaluation (MPZCH read-only lookup; counted as misses).
- ``hr@10``: leave-one-out test HR@10, full ranking over the model's rows (unused rows included).

    PYTHONPATH=. python experiments/zch_experiment.py --out /tmp/zch_exp [--small]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recjax.data import batching, movielens
from recjax.data.paths import data_dir
from recjax.data.splits import leave_one_out
from recjax.data.types import SequenceDataset
from recjax.embeddings import zch_remap as zr
from recjax.eval import ranking
from recjax.models.sasrec import SASRec, SASRecConfig
from recjax.train.trainer import LossConfig, TrainConfig, make_optimizer, make_train_step


@dataclasses.dataclass(frozen=True)
class RunConfig:
    embed_dim: int = 32
    max_len: int = 50
    num_blocks: int = 1
    batch_size: int = 128
    epochs: int = 10
    learning_rate: float = 2e-3
    num_negatives: int = 64
    max_probe: int = 64
    eviction: str = "lru"
    seed: int = 0
    rank_used_only: bool = False  # evaluation ranks only rows some training ID used (no empty random rows)


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
class Freshness:
    """Host-side row ownership: was a first-seen ID's row already trained for another ID?"""

    def __init__(self, num_rows: int):
        self.owner = np.full(num_rows, -1, np.int64)
        self.seen: set[int] = set()
        self.new = self.inherited = 0

    def update(self, raw_ids, rows, reset):
        self.owner[np.asarray(reset)] = -1
        raw_ids, rows = np.asarray(raw_ids).reshape(-1), np.asarray(rows).reshape(-1)
        keep = (raw_ids > 0) & (rows > 0)
        pairs = np.unique(np.stack([raw_ids[keep], rows[keep]], 1), axis=0)
        for i, r in pairs:
            if int(i) not in self.seen:
                self.seen.add(int(i))
                self.new += 1
                self.inherited += int(self.owner[r] not in (-1, i))
        self.owner[pairs[:, 1]] = pairs[:, 0]

    @property
    def rate(self) -> float:
        return self.inherited / max(self.new, 1)


def train_and_eval(split, table_size: int, method: str, cfg: RunConfig, *, time_ordered: bool, eval_rows):
    remapper = zr.ItemIdRemapper(
        zr.RemapConfig(
            table_size, method=method, max_probe=cfg.max_probe, eviction=cfg.eviction, impl="auto"
        ),
        seed=cfg.seed,
    )
    mcfg = SASRecConfig(
        num_items=remapper.num_items,
        max_len=cfg.max_len,
        embed_dim=cfg.embed_dim,
        num_blocks=cfg.num_blocks,
        ffn_hidden_dim=cfg.embed_dim,
    )
    model = SASRec(mcfg, rngs=nnx.Rngs(cfg.seed))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tcfg = TrainConfig(learning_rate=cfg.learning_rate, b2=0.98)
    opt = make_optimizer(tcfg)
    opt_state = opt.init(params)
    step_fn = zr.make_zch_train_step(
        make_train_step(graphdef, opt, LossConfig(num_negatives=cfg.num_negatives)), remapper
    )
    zch_state = remapper.init_state()
    train = split.train_examples(cfg.max_len)
    fresh = Freshness(remapper.num_rows)
    step, key = 0, jax.random.key(cfg.seed)
    for epoch in range(cfg.epochs):
        last = dict(ids=0, fallbacks=0, evictions=0)
        for b in batching.batches(
            train, cfg.batch_size, shuffle=not time_ordered, seed=cfg.seed, epoch=epoch
        ):
            b = {k: b[k] for k in ("inputs", "targets", "mask")}
            params, rest, opt_state, zch_state, _, stats, rows = step_fn(
                params, rest, opt_state, zch_state, b, jax.random.fold_in(key, step), step
            )
            step += 1
            fresh.update(
                np.concatenate([b["inputs"], b["targets"]]),
                np.concatenate([np.asarray(rows["inputs"]), np.asarray(rows["targets"])]),
                rows["reset"],
            )
            for k in last:
                last[k] += int(stats[k])
    # Evaluation: read-only remap, full ranking over the model's rows; unknown targets are misses.
    model_eval = nnx.merge(graphdef, params, rest)
    model_eval.eval()
    items = model_eval.candidate_embeddings()
    hits = n = unknown = 0
    for b in batching.batches(eval_rows, 256):
        rb, _, _, _ = remapper.remap(
            zch_state, {k: b[k] for k in ("inputs", "mask", "target", "exclude")}, step, training=False
        )
        q = model_eval.user_embedding(model_eval(rb["inputs"], rb["mask"]))
        known = np.asarray(rb["target_known"]) & b["valid"]
        tgt = jnp.where(rb["target_known"], rb["target"], 1)
        exclude = rb["exclude"]
        if cfg.rank_used_only:  # never-used rows (random init) are not candidates
            unused = np.flatnonzero(fresh.owner[1:] == -1) + 1
            exclude = jnp.concatenate([exclude, jnp.broadcast_to(unused, (exclude.shape[0], unused.size))], 1)
        s = ranking.rank_batch(q, items, tgt, exclude, jnp.asarray(known), ks=(10,), impl="xla")
        hits += float(s["hr@10"])
        n += int(b["valid"].sum())
        unknown += int((b["valid"] & ~np.asarray(rb["target_known"])).sum())
    if method == "modulo":
        all_ids = np.concatenate([s for s in split.dataset.sequences])
        coll = zr.modulo_collision_rate(all_ids, table_size)
    else:
        coll = last["fallbacks"] / max(last["ids"], 1)
    return {
        "coll": coll,
        "evict": last["evictions"] / max(last["ids"], 1),
        "inherit": fresh.rate,
        "new_ids": fresh.new,
        "unknown": unknown / max(n, 1),
        "hr@10": hits / max(n, 1),
        "steps": step,
    }


def remap_only(split, table_size: int, method: str, cfg: RunConfig, *, time_ordered: bool, eval_rows):
    """The ID-side metrics without a model (seconds): the training stream goes through the remapper only
    (one jitted remap), then a read-only lookup of the test targets. HR@10 is NaN."""
    remapper = zr.ItemIdRemapper(
        zr.RemapConfig(
            table_size, method=method, max_probe=cfg.max_probe, eviction=cfg.eviction, impl="auto"
        ),
        seed=cfg.seed,
    )

    @jax.jit
    def fn(st, b, step):
        rows, st, reset, stats = remapper.remap(st, b, step)
        return st, reset, stats, rows

    zch_state, fresh, step = remapper.init_state(), Freshness(remapper.num_rows), 0
    train = split.train_examples(cfg.max_len)
    for epoch in range(cfg.epochs):
        last = dict(ids=0, fallbacks=0, evictions=0)
        for b in batching.batches(
            train, cfg.batch_size, shuffle=not time_ordered, seed=cfg.seed, epoch=epoch
        ):
            b = {k: b[k] for k in ("inputs", "targets")}
            zch_state, reset, stats, rows = fn(zch_state, b, step)
            step += 1
            fresh.update(
                np.concatenate([b["inputs"], b["targets"]]),
                np.concatenate([np.asarray(rows["inputs"]), np.asarray(rows["targets"])]),
                reset,
            )
            for k in last:
                last[k] += int(stats[k])
    ev, _, _, _ = remapper.remap(zch_state, {"target": eval_rows["target"]}, step, training=False)
    if method == "modulo":
        coll = zr.modulo_collision_rate(np.concatenate(split.dataset.sequences), table_size)
    else:
        coll = last["fallbacks"] / max(last["ids"], 1)
    return {
        "coll": coll,
        "evict": last["evictions"] / max(last["ids"], 1),
        "inherit": fresh.rate,
        "new_ids": fresh.new,
        "unknown": float(1.0 - np.asarray(ev["target_known"]).mean()),
        "hr@10": float("nan"),
        "steps": step,
    }


def run(
    dataset: str, factors, cfg: RunConfig, *, users: int, small: bool, train_model: bool = True
) -> list[dict]:
    if dataset == "ml-1m":
        ds, _ = ml1m_raw(users, cfg.seed)
        time_ordered = False
    else:
        kw = dict(num_users=users, pool=150, churn=15, num_clusters=8) if small else dict(num_users=users)
        ds, _ = churn_dataset(seed=cfg.seed, **kw)
        time_ordered = True
    split = leave_one_out(ds)
    test = split.eval_examples("test", cfg.max_len)
    if time_ordered:  # the most recent 30 % of users (users are sorted by start period)
        keep = test["user"] >= int(0.7 * ds.num_users)
        test = {k: v[keep] for k, v in test.items()}
    distinct = len(np.unique(np.concatenate(ds.sequences)))
    out = []
    for f in factors:
        size = max(int(round(f * distinct)), cfg.max_probe)
        for method in ("modulo", "mpzch"):
            t0 = time.time()
            fn = train_and_eval if train_model else remap_only
            r = fn(split, size, method, cfg, time_ordered=time_ordered, eval_rows=test)
            r.update(
                dataset=dataset, distinct=distinct, factor=f, table=size, method=method, s=time.time() - t0
            )
            print(json.dumps(r), flush=True)
            out.append(r)
    return out


def markdown(results: list[dict]) -> str:
    head = "| dataset | distinct IDs | table | method | collision | eviction | inherited | unknown | HR@10 |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['dataset']} | {r['distinct']} | {r['table']} ({r['factor']}x) | {r['method']} | "
            f"{r['coll']:.3f} | {r['evict']:.3f} | {r['inherit']:.3f} | {r['unknown']:.3f} | "
            f"{r['hr@10']:.4f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in results})
    fig, axes = plt.subplots(len(datasets), 3, figsize=(12, 3.2 * len(datasets)), squeeze=False)
    for row, d in zip(axes, datasets, strict=True):
        for method, style in (("modulo", "o--"), ("mpzch", "s-")):
            rs = [r for r in results if r["dataset"] == d and r["method"] == method]
            x = [r["factor"] for r in rs]
            for ax, key, title in zip(
                row,
                ("hr@10", "coll", "inherit"),
                ("HR@10", "collision rate", "new IDs on a used row"),
                strict=True,
            ):
                ax.plot(x, [r[key] for r in rs], style, label=method)
                ax.set_title(f"{d}: {title}")
                ax.set_xlabel("table size / distinct IDs")
                ax.set_xscale("log", base=2)
        row[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/zch_experiment")
    p.add_argument("--datasets", default="ml-1m,churn")
    p.add_argument("--factors", default="0.5,1,2")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=RunConfig.learning_rate)
    p.add_argument("--dim", type=int, default=RunConfig.embed_dim)
    p.add_argument("--rank-used-only", action="store_true", help="rank only rows used in training")
    p.add_argument("--small", action="store_true", help="seconds-long smoke setting")
    a = p.parse_args(argv)
    cfg = RunConfig(epochs=a.epochs, learning_rate=a.lr, embed_dim=a.dim, rank_used_only=a.rank_used_only)
    users = a.users
    if a.small:
        cfg = dataclasses.replace(cfg, epochs=1, embed_dim=8, max_len=20, max_probe=16, num_negatives=16)
        users = min(users, 200)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    factors = [float(f) for f in a.factors.split(",")]
    t0 = time.time()
    results = []
    for d in a.datasets.split(","):
        results += run(d, factors, cfg, users=users, small=a.small)
    table = markdown(results)
    print(table)
    meta = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=f"{platform.processor() or platform.machine()}, {jax.devices()[0].platform}",
        config=dataclasses.asdict(cfg),
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
