"""ID remapping as a task wrapper: train and evaluate any task of a recjax sequential model on raw
(unbounded) IDs. ``RemappedTask(NextItemTask(...), remapper)`` is an ordinary task for the one ``Trainer``.

``remapper`` is any object with the ``IdRemapper`` interface below; the one shipped is
``recjax.embeddings.zch_remap.ItemIdRemapper`` (MPZCH or the modulo-hash baseline). The wrapper:

- ``prepare`` (first thing inside the jitted train step): the batch's ID keys are gathered (replicated
  over the ``data`` mesh, so the remap sees the whole global batch and the replicated remap state stays
  identical on every device) -> ``remap(state, batch, step, training=True)`` -> ``reset_rows`` of the
  embedding table and of the optimizer state for rows that got a new owner -> the batch is split over
  ``data`` again -> the wrapped task's unchanged loss. The remap counters are summed into per-epoch totals
  (int32; an epoch must see < 2**31 ID occurrences). Remap state and totals are the task state: they live
  in the ``TrainState``, are checkpointed with it, and the best-parameters copy keeps the remap state that
  trained those parameters.
- ``evaluate``: ``remap(..., training=False)`` (read-only) on every ID key; inputs with no row are dropped
  and each row re-left-padded by the remapper (the last known input is the query position). A target with
  no row is a miss (it counts in the denominator, never as a hit: the ranking's ``scoreable`` mask) and is
  reported as ``unknown_target_rate``; a row with no known input left is a miss too (``no_input_rate``).
- ``epoch_metrics``: the remapper's rates over the epoch's ID occurrences (logged under ``remap/``).

A remapper must return the batch with dropped inputs removed from ``mask`` and re-left-padded (as
``ItemIdRemapper.remap`` does with ``zch_remap.left_pad``).

Letters: B batch, N model rows.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from recjax.embeddings.zch_remap import ID_KEYS
from recjax.sharding import mesh as mesh_lib
from recjax.train.tasks import NextItemTask, Task


class IdRemapper(Protocol):
    num_rows: int  # rows of the model's item table (padding row 0 included)

    def init_state(self) -> Any: ...

    def remap(self, state, batch, step, *, training: bool = True) -> tuple[dict, Any, jax.Array, dict]:
        """-> (batch with row IDs, state, reset_R bool (num_rows,), counters: name -> int32 scalar)."""
        ...

    def reset_rows(self, params, opt_state, reset_R, key) -> tuple[Any, Any]: ...

    def rates(self, totals: dict, state) -> dict[str, jax.Array]: ...


def _constrain(batch: dict, sharding) -> dict:
    return {k: jax.lax.with_sharding_constraint(v, sharding) for k, v in batch.items()}


class RemappedTask(Task):
    """Wraps a ranking task (``NextItemTask`` or one with the same ``rank`` / ``eval_batches`` surface) so
    that its batches hold raw IDs; see the module docstring."""

    def __init__(self, task: NextItemTask, remapper: IdRemapper):
        self.task, self.remapper = task, remapper
        self.early_stop_metric = task.early_stop_metric
        self.splits = task.splits
        self._eval_remap = jax.jit(self._eval_remap_fn)

    def attach(self, mesh):
        super().attach(mesh)
        self.task.attach(mesh)

    def check_model(self, model):
        rows = model.item_embeddings().shape[0]
        if rows != self.remapper.num_rows:
            raise ValueError(
                f"id_remapper: the model has {rows} item rows, the remapper maps to "
                f"{self.remapper.num_rows} (build the model with num_items = remapper.num_items)"
            )

    def metric_names(self):
        return self.task.metric_names()

    def loss(self, model, batch, rng):
        return self.task.loss(model, batch, rng)

    def num_train_batches(self):
        return self.task.num_train_batches()

    def train_batches(self, epoch, seed):
        return self.task.train_batches(epoch, seed)

    # -- state --------------------------------------------------------------------------------------------
    def init_state(self, params):
        remap_state = self.remapper.init_state()
        shapes = jax.eval_shape(  # zero counters with the keys and dtypes ``remap`` returns
            lambda st: self.remapper.remap(st, {"inputs": jnp.ones((1, 1), jnp.int32)}, 0)[3], remap_state
        )
        return {"remap": remap_state, "totals": {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}}

    def start_epoch(self, task_state):
        return {**task_state, "totals": jax.tree.map(jnp.zeros_like, task_state["totals"])}

    def rates(self, task_state) -> dict[str, float]:
        """The remapper's rates over the current (or last finished) epoch's ID occurrences."""
        rates = self.remapper.rates(task_state["totals"], task_state["remap"])
        return {k: float(v) for k, v in jax.device_get(rates).items()}

    def epoch_metrics(self, task_state):
        return self.rates(task_state)

    # -- train step ---------------------------------------------------------------------------------------
    def prepare(self, params, opt_state, task_state, batch, rng, step):
        repl, split = mesh_lib.replicated(self.mesh), mesh_lib.batch_sharding(self.mesh)
        batch, remap_state, reset_R, counters = self.remapper.remap(
            task_state["remap"], _constrain(batch, repl), step, training=True
        )
        remap_state = jax.lax.with_sharding_constraint(remap_state, repl)
        params, opt_state = self.remapper.reset_rows(params, opt_state, reset_R, jax.random.fold_in(rng, 1))
        totals = {k: task_state["totals"][k] + counters[k] for k in task_state["totals"]}
        rates = self.remapper.rates(counters, remap_state)
        metrics = {f"remap/{k}": v for k, v in rates.items()}
        return params, opt_state, {"remap": remap_state, "totals": totals}, _constrain(batch, split), metrics

    # -- evaluation ---------------------------------------------------------------------------------------
    def _eval_remap_fn(self, remap_state, batch):
        """Row IDs for a raw evaluation batch; ``target`` is row 1 where unknown (any valid row: the
        ``scoreable`` mask keeps it out of the hits). ``scoreable`` is also False for a row with no known
        input left (all-False ``mask``: SASRec/HSTU would read a zero query), so such a row is a miss."""
        repl, split = mesh_lib.replicated(self.mesh), mesh_lib.batch_sharding(self.mesh)
        ids = {k: batch[k] for k in ID_KEYS if k in batch}
        rows, _, _, _ = self.remapper.remap(
            remap_state, {**batch, **_constrain(ids, repl)}, 0, training=False
        )
        target_known = rows["target_known"] & batch["valid"]
        no_input = ~jnp.any(rows["mask"], axis=-1) & batch["valid"]
        out = dict(
            rows, target=jnp.where(target_known, rows["target"], 1), scoreable=target_known & ~no_input
        )
        out.update(unknown_target=batch["valid"] & ~target_known, no_input=no_input)
        return _constrain(out, split)

    def evaluate(self, model: nnx.Module, split: str, task_state: Any = None) -> dict[str, float]:
        if task_state is None:
            raise ValueError("task_state: the remap state that trained the evaluated parameters is required")
        batches = (self._eval_remap(task_state["remap"], b) for b in self.task.eval_batches(split))
        return self.task.rank(model, batches, row_rates=("unknown_target", "no_input"))
