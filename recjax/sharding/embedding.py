"""Sharded embedding tables: row-wise (TorchRec's row-wise sharding, in JAX), table-wise or replicated,
chosen per table.

Placement of a table with logical axes ``(<rows>, "embed")`` (``SequenceEmbedding.items``: ``"vocab"``):

- ``"row"``: rows split in contiguous blocks over the ``model`` mesh axis (and replicated over ``data``),
  as are its optimizer moments (they follow the parameter's sharding). A lookup runs in ``jax.shard_map``:
  the flattened ids are split over all ``data x model`` devices; each device sends every id to the owner of
  its row block (``all_to_all`` over ``model``), owners gather their local rows, and the rows go back by a
  second ``all_to_all``. The backward pass is the transpose of the same program: row gradients travel back
  to the owners by ``all_to_all`` and are scatter-added into the local block (summed over ``data`` by
  shard_map's transpose of the ``data``-replicated table).
- ``"table"``: the whole table is served by one ``model`` rank (``owner``): the same two all-to-alls with
  every id sent to that rank. Deviation: a ``NamedSharding`` cannot place an array on one device of a mesh,
  so the table's storage stays replicated; only the lookup traffic is table-wise. Saving memory with
  table-wise placement needs several tables stacked into one ``model``-sharded array (not built).
- ``"replicated"``: a plain gather.

Deviation from TorchRec: the all-to-alls have fixed capacity (every device sends a slot for each of its
ids to every owner, ``-1`` where it does not own the row), so the traffic is ``model`` times that of
variable-split all-to-alls; it keeps shapes static and needs no host sync. Results equal a plain gather.

The lookup is chosen at trace time from the active :class:`EmbeddingPlan` (:func:`use_plan`, set by the
Trainer around its step); outside a plan every lookup is a plain gather (GSPMD partitions it for a sharded
table), so models call :func:`lookup` unconditionally.

Letters: N table rows, D dim, T ids (flattened), M model-axis size, R rows per model rank, C ids per device.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

PLACEMENTS = ("row", "table", "replicated")


@dataclasses.dataclass(frozen=True)
class TablePlacement:
    """One table: its name (as passed to :func:`lookup`), the logical name of its row axis, placement."""

    name: str
    placement: str = "row"
    row_axis: str = "vocab"
    owner: int = 0  # model rank serving a "table"-placed table

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(
                f"tables[{self.name!r}].placement: expected one of {PLACEMENTS}, got {self.placement!r}"
            )
        if self.owner < 0:
            raise ValueError(f"tables[{self.name!r}].owner: expected >= 0, got {self.owner}")


@dataclasses.dataclass(frozen=True)
class EmbeddingPlan:
    """Placements by table name, on ``mesh`` (whose ``model`` axis splits the rows)."""

    tables: tuple[TablePlacement, ...] = ()
    axis: str = "model"

    @classmethod
    def from_config(cls, placements: Mapping[str, str], axis: str = "model") -> EmbeddingPlan:
        """``{"items": "row"}`` -> a plan (row axis ``vocab`` for every table)."""
        return cls(tuple(TablePlacement(k, v) for k, v in placements.items()), axis)

    def get(self, name: str) -> TablePlacement | None:
        return next((t for t in self.tables if t.name == name), None)

    def rules(self, base: Mapping[str, str | None]) -> dict[str, str | None]:
        """``base`` with each table's row axis mapped to ``axis`` (row) or None (table, replicated)."""
        out = dict(base)
        for t in self.tables:
            out[t.row_axis] = self.axis if t.placement == "row" else None
        return out

    def check(self, mesh: jax.sharding.Mesh) -> None:
        """Raises naming the field when ``mesh`` lacks the axis or an owner is out of range (rows that do
        not divide over the axis are refused by ``mesh.variable_shardings``, naming the parameter)."""
        if self.axis not in mesh.axis_names:
            raise ValueError(f"embedding_plan.axis: {self.axis!r} is not a mesh axis {mesh.axis_names}")
        m = mesh.shape[self.axis]
        for t in self.tables:
            if t.placement == "table" and t.owner >= m:
                raise ValueError(
                    f"tables[{t.name!r}].owner: expected < {m} ({self.axis} size), got {t.owner}"
                )


_ACTIVE: contextvars.ContextVar[tuple[jax.sharding.Mesh, EmbeddingPlan] | None] = contextvars.ContextVar(
    "recjax_embedding_plan", default=None
)


@contextlib.contextmanager
def use_plan(mesh: jax.sharding.Mesh, plan: EmbeddingPlan) -> Iterator[None]:
    """Lookups traced inside use ``plan`` on ``mesh``."""
    plan.check(mesh)
    token = _ACTIVE.set((mesh, plan))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def with_plan(fn: Callable, mesh: jax.sharding.Mesh, plan: EmbeddingPlan) -> Callable:
    """``fn`` traced (and run) with ``plan`` active."""

    def wrapped(*args, **kwargs):
        with use_plan(mesh, plan):
            return fn(*args, **kwargs)

    return wrapped


# Set by recjax.sharding.prefetch while it traces a step: [name, ids shape, rows looked up ahead, ids seen];
# the model's first lookup of ``name`` with ids of that shape returns those rows (gradients reach the table).
PREFETCHED: contextvars.ContextVar[list | None] = contextvars.ContextVar("recjax_prefetched", default=None)


def lookup(table_NxD: jax.Array, ids: jax.Array, name: str = "items") -> jax.Array:
    """``table_NxD[ids]`` (shape ``ids.shape + (D,)``) through the active plan's placement of ``name``."""
    pre = PREFETCHED.get()
    if pre is not None and pre[0] == name and pre[1] == ids.shape and not pre[3]:
        pre[3].append(ids)  # the prefetcher checks these are the ids it looked up ahead
        return _rows_with_gather_grad(table_NxD, ids, pre[2], name)
    return gather(table_NxD, ids, name)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _rows_with_gather_grad(table_NxD: jax.Array, ids: jax.Array, rows: jax.Array, name: str) -> jax.Array:
    """``rows`` (equal to ``table_NxD[ids]``, looked up ahead) with the gather's gradient to the table."""
    return rows


def _rows_fwd(table_NxD, ids, rows, name):
    return rows, (table_NxD, ids)


def _rows_bwd(name, res, g):
    table_NxD, ids = res
    (d_table,) = jax.linear_transpose(lambda t: gather(t, ids, name), table_NxD)(g)
    return d_table, None, None


_rows_with_gather_grad.defvjp(_rows_fwd, _rows_bwd)


def gather(table_NxD: jax.Array, ids: jax.Array, name: str = "items") -> jax.Array:
    """:func:`lookup` without a prefetched result: the active plan's lookup of ``name``."""
    active = _ACTIVE.get()
    placement = active[1].get(name) if active is not None else None
    if placement is None or placement.placement == "replicated":
        return table_NxD[ids]
    mesh, plan = active
    owner = placement.owner if placement.placement == "table" else None
    return sharded_lookup(table_NxD, ids, mesh, axis=plan.axis, owner=owner)


def _batch_axes(mesh: jax.sharding.Mesh, axis: str) -> tuple[str, ...]:
    """Every mesh axis the ids are split over: all of them, ``axis`` last (minor)."""
    return tuple(a for a in mesh.axis_names if a != axis) + (axis,)


def sharded_lookup(
    table_NxD: jax.Array,
    ids: jax.Array,
    mesh: jax.sharding.Mesh,
    *,
    axis: str = "model",
    owner: int | None = None,
) -> jax.Array:
    """``table_NxD[ids]`` with the rows on the ``axis`` ranks (row-wise; ``owner`` given: all rows served by
    that rank) and two fixed-capacity all-to-alls; see the module docstring. Differentiable in the table."""
    m = mesh.shape[axis]
    n, d = table_NxD.shape
    if owner is None and n % m:
        raise ValueError(f"table_NxD: {n} rows do not divide over {m} '{axis}' devices")
    split = _batch_axes(mesh, axis)
    devices = mesh.size
    flat_T = ids.reshape(-1).astype(jnp.int32)
    t = flat_T.shape[0]
    pad = (-t) % devices
    flat_T = jnp.pad(flat_T, (0, pad))  # id 0 (a real row) pads; its rows are dropped below
    table_spec = P(axis, None) if owner is None else P(None, None)
    fn = partial(_lookup_local, axis=axis, m=m, owner=owner)
    rows_TxD = jax.shard_map(
        fn, mesh=mesh, in_specs=(table_spec, P(split)), out_specs=P(split, None), check_vma=True
    )(table_NxD, flat_T)
    return rows_TxD[:t].reshape(ids.shape + (d,))


def _lookup_local(table_RxD: jax.Array, ids_C: jax.Array, *, axis: str, m: int, owner: int | None):
    r = table_RxD.shape[0]
    me = jax.lax.axis_index(axis)
    dest_C = ids_C // r if owner is None else jnp.full_like(ids_C, owner)
    # send_MxC[k, i]: my i-th id if rank k owns it, else -1 (fixed capacity: one slot per id per rank)
    send_MxC = jnp.where(dest_C[None, :] == jnp.arange(m)[:, None], ids_C[None, :], -1)
    recv_MxC = jax.lax.all_to_all(send_MxC, axis, 0, 0, tiled=False)
    local_MxC = recv_MxC - (me * r if owner is None else 0)
    hit_MxC = recv_MxC >= 0
    rows_MxCxD = jnp.where(hit_MxC[..., None], table_RxD[jnp.where(hit_MxC, local_MxC, 0)], 0)
    back_MxCxD = jax.lax.all_to_all(rows_MxCxD, axis, 0, 0, tiled=False)
    return back_MxCxD.sum(axis=0)  # exactly one rank sent a non-zero row for each id
