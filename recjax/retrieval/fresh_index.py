"""Main + fresh item index, merged at query time (SilverTorch).

The main table holds the catalogue the index was built from (optionally also an int8 copy for the Int8
ANN op); the fresh table is a fixed-capacity buffer that newly added items are appended to without
rebuilding (or re-quantizing) the main table. A query searches both tables with the same filter and takes
the top-K over the union, so an item is retrievable the moment ``add_items`` returns.

Ids are global and the same in both tables: the main table's row r holds id ``ids_N[r]`` (by default r,
with row 0 = padding id 0 marked empty), fresh slot s holds ``ids_F[s]``; -1 marks an empty row or slot.
Filters are boolean masks over the global id space [0, V) (V = ``id_capacity``), gathered per table, so
one mask filters both tables consistently. Fewer than K allowed items -> score -inf, id -1.

Retrieval per table (``impl``), all through recjax.ops:
- ``"exact"``: ``ops.topk.topk_inner_product`` (float scores, ``topk_impl`` picks xla / reference / the
  int8 "pallas" kernel); filtered-out rows are passed as its per-query exclude list.
- ``"int8"``: the main table through ``ops.ann.int8_search`` on the int8 copy with the filter as a packed
  mask applied inside the kernel (``ann_impl``); the small fresh table stays exact float.
- ``candidate_fn(queries_BxD, table, allowed_BxN, k) -> (scores_BxK, rows_BxK)``: any other search (e.g.
  IVF), used for the main table.

Letters: B queries, N main rows, F fresh slots, V global ids, D dim, S side width, K candidates, A added.
Deviation from SilverTorch: its fresh index is a separate ANN index of the same kind; ours is searched
exactly (it is meant to stay small until the next main rebuild, ``merge_fresh`` here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from recjax import validation
from recjax.ops import ann, topk
from recjax.ops.quantize import Int8Embeddings, quantize_items

SEARCH_IMPLS = ("exact", "int8")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ItemTable:
    emb_NxD: jax.Array  # float32
    side_NxS: jax.Array  # float32, S may be 0
    ids_N: jax.Array  # int32 global ids, -1 = empty

    @property
    def num_rows(self) -> int:
        return self.emb_NxD.shape[0]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class FreshIndex:
    main: ItemTable
    fresh: ItemTable
    num_fresh: jax.Array  # int32 scalar: fresh slots used
    main_int8: Int8Embeddings | None = None
    id_capacity: int = field(default=0, metadata=dict(static=True))  # V

    @property
    def dim(self) -> int:
        return self.main.emb_NxD.shape[1]

    @property
    def side_dim(self) -> int:
        return self.main.side_NxS.shape[1]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Candidates:
    scores_BxK: jax.Array  # best first; -inf = missing
    ids_BxK: jax.Array  # global ids; -1 = missing
    emb_BxKxD: jax.Array
    side_BxKxS: jax.Array


def _float_array(name: str, x, shape) -> jax.Array:
    validation.check_float_values(name, x, shape)
    return jnp.asarray(x, jnp.float32)


def build_index(
    main_emb_NxD,
    *,
    side_NxS=None,
    ids_N=None,
    fresh_capacity: int = 0,
    id_capacity: int | None = None,
    quantize: bool = False,
) -> FreshIndex:
    """Index over a main table. Default ids: row r -> id r with row 0 the padding item (id 0, never
    returned), the layout of ``model.item_embeddings()``. ``id_capacity`` (default N + fresh_capacity)
    bounds the ids fresh items may take. ``quantize`` stores an int8 copy for ``impl="int8"``."""
    emb = _float_array("main_emb_NxD", main_emb_NxD, (None, None))
    n, d = emb.shape
    side = (
        jnp.zeros((n, 0), jnp.float32) if side_NxS is None else _float_array("side_NxS", side_NxS, (n, None))
    )
    validation.check_positive("fresh_capacity", fresh_capacity, allow_zero=True)
    if ids_N is None:
        ids = np.arange(n, dtype=np.int32)
        ids[0] = -1
    else:
        validation.check_shape("ids_N", ids_N, (n,))
        validation.check_dtype("ids_N", ids_N, "iu")
        ids = np.asarray(ids_N, np.int32)
    v = int(id_capacity) if id_capacity is not None else n + fresh_capacity
    validation.check_range("ids_N", ids, 0, v, allow=(-1,))
    used = ids[ids >= 0]
    if len(np.unique(used)) != len(used):
        raise ValueError("ids_N: expected unique ids (-1 for empty rows), found duplicates")
    fresh = ItemTable(
        jnp.zeros((fresh_capacity, d), jnp.float32),
        jnp.zeros((fresh_capacity, side.shape[1]), jnp.float32),
        jnp.full((fresh_capacity,), -1, jnp.int32),
    )
    q = quantize_items(emb) if quantize else None
    return FreshIndex(ItemTable(emb, side, jnp.asarray(ids)), fresh, jnp.int32(0), q, v)


@jax.jit
def _append(fresh: ItemTable, start, emb_AxD, side_AxS, ids_A) -> ItemTable:
    return ItemTable(
        jax.lax.dynamic_update_slice(fresh.emb_NxD, emb_AxD, (start, 0)),
        jax.lax.dynamic_update_slice(fresh.side_NxS, side_AxS, (start, 0)),
        jax.lax.dynamic_update_slice(fresh.ids_N, ids_A, (start,)),
    )


def add_items(index: FreshIndex, ids_A, emb_AxD, side_AxS=None) -> FreshIndex:
    """Appends A new items to the fresh table (no main rebuild). Ids must be new and in [0, V)."""
    d, s = index.dim, index.side_dim
    emb = _float_array("emb_AxD", emb_AxD, (None, d))
    a = emb.shape[0]
    if side_AxS is None:
        if s:
            raise ValueError(f"side_AxS: the index holds side features of width {s}, got None")
        side = jnp.zeros((a, 0), jnp.float32)
    else:
        side = _float_array("side_AxS", side_AxS, (a, s))
    validation.check_shape("ids_A", ids_A, (a,))
    validation.check_dtype("ids_A", ids_A, "iu")
    ids = np.asarray(ids_A, np.int32)
    validation.check_range("ids_A", ids, 0, index.id_capacity)
    used = int(index.num_fresh)
    if used + a > index.fresh.num_rows:
        raise ValueError(
            f"ids_A: fresh table full: {used} of {index.fresh.num_rows} slots used, cannot add {a} items"
        )
    present = np.concatenate([np.asarray(index.main.ids_N), np.asarray(index.fresh.ids_N)[:used]])
    clash = np.intersect1d(ids, present)
    if len(clash) or len(np.unique(ids)) != a:
        bad = clash[0] if len(clash) else ids[np.argmax(np.bincount(ids))]
        raise ValueError(f"ids_A: expected new unique ids, id {bad} is already indexed or repeated")
    fresh = _append(index.fresh, jnp.int32(used), emb, side, jnp.asarray(ids))
    return FreshIndex(index.main, fresh, jnp.int32(used + a), index.main_int8, index.id_capacity)


def merge_fresh(index: FreshIndex, *, quantize: bool | None = None) -> FreshIndex:
    """The periodic rebuild: fresh items move into the main table (which grows); the fresh table empties."""
    used = int(index.num_fresh)
    f = index.fresh
    main = jax.tree.map(lambda m, x: jnp.concatenate([m, x[:used]]), index.main, f)
    fresh = ItemTable(f.emb_NxD, f.side_NxS, jnp.full_like(f.ids_N, -1))
    q = (index.main_int8 is not None) if quantize is None else quantize
    return FreshIndex(
        main, fresh, jnp.int32(0), quantize_items(main.emb_NxD) if q else None, index.id_capacity
    )


# ------------------------------------------------------------------------------------------- search


def check_search_inputs(
    index: FreshIndex, k: int, *, batch: int, queries_BxD=None, allowed=None, impl: str = "exact"
) -> None:
    """Boundary checks for :func:`search` (call outside jit; value checks are skipped on tracers)."""
    if queries_BxD is not None:
        validation.check_shape("queries_BxD", queries_BxD, (batch, index.dim))
        validation.check_dtype("queries_BxD", queries_BxD, "f")
        validation.check_finite("queries_BxD", queries_BxD)
    n = index.main.num_rows
    if not 0 < k <= n:
        raise ValueError(f"k: expected 1 <= k <= N={n} (main index rows), got {k}")
    if impl not in SEARCH_IMPLS:
        raise ValueError(f"impl: expected one of {SEARCH_IMPLS}, got {impl!r}")
    if impl == "int8" and index.main_int8 is None:
        raise ValueError("impl: 'int8' needs an index built with quantize=True")
    if allowed is not None:
        v = index.id_capacity
        validation.check_shape("allowed", allowed, (v,) if np.ndim(allowed) == 1 else (batch, v))
        validation.check_dtype("allowed", allowed, "b")


def allowed_rows(table: ItemTable, allowed_BxV: jax.Array | None, b: int) -> jax.Array:
    """(B, rows) bool: row holds an item and the item's global id is allowed."""
    valid = table.ids_N >= 0
    if allowed_BxV is None:
        return jnp.broadcast_to(valid, (b, table.num_rows))
    return valid[None, :] & allowed_BxV[:, jnp.maximum(table.ids_N, 0)]


def _exact_rows(queries_BxD, table: ItemTable, allowed_BxN, k: int, topk_impl: str):
    rows = jnp.arange(table.num_rows, dtype=jnp.int32)
    exclude_BxN = jnp.where(allowed_BxN, -1, rows[None, :])
    return topk.topk_inner_product(queries_BxD, table.emb_NxD, k, exclude_BxH=exclude_BxN, impl=topk_impl)


def _gather(table: ItemTable, scores_BxK, rows_BxK) -> Candidates:
    ok = (rows_BxK >= 0) & ~jnp.isneginf(scores_BxK)
    r = jnp.maximum(rows_BxK, 0)
    return Candidates(
        jnp.where(ok, scores_BxK, -jnp.inf),
        jnp.where(ok, table.ids_N[r], -1),
        table.emb_NxD[r],
        table.side_NxS[r],
    )


def search(
    index: FreshIndex,
    queries_BxD: jax.Array,
    k: int,
    *,
    allowed: jax.Array | None = None,
    impl: str = "exact",
    topk_impl: str = "auto",
    ann_impl: str = "auto",
    candidate_fn: Callable | None = None,
) -> Candidates:
    """Top-k over main + fresh (filtered by ``allowed``: (V,) or (B, V) bool over global ids). Jittable;
    call :func:`check_search_inputs` first at a public boundary."""
    b = queries_BxD.shape[0]
    allowed_BxV = None if allowed is None else jnp.broadcast_to(allowed, (b, index.id_capacity))
    allowed_main = allowed_rows(index.main, allowed_BxV, b)
    if candidate_fn is not None:
        scores, rows = candidate_fn(queries_BxD, index.main, allowed_main, k)
    elif impl == "int8":
        mask = ann.pack_mask(allowed_main)
        scores, rows = ann.int8_search(queries_BxD, index.main_int8, k, mask_BxW=mask, impl=ann_impl)
    else:
        scores, rows = _exact_rows(queries_BxD, index.main, allowed_main, k, topk_impl)
    main = _gather(index.main, scores, rows)
    kf = min(k, index.fresh.num_rows)
    if kf == 0:
        return main
    allowed_fresh = allowed_rows(index.fresh, allowed_BxV, b)
    fresh = _gather(index.fresh, *_exact_rows(queries_BxD, index.fresh, allowed_fresh, kf, topk_impl))
    both = jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=1), main, fresh)
    top, pos = jax.lax.top_k(both.scores_BxK, k)
    take = lambda x: jnp.take_along_axis(x, pos.reshape(pos.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
    ids = jnp.where(jnp.isneginf(top), -1, take(both.ids_BxK))
    return Candidates(top, ids, take(both.emb_BxKxD), take(both.side_BxKxS))
