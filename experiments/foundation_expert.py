"""Foundation–Expert with HyperCast (arXiv 2508.02929): the per-surface table and the transfer ratio.

For each seed: train a small and a large FM (``config.fm_blocks``, e.g. 2 and 8 HSTU blocks) on all surfaces
with the one Trainer; HyperCast-log each FM's TAE for the experts' train / valid / test impressions into the
store (``WORKDIR/store``, version = 1000 * seed + blocks, sealed); then train per surface the expert alone
and the expert on each FM's TAE. The table, per surface (mean ± std over seeds): expert alone, expert + FM
TAE (large FM), FM alone (large), with FLOPs per request (``config.flops_candidates`` candidates); the
transfer ratio per surface TR = (NE(expert|FM1) - NE(expert|FM2)) / (NE(FM1) - NE(FM2)) from the seed means.

    python -m experiments.foundation_expert --config experiments/configs/foundation_expert_ml1m.py \
        --workdir runs/fe_ml1m [--seeds 0,1,2]

Finished runs are reused (each Trainer workdir resumes; a sealed store version is not logged again). Seeds
run as parallel processes (one workdir each) are joined with ``--merge DIR,DIR,... --workdir OUT``.
Writes WORKDIR/results.json and WORKDIR/table.md and prints the table.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import pathlib
import shutil
import sys
import time

import numpy as np
from flax import nnx

from experiments import train_lib
from recjax.data import registry
from recjax.data import surfaces as S
from recjax.data.tae_store import TAEStore
from recjax.models import experts as X
from recjax.models import foundation as F
from recjax.train.trainer import TrainConfig, Trainer


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("fe_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def build_data(c) -> S.SurfaceData:
    d = c.data
    if d.name == "synthetic":
        ds = registry.load({"name": "synthetic", "synthetic": dict(d.synthetic)})
        surfaces = S.item_group_surfaces(ds, "genre", d.surface_groups)
    elif d.name == "ml-1m":
        ds = registry.load({"name": "ml-1m"})
        surfaces = S.genre_surfaces(ds)
    elif d.name == "ml-100k":
        ds = registry.load({"name": "ml-100k"})
        surfaces = S.occupation_surfaces(ds)
    else:
        raise ValueError(f"data.name: expected 'ml-1m', 'ml-100k' or 'synthetic', got {d.name!r}")
    return S.SurfaceData(ds, surfaces, max_len=d.max_len, num_negatives=d.num_negatives)


def _train_cfg(t, seed: int, progress: bool) -> TrainConfig:
    return TrainConfig(
        batch_size=t.batch_size,
        num_epochs=t.num_epochs,
        learning_rate=t.learning_rate,
        patience=t.patience,
        seed=seed,
        num_devices=1,
        progress=progress,
        checkpoint_every_epochs=1,
        max_train_seconds=t.get("max_train_seconds", TrainConfig.max_train_seconds),
    )


def _fm_config(c, data, blocks: int) -> F.FoundationConfig:
    return F.FoundationConfig(
        num_items=data.num_items,
        num_surfaces=data.surfaces.num_surfaces,
        max_len=data.max_len,
        num_blocks=blocks,
        **dict(c.fm),
    )


def _fm_task(c, data) -> F.FoundationTask:
    ft = c.fm_train
    return F.FoundationTask(
        data,
        batch_size=ft.batch_size,
        positions_per_user=c.data.positions_per_user or None,
        eval_candidates=ft.eval_candidates,
        eval_batch_size=ft.eval_batch_size,
        max_valid_rows=ft.max_valid_rows,
    )


def _fm_trainer(c, data, fm_task, seed: int, blocks: int, workdir: pathlib.Path, progress: bool) -> Trainer:
    fm = F.FoundationModel(_fm_config(c, data, blocks), rngs=nnx.Rngs(seed))
    return Trainer(
        fm, fm_task, _train_cfg(c.fm_train, seed, progress), workdir / f"seed{seed}" / f"fm{blocks}"
    )


def train_fm_only(c, data, seed: int, blocks: int, workdir: pathlib.Path, progress: bool) -> dict:
    """Train (or resume) one FM of one seed in the workdir layout ``run_seed`` reuses, nothing else: the
    FMs of a seed can then train as parallel processes before one ``run_seed`` per seed logs their TAE."""
    res = _fm_trainer(c, data, _fm_task(c, data), seed, blocks, workdir, progress).fit()
    return {"test": res["test"], "best_epoch": res["best_epoch"], "epochs": res["epochs"],
            "out_of_time": bool(res.get("out_of_time"))}  # fmt: skip


def run_seed(c, data, seed: int, workdir: pathlib.Path, store: TAEStore, progress: bool) -> dict:
    ft = c.fm_train
    fm_task = _fm_task(c, data)
    imps = {
        "train": data.train_impressions(10_000 + seed, c.data.expert_positions_per_user or None),
        **fm_task.eval_imp,
    }
    out: dict = {}
    versions = {}
    for blocks in c.fm_blocks:
        version = 1000 * seed + blocks
        trainer = _fm_trainer(c, data, fm_task, seed, blocks, workdir, progress)
        res = trainer.fit()
        out[f"fm{blocks}"] = res["test"]
        out.setdefault("out_of_time", {})[f"fm{blocks}"] = bool(res.get("out_of_time"))
        # The note names the FM's training state: a time-budgeted FM that trained on in a later run is a
        # different model, and its experts must not read the TAE logged from the earlier one.
        note = f"fm {blocks} blocks, best epoch {res['best_epoch']} of {res['epochs']}, {res['steps']} steps"
        info = store.versions().get(version)
        if info is not None and not info["sealed"]:
            raise RuntimeError(
                f"store version {version} was left unsealed by an interrupted run; remove "
                f"{store.path / f'v{version}'} and its manifest entry (or the store) and rerun"
            )
        if info is not None and info["note"] != note:
            raise RuntimeError(
                f"store version {version} holds the TAE of another state of this FM ({info['note']!r}; the "
                f"FM is now at {note!r}: a time-budgeted run went on training); its experts were trained on "
                "the old TAE. Start the seed afresh (--fresh, or a new --workdir)"
            )
        if info is None:
            best = trainer.best_model()
            store.create_version(version, best.config.embed_dim, dtype=c.tae_dtype, note=note)
            for name, imp in imps.items():  # training requests are narrow (a positive and its negatives)
                width = fm_task.num_candidates if name == "train" else ft.eval_candidates
                F.log_tae(
                    best,
                    data,
                    imp,
                    store.writer(version, name),
                    num_candidates=width,
                    batch_size=ft.eval_batch_size,
                )
            store.seal(version)
        versions[blocks] = version
    et = c.expert_train
    for s, sname in enumerate(data.surfaces.names):
        if not (imps["train"]["surface"] == s).sum() >= et.batch_size:
            continue
        for variant, version in [("expert", None)] + [(f"expert+fm{b}", v) for b, v in versions.items()]:
            tae = (
                None if version is None else {k: store.reader(version, k, require_sealed=True) for k in imps}
            )
            task = X.ExpertTask(
                data,
                s,
                imps,
                history_len=c.expert.history_len,
                tae=tae,
                fm_version=version,
                batch_size=et.batch_size,
            )
            model = X.Expert(
                task.config_for(embed_dim=c.expert.embed_dim, hidden_dim=c.expert.hidden_dim),
                rngs=nnx.Rngs(seed),
            )
            wd = workdir / f"seed{seed}" / f"{variant}_{sname}"
            res = Trainer(model, task, _train_cfg(et, seed, progress), wd).fit()
            out.setdefault(variant, {}).update({f"{sname}/{k}": v for k, v in res["test"].items()})
            out.setdefault("expert_out_of_time", {})[f"{variant}/{sname}"] = bool(res.get("out_of_time"))
    return out


def summarize(c, data, results: dict[int, dict]) -> tuple[str, dict]:
    """Markdown table + summary dict (means, stds, TR per surface)."""
    small, large = (f"fm{b}" for b in c.fm_blocks)
    kind = data.surfaces.kind
    metrics = ("hr@10", "ndcg@10", "ne") if kind == "next_item" else ("auc", "ne")
    variants = ("expert", f"expert+{large}", large, f"expert+{small}", small)
    C = c.flops_candidates
    fm_flops = {
        f"fm{b}": F.fm_flops_per_request(_fm_config(c, data, b), data.max_len, C) for b in c.fm_blocks
    }
    ecfg = X.ExpertConfig(
        num_items=data.num_items,
        embed_dim=c.expert.embed_dim,
        hidden_dim=c.expert.hidden_dim,
        history_len=c.expert.history_len,
    )
    item_side, user_side = X.side_features(data)
    ecfg_kw = dict(item_side_dim=item_side.shape[1], user_side_dim=user_side.shape[1])
    e_flops = X.expert_flops_per_request(X.ExpertConfig(**{**ecfg.__dict__, **ecfg_kw}), C)
    e_tae_flops = X.expert_flops_per_request(
        X.ExpertConfig(**{**ecfg.__dict__, **ecfg_kw, "tae_dim": c.fm.embed_dim}), C
    )
    flops = {"expert": e_flops, **fm_flops, **{f"expert+{k}": e_tae_flops for k in fm_flops}}
    summary: dict = {
        "surfaces": {},
        "flops_per_request": flops,
        "flops_candidates": C,
        "seeds": sorted(results),
    }
    lines = [
        f"| surface | model | {' | '.join(metrics)} | MFLOPs/request ({C} cand.; expert+FM: expert only) |",
        "|---" * (len(metrics) + 3) + "|",
    ]
    for sname in data.surfaces.names:
        row: dict = {}
        for v in variants:
            vals = {m: [results[s].get(v, {}).get(f"{sname}/{m}", np.nan) for s in results] for m in metrics}
            row[v] = {
                m: (float(np.nanmean(x)), float(np.nanstd(x)))
                for m, x in vals.items()
                if np.isfinite(x).any()
            }
            if row[v]:
                cells = " | ".join(
                    f"{row[v][m][0]:.4f} ± {row[v][m][1]:.4f}" if m in row[v] else "-" for m in metrics
                )
                lines.append(f"| {sname} | {v} | {cells} | {flops[v] / 1e6:.2f} |")
        ne = {v: row[v].get("ne", (np.nan,))[0] for v in row}
        denom = ne.get(small, np.nan) - ne.get(large, np.nan)
        tr = (
            (ne.get(f"expert+{small}", np.nan) - ne.get(f"expert+{large}", np.nan)) / denom
            if denom
            else np.nan
        )
        row["transfer_ratio"] = float(tr)
        summary["surfaces"][sname] = row
    lines.append("")
    lines.append(
        f"Transfer ratio TR = (NE(expert|{small}) - NE(expert|{large})) / (NE({small}) - NE({large})), "
        "from the seed means:"
    )
    lines += [f"- {s}: {summary['surfaces'][s]['transfer_ratio']:.3f}" for s in data.surfaces.names]
    for key, kind, what in (
        ("out_of_time", "fm", "FMs stopped by fm_train.max_train_seconds (not fully trained)"),
        ("expert_out_of_time", "expert", "Experts stopped by expert_train.max_train_seconds"),
    ):
        cut = [f"seed {s} {m}" for s in results for m, v in results[s].get(key, {}).items() if v]
        summary[f"{kind}_out_of_time"] = cut
        if cut:
            lines.append(f"\n{what}: {', '.join(cut)}")
    return "\n".join(lines), summary


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--seeds", default="", help="comma-separated; default: the config's")
    p.add_argument("--fresh", action="store_true", help="delete the workdir first")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config entry, e.g. --set fm_train.num_epochs=10 (value parsed as Python)",
    )
    p.add_argument("--merge", default="", metavar="DIR,DIR,...", help=train_lib.MERGE_HELP)
    p.add_argument(
        "--fm-only",
        type=int,
        default=None,
        metavar="BLOCKS",
        help="only train (or resume) the FM of BLOCKS blocks for the seeds, print its test metrics and stop; "
        "a later plain run on the same workdir reuses it",
    )
    a = p.parse_args(argv)
    if a.fm_only is not None and a.merge:
        raise SystemExit("error: --fm-only and --merge exclude each other")
    c = load_config(a.config)
    for item in a.set:
        key, _, value = item.partition("=")
        *path, leaf = key.split(".")
        node = c
        for k in path:
            node = node[k]
        if leaf not in node:
            raise SystemExit(f"error: --set {key}: no such config entry")
        node[leaf] = ast.literal_eval(value)
    if a.fm_only is not None and a.fm_only not in c.fm_blocks:  # before --fresh deletes anything
        raise SystemExit(f"error: --fm-only {a.fm_only}: the config's fm_blocks are {tuple(c.fm_blocks)}")
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else list(c.seeds)
    workdir = pathlib.Path(a.workdir)
    if a.fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = build_data(c)
    if a.fm_only is not None:
        out = {s: train_fm_only(c, data, s, a.fm_only, workdir, not a.quiet) for s in seeds}
        print(json.dumps(out, indent=1, default=float))
        return out
    if a.merge:
        dirs = [d for d in a.merge.split(",") if d]
        pairs, settings = train_lib.merged_per_seed(dirs, ("config", "set"))
        if pathlib.Path(settings["config"]).resolve() != pathlib.Path(a.config).resolve():
            raise SystemExit(f"error: --merge: {dirs[0]} ran --config {settings['config']}, not {a.config}")
        a.set = settings["set"]  # the table's FLOPs and notes follow the runs' settings
        results = dict(pairs)
    else:
        store = TAEStore(workdir / "store")
        results = {s: run_seed(c, data, s, workdir, store, not a.quiet) for s in seeds}
    table, summary = summarize(c, data, results)
    summary.update(config=a.config, set=a.set, wall_s=time.time() - t0, per_seed=results)
    (workdir / "results.json").write_text(json.dumps(summary, indent=1, default=float))
    (workdir / "table.md").write_text(table + "\n")
    print(table)
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
