"""One trainer for every system. A task (``recjax.train.tasks``) brings the loss, the batches, the evaluation
and the early-stopping metric; the trainer owns a typed ``TrainState`` (params, non-parameter module state,
optimizer state, RNG key, step, task state), one jitted step with donated state and in/out shardings from
the logical-axis rules (``recjax.sharding.mesh.variable_shardings``), Orbax checkpoints with exact resume,
JSONL + TensorBoard metrics, per-epoch validation with early stopping, and the final test evaluation of the
best parameters.

Memory: the state is donated to the step (updated in place), and the best-parameters copy lives on the
host (numpy), so device memory holds one set of params + optimizer state (measured in benchmarks/RESULTS.md,
"Trainer state memory"). Data parallel over the ``data`` mesh axis: batches are split, parameters placed by
the rules (replicated unless a rule shards one of their logical axes).

Resume is exact: the checkpoint holds the ``TrainState``, the data position (epoch, batch index), the
early-stopping state and the best copy; the epoch's batch order is a pure function of (seed, epoch). A run
killed with SIGKILL and restarted with the same config and workdir reaches the same metrics as an
uninterrupted run.

Non-finite steps: a step whose loss or gradient norm is not finite never changes the state (the step keeps
the old state); ``TrainConfig.nonfinite="error"`` (default) then stops training with an error naming the
step, ``"skip"`` goes on and counts the skipped steps (``train/skipped_steps``). The check reads each step's
flag one step late, so the host never waits for the step it just dispatched.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from tqdm.auto import tqdm

from recjax.eval import ranking
from recjax.sharding import distributed as distributed_lib
from recjax.sharding import embedding as embedding_lib
from recjax.sharding import mesh as mesh_lib
from recjax.sharding import prefetch as prefetch_lib
from recjax.train import item_version
from recjax.train import workdir as workdir_lib
from recjax.train.checkpoint import Checkpointer
from recjax.train.metric_writer import MetricWriter
from recjax.train.tasks import LossConfig, Task

NONFINITE_MODES = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The ``train`` section of an experiment config. The loop, optimizer, checkpoint and device fields are
    the Trainer's; ``batch_size``, ``eval_batch_size``, ``ks``, ``early_stop_metric``, ``eval_impl`` and
    ``loss`` configure ``NextItemTask.from_config`` (a custom task takes its own settings; the Trainer then
    only checks that the batch sizes divide the devices)."""

    batch_size: int = 128
    num_epochs: int = 100
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.98
    warmup_steps: int = 0
    grad_clip_norm: float = 0.0  # 0 disables clipping
    seed: int = 0
    eval_every_epochs: int = 1  # 0: no validation (no early stopping; the last parameters are "best")
    patience: int = 10  # validations without improvement before stopping; 0 disables early stopping
    early_stop_metric: str = "ndcg@10"
    checkpoint_every_steps: int = 0  # 0: none inside an epoch
    checkpoint_every_epochs: int = 1  # 0: none at epoch ends (both 0: checkpoints off)
    eval_batch_size: int = 256
    ks: tuple[int, ...] = ranking.DEFAULT_KS
    num_devices: int = 0  # 0: all local devices
    eval_impl: str = "auto"  # recjax.eval.ranking.IMPLS: how evaluation computes the score matrix
    progress: bool = True
    nonfinite: str = "error"  # or "skip"; see the module docstring
    donate: bool = True  # donate the state to the step (False only to measure what donation saves)
    # Wall-clock budget of this process's training loop, checked at epoch ends (0: none). When spent, the
    # run stops after that epoch's validation, saves a checkpoint (whatever the cadence), tests the best
    # parameters and reports "out_of_time"; a resumed run gets the budget afresh and goes on training.
    # Needs checkpoints (a cadence > 0): without them a second run could only start over.
    max_train_seconds: float = 0.0
    loss: LossConfig = LossConfig()

    def __post_init__(self):
        for name in ("batch_size", "num_epochs", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name}: expected > 0, got {getattr(self, name)}")
        for name in (
            "eval_every_epochs", "patience", "checkpoint_every_steps", "checkpoint_every_epochs",
            "max_train_seconds",
        ):  # fmt: skip
            if not getattr(self, name) >= 0:
                raise ValueError(f"train.{name}: expected >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"train.learning_rate: expected > 0, got {self.learning_rate}")
        if self.max_train_seconds and not (self.checkpoint_every_epochs or self.checkpoint_every_steps):
            raise ValueError(
                f"train.max_train_seconds={self.max_train_seconds} needs checkpoints to continue the run: "
                "set train.checkpoint_every_epochs (or checkpoint_every_steps) > 0"
            )
        if self.nonfinite not in NONFINITE_MODES:
            raise ValueError(f"train.nonfinite: expected one of {NONFINITE_MODES}, got {self.nonfinite!r}")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"train.ks: expected cutoffs >= 1, got {self.ks}")
        metrics = ["mrr"] + [f"{m}@{k}" for k in self.ks for m in ("hr", "ndcg")]
        if self.early_stop_metric not in metrics:
            raise ValueError(
                f"train.early_stop_metric: expected one of {metrics}, got {self.early_stop_metric!r}"
            )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    lr: Any = cfg.learning_rate
    if cfg.warmup_steps:
        lr = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    parts = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm else []
    parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


@struct.dataclass
class TrainState:
    """Everything the jitted step reads and writes; donated to it."""

    params: Any  # nnx.State of nnx.Param
    rest: Any  # nnx.State of the other module variables (dropout RNG counters, ...)
    opt_state: Any
    rng: jax.Array  # typed PRNG key; the step's key is fold_in(rng, step)
    step: jax.Array  # int32 scalar
    task_state: Any  # the task's own pytree (e.g. an ID remapper's table), {} by default


def make_train_step(
    graphdef: nnx.GraphDef, task: Task, optimizer: optax.GradientTransformation
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure step ``(state, batch) -> (state, metrics)`` (not jitted: the Trainer jits it with shardings
    and donation). A non-finite loss or gradient norm keeps the old state (``metrics["finite"]`` False)."""

    def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        params, opt_state, task_state, batch, pre_metrics = task.prepare(
            state.params, state.opt_state, state.task_state, batch, rng, state.step
        )
        # Merge in the jit trace and differentiate with nnx.value_and_grad w.r.t. Params only: non-Param
        # state (dropout RNG counters) is then mutated in the trace it lives in.
        model = nnx.merge(graphdef, params, state.rest)
        (loss, metrics), grads = nnx.value_and_grad(
            lambda m: task.loss(m, batch, rng), argnums=nnx.DiffState(0, nnx.Param), has_aux=True
        )(model)
        item_version.advance_item_versions(model)  # kept back with the rest by a non-finite step
        # What a custom loss left sown outside nnx.capture is dropped: it is not state between steps.
        _, _, _, rest = nnx.split(model, nnx.Param, nnx.Intermediate, ...)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def keep(new, old):  # a non-finite step changes nothing
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        new = TrainState(
            params=keep(new_params, state.params),
            rest=keep(rest, state.rest),
            opt_state=keep(new_opt_state, state.opt_state),
            rng=state.rng,
            step=state.step + 1,
            task_state=keep(task_state, state.task_state),
        )
        metrics = {**metrics, **pre_metrics, "loss": loss, "grad_norm": grad_norm, "finite": finite}
        return new, metrics

    return step_fn


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


def _host_copy(tree):
    """A numpy copy (never a view of a device buffer that a donated step may overwrite)."""
    return jax.tree.map(lambda x: np.array(x, copy=True), distributed_lib.host_tree(tree))


def _best_copy(state: TrainState) -> dict:
    """Host copy of what the best parameters are evaluated with: their task state and the module's other
    variables of the same step (an item-version tag must match the parameters it names)."""
    return _host_copy(
        {"params": state.params, "rest": _to_storable(state.rest), "task_state": state.task_state}
    )


def _distinct_buffers(tree):
    """Copies leaves that share a buffer with an earlier leaf (e.g. one zeros array used twice in a task's
    initial state): a donated argument may not hold the same buffer twice."""
    seen: set[int] = set()

    def one(x):
        if not isinstance(x, jax.Array) or not x.addressable_shards:
            return x
        ptr = x.addressable_shards[0].data.unsafe_buffer_pointer()
        if ptr in seen:
            return jnp.array(x, copy=True)
        seen.add(ptr)
        return x

    return jax.tree.map(one, tree)


def _opt_shardings(optimizer: optax.GradientTransformation, params: Any, repl: Any) -> Any:
    """Shardings of ``optimizer.init(params)``: every sub-tree shaped like ``params`` (moments) takes the
    parameters' shardings, everything else ``repl``."""
    p_struct = jax.tree.structure(params)
    p_shardings = jax.tree.map(lambda x: x.sharding, params)

    def like_params(x) -> bool:
        return jax.tree.structure(x) == p_struct

    return jax.tree.map(
        lambda sub: p_shardings if like_params(sub) else jax.tree.map(lambda _: repl, sub),
        jax.eval_shape(optimizer.init, params),
        is_leaf=like_params,
    )


def _metric_order(name: str) -> tuple:
    """hr@10, hr@50, hr@200, ..., then names without a numeric cutoff (numeric, not lexicographic)."""
    family, _, k = name.partition("@")
    return (0, family, int(k)) if k.isdigit() else (1, name, 0)


# The host-side loop position and early-stopping state, checkpointed beside the TrainState.
_LOOP_INT = ("epoch", "batch", "best_epoch", "since_best", "stopped", "skipped_steps")


class Trainer:
    """Trains ``model`` on ``task``; see the module docstring.

    ``optimizer`` defaults to ``make_optimizer(cfg)`` (AdamW with optional warmup and clipping);
    ``rules`` maps logical axis names to mesh axes (``recjax.sharding.mesh.DEFAULT_RULES``); ``mesh``
    (default: the 1-d ``data`` mesh of ``cfg.num_devices``) may be any N-d mesh with a ``data`` axis
    (``recjax.sharding.mesh.make_nd_mesh``); ``embedding_plan`` places embedding tables row-/table-wise
    (``recjax.sharding.embedding``: its rows' logical axis is mapped onto the plan's mesh axis and the
    step's lookups go through the all-to-all path); ``prefetch`` runs the steps with FreeScale's prioritized
    lookups of the next batch's rows (``recjax.sharding.prefetch``: identical results)."""

    def __init__(
        self,
        model: nnx.Module,
        task: Task,
        cfg: TrainConfig,
        workdir: str | pathlib.Path,
        *,
        optimizer: optax.GradientTransformation | None = None,
        rules: Mapping[str, str | None] = mesh_lib.DEFAULT_RULES,
        mesh: jax.sharding.Mesh | None = None,
        embedding_plan: embedding_lib.EmbeddingPlan | None = None,
        prefetch: prefetch_lib.PrefetchConfig | None = None,
    ):
        self.cfg, self.task = cfg, task
        self.workdir = pathlib.Path(workdir)
        # One writer per workdir, from before the checkpointer opens (it cleans up unfinished saves) to the
        # end of fit(); a second run on the same workdir is refused naming the holder.
        self._lock = workdir_lib.WorkdirLock(self.workdir)
        self._lock.acquire()
        self._locked = True
        try:
            self._setup(model, task, cfg, optimizer, rules, mesh, embedding_plan, prefetch)
        except BaseException:
            self.close()  # a Trainer that failed to build holds no workdir
            raise

    def _setup(
        self, model, task, cfg, optimizer, rules, mesh=None, embedding_plan=None, prefetch=None
    ) -> None:
        if cfg.eval_every_epochs and "valid" not in task.splits:
            raise ValueError(
                f"train.eval_every_epochs={cfg.eval_every_epochs}: the task has no 'valid' split "
                f"(splits {task.splits}); set it to 0 to train without validation"
            )
        self.mesh = mesh if mesh is not None else mesh_lib.make_mesh(cfg.num_devices or None)
        if "data" not in self.mesh.axis_names:
            raise ValueError(f"mesh: expected a 'data' axis, got axes {self.mesh.axis_names}")
        mesh_lib.check_rules(rules, self.mesh)
        if embedding_plan is not None:
            embedding_plan.check(self.mesh)
            rules = embedding_plan.rules(rules)
        self.embedding_plan = embedding_plan
        distributed_lib.check_checkpoints(cfg.checkpoint_every_steps, cfg.checkpoint_every_epochs)
        n_dev = self.mesh.shape["data"]
        for name in ("batch_size", "eval_batch_size"):
            if getattr(cfg, name) % n_dev:
                raise ValueError(f"train.{name}: {getattr(cfg, name)} is not divisible by {n_dev} devices")
        if task.early_stop_metric not in task.metric_names():
            raise ValueError(
                f"early_stop_metric: {task.early_stop_metric!r} is not one of the task's metrics "
                f"{list(task.metric_names())}"
            )
        task.attach(self.mesh)
        task.check_model(model)
        model.train()
        self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        model.eval()
        self.graphdef_eval = nnx.split(model, nnx.Param, ...)[0]
        model.train()
        self.optimizer = optimizer or make_optimizer(cfg)

        repl = mesh_lib.replicated(self.mesh)
        params = distributed_lib.put(params, mesh_lib.variable_shardings(params, self.mesh, rules))
        rest = distributed_lib.put(rest, repl)
        # Adam's moments get their parameters' shardings (propagation through init does not carry them
        # to zeros_like: a row-sharded table's moments came out replicated); the rest is replicated.
        opt_state = jax.tree.map(
            lambda x: x if getattr(x.sharding, "mesh", None) == self.mesh else distributed_lib.put(x, repl),
            jax.jit(self.optimizer.init, out_shardings=_opt_shardings(self.optimizer, params, repl))(params),
        )
        state = TrainState(
            params=params,
            rest=rest,
            opt_state=opt_state,
            rng=distributed_lib.put(jax.random.key(cfg.seed), repl),
            step=distributed_lib.put(jnp.zeros((), jnp.int32), repl),
            task_state=distributed_lib.put(task.init_state(params), repl),
        )
        state = _distinct_buffers(state)
        self.state_shardings = jax.tree.map(lambda x: x.sharding, state)
        step_fn = make_train_step(self.graphdef, task, self.optimizer)
        if embedding_plan is not None:  # the plan is read when the step is traced
            step_fn = embedding_lib.with_plan(step_fn, self.mesh, embedding_plan)
        self.train_step = jax.jit(
            step_fn,
            in_shardings=(self.state_shardings, mesh_lib.batch_sharding(self.mesh)),
            out_shardings=(self.state_shardings, repl),
            donate_argnums=(0,) if cfg.donate else (),
        )
        self.prefetcher = None
        if prefetch is not None and type(task).prepare is not Task.prepare:
            # The carried rows are read before the step; a prepare that rewrites the table or the ids (an
            # ID remapper, MFLI's k-means) would be served rows of the table before it ran.
            raise ValueError(
                f"prefetch: {type(task).__name__} overrides Task.prepare (it may change the table or the ids "
                "before the step); prioritized lookups need the plain prepare -- leave prefetch off"
            )
        if prefetch is not None:  # one program per step: this batch's step + the next batch's lookups
            self.prefetcher = prefetch_lib.Prefetcher(
                step_fn, self.mesh, embedding_plan, self.state_shardings, prefetch, donate=cfg.donate
            )
        self.state = state
        self.loop = {k: 0 for k in _LOOP_INT} | {"best_metric": -np.inf, "best_epoch": -1}
        self.best = _best_copy(state)
        self.checkpointer = Checkpointer(self.workdir / workdir_lib.CHECKPOINT_DIR)
        self.resumed_from = None
        if self.checkpointer.has_checkpoints():
            self._restore()
            print(workdir_lib.resume_message(self.resumed_from, self.loop["epoch"], self.loop["batch"]))

    # -- checkpoints ------------------------------------------------------------------------------------
    def _checkpoint_tree(self) -> dict:
        return {"state": _to_storable(self.state), "loop": dict(self.loop), "best": self.best}

    def _save(self) -> None:
        self.checkpointer.save(int(self.loop_step), self._checkpoint_tree(), force=True)

    def _restore(self) -> None:
        stored = self.checkpointer.restore(self._checkpoint_tree())
        self.state = _distinct_buffers(_from_storable(stored["state"], self.state))
        loop = stored["loop"]
        self.loop = {k: int(loop[k]) for k in _LOOP_INT} | {"best_metric": float(loop["best_metric"])}
        self.best = _host_copy(stored["best"])
        self.resumed_from = int(self.state.step)

    @property
    def loop_step(self) -> int:
        return int(self.state.step)

    # -- evaluation -------------------------------------------------------------------------------------
    def eval_model(self, params: Any = None, rest: Any = None) -> nnx.Module:
        """The eval-mode module with ``params`` and ``rest`` (default: the current ones)."""
        params = self.state.params if params is None else params
        return nnx.merge(self.graphdef_eval, params, self.state.rest if rest is None else rest)

    def best_model(self) -> nnx.Module:
        """The eval-mode module with the best parameters and the variables saved with them."""
        params = distributed_lib.put(self.best["params"], self.state_shardings.params)
        rest = _from_storable(self.best["rest"], self.state.rest)
        rest = distributed_lib.put(rest, self.state_shardings.rest)
        return self.eval_model(params, rest)

    def evaluate(self, split: str, params: Any = None, task_state: Any = None) -> dict[str, float]:
        """The task's metrics on ``split``. Defaults: the current parameters for "valid", the best for
        "test", each with the task state saved with them; pass ``params`` and ``task_state`` together (the
        state that trained those parameters, e.g. an ID remapper's table) or neither."""
        self.task.check_split(split)
        if (params is None) != (task_state is None) and jax.tree.leaves(self.state.task_state):
            raise ValueError(
                "params / task_state: pass both (the task state that trained these params) or neither, got "
                f"params={'None' if params is None else 'given'}, "
                f"task_state={'None' if task_state is None else 'given'}"
            )
        if params is None:
            if split == "test" and self.cfg.eval_every_epochs:
                task_state = distributed_lib.put(self.best["task_state"], self.state_shardings.task_state)
                return self.task.evaluate(self.best_model(), split, task_state)
            params, task_state = self.state.params, self.state.task_state
        return self.task.evaluate(self.eval_model(params), split, task_state)

    # -- training ---------------------------------------------------------------------------------------
    def _check_prefetch(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.check()

    def _check_finite(self, step: int, metrics: dict) -> None:
        if bool(metrics["finite"]):
            return
        if self.cfg.nonfinite == "skip":
            self.loop["skipped_steps"] += 1
            return
        m = jax.device_get(metrics)
        raise FloatingPointError(
            f"training step {step}: non-finite loss {float(m['loss'])} / gradient norm "
            f"{float(m['grad_norm'])}; that step changed nothing (the next one was already applied; last "
            "checkpoint: step "
            f"{self.checkpointer.latest_step()}). Lower train.learning_rate, clip gradients "
            "(train.grad_clip_norm) or set train.nonfinite='skip'"
        )

    def _validate(self, writer: MetricWriter, epoch: int) -> None:
        cfg, lp = self.cfg, self.loop
        valid = self.evaluate("valid", self.state.params, self.state.task_state)
        writer.write(self.loop_step, {**valid, "epoch": epoch}, prefix="valid/")
        metric = self.task.early_stop_metric
        score = valid[metric]
        if not np.isfinite(score):
            warnings.warn(
                f"epoch {epoch}: validation {metric} is {score}; these parameters cannot become the best",
                stacklevel=2,
            )
        params_finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(self.state.params))
        if params_finite and score > lp["best_metric"]:
            lp.update(best_metric=float(score), best_epoch=epoch, since_best=0)
            self.best = _best_copy(self.state)
        else:
            lp["since_best"] += 1
        lp["stopped"] = int(bool(cfg.patience) and lp["since_best"] >= cfg.patience)
        if cfg.progress:
            shown = " ".join(f"{k}={valid[k]:.4f}" for k in sorted(valid, key=_metric_order) if k != metric)
            tqdm.write(
                f"epoch {epoch}: valid {metric}={score:.4f} (best {lp['best_metric']:.4f} @ "
                f"{lp['best_epoch']}) {shown}"
            )

    def close(self) -> None:
        """Releases the workdir (for a Trainer built only to restore or evaluate; ``fit`` releases it)."""
        if self._locked:
            self._lock.release()
            self._locked = False

    def fit(self) -> dict[str, Any]:
        """Trains to ``num_epochs`` (or early stopping), evaluates the best parameters on the test split,
        writes ``results.json`` and releases the workdir."""
        if not self._locked:
            self._lock.acquire()
            self._locked = True
        try:
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> dict[str, Any]:
        cfg, task, lp = self.cfg, self.task, self.loop
        writer = MetricWriter(self.workdir, purge_step=self.resumed_from)
        steps_per_epoch = task.num_train_batches()
        t_start, epoch_times, out_of_time = time.time(), [], False
        while lp["epoch"] < cfg.num_epochs and not lp["stopped"] and not out_of_time:
            epoch, t_epoch = lp["epoch"], time.time()
            if lp["batch"] == 0:  # a new epoch: its task counters start at zero
                task_state = _distinct_buffers(task.start_epoch(self.state.task_state))
                self.state = self.state.replace(task_state=task_state)
            bar = tqdm(
                total=steps_per_epoch, initial=lp["batch"], desc=f"epoch {epoch}", disable=not cfg.progress,
                leave=False,
            )  # fmt: skip
            step = self.loop_step
            pending: tuple[int, dict] | None = None
            batches = task.train_batches(epoch, cfg.seed)
            pairs = prefetch_lib.lookahead(batches) if self.prefetcher else ((b, None) for b in batches)
            for i, (batch, next_batch) in enumerate(pairs):
                if i < lp["batch"]:  # resuming inside an epoch: skip the batches already trained on
                    continue
                if self.prefetcher is not None:
                    self.state, metrics = self.prefetcher.step(self.state, batch, next_batch)
                else:
                    self.state, metrics = self.train_step(self.state, mesh_lib.shard_batch(batch, self.mesh))
                if pending is not None:  # one step late: the host does not wait for this step
                    self._check_finite(*pending)
                pending = (step, metrics)  # checked exactly once (below, or at the next step)
                step += 1
                lp["batch"] = i + 1
                bar.update(1)
                if step % 50 == 0:
                    writer.write(step, jax.device_get(metrics), prefix="train/")
                if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0:
                    self._check_finite(*pending)
                    pending = None
                    self._check_prefetch()
                    self._save()
            if pending is not None:
                self._check_finite(*pending)
            self._check_prefetch()  # the epoch's last step, before validation, the best copy and a save
            jax.block_until_ready(self.state)  # the epoch's time includes its device work
            bar.close()
            epoch_times.append(time.time() - t_epoch)
            lp["epoch"], lp["batch"] = epoch + 1, 0
            extra = task.epoch_metrics(self.state.task_state)
            writer.write(
                step, {**extra, "epoch": epoch + 1, "skipped_steps": lp["skipped_steps"]}, prefix="epoch/"
            )
            if cfg.eval_every_epochs and (
                (epoch + 1) % cfg.eval_every_epochs == 0 or epoch + 1 == cfg.num_epochs
            ):
                self._validate(writer, epoch + 1)
            elif not cfg.eval_every_epochs:  # no validation: the last parameters are the ones tested
                lp["best_epoch"] = epoch + 1
            out_of_time = (  # the budget is spent and the run would otherwise go on
                bool(cfg.max_train_seconds)
                and time.time() - t_start >= cfg.max_train_seconds
                and lp["epoch"] < cfg.num_epochs
                and not lp["stopped"]
            )
            if (cfg.checkpoint_every_epochs or out_of_time) and (  # a run out of time is saved to continue
                out_of_time
                or (epoch + 1) % cfg.checkpoint_every_epochs == 0
                or epoch + 1 == cfg.num_epochs
                or lp["stopped"]
            ):
                self._save()
            writer.flush()  # a killed run keeps every finished epoch's metrics on disk
            if out_of_time and cfg.progress:
                tqdm.write(f"epoch {lp['epoch']}: train.max_train_seconds={cfg.max_train_seconds} spent")
        if not cfg.eval_every_epochs:  # copied once, at the end (a resume re-runs this line too)
            self.best = _best_copy(self.state)
        test = self.evaluate("test") if "test" in task.splits else {}
        writer.write(self.loop_step, test, prefix="test/")
        writer.close()
        result = {
            "test": test,
            "best_valid": lp["best_metric"],
            "best_epoch": lp["best_epoch"],
            "epochs": lp["epoch"],
            "steps": self.loop_step,
            "skipped_steps": lp["skipped_steps"],
            "stopped_early": bool(lp["stopped"]),
            "out_of_time": out_of_time,
            "wall_s": time.time() - t_start,
            "s_per_epoch": float(np.median(epoch_times)) if epoch_times else None,  # None: no epoch ran
            "devices": f"{self.mesh.shape['data']} x {jax.devices()[0].platform}",
            "resumed_from_step": self.resumed_from,
            "last_epoch": task.epoch_metrics(self.state.task_state),
        }
        workdir_lib.write_json_atomic(self.workdir / workdir_lib.RESULTS_FILE, result)
        return result
