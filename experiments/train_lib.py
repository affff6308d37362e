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


def check_model_config(config: ml_collections.ConfigDict) -> None:
    """Builds the model config (and checks the ``task`` section) before any data is loaded: num_items is
    only known then, so any positive count checks the other fields (and a placeholder the sizes that come
    from the dataset)."""
    from recjax.models.registry import make_config

    model_cfg = config.model.to_dict()
    name = model_cfg.pop("name")
    if name == "lime" and model_cfg.get("contextualize", False):
        model_cfg["user_feature_sizes"] = (1,)
    make_config(name, 1, max_len=config.data.max_len, **model_cfg)
    task_cfg = dict(config.get("task", {}) or {})
    allowed = TASK_SETTINGS.get(name, ())
    unknown = sorted(set(task_cfg) - set(allowed))
    if unknown:
        raise ValueError(f"task: unknown settings {unknown} for model {name!r}; valid: {sorted(allowed)}")
    check_serving_config(name, config.get("serving"))


def check_serving_config(model_name: str, serving) -> None:
    """The optional ``serving`` section (MFLI only; ``base.mfli_serving`` has its keys and defaults)."""
    if serving is None:
        return
    from experiments.configs import base

    if model_name != "mfli":
        raise ValueError(
            f"serving: only MFLI models have a serving evaluation, this config's is {model_name!r}"
        )
    keys, expected = set(serving), set(base.mfli_serving())
    if keys != expected:
        raise ValueError(
            f"serving: unknown keys {sorted(keys - expected)}, missing {sorted(expected - keys)}; expected "
            f"exactly {sorted(expected)} (experiments/configs/base.py: mfli_serving)"
        )
    if not 0 < serving["cold"] < 1:
        raise ValueError(f"serving.cold: expected a fraction in (0, 1), got {serving['cold']}")
    for key in ("upper", "k_clusters", "candidates", "ivf_clusters"):
        if serving[key] < 1:
            raise ValueError(f"serving.{key}: expected >= 1, got {serving[key]}")
    if not 0 <= serving["lower"] <= serving["upper"]:
        raise ValueError(
            f"serving.lower: expected 0 <= lower <= upper={serving['upper']}, got {serving['lower']}"
        )


def _lime_task(split, tcfg, config, batch_iter):
    from recjax.models.lime import LimeNextItemTask, user_feature_matrix

    task_cfg = dict(config.get("task", {}) or {})
    features = None
    if config.model.get("contextualize", False):
        features = user_feature_matrix(split.dataset.user_features)  # every categorical user field
    return LimeNextItemTask(
        split,
        max_len=config.data.max_len,
        batch_size=tcfg.batch_size,
        cuts_per_sequence=task_cfg.get("cuts_per_sequence", 0),
        user_features=features,
        loss=tcfg.loss,
        eval_batch_size=tcfg.eval_batch_size,
        ks=tcfg.ks,
        early_stop_metric=tcfg.early_stop_metric,
        batch_iter=batch_iter,
    )


def _mfli_task(split, tcfg, config, batch_iter):
    from recjax.models.mfli import MFLITask

    task_cfg = dict(config.get("task", {}) or {})
    return MFLITask.from_config(
        split,
        tcfg,
        max_len=config.data.max_len,
        batch_iter=batch_iter,
        label_weights=dict(task_cfg.get("label_weights", {"next_item": 1.0})),
        quantized_weight=task_cfg.get("quantized_weight", 1.0),
    )


# Models trained by a task other than NextItemTask: model name -> (split, TrainConfig, config, batch_iter)
# -> Task. The optional ``config.task`` section holds that task's own settings.
TASK_BUILDERS = {"lime": _lime_task, "mfli": _mfli_task}
TASK_SETTINGS = {"lime": ("cuts_per_sequence",), "mfli": ("label_weights", "quantized_weight")}


def model_overrides(model_name: str, model_cfg: dict, dataset) -> dict:
    """Hyper-parameters derived from the dataset (LIME's user feature sizes when it contextualizes)."""
    if model_name == "lime" and model_cfg.get("contextualize", False):
        from recjax.models.lime import user_feature_matrix, user_feature_sizes

        sizes = user_feature_sizes(user_feature_matrix(dataset.user_features))
        return {**model_cfg, "user_feature_sizes": sizes}
    return model_cfg


def run_experiment(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, allow_change: bool | str = False
) -> dict[str, Any]:
    """Trains, evaluates and returns the results dict (also written to ``workdir/results.json``).

    The workdir is locked for the whole run (a second run on it is refused, naming the holder). Its
    config is stored on the first start; resuming with a different config is refused naming the differing
    keys unless ``allow_change`` allows them (``True``, or comma-separated keys / prefixes). A workdir that
    already holds the results of this config is reported, not trained again."""
    from flax import nnx

    from experiments import parallel
    from recjax.data.splits import leave_one_out
    from recjax.eval import ranking
    from recjax.models.registry import build_model
    from recjax.train import workdir as workdir_lib
    from recjax.train.tasks import NextItemTask
    from recjax.train.trainer import Trainer

    # Every value is checked before the data loads (a bad one fails in seconds, not after loading).
    tcfg = train_config(config.train)
    model_cfg = config.model.to_dict()
    model_name = model_cfg.pop("name")
    check_model_config(config)
    batch_iter = batch_iterator(config.data.pipeline)
    # mesh / embedding plan / length buckets / balancing from the optional sections (experiments/parallel.py)
    mesh, plan, batch_iter = parallel.setup(config, batch_iter)
    config_dict = json.loads(config.to_json_best_effort())
    with workdir_lib.WorkdirLock(workdir):
        done = workdir_lib.finished_results(workdir, config_dict)
        if done is not None:
            print(f"{workdir}: already finished with this config (results.json); nothing to train")
            return done
        changes = workdir_lib.check_resume_config(workdir, config_dict, allow_change=allow_change)
        if changes:
            print(workdir_lib.format_changes(changes))
        dataset = load_dataset(config.data)
        split = leave_one_out(dataset)
        model = build_model(
            model_name,
            dataset.num_items,
            max_len=config.data.max_len,
            rngs=nnx.Rngs(params=tcfg.seed, dropout=tcfg.seed + 1),
            **parallel.model_options(mesh, model_overrides(model_name, model_cfg, dataset)),
        )
        if model_name in TASK_BUILDERS:
            task = TASK_BUILDERS[model_name](split, tcfg, config, batch_iter)
        else:
            task = NextItemTask.from_config(split, tcfg, max_len=config.data.max_len, batch_iter=batch_iter)
        options = parallel.trainer_options(config, tcfg)  # row-sparse table updates, prioritized lookups
        trainer = Trainer(model, task, tcfg, workdir, mesh=mesh, embedding_plan=plan, **options)
        results = trainer.fit()
        if model_name == "mfli" and config.get("serving") is not None:  # serving recall of the best model
            from experiments import mfli_experiment

            serving = mfli_experiment.serving_test_metrics(trainer.best_model(), task, split, config.serving)
            results["test"].update(serving)
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
        results["config"] = config_dict
        workdir_lib.write_json_atomic(pathlib.Path(workdir, workdir_lib.RESULTS_FILE), results)
        return results


MERGE_HELP = (
    "train nothing: join the per-seed results of these finished workdirs (seeds run as parallel processes, "
    "one workdir each) into --workdir's results.json and table"
)


def merged_per_seed(
    dirs: list[str], same: tuple[str, ...] = ()
) -> tuple[list[tuple[int, Any]], dict[str, Any]]:
    """(seed, result) pairs from the ``per_seed`` entry of each workdir's ``results.json`` (a list of results
    carrying ``"seed"``, or a ``{seed: result}`` mapping), in order, and the entries named by ``same`` (the
    run's settings), which must be equal in every workdir. A missing file, a seed found twice or settings
    that differ are errors naming them (``--merge`` of experiments.mfli_experiment / foundation_expert)."""
    pairs: list[tuple[int, Any]] = []
    settings: dict[str, Any] | None = None
    for d in dirs:
        path = pathlib.Path(d) / "results.json"
        if not path.exists():
            raise SystemExit(f"error: --merge: {path} does not exist (run that workdir first)")
        stored = json.loads(path.read_text())
        mine = {k: stored.get(k) for k in same}
        if settings is None:
            settings = mine
        for k in same:
            if mine[k] != settings[k]:
                raise SystemExit(
                    f"error: --merge: {d} was run with {k}={mine[k]!r}, {dirs[0]} with {settings[k]!r}"
                )
        per_seed = stored["per_seed"]
        items = per_seed.items() if isinstance(per_seed, dict) else ((r["seed"], r) for r in per_seed)
        for seed, result in items:
            if int(seed) in {s for s, _ in pairs}:
                raise SystemExit(f"error: --merge: seed {seed} is in more than one of {dirs}")
            pairs.append((int(seed), result))
    return pairs, settings or {}


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
    pace = results["s_per_epoch"]  # None when this invocation trained no epoch (a finished run resumed)
    pace = "no epoch trained by this run" if pace is None else f"{pace:.2f} s/epoch"
    if results.get("out_of_time"):  # run it again to continue
        pace += "; stopped by train.max_train_seconds"
    lines.append(
        f"\ntest split: leave-one-out, ranked against all {ds['items']} items of {ds['name']} ({ds['users']} "
        f"users). Best validation epoch {results['best_epoch']} of {results['epochs']}; "
        f"{pace}; wall {results['wall_s']:.0f} s on {results['devices']}."
    )
    return "\n".join(lines)
