"""Library side of the experiments CLI (no flags): load the configured dataset, build the model, train,
evaluate beside the popularity baseline, and format the metrics table. Used by ``experiments.run``,
``experiments.sweep``, the notebooks and the tests.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import ml_collections


def load_dataset(data: ml_collections.ConfigDict):
    """The dataset named by ``data.name`` through ``recjax.data.registry`` (built-ins, "file", your own)."""
    from recjax.data import registry

    return registry.load(data)


def train_config(train: ml_collections.ConfigDict):
    from recjax.train.tasks import LossConfig
    from recjax.train.trainer import TrainConfig

    fields = train.to_dict()
    loss = LossConfig(**fields.pop("loss"))
    fields["ks"] = tuple(fields["ks"])
    return TrainConfig(**fields, loss=loss)


def batch_iterator(pipeline: str):
    from recjax.data import batching

    if pipeline == "numpy":
        return batching.batches
    if pipeline == "grain":
        from recjax.data import pipeline as grain_pipeline

        return grain_pipeline.grain_iterator
    raise ValueError(f"data.pipeline: expected 'grain' or 'numpy', got {pipeline!r}")


def run_experiment(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains, evaluates and returns the results dict (also written to ``workdir/results.json``)."""
    from flax import nnx

    from recjax.data.splits import leave_one_out
    from recjax.eval import ranking
    from recjax.models.registry import build_model
    from recjax.train.tasks import NextItemTask
    from recjax.train.trainer import Trainer

    tcfg = train_config(config.train)
    dataset = load_dataset(config.data)
    split = leave_one_out(dataset)
    model_cfg = config.model.to_dict()
    model = build_model(
        model_cfg.pop("name"),
        dataset.num_items,
        max_len=config.data.max_len,
        rngs=nnx.Rngs(params=tcfg.seed, dropout=tcfg.seed + 1),
        **model_cfg,
    )
    task = NextItemTask.from_config(
        split, tcfg, max_len=config.data.max_len, batch_iter=batch_iterator(config.data.pipeline)
    )
    trainer = Trainer(model, task, tcfg, workdir)
    results = trainer.fit()
    from recjax.data import batching

    test_batches = batching.batches(task.examples["test"], tcfg.eval_batch_size)
    results["popularity_test"] = ranking.evaluate_popularity(
        split.train, dataset.num_items, test_batches, ks=tcfg.ks
    )
    results["dataset"] = {
        "name": dataset.name,
        "users": dataset.num_users,
        "items": dataset.num_items,
        "interactions": dataset.num_interactions,
    }
    results["config"] = json.loads(config.to_json_best_effort())
    pathlib.Path(workdir, "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


def metric_sort_key(name: str) -> tuple:
    """Table order: hr@k, then ndcg@k (numeric k: @10 before @50 before @200), then other @k, then mrr,
    then the rest; a ``split/`` prefix is ignored."""
    base = name.rsplit("/", 1)[-1]
    family, at, k = base.partition("@")
    if at and k.isdigit():
        rank = {"hr": 0, "ndcg": 1}.get(family, 2)
        return (0, rank, family, int(k))
    return (1, 0 if base == "mrr" else 1, base, 0)


def ordered_metrics(names) -> list[str]:
    return sorted(names, key=metric_sort_key)


def format_table(results: dict[str, Any]) -> str:
    """Test metrics of the trained model beside popularity, as an aligned markdown table, and a summary."""
    keys = ordered_metrics(k for k in results["test"] if k in results["popularity_test"])
    rows = [
        ["model", *keys],
        ["trained", *(f"{results['test'][k]:.4f}" for k in keys)],
        ["popularity", *(f"{results['popularity_test'][k]:.4f}" for k in keys)],
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(keys) + 1)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    lines = [line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows[1:])]
    ds = results["dataset"]
    lines.append(
        f"\ntest split: leave-one-out, ranked against all {ds['items']} items of {ds['name']} ({ds['users']} "
        f"users). Best validation epoch {results['best_epoch']} of {results['epochs']}; "
        f"{results['s_per_epoch']:.2f} s/epoch; wall {results['wall_s']:.0f} s on {results['devices']}."
    )
    return "\n".join(lines)
