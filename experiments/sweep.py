"""Ablation sweeps: a config, axes of overrides and seeds -> one run per combination, then a results table
(markdown + CSV, mean ± std over seeds) and a bar plot.

``python -m experiments.sweep --config=experiments/configs/X.py --sweep=model.num_blocks=1,2
--sweep=train.learning_rate=1e-3,3e-3 --seeds=0,1 --out=runs/sweep-X [--metric=hr@10]``
Each axis is ``dotted.key=v1,v2,...``; the runs are the cartesian product of the axes times the seeds.
Values are parsed to the type of the config's current value; an unknown key is an error.
"""

from __future__ import annotations

import ast
import copy
import csv
import itertools
import pathlib

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments.train_lib import run_experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file")
_SWEEP = flags.DEFINE_multi_string("sweep", [], "axis: dotted.key=v1,v2,...")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "seeds (train.seed) for every combination")
_OUT = flags.DEFINE_string("out", "runs/sweep", "output directory")
_METRIC = flags.DEFINE_string("metric", "hr@10", "test metric plotted")


def parse_axis(spec: str) -> tuple[str, list[str]]:
    if "=" not in spec:
        raise ValueError(f"--sweep: expected 'dotted.key=v1,v2', got {spec!r}")
    key, values = spec.split("=", 1)
    return key.strip(), [v.strip() for v in values.split(",") if v.strip()]


def apply_override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
    """Sets ``config.<key>`` from a string, typed like the current value; unknown keys raise."""
    *parents, leaf = key.split(".")
    node = config
    for i, p in enumerate(parents):
        if p not in node:
            raise KeyError(f"--sweep key {key!r}: no field {'.'.join(parents[: i + 1])!r} in the config")
        node = node[p]
    if leaf not in node:
        raise KeyError(f"--sweep key {key!r}: no field {leaf!r}; fields there: {sorted(node.keys())}")
    old = node[leaf]
    if isinstance(old, bool):
        value = raw.lower() in ("1", "true", "yes")
    elif isinstance(old, (int, float, str)):
        value = type(old)(raw)
    else:
        value = ast.literal_eval(raw)
    node[leaf] = value


def run_sweep(
    config,
    axes: list[tuple[str, list[str]]],
    seeds: list[int],
    out: str | pathlib.Path,
    metric: str = "hr@10",
) -> list[dict]:
    out = pathlib.Path(out)
    rows = []
    combos = list(itertools.product(*[[(k, v) for v in vs] for k, vs in axes])) or [()]
    for combo in combos:
        for seed in seeds:
            cfg = copy.deepcopy(config)
            for k, v in combo:
                apply_override(cfg, k, v)
            cfg.train.seed = int(seed)
            name = "_".join(f"{k.split('.')[-1]}-{v}" for k, v in combo) or "base"
            res = run_experiment(cfg, out / f"{name}_seed{seed}")
            rows.append(
                {
                    "run": name,
                    "seed": seed,
                    **{k: v for k, v in combo},
                    **{f"test/{m}": v for m, v in res["test"].items()},
                    "best_epoch": res["best_epoch"],
                    "wall_s": round(res["wall_s"], 1),
                }
            )
    write_tables(rows, out, metric)
    return rows


def write_tables(rows: list[dict], out: pathlib.Path, metric: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    metrics = [k for k in rows[0] if k.startswith("test/")]
    runs = list(dict.fromkeys(r["run"] for r in rows))
    lines = [
        "| run | seeds | " + " | ".join(m[5:] for m in metrics) + " |",
        "|---" * (len(metrics) + 2) + "|",
    ]
    means, stds = [], []
    for run in runs:
        vals = {m: np.array([r[m] for r in rows if r["run"] == run]) for m in metrics}
        n = len(vals[metrics[0]])
        lines.append(
            f"| {run} | {n} | " + " | ".join(f"{v.mean():.4f} ± {v.std():.4f}" for v in vals.values()) + " |"
        )
        means.append(vals[f"test/{metric}"].mean())
        stds.append(vals[f"test/{metric}"].std())
    (out / "results.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(runs)), 3.5))
    ax.bar(range(len(runs)), means, yerr=stds, capsize=4)
    ax.set_xticks(range(len(runs)), runs, rotation=30, ha="right")
    ax.set_ylabel(f"test {metric}")
    fig.tight_layout()
    fig.savefig(out / f"{metric.replace('@', '_at_')}.png", dpi=120)
    plt.close(fig)
    print("\n".join(lines))


def main(argv):
    del argv
    if _CONFIG.value is None:
        raise app.UsageError("--config is required")
    run_sweep(
        _CONFIG.value,
        [parse_axis(s) for s in _SWEEP.value],
        [int(s) for s in _SEEDS.value],
        _OUT.value,
        _METRIC.value,
    )


if __name__ == "__main__":
    app.run(main)
