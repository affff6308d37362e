"""Ablation sweeps: a config, axes of overrides and seeds -> one run per combination, then a results table
(markdown + CSV, mean ± std over seeds) and a bar plot.

``python -m experiments.sweep --config=experiments/configs/X.py --sweep=model.num_blocks=1,2
--sweep=train.learning_rate=1e-3,3e-3 --seeds=0,1 --out=runs/sweep-X [--metric=hr@10]
[--mode=ablation] [--workers=4]``
Each axis is ``dotted.key=v1,v2,...``. ``--mode=grid`` (default): the runs are the cartesian product of the
axes times the seeds. ``--mode=ablation``: one change at a time -- the base config (run ``base``) plus each
axis value alone; a value equal to the base config's is the base run, so four one-factor ablations share
one base run instead of training it four times.

``--workers=N`` trains N settings at once, one process each (``--shard=i/N``: every N-th setting from the
i-th; logs in ``out/worker<i>.log``); on one GPU each worker may take up to ``0.8 / N`` of its memory
(``XLA_PYTHON_CLIENT_MEM_FRACTION``, not preallocated) unless those variables are set. Small models leave a
GPU mostly idle between kernel launches, so N processes finish N settings in far less than N times one's
wall (18 MFLI ML-1M runs at once on one H200: ~390 s each, benchmarks/NOTES.md). The parent rewrites the
tables from the finished workdirs while the workers run and once all have ended (``--collect``: the same
tables without training anything). Each run's workdir is its own, so a sweep killed and started again skips
the finished runs and continues the others from their checkpoints.

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
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments import overrides
from experiments.train_lib import ordered_metrics, run_experiment
from recjax.train import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:argument]")
_SWEEP = flags.DEFINE_multi_string("sweep", [], "axis: dotted.key=v1,v2,...")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "seeds (train.seed) for every combination")
_OUT = flags.DEFINE_string("out", "runs/sweep", "output directory")
_METRIC = flags.DEFINE_string("metric", "hr@10", "test metric(s) plotted, comma-separated")
_COLUMNS = flags.DEFINE_list("columns", [], "test metrics shown in results.md (default: all; CSV has all)")
MODES = ("grid", "ablation")
_MODE = flags.DEFINE_enum("mode", "grid", list(MODES), "grid: axes product; ablation: one change at a time")
_WORKERS = flags.DEFINE_integer("workers", 1, "settings trained at once, one process each")
_SHARD = flags.DEFINE_string("shard", "", "i/N: every N-th setting from the i-th (a worker's part)")
_COLLECT = flags.DEFINE_bool("collect", False, "train nothing: the tables from the finished workdirs")


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


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N) with 0 <= i < N; ValueError naming ``--shard``."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard: expected 'i/N' (e.g. 0/4), got {spec!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {spec}: expected 0 <= i < N")
    return i, n


def _combos(config, axes, mode: str) -> list[tuple[tuple[str, str], ...]]:
    if mode == "grid":
        return list(itertools.product(*[[(k, v) for v in vs] for k, vs in axes])) or [()]
    if mode != "ablation":
        raise ValueError(f"--mode: expected one of {MODES}, got {mode!r}")
    combos: list[tuple[tuple[str, str], ...]] = [()]
    for key, values in axes:
        node, leaf = overrides.lookup(config, key)
        for v in values:
            if overrides.parse_value(node[leaf], v) != node[leaf]:  # the base value is the base run
                combos.append(((key, v),))
    return combos


def _unique_values(config, axes):
    """Each axis without repeated values (``1e-3`` and ``0.001`` are one value: the first spelling stays)."""
    out = []
    for key, values in axes:
        node, leaf = overrides.lookup(config, key)
        seen, kept = [], []
        for v in values:
            parsed = overrides.parse_value(node[leaf], v)
            if parsed not in seen:
                seen.append(parsed)
                kept.append(v)
        out.append((key, kept))
    return out


def _run_names(combos) -> list[str]:
    """Run names from the last key part (``num_blocks-2``); the whole dotted key when two axes share a last
    part (``model.dropout`` and ``task.dropout``), so every setting has its own name and workdir."""
    leaves = [k.split(".")[-1] for k in dict.fromkeys(k for c in combos for k, _ in c)]
    full = len(set(leaves)) < len(leaves)
    return ["_".join(f"{k if full else k.split('.')[-1]}-{v}" for k, v in c) or "base" for c in combos]


def plan(
    config: ml_collections.ConfigDict,
    axes: list[tuple[str, list[str]]],
    seeds: list[int],
    mode: str = "grid",
) -> list[Setting]:
    """Every setting of the sweep (``mode``: ``grid`` or ``ablation``, see the module docstring), each
    validated (ValueError naming the setting) before any trains."""
    for key, values in axes:
        spec = f"--sweep {key}={','.join(values)}"
        if not values:
            raise ValueError(f"{spec}: no values")
        if key == "train.seed":  # each setting's seed is set from --seeds and would silently win
            raise ValueError("--sweep train.seed: the seeds are --seeds (one run per seed and setting)")
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
    combos = _combos(config, _unique_values(config, axes), mode)
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"--seeds {','.join(map(str, seeds))}: a seed is repeated")
    for combo, name in zip(combos, _run_names(combos), strict=True):
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


def _workdir(out: pathlib.Path, s: Setting) -> pathlib.Path:
    return out / f"{s.name}_seed{s.seed}"


def _ok_row(row: dict, res: dict) -> dict:
    row.update(status="ok", error="")
    row.update({f"test/{m}": v for m, v in res["test"].items()})
    row.update(best_epoch=res["best_epoch"], wall_s=round(res["wall_s"], 1))
    row["out_of_time"] = bool(res.get("out_of_time"))  # stopped by train.max_train_seconds
    return row


def run_sweep(
    config,
    axes: list[tuple[str, list[str]]],
    seeds: list[int],
    out: str | pathlib.Path,
    metric: str = "hr@10",
    *,
    mode: str = "grid",
    shard: tuple[int, int] = (0, 1),
    columns: Sequence[str] | None = None,
) -> list[dict]:
    """Runs every setting (all validated first), or a worker's part ``shard = (i, N)``: every N-th from the
    i-th; returns one row per run, failed ones with their error. The whole sweep writes ``out``'s tables;
    a worker writes its rows to ``out/worker<i>.json`` (the parent's :func:`collect` reads the errors)."""
    out = pathlib.Path(out)
    settings = plan(config, axes, seeds, mode)
    i0, n = shard
    mine = settings[i0::n]
    rows = []
    for i, s in enumerate(mine):
        print(f"[{i + 1}/{len(mine)}] {s.name} seed {s.seed}", flush=True)
        row = {"run": s.name, "seed": s.seed, **s.axes}
        try:
            res = run_experiment(s.config, _workdir(out, s))
        except Exception as e:  # one failing setting must not cost the others
            traceback.print_exc()
            row.update(status="error", error=f"{type(e).__name__}: {e}".splitlines()[0][:300])
        else:
            _ok_row(row, res)
        rows.append(row)
        if n == 1:  # after each run: a killed sweep keeps what finished
            write_tables(rows, out, metric, echo=False, columns=columns)
        else:
            out.mkdir(parents=True, exist_ok=True)
            workdir_lib.write_json_atomic(out / f"worker{i0}.json", rows)
    if n == 1:
        write_tables(rows, out, metric, columns=columns)
    return rows


def collect(
    config,
    axes: list[tuple[str, list[str]]],
    seeds: list[int],
    out: str | pathlib.Path,
    metric: str = "hr@10",
    *,
    mode: str = "grid",
    echo: bool = True,
    columns: Sequence[str] | None = None,
) -> list[dict]:
    """The sweep's rows from its workdirs' ``results.json`` (runs cut by ``train.max_train_seconds``
    included, flagged), trains nothing, writes the tables. A setting without results is an error row with
    the worker's error when a ``worker<i>.json`` has one, else ``not finished``."""
    out = pathlib.Path(out)
    errors = {}
    for path in sorted(out.glob("worker*.json")):
        try:
            for r in json.loads(path.read_text()):
                if r.get("status") == "error":
                    errors[(r["run"], r["seed"])] = r["error"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a torn or foreign file: its settings read as not finished
    rows = []
    for s in plan(config, axes, seeds, mode):
        row = {"run": s.name, "seed": s.seed, **s.axes}
        config_dict = json.loads(s.config.to_json_best_effort())  # as run_experiment stores it
        res = workdir_lib.finished_results(_workdir(out, s), config_dict, accept_out_of_time=True)
        if res is not None:
            _ok_row(row, res)
        else:
            row.update(status="error", error=errors.get((s.name, s.seed), "not finished"))
        rows.append(row)
    write_tables(rows, out, metric, echo=echo, columns=columns)
    return rows


def keep_parent_off_gpu() -> None:
    """The parent of ``--workers`` only reads results: pin its JAX to the CPU so the GPU is the workers';
    refused when a backend already exists (a config that touched JAX), since the pin would then be void."""
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("--workers: JAX already holds a device in the parent (a config touched JAX)")
    jax.config.update("jax_platforms", "cpu")


def run_workers(
    argv: list[str], workers: int, out: str | pathlib.Path, report, poll_s: float = 10.0
) -> list[int]:
    """Starts ``workers`` processes ``python -m experiments.sweep <argv> --shard=i/N``, calls ``report()``
    every ``poll_s`` while they run (the parent's table refresh), returns their exit codes. However the
    parent ends (done, SIGTERM / SIGINT, an error in ``report``), no worker outlives it: the ones still
    running are terminated and waited for (their finished runs and checkpoints stay)."""
    if "--" in argv:  # flags after it would reach the workers as positional arguments
        raise ValueError("--workers: put every flag before '--' (or leave '--' out)")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("worker*.json"):  # an earlier sweep's errors must not be reported as this one's
        stale.unlink()
    env = dict(os.environ)
    # Each process also holds ~1 GB of CUDA / cuBLAS context outside the pool: 0.8 / N leaves room for it.
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.8 / workers:.3f}")
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # take the pool as needed, up to the cap
    keep_parent_off_gpu()
    procs, logs = [], []

    def stop(signum, frame):
        raise SystemExit(f"sweep stopped by signal {signum}; the workers were terminated")

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i in range(workers):
            logs.append(open(out / f"worker{i}.log", "w"))  # noqa: SIM115 -- closed in finally
            cmd = [sys.executable, "-m", "experiments.sweep", *argv, "--workers=1", f"--shard={i}/{workers}"]
            procs.append(subprocess.Popen(cmd, stdout=logs[-1], stderr=subprocess.STDOUT, env=env))
        while any(p.poll() is None for p in procs):
            time.sleep(poll_s)
            report()
    finally:
        running = [p for p in procs if p.poll() is None]
        for p in running:
            p.terminate()
        for p in running:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for log in logs:
            log.close()
    return [p.returncode for p in procs]


def _columns(rows: list[dict]) -> list[str]:
    """Keys in first-seen order, the ``test/`` metrics in table order (hr@10, hr@50, hr@200, ..., mrr)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    metrics = ordered_metrics(k for k in keys if k.startswith("test/"))
    lead = [k for k in keys if not k.startswith("test/") and k not in ("best_epoch", "wall_s")]
    return lead + metrics + [k for k in ("best_epoch", "wall_s") if k in keys]


def _names(spec: str | Sequence[str] | None) -> list[str]:
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else spec
    return [m.strip() for m in items if m.strip()]


def write_tables(
    rows: list[dict],
    out: pathlib.Path,
    metric: str | Sequence[str],
    *,
    echo: bool = True,
    columns: str | Sequence[str] | None = None,
) -> None:
    """results.csv (one row per run, every metric), results.md (mean ± std over the seeds that finished,
    status; only the test metrics named in ``columns`` when given, in that order) and a bar plot of
    ``metric`` (several, comma-separated: grouped bars, the file named after the first)."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    all_columns = _columns(rows)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=all_columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    metrics = [k for k in all_columns if k.startswith("test/")]
    if _names(columns):
        metrics = [f"test/{m}" for m in _names(columns)]
    runs = list(dict.fromkeys(r["run"] for r in rows))
    lines = [
        "| run | seeds | " + " | ".join(m[5:] for m in metrics) + " | status |",
        "|---" * (len(metrics) + 3) + "|",
    ]
    plotted: dict[str, dict[str, tuple[float, float]]] = {}  # run -> metric -> (mean, std)
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
        for m in _names(metric):
            v = [r[f"test/{m}"] for r in ok if f"test/{m}" in r]
            if v:
                plotted.setdefault(run, {})[m] = (float(np.mean(v)), float(np.std(v)))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    if plotted:
        _plot(plotted, _names(metric), out)
    if echo:
        print("\n".join(lines))


def _plot(values: dict[str, dict[str, tuple[float, float]]], metrics: list[str], out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(values)
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(runs) * max(1, len(metrics) / 2)), 3.5))
    for j, m in enumerate(metrics):
        pts = [(i, *values[r][m]) for i, r in enumerate(runs) if m in values[r]]
        if pts:
            x, mean, std = zip(*pts, strict=True)
            ax.bar(
                np.array(x) + (j - (len(metrics) - 1) / 2) * width, mean, width, yerr=std, capsize=3, label=m
            )
    ax.set_xticks(range(len(runs)), runs, rotation=30, ha="right")
    ax.set_ylabel("test " + (metrics[0] if len(metrics) == 1 else "metric"))
    if len(metrics) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{metrics[0].replace('@', '_at_')}.png", dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    overrides.quiet_logging(flags.FLAGS)
    if _CONFIG.value is None:
        raise app.UsageError("--config is required")
    try:
        axes = [parse_axis(s) for s in _SWEEP.value]
        seeds = parse_seeds(_SEEDS.value)
        shard = parse_shard(_SHARD.value) if _SHARD.value else (0, 1)
        if _WORKERS.value < 1:
            raise ValueError(f"--workers: expected >= 1, got {_WORKERS.value}")
        if _WORKERS.value > 1 and _SHARD.value:
            raise ValueError("--workers and --shard: give one (the workers get their shards)")
        # fail before anything trains (run_sweep plans again, cheaply)
        plan(_CONFIG.value, axes, seeds, _MODE.value)
    except ValueError as e:
        sys.exit(f"error: {e}")
    args = (_CONFIG.value, axes, seeds, _OUT.value, _METRIC.value)
    kw = dict(mode=_MODE.value, columns=_COLUMNS.value)
    if _COLLECT.value:
        rows = collect(*args, **kw)
    elif _WORKERS.value > 1:
        report = lambda: collect(*args, **kw, echo=False)  # noqa: E731
        try:
            codes = run_workers(sys.argv[1:], _WORKERS.value, _OUT.value, report)
        except (ValueError, RuntimeError) as e:
            sys.exit(f"error: {e}")
        rows = collect(*args, **kw)
        if any(codes):
            print(f"worker exit codes {codes} (logs: {_OUT.value}/worker<i>.log)", file=sys.stderr)
    else:
        rows = run_sweep(*args, **kw, shard=shard)
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        sys.exit(f"error: {len(failed)} of {len(rows)} runs failed (see {_OUT.value}/results.md)")


if __name__ == "__main__":
    overrides.exit_on_unknown_override(sys.argv)
    app.run(main)
