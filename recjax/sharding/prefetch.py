"""FreeScale's prioritized embedding lookups (arXiv 2604.24073): the next batch's rows are looked up during
the current step, and only the rows the current step changes ("collision" rows) are looked up again on the
critical path, after the update; results identical to synchronous training.

One jitted program per step ``t`` (:class:`Prefetcher`), given batch ``t``, its rows ``R_t`` (looked up
during step ``t-1``) and the next batch's ids ``I_{t+1}``:

1. ``P = lookup(W_t, I_{t+1})``: the "exclusive" lookup, from the table before this step's update. It
   depends only on ``W_t`` and the ids, not on the forward/backward pass, so its all-to-alls can run
   overlapped with that compute (XLA's latency-hiding scheduler, docs/FREESCALE.md);
2. the Trainer's step on batch ``t``; the model's lookup of batch ``t``'s ids returns ``R_t`` (with the
   gather's gradient to the table: ``recjax.sharding.embedding.lookup``);
3. ``changed = any(W_{t+1} != W_t, axis=1)``: the rows this step changed, found by comparison, so the
   split is exact for any optimizer, a step that changed nothing (non-finite, kept) included;
4. the collision ids (``changed[I_{t+1}]``, a one-column lookup) are compacted into ``capacity`` slots and
   looked up from ``W_{t+1}`` (the critical-path lookup moves ``capacity`` ids instead of all of them) and
   written over ``P``: ``R_{t+1}``. More collisions than slots: the full lookup from ``W_{t+1}`` (exact).

What it saves depends on the optimizer. With dense Adam(W) every row whose moments are non-zero changes
every step (``m / (sqrt(v) + eps)`` is non-zero after the row's first gradient), so after a few steps
almost every id collides and the fallback runs: exact, no saving. The split pays with optimizers that
leave rows without gradient untouched: SGD without momentum / weight decay, or the row-sparse ("lazy")
optimizers of TorchRec / FBGEMM's fused embedding updates; :func:`lazy_rows` makes any optax optimizer
row-sparse on the tables it selects (Adam with global bias correction, as FBGEMM's and TF's LazyAdam).

Deviations: rows changed are found by comparing the table before and after the update (one extra
elementwise pass over the table, and the old table stays alive until then) instead of from the batch's
unique ids; the lookups are the plan's fixed-capacity all-to-alls (no id dedup). The prefetcher checks at
run time (one step late) that the ids the model looked up are the ids it prefetched.

Letters: N table rows, D dim, T ids of a batch (flattened), K critical-path slots.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax

from recjax.sharding import embedding as embedding_lib
from recjax.sharding import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class PrefetchConfig:
    """Which lookup is prefetched: the table ``table`` (its name in the plan / ``embedding.lookup``), at
    ``param_path`` in the parameters, looked up with ``batch[ids_key]``; ``capacity``: critical-path slots
    as a fraction of the batch's ids (more collisions: the full lookup)."""

    table: str = "items"
    param_path: tuple[str, ...] = ("embedding", "items")
    ids_key: str = "inputs"
    capacity: float = 0.25

    def __post_init__(self):
        if not 0 < self.capacity <= 1:
            raise ValueError(f"prefetch.capacity: expected in (0, 1], got {self.capacity}")
        if not self.param_path:
            raise ValueError("prefetch.param_path: expected a non-empty path, e.g. ('embedding', 'items')")


def _key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _matches(path, prefix: tuple[str, ...]) -> bool:
    names = tuple(_key_name(k) for k in path)
    return any(names[i : i + len(prefix)] == prefix for i in range(len(names) - len(prefix) + 1))


def lazy_rows(
    inner: optax.GradientTransformation, tables: Iterable[tuple[str, ...]]
) -> optax.GradientTransformation:
    """``inner`` applied row-sparsely to the parameters whose path contains one of ``tables`` (e.g.
    ``("embedding", "items")``): a row whose gradient is all zero keeps its value and its optimizer state
    (moments); other parameters are updated as by ``inner``. Global step counts (bias correction) still
    advance every step."""
    tables = tuple(tuple(t) for t in tables)

    def row_masks(grads):
        def one(path, g):
            if g.ndim >= 2 and any(_matches(path, t) for t in tables):
                return jnp.any(g != 0, axis=tuple(range(1, g.ndim))).reshape((-1,) + (1,) * (g.ndim - 1))
            return jnp.ones((), bool)

        return jax.tree_util.tree_map_with_path(one, grads)

    def update(grads, state, params=None):
        updates, new_state = inner.update(grads, state, params)
        masks = row_masks(grads)
        updates = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, masks)
        g_struct = jax.tree.structure(grads)

        def keep_rows(new, old):  # sub-trees shaped like the parameters (moments): untouched rows kept
            if jax.tree.structure(new) != g_struct:
                return new
            return jax.tree.map(lambda a, b, m: jnp.where(m, a, b), new, old, masks)

        new_state = jax.tree.map(
            keep_rows, new_state, state, is_leaf=lambda x: jax.tree.structure(x) == g_struct
        )
        return updates, new_state

    return optax.GradientTransformation(inner.init, update)


def _table(params: Any, path: tuple[str, ...]) -> jax.Array:
    found = [x for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if _matches(p, path)]
    if len(found) != 1:
        raise ValueError(f"prefetch.param_path: {path} matches {len(found)} parameters, expected 1")
    return found[0]


def lookahead(batches: Iterable[dict]) -> Iterator[tuple[dict, dict | None]]:
    """``(batch, next batch)`` pairs; the last one's next is None."""
    it = iter(batches)
    cur = next(it, None)
    while cur is not None:
        nxt = next(it, None)
        yield cur, nxt
        cur = nxt


def next_rows(
    table_old_NxD: jax.Array,
    table_new_NxD: jax.Array,
    ids: jax.Array,
    pre_TxD: jax.Array,
    capacity: float,
    name: str = "items",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``table_new_NxD[ids]`` from ``pre_TxD = table_old_NxD[ids]`` (flattened ids), re-looking up only the
    rows that differ between the tables; steps 3-4 of the module docstring. Returns the rows (shape
    ``ids.shape + (D,)``) and ``collision_fraction`` / ``fallback`` metrics."""
    flat_T = ids.reshape(-1)
    t = flat_T.shape[0]
    k = max(1, math.ceil(capacity * t))
    changed_Nx1 = jnp.any(table_new_NxD != table_old_NxD, axis=1, keepdims=True).astype(jnp.float32)
    collide_T = embedding_lib.gather(changed_Nx1, flat_T, name)[:, 0] > 0
    count = collide_T.sum()
    pre_TxD = pre_TxD.reshape(t, -1)

    def compact(_):
        (idx_K,) = jnp.nonzero(collide_T, size=k, fill_value=t)
        ids_K = flat_T.at[idx_K].get(mode="fill", fill_value=0)
        rows_KxD = embedding_lib.gather(table_new_NxD, ids_K, name)
        return pre_TxD.at[idx_K].set(rows_KxD, mode="drop")

    def full(_):
        return embedding_lib.gather(table_new_NxD, flat_T, name)

    rows_TxD = jax.lax.cond(count > k, full, compact, None)
    stats = {"prefetch/collision_fraction": count / t, "prefetch/fallback": (count > k).astype(jnp.float32)}
    return rows_TxD.reshape(ids.shape + (-1,)), stats


def make_prefetch_step(step_fn: Callable, cfg: PrefetchConfig) -> Callable:
    """``(state, batch, rows, next_ids) -> (state, next_rows, metrics)`` from the Trainer's pure step
    ``(state, batch) -> (state, metrics)`` (traced with the embedding plan active, if any)."""

    def step(state, batch, rows_t, ids_next):
        table_old = _table(state.params, cfg.param_path)
        pre_next = embedding_lib.gather(table_old, ids_next, cfg.table)  # exclusive: off the critical path
        seen: list = []
        token = embedding_lib.PREFETCHED.set([cfg.table, batch[cfg.ids_key].shape, rows_t, seen])
        try:
            new_state, metrics = step_fn(state, batch)
        finally:
            embedding_lib.PREFETCHED.reset(token)
        if not seen:
            raise ValueError(
                f"prefetch: the model never looked up batch[{cfg.ids_key!r}] (shape "
                f"{batch[cfg.ids_key].shape}) through recjax.sharding.embedding.lookup(..., {cfg.table!r})"
            )
        match = jnp.array_equal(seen[0], batch[cfg.ids_key])  # the ids the model used are the prefetched ones
        table_new = _table(new_state.params, cfg.param_path)
        rows_next, stats = next_rows(table_old, table_new, ids_next, pre_next, cfg.capacity, cfg.table)
        return new_state, rows_next, {**metrics, **stats, "prefetch/ids_match": match}

    return step


class Prefetcher:
    """Runs the Trainer's steps with prioritized lookups (module docstring), carrying the next batch's
    rows between steps. ``step(state, batch, next_batch)``; ``next_batch`` None (the epoch's last batch)
    prefetches nothing. A batch it did not prefetch for (the first, after a resume) is looked up first."""

    def __init__(
        self,
        step_fn: Callable,
        mesh: jax.sharding.Mesh,
        plan: embedding_lib.EmbeddingPlan | None,
        state_shardings: Any,
        cfg: PrefetchConfig,
        *,
        donate: bool = True,
    ):
        self.mesh, self.cfg = mesh, cfg
        batch_s, repl = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
        step = make_prefetch_step(step_fn, cfg)

        def first(params, ids):
            return embedding_lib.gather(_table(params, cfg.param_path), ids, cfg.table)

        if plan is not None:
            step, first = (embedding_lib.with_plan(f, mesh, plan) for f in (step, first))
        self._step = jax.jit(
            step,
            in_shardings=(state_shardings, batch_s, batch_s, batch_s),
            out_shardings=(state_shardings, batch_s, repl),
            donate_argnums=(0, 2) if donate else (),
        )
        self._first = jax.jit(first, in_shardings=(state_shardings.params, batch_s), out_shardings=batch_s)
        self._carry: tuple[dict, jax.Array] | None = None  # (the host batch the rows are for, rows)
        self._unchecked: dict | None = None

    def step(
        self, state: Any, batch: dict, next_batch: dict | None, device_batch: dict | None = None
    ) -> tuple[Any, dict]:
        """One step on host ``batch`` (``device_batch``: the same already on the mesh, e.g. put ahead)."""
        dev = mesh_lib.shard_batch(batch, self.mesh) if device_batch is None else device_batch
        key = self.cfg.ids_key
        if self._carry is not None and self._carry[0] is batch:
            rows = self._carry[1]
        else:
            rows = self._first(state.params, dev[key])
        ids_next = (
            dev[key] if next_batch is None else mesh_lib.shard_batch({key: next_batch[key]}, self.mesh)[key]
        )
        state, rows_next, metrics = self._step(state, dev, rows, ids_next)
        self._carry = None if next_batch is None else (next_batch, rows_next)
        self.check()
        self._unchecked = metrics
        return state, metrics

    def check(self) -> None:
        """Raises if the last step's model looked up other ids than the prefetched ones (read one step late,
        so the host does not wait for the step it just dispatched)."""
        if self._unchecked is not None and not bool(self._unchecked["prefetch/ids_match"]):
            raise ValueError(
                f"prefetch: the model looked up other ids than batch[{self.cfg.ids_key!r}] with table "
                f"{self.cfg.table!r} (a task's prepare changed them?); prefetched rows would be wrong"
            )
        self._unchecked = None
