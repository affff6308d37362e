"""LIME in ranking mode on MovieLens-100K: AUC / GAUC / NE of held-out ratings >= 4 vs the rest, LIME-MHA vs
LIME-XOR vs target-aware HSTU vs SASRec, one table (mean +- std over seeds), every model trained by the one
Trainer with ``recjax.models.rankers.RatingRankingTask``.

Split: per user chronologically, the last 10 ratings are the test candidates, the 10 before them the
validation candidates (users with >= 25 ratings: 943 of 943), history = everything before the block.

Usage: python -m experiments.lime_ml100k --workdir runs/lime_ml100k [--seeds 0,1,2] [--epochs 20]
  [--models lime_xor,lime_mha,hstu,sasrec] [--small]   (--small: synthetic ratings, seconds; for the tests)
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
from flax import nnx

from recjax.data import registry
from recjax.data.rating_requests import rating_split
from recjax.models.hstu import HSTUConfig
from recjax.models.lime import LIME, LimeConfig, user_feature_matrix, user_feature_sizes
from recjax.models.rankers import HSTURanker, RatingRankingTask, SASRecRanker
from recjax.models.sasrec import SASRecConfig
from recjax.train.trainer import TrainConfig, Trainer

MODELS = ("lime_xor", "lime_mha", "hstu", "sasrec")


def build(name: str, num_items: int, max_len: int, dim: int, features, seed: int):
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    common = dict(num_items=num_items, max_len=max_len, embed_dim=dim, dropout=0.2)
    if name.startswith("lime"):
        cfg = LimeConfig(
            **common, num_links=16, attention=name.removeprefix("lime_"), num_layers=2, attention_dim=dim,
            linear_dim=dim, ffn_hidden_dim=dim, scorer="mlp", contextualize=features is not None,
            user_feature_sizes=user_feature_sizes(features) if features is not None else (),
            num_position_buckets=max_len,
        )  # fmt: skip
        return LIME(cfg, rngs=rngs)
    if name == "hstu":
        cfg = HSTUConfig(**common, attention_dim=dim, linear_dim=dim, num_position_buckets=max_len)
        return HSTURanker(cfg, rngs=rngs)
    if name == "sasrec":
        return SASRecRanker(SASRecConfig(**common, ffn_hidden_dim=dim), rngs=rngs)
    raise ValueError(f"models: expected names from {MODELS}, got {name!r}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--max_len", type=int, default=100)
    ap.add_argument("--dim", type=int, default=50)
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args(argv)
    if args.small:
        from recjax.data.synthetic import make_synthetic

        base = make_synthetic(0, num_users=120, num_items=60, min_len=30, max_len=40)
        rng = np.random.default_rng(0)
        ratings = tuple((1 + rng.integers(0, 5, len(s))).astype(np.float32) for s in base.sequences)
        import dataclasses

        dataset = dataclasses.replace(base, ratings=ratings)
    else:
        import ml_collections

        dataset = registry.load(ml_collections.ConfigDict({"name": "ml-100k"}))
    split = rating_split(dataset, holdout=10, threshold=4.0)
    features = user_feature_matrix(dataset.user_features) if dataset.user_features else None
    tcfg = TrainConfig(
        batch_size=64 if args.small else 128, num_epochs=args.epochs, patience=5, progress=False,
        eval_batch_size=64 if args.small else 256, learning_rate=1e-3,
    )  # fmt: skip
    results: dict = {}
    for name in args.models.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            task = RatingRankingTask(
                split, max_len=args.max_len, batch_size=tcfg.batch_size, eval_batch_size=tcfg.eval_batch_size,
                user_features=features if name.startswith("lime") else None,
            )  # fmt: skip
            model = build(
                name,
                dataset.num_items,
                args.max_len,
                args.dim,
                features if name.startswith("lime") else None,
                seed,
            )
            workdir = pathlib.Path(args.workdir, f"{name}_s{seed}")
            import dataclasses

            out = Trainer(model, task, dataclasses.replace(tcfg, seed=seed), workdir).fit()
            results.setdefault(name, []).append(out["test"])
            print(name, seed, {k: round(v, 4) for k, v in out["test"].items()}, flush=True)
    table = ["| model | AUC | GAUC | NE | seeds |", "|---|---|---|---|---|"]
    for name, runs in results.items():
        cells = []
        for m in ("auc", "gauc", "ne"):
            v = np.asarray([r[m] for r in runs])
            cells.append(f"{v.mean():.4f} ± {v.std():.4f}")
        table.append(f"| {name} | " + " | ".join(cells) + f" | {len(runs)} |")
    print("\n".join(table))
    pathlib.Path(args.workdir).mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.workdir, "table.md").write_text("\n".join(table) + "\n")
    pathlib.Path(args.workdir, "results.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
