"""Ablation sweeps: a config, axes of overrides and seeds -> one run per combination, then a results table
(markdown + CSV, mean ± std over seeds) and a bar plot.

``python -m experiments.sweep --config=experiments/configs/X.py --sweep=model.num_blocks=1,2
--sweep=train.learning_rate=1e-3,3e-3 --seeds=0,1 --out=runs/sweep-X [--metric=hr@10]``
Each axis is ``dotted.key=v1,v2,...``; the runs are the cartesian product of the axes times the seeds.

Every setting is checked before the first one trains: each value is parsed to the type of the config's
current value and each combination's train and model configs are built (an unknown key names the closest
one; ``--sweep model.num_blocks=1,x: 'x' is not an int``). A setting that fails while running is reported
in the tables (``status`` column, error text) and the others go on; the tables and the plot are rewritten
after every finished run, so a killed sweep keeps what finished. Exit status 1 if any setting failed.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import itertools
import pathlib
import sys
import traceback

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments import overrides
from experiments.train_lib import ordered_metrics, run_experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:argument]")
_SWEEP = flags.DEFINE_multi_string("sweep", [], "axis: dotted.key=v1,v2,...")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "seeds (train.seed) for every combination")
_OUT = flags.DEFINE_string("out", "runs/sweep", "output directory")
_METRIC = flags.DEFINE_string("metric", "hr@10", "test metric plotted")


def parse_axis(spec: str) -> tuple[str, list[str]]:
    if "=" not in spec:
        raise ValueError(f"--sweep: expected 'dotted.key=v1,v2', got {spec!r}")
    key, values = spec.split("=", 1)
    return key.strip(), [v.strip() for v in values.split(",") if v.strip()]


def parse_seeds(values: list[str]) -> list[int]:
    try:
        return [overrides.parse_value(0, v) for v in values]
    except ValueError as e:
        raise ValueError(f"--seeds {','.join(values)}: {e}") from None


def apply_override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
    """Sets ``config.<key>`` from a string, typed like the current value; unknown keys raise KeyError."""
    overrides.set_value(config, key, raw)


@dataclasses.dataclass
class Setting:
    name: str  # e.g. "num_blocks-2_learning_rate-0.003"
    seed: int
    axes: dict[str, str]  # dotted key -> value as given
    config: ml_collections.ConfigDict


def plan(
    config: ml_collections.ConfigDict, axes: list[tuple[str, list[str]]], seeds: list[int]
) -> list[Setting]:
    """Every setting of the sweep, each validated (ValueError naming the setting) before any trains."""
    for key, values in axes:
        spec = f"--sweep {key}={','.join(values)}"
        if not values:
            raise ValueError(f"{spec}: no values")
        try:
            node, leaf = overrides.lookup(config, key, label=spec)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        for v in values:
            try:
                overrides.parse_value(node[leaf], v)
            except ValueError as e:
                raise ValueError(f"{spec}: {e}") from None
    settings = []
    combos = list(itertools.product(*[[(k, v) for v in vs] for k, vs in axes])) or [()]
    for combo in combos:
        name = "_".join(f"{k.split('.')[-1]}-{v}" for k, v in combo) or "base"
        for seed in seeds:
            cfg = copy.deepcopy(config)
            for k, v in combo:
                overrides.set_value(cfg, k, v)
            cfg.train.seed = int(seed)
            try:
                overrides.validate(cfg)
            except (ValueError, TypeError) as e:
                given = " ".join(f"{k}={v}" for k, v in combo) or "the base config"
                raise ValueError(f"--sweep setting {given} (seed {seed}): {e}") from None
            settings.append(Setting(name, int(seed), dict(combo), cfg))
    return settings


def run_sweep(
    config,
    axes: list[tuple[str, list[str]]],
    seeds: list[int],
    out: str | pathlib.Path,
    metric: str = "hr@10",
) -> list[dict]:
    """Runs every setting (all validated first); returns one row per run, failed ones with their error."""
    out = pathlib.Path(out)
    settings = plan(config, axes, seeds)
    rows = []
    for i, s in enumerate(settings):
        print(f"[{i + 1}/{len(settings)}] {s.name} seed {s.seed}", flush=True)
        row = {"run": s.name, "seed": s.seed, **s.axes}
        try:
            res = run_experiment(s.config, out / f"{s.name}_seed{s.seed}")
        except Exception as e:  # one failing setting must not cost the others
            traceback.print_exc()
            row.update(status="error", error=f"{type(e).__name__}: {e}".splitlines()[0][:300])
        else:
            row.update(status="ok", error="")
            row.update({f"test/{m}": v for m, v in res["test"].items()})
            row.update(best_epoch=res["best_epoch"], wall_s=round(res["wall_s"], 1))
            row["out_of_time"] = bool(res.get("out_of_time"))  # stopped by train.max_train_seconds
        rows.append(row)
        write_tables(rows, out, metric, echo=False)  # after each run: a killed sweep keeps what finished
    write_tables(rows, out, metric)
    return rows


def _columns(rows: list[dict]) -> list[str]:
    """Keys in first-seen order, the ``test/`` metrics in table order (hr@10, hr@50, hr@200, ..., mrr)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    metrics = ordered_metrics(k for k in keys if k.startswith("test/"))
    lead = [k for k in keys if not k.startswith("test/") and k not in ("best_epoch", "wall_s")]
    return lead + metrics + [k for k in ("best_epoch", "wall_s") if k in keys]


def write_tables(rows: list[dict], out: pathlib.Path, metric: str, *, echo: bool = True) -> None:
    """results.csv (one row per run), results.md (mean ± std over the seeds that finished, status) and
    a bar plot of ``metric``."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    columns = _columns(rows)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    metrics = [k for k in columns if k.startswith("test/")]
    runs = list(dict.fromkeys(r["run"] for r in rows))
    lines = [
        "| run | seeds | " + " | ".join(m[5:] for m in metrics) + " | status |",
        "|---" * (len(metrics) + 3) + "|",
    ]
    plotted, means, stds = [], [], []
    for run in runs:
        mine = [r for r in rows if r["run"] == run]
        ok = [r for r in mine if r.get("status", "ok") == "ok"]
        failed = [r for r in mine if r not in ok]
        cells = []
        for m in metrics:
            v = np.array([r[m] for r in ok if m in r], dtype=float)
            cells.append(f"{v.mean():.4f} ± {v.std():.4f}" if len(v) else "–")
        status = "ok" if not failed else "; ".join(f"seed {r['seed']}: {r['error']}" for r in failed)
        cut = [str(r["seed"]) for r in ok if r.get("out_of_time")]
        if cut:  # still in the means: what the budget allowed, flagged
            status += f"; stopped by train.max_train_seconds: seeds {', '.join(cut)}"
        seeds = f"{len(ok)}" if not failed else f"{len(ok)} of {len(mine)}"
        lines.append(f"| {run} | {seeds} | " + " | ".join(cells) + f" | {status.replace('|', '/')} |")
        key = f"test/{metric}"
        if ok and key in metrics:
            plotted.append(run)
            means.append(np.mean([r[key] for r in ok]))
            stds.append(np.std([r[key] for r in ok]))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    if plotted:
        _plot(plotted, means, stds, out, metric)
    if echo:
        print("\n".join(lines))


def _plot(runs: list[str], means: list[float], stds: list[float], out: pathlib.Path, metric: str) -> None:
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


def main(argv):
    del argv
    overrides.quiet_logging(flags.FLAGS)
    if _CONFIG.value is None:
        raise app.UsageError("--config is required")
    try:
        axes = [parse_axis(s) for s in _SWEEP.value]
        seeds = parse_seeds(_SEEDS.value)
        plan(_CONFIG.value, axes, seeds)  # fail before anything trains (run_sweep plans again, cheaply)
    except ValueError as e:
        sys.exit(f"error: {e}")
    rows = run_sweep(_CONFIG.value, axes, seeds, _OUT.value, _METRIC.value)
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        sys.exit(f"error: {len(failed)} of {len(rows)} runs failed (see {_OUT.value}/results.md)")


if __name__ == "__main__":
    overrides.exit_on_unknown_override(sys.argv)
    app.run(main)
