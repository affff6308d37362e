"""One trainer for every sequential model: pure jitted train step over ``nnx.split`` state, AdamW, Orbax
checkpoints with exact resume, JSONL + TensorBoard metrics, per-epoch validation with early stopping, and a
final test evaluation of the best parameters. Data parallel over a 1-d ``data`` mesh (parameters
replicated, batches split), giving the same numbers as one device up to float reduction order.

Resume is exact: the checkpoint holds parameters, optimizer state, RNG keys, the step and the data position
(epoch, batch index); the epoch's batch order is a pure function of (seed, epoch). A run killed with SIGKILL
and restarted with the same config and workdir reaches the same metrics as an uninterrupted run.

Raw IDs: ``id_remapper=`` (``recjax.train.remap_hook``; e.g. ``recjax.embeddings.zch_remap.ItemIdRemapper``)
maps the batches' raw item IDs to rows inside the jitted train step (resetting re-assigned rows and their
optimizer state), evaluates through the read-only remap, keeps the remap state (and per-epoch counters) in
the checkpointed trainer state and logs its rates under ``remap/``. ``None`` (default): unchanged behaviour.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from recjax.data import batching
from recjax.data.splits import LeaveOneOut
from recjax.eval import ranking
from recjax.layers.moe import MoEStats, collect_aux_loss
from recjax.sharding import mesh as mesh_lib
from recjax.train import losses, remap_hook
from recjax.train.checkpoint import Checkpointer
from recjax.train.metric_writer import MetricWriter


@dataclasses.dataclass(frozen=True)
class LossConfig:
    name: str = "sampled_softmax"  # or "bce"
    num_negatives: int = 128
    negatives: str = "uniform"  # or "in_batch"
    temperature: float = 0.05


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 128
    num_epochs: int = 100
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.98
    warmup_steps: int = 0
    grad_clip_norm: float = 0.0  # 0 disables clipping
    seed: int = 0
    eval_every_epochs: int = 1
    patience: int = 10  # validations without improvement before stopping; 0 disables early stopping
    early_stop_metric: str = "ndcg@10"
    checkpoint_every_steps: int = 0  # 0: only at the end of each epoch
    eval_batch_size: int = 256
    ks: tuple[int, ...] = ranking.DEFAULT_KS
    num_devices: int = 0  # 0: all local devices
    topk_impl: str = "auto"
    progress: bool = True
    loss: LossConfig = LossConfig()

    def __post_init__(self):
        for name in ("batch_size", "num_epochs", "eval_batch_size", "eval_every_epochs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name}: expected > 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"train.learning_rate: expected > 0, got {self.learning_rate}")
        metrics = ["mrr"] + [f"{m}@{k}" for k in self.ks for m in ("hr", "ndcg")]
        if self.early_stop_metric not in metrics:
            raise ValueError(
                f"train.early_stop_metric: expected one of {metrics}, got {self.early_stop_metric!r}"
            )
        if self.loss.name not in ("sampled_softmax", "bce"):
            raise ValueError(f"train.loss.name: expected 'sampled_softmax' or 'bce', got {self.loss.name!r}")


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    lr: Any = cfg.learning_rate
    if cfg.warmup_steps:
        lr = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    parts = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm else []
    parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def _loss(cfg: LossConfig, model, batch, rng):
    hidden = model(batch["inputs"], batch["mask"])
    table = model.item_embeddings()
    if cfg.name == "bce":
        loss, metrics = losses.bce_loss(hidden, batch["targets"], batch["mask"], table, rng)
    else:
        loss, metrics = losses.sampled_softmax_loss(
            hidden,
            batch["targets"],
            batch["mask"],
            table,
            rng,
            num_negatives=cfg.num_negatives,
            negatives=cfg.negatives,
            temperature=cfg.temperature,
            l2_normalize=model.config.l2_normalize,
        )
    # Router load-balancing + z losses stored by MoE feed-forward layers during this forward (0 without MoE).
    aux = collect_aux_loss(model)
    metrics = {**metrics, "moe_aux_loss": aux}
    loads = [x.reshape(-1) for x in jax.tree.leaves(nnx.state(model, MoEStats))]
    if loads:  # expert balance: busiest expert's assignments over the mean, worst layer (1 = perfect)
        metrics["moe_max_load_ratio"] = jnp.max(
            jnp.stack([jnp.max(x) / jnp.maximum(jnp.mean(x), 1e-9) for x in loads])
        )
    return loss + aux, metrics


def make_train_step(graphdef, optimizer: optax.GradientTransformation, loss_cfg: LossConfig) -> Callable:
    """(params, rest, opt_state, batch, rng) -> (params, rest, opt_state, metrics); pure and jitted."""

    @jax.jit
    def train_step(params, rest, opt_state, batch, rng):
        # Merge in the jit trace and differentiate with nnx.value_and_grad w.r.t. Params only: non-Param
        # state (dropout RNG counters) is then mutated in the trace it lives in (merging inside jax.grad
        # raises TraceContextError in flax 0.12).
        model = nnx.merge(graphdef, params, rest)
        (loss, metrics), grads = nnx.value_and_grad(
            lambda m: _loss(loss_cfg, m, batch, rng), argnums=nnx.DiffState(0, nnx.Param), has_aux=True
        )(model)
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return params, new_rest, opt_state, metrics

    return train_step


def make_query_fn(graphdef_eval) -> Callable:
    """Jitted (params, rest, inputs_BxL, mask_BxL) -> queries_BxD, built once per trainer."""

    @jax.jit
    def query(params, rest, inputs, mask):
        model = nnx.merge(graphdef_eval, params, rest)
        return model.user_embedding(model(inputs, mask))

    return query


def item_table(graphdef_eval, params, rest) -> jax.Array:
    model = nnx.merge(graphdef_eval, params, rest)
    return model.candidate_embeddings()


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


# Typed PRNG keys are stored as raw key data so any checkpoint backend can hold them.
def _to_storable(tree):
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _from_storable(stored, like):
    return jax.tree.map(
        lambda s, x: jax.random.wrap_key_data(s, impl=jax.random.key_impl(x)) if _is_key(x) else s,
        stored,
        like,
    )


class Trainer:
    """Trains ``model`` on a leave-one-out split; see module docstring."""

    def __init__(
        self,
        model: nnx.Module,
        split: LeaveOneOut,
        cfg: TrainConfig,
        workdir: str | pathlib.Path,
        *,
        max_len: int,
        batch_iter: Callable[..., Iterator[dict]] | None = None,
        id_remapper: remap_hook.IdRemapper | None = None,
    ):
        self.cfg, self.split, self.max_len = cfg, split, max_len
        self.workdir = pathlib.Path(workdir)
        self.mesh = mesh_lib.make_mesh(cfg.num_devices or None)
        n_dev = self.mesh.shape["data"]
        for name in ("batch_size", "eval_batch_size"):
            if getattr(cfg, name) % n_dev:
                raise ValueError(f"train.{name}: {getattr(cfg, name)} is not divisible by {n_dev} devices")
        self.batch_iter = batch_iter or batching.batches
        self.train_examples = split.train_examples(max_len)
        self.valid_examples = split.eval_examples("valid", max_len)
        self.test_examples = split.eval_examples("test", max_len)
        model.train()
        self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        model.eval()
        self.graphdef_eval = nnx.split(model, nnx.Param, ...)[0]
        model.train()
        self.optimizer = make_optimizer(cfg)
        self.train_step = make_train_step(self.graphdef, self.optimizer, cfg.loss)
        self.query = make_query_fn(self.graphdef_eval)
        repl = mesh_lib.replicated(self.mesh)
        params, rest = jax.device_put((params, rest), repl)
        self.id_remapper = id_remapper
        if id_remapper is not None:
            rows = item_table(self.graphdef_eval, params, rest).shape[0]
            if rows != id_remapper.num_rows:
                raise ValueError(
                    f"id_remapper: the model has {rows} item rows, the remapper maps to "
                    f"{id_remapper.num_rows} (build the model with num_items = remapper.num_items)"
                )
            self.remap_step = remap_hook.make_remapped_train_step(self.train_step, id_remapper, self.mesh)
            self.eval_remap = remap_hook.make_eval_remap(id_remapper, self.mesh)
        self.state = {
            "params": params,
            "rest": rest,
            # Committed to the mesh like the parameters: restored arrays are committed, and a restored
            # scalar left on one device would not mix with replicated parameters in the jitted step.
            "opt_state": jax.device_put(self.optimizer.init(params), repl),
            "rng": jax.device_put(jax.random.key(cfg.seed), repl),
            "step": 0,
            "epoch": 0,
            "batch": 0,
            "best_metric": -np.inf,
            "best_epoch": -1,
            "since_best": 0,
            "stopped": 0,
            "best_params": params,
        }
        if id_remapper is not None:  # remap state of the current and of the best parameters, epoch counters
            remap_state = jax.device_put(id_remapper.init_state(), repl)
            self.state.update(
                remap_state=remap_state,
                best_remap_state=remap_state,
                remap_totals=jax.device_put(remap_hook.init_totals(id_remapper), repl),
            )
        self.checkpointer = Checkpointer(self.workdir / "checkpoints")
        if self.checkpointer.latest_step() is not None:
            stored = self.checkpointer.restore(_to_storable(self.state))
            self.state = _from_storable(stored, self.state)
            self.state = {
                k: (
                    int(v)
                    if k in ("step", "epoch", "batch", "best_epoch", "since_best", "stopped")
                    else float(v)
                    if k == "best_metric"
                    else v
                )
                for k, v in self.state.items()
            }
            self.resumed_from = self.state["step"]
        else:
            self.resumed_from = None

    # -- evaluation -------------------------------------------------------------------------------------
    def evaluate(self, which: str, params=None, remap_state=None) -> dict[str, float]:
        """Metrics on ``which`` ("valid" | "test"). Defaults: the current (valid) or best (test) parameters
        and, with an ``id_remapper``, the remap state saved with them. With an ``id_remapper`` pass
        ``params`` and ``remap_state`` together (the state that trained those parameters) or neither."""
        if self.id_remapper is not None and (params is None) != (remap_state is None):
            raise ValueError(
                "params / remap_state: with an id_remapper pass both (the remap state that trained these "
                f"params) or neither, got params={'None' if params is None else 'given'}, "
                f"remap_state={'None' if remap_state is None else 'given'}"
            )
        params = self.state["best_params" if which == "test" else "params"] if params is None else params
        examples = self.valid_examples if which == "valid" else self.test_examples
        batches = (
            mesh_lib.shard_batch(b, self.mesh)
            for b in batching.batches(examples, self.cfg.eval_batch_size, shuffle=False)
        )
        rest = self.state["rest"]
        query_fn = lambda b: self.query(params, rest, b["inputs"], b["mask"])  # noqa: E731
        if self.id_remapper is not None:
            if remap_state is None:
                remap_state = self.state["best_remap_state" if which == "test" else "remap_state"]
            step = self.state["step"]
            return remap_hook.evaluate_remapped(
                query_fn,
                item_table(self.graphdef_eval, params, rest),
                (self.eval_remap(remap_state, b, step) for b in batches),
                ks=self.cfg.ks,
                impl=self.cfg.topk_impl,
            )
        return ranking.evaluate(
            query_fn,
            item_table(self.graphdef_eval, params, rest),
            batches,
            ks=self.cfg.ks,
            impl=self.cfg.topk_impl,
        )

    def remap_rates(self) -> dict[str, float]:
        """The remapper's rates over the current (or last finished) epoch's ID occurrences."""
        s = self.state
        rates = self.id_remapper.rates(s["remap_totals"], s["remap_state"])
        return {k: float(v) for k, v in jax.device_get(rates).items()}

    def _save(self):
        self.checkpointer.save(self.state["step"], _to_storable(self.state), force=True)

    # -- training ---------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, s = self.cfg, self.state
        writer = MetricWriter(self.workdir)
        n_examples = len(self.train_examples["inputs"])
        steps_per_epoch = batching.num_batches(n_examples, cfg.batch_size, drop_remainder=False)
        t_start, epoch_times = time.time(), []
        while s["epoch"] < cfg.num_epochs and not s["stopped"]:
            epoch, t_epoch = s["epoch"], time.time()
            it = self.batch_iter(
                self.train_examples,
                cfg.batch_size,
                shuffle=True,
                seed=cfg.seed,
                epoch=epoch,
                drop_remainder=False,
            )
            bar = tqdm(
                total=steps_per_epoch,
                initial=s["batch"],
                desc=f"epoch {epoch}",
                disable=not cfg.progress,
                leave=False,
            )
            for i, batch in enumerate(it):
                if i < s["batch"]:  # resuming inside an epoch: skip the batches already trained on
                    continue
                rng = jax.random.fold_in(s["rng"], s["step"])
                if self.id_remapper is None:
                    s["params"], s["rest"], s["opt_state"], metrics = self.train_step(
                        s["params"], s["rest"], s["opt_state"], mesh_lib.shard_batch(batch, self.mesh), rng
                    )
                else:
                    if i == 0:  # a new epoch: its counters start at zero
                        s["remap_totals"] = jax.tree.map(jnp.zeros_like, s["remap_totals"])
                    (s["params"], s["rest"], s["opt_state"], s["remap_state"], s["remap_totals"], metrics) = (
                        self.remap_step(
                            s["params"],
                            s["rest"],
                            s["opt_state"],
                            s["remap_state"],
                            s["remap_totals"],
                            mesh_lib.shard_batch(batch, self.mesh),
                            rng,
                            s["step"],
                        )
                    )
                s["step"] += 1
                s["batch"] = i + 1
                bar.update(1)
                if s["step"] % 50 == 0:
                    writer.write(s["step"], jax.device_get(metrics), prefix="train/")
                if cfg.checkpoint_every_steps and s["step"] % cfg.checkpoint_every_steps == 0:
                    self._save()
            bar.close()
            epoch_times.append(time.time() - t_epoch)
            s["epoch"], s["batch"] = epoch + 1, 0
            if self.id_remapper is not None:
                writer.write(s["step"], {**self.remap_rates(), "epoch": epoch + 1}, prefix="remap/")
            if (epoch + 1) % cfg.eval_every_epochs == 0 or epoch + 1 == cfg.num_epochs:
                valid = self.evaluate("valid", s["params"], s.get("remap_state"))
                writer.write(s["step"], {**valid, "epoch": epoch + 1}, prefix="valid/")
                score = valid[cfg.early_stop_metric]
                if score > s["best_metric"]:
                    s.update(best_metric=score, best_epoch=epoch + 1, since_best=0, best_params=s["params"])
                    if self.id_remapper is not None:
                        s["best_remap_state"] = s["remap_state"]
                else:
                    s["since_best"] += 1
                s["stopped"] = int(bool(cfg.patience) and s["since_best"] >= cfg.patience)
                if cfg.progress:
                    tqdm.write(
                        f"epoch {epoch + 1}: valid {cfg.early_stop_metric}={score:.4f} "
                        f"hr@10={valid['hr@10']:.4f} (best {s['best_metric']:.4f} @ {s['best_epoch']})"
                    )
            self._save()
        test = self.evaluate("test")
        writer.write(s["step"], test, prefix="test/")
        writer.close()
        result = {
            "test": test,
            "best_valid": s["best_metric"],
            "best_epoch": s["best_epoch"],
            "epochs": s["epoch"],
            "steps": s["step"],
            "stopped_early": bool(s["stopped"]),
            "wall_s": time.time() - t_start,
            "s_per_epoch": float(np.median(epoch_times)) if epoch_times else float("nan"),
            "devices": f"{self.mesh.shape['data']} x {jax.devices()[0].platform}",
            "resumed_from_step": self.resumed_from,
        }
        if self.id_remapper is not None:
            result["remap_last_epoch"] = self.remap_rates()
        (self.workdir / "results.json").write_text(json.dumps(result, indent=2))
        return result
