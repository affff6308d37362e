"""The Trainer's ID-remap hook: train and evaluate any recjax sequential model on raw (unbounded) IDs.

``Trainer(..., id_remapper=r)`` takes any object with the ``IdRemapper`` interface below; the one shipped
is ``recjax.embeddings.zch_remap.ItemIdRemapper`` (MPZCH or the modulo-hash baseline). The hook:

- train step (one jit): the batch's ID keys are gathered (replicated over the ``data`` mesh, so the remap
  sees the whole global batch and the replicated remap state stays identical on every device) ->
  ``remap(state, batch, step, training=True)`` -> ``reset_rows`` of the embedding table and of the
  optimizer state for rows that got a new owner -> the batch is split over ``data`` again -> the trainer's
  unchanged ``make_train_step`` step. The remap counters are summed into per-epoch totals (int32; an epoch
  must see < 2**31 ID occurrences) that live, like the remap state, in the trainer state and its checkpoint.
- evaluation: ``remap(..., training=False)`` (read-only) on every ID key; inputs with no row are dropped
  and each row re-left-padded by the remapper (the last known input is the query position). A target with
  no row is a miss (it counts in the denominator, never as a hit) and is reported as
  ``unknown_target_rate``; a row with no known input left is a miss too (``no_input_rate``).

A remapper must return the batch with dropped inputs removed from ``mask`` and re-left-padded (as
``ItemIdRemapper.remap`` does with ``zch_remap.left_pad``).

Letters: B batch, D embedding dim, N model rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from recjax.embeddings.zch_remap import ID_KEYS
from recjax.eval import ranking
from recjax.sharding import mesh as mesh_lib


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


def init_totals(remapper: IdRemapper) -> dict:
    """Zero counters with the keys and dtypes ``remap`` returns (traced once, nothing is computed)."""
    shapes = jax.eval_shape(
        lambda st: remapper.remap(st, {"inputs": jnp.ones((1, 1), jnp.int32)}, 0)[3], remapper.init_state()
    )
    return {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}


def make_remapped_train_step(train_step: Callable, remapper: IdRemapper, mesh: jax.sharding.Mesh) -> Callable:
    """``(params, rest, opt_state, remap_state, totals, raw_batch, rng, step) -> (params, rest, opt_state,
    remap_state, totals, metrics)``, jitted; ``metrics`` = the train step's plus ``remap/<rate>`` of this
    batch."""
    repl, split = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)

    @jax.jit
    def step_fn(params, rest, opt_state, remap_state, totals, batch, rng, step):
        batch, remap_state, reset_R, counters = remapper.remap(
            remap_state, _constrain(batch, repl), step, training=True
        )
        remap_state = jax.lax.with_sharding_constraint(remap_state, repl)
        params, opt_state = remapper.reset_rows(params, opt_state, reset_R, jax.random.fold_in(rng, 1))
        params, rest, opt_state, metrics = train_step(params, rest, opt_state, _constrain(batch, split), rng)
        totals = {k: totals[k] + counters[k] for k in totals}
        rates = remapper.rates(counters, remap_state)
        return (
            params,
            rest,
            opt_state,
            remap_state,
            totals,
            {
                **metrics,
                **{f"remap/{k}": v for k, v in rates.items()},
            },
        )

    return step_fn


def make_eval_remap(remapper: IdRemapper, mesh: jax.sharding.Mesh) -> Callable:
    """Jitted ``(remap_state, raw_eval_batch, step) -> eval batch`` with row IDs, re-left-padded by the
    remapper (the last known input in the query position): ``target`` is row 1 where unknown (any valid
    row: the batch's ``known`` mask keeps it out of the hits). ``known`` is also False for a row with no
    known input left (all-False ``mask``: SASRec/HSTU would read a zero query, whose scores all tie at
    rank 1), so such a row is a miss; ``target_known`` / ``no_input`` (valid rows only) feed the rates."""
    repl, split = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)

    @jax.jit
    def fn(state, batch, step):
        ids = {k: batch[k] for k in ID_KEYS if k in batch}
        rows, _, _, _ = remapper.remap(state, {**batch, **_constrain(ids, repl)}, step, training=False)
        target_known = rows["target_known"] & batch["valid"]
        no_input = ~jnp.any(rows["mask"], axis=-1) & batch["valid"]
        out = dict(
            rows,
            target=jnp.where(target_known, rows["target"], 1),
            known=target_known & ~no_input,
            target_known=target_known,
            no_input=no_input,
        )
        return _constrain(out, split)

    return fn


def evaluate_remapped(
    query_fn: Callable[[dict], jax.Array],
    items_NxD: jax.Array,
    batches: Iterable[dict],
    *,
    ks: Sequence[int],
    impl: str,
) -> dict[str, float]:
    """``ranking.evaluate`` over remapped batches (``make_eval_remap``): means over every valid row, rows
    whose target has no model row, or that have no known input left, count as misses; adds
    ``unknown_target_rate`` and ``no_input_rate``."""
    ks = tuple(sorted(set(int(k) for k in ks)))
    if ks[0] < 1 or ks[-1] > items_NxD.shape[0] - 1:
        raise ValueError(f"ks: expected cutoffs in [1, {items_NxD.shape[0] - 1}] (model rows), got {ks}")
    totals: dict[str, float] = {}
    count = known = no_input = 0.0
    for b in batches:
        sums = ranking.rank_batch(
            query_fn(b), items_NxD, b["target"], b["exclude"], b["known"], ks=ks, impl=impl
        )
        sums, k_, n_, c_ = jax.device_get(  # one transfer per batch
            (sums, b["target_known"].sum(), b["no_input"].sum(), b["valid"].sum())
        )
        sums.pop("count")
        known, no_input, count = known + float(k_), no_input + float(n_), count + float(c_)
        for name, v in sums.items():
            totals[name] = totals.get(name, 0.0) + float(v)
    if count == 0:
        raise ValueError("batches: no valid evaluation rows")
    out = {name: v / count for name, v in totals.items()}
    out["unknown_target_rate"] = 1.0 - known / count
    out["no_input_rate"] = no_input / count
    return out
