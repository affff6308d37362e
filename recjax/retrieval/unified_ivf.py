"""IVF main index of the unified retrieval model (SilverTorch): filtered Int8 IVF over the main table.

``build_main_ivf(index, num_clusters, ...)`` clusters the main table of a ``FreshIndex`` (IVF item i = main
row i). Given the item features the id-layout Bloom index was built from, it also builds the Bloom index in
the IVF sorted layout, so that a Bloom plan is evaluated only on the probed clusters' words (probe, then
filter; ``ops.ann.ivf_search``).

In ``unified.serve`` with ``UnifiedConfig.index="ivf"``:
- ``ivf_candidates`` is the main-table search (``fresh_index.search``'s ``candidate_fn``): the allow-mask
  over main rows (allowed ids AND not excluded AND the row holds an item) is packed (the ``int8_search``
  word layout) and handed to ``ops.ann.ivf_search``, which gathers it onto the probed clusters' sorted
  rows; together with the probed Bloom words it is one mask inside the kernel, so filtered items never
  compete for the top-K;
- ``bloom_on_fresh``: the fresh table is searched exactly (as with brute force); the Bloom plan is ANDed into
  the allow-mask at the fresh ids only, evaluated on the one word that holds each fresh id (not on all V
  ids), and ids the Bloom index does not cover are not allowed (as ``unified.bloom_allowed``).
The main + fresh merge is unchanged (``fresh_index.search``).

Letters: B queries, V global ids, N main rows, F fresh slots, K candidates, D dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import jax
import jax.numpy as jnp
import numpy as np

from recjax import validation
from recjax.ops import ann
from recjax.ops import bloom as bloom_op
from recjax.retrieval import bloom as bloom_lib
from recjax.retrieval.fresh_index import FreshIndex, ItemTable
from recjax.retrieval.ivf import KMeansConfig, build_ivf_index, kmeans


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class MainIVF:
    """IVF over a FreshIndex's main table, with (optionally) the Bloom index in the IVF sorted layout."""

    ivf: ann.IVFIndex
    bloom_words_MxW: jax.Array | None = None  # sorted-layout Bloom words (+ one cluster of zero padding)
    bloom_meta: bloom_op.BloomIndex | None = field(default=None, metadata=dict(static=True))  # no words

    def sorted_bloom(self) -> bloom_op.BloomIndex | None:
        return None if self.bloom_meta is None else replace(self.bloom_meta, words_MxW=self.bloom_words_MxW)


def build_main_ivf(
    index: FreshIndex,
    num_clusters: int,
    *,
    block_n: int = 32,
    iterations: int = 10,
    seed: int = 0,
    bloom_features: bloom_lib.ItemFeatures | None = None,
    bloom_config: bloom_op.BloomConfig | None = None,
) -> MainIVF:
    """k-means on the main rows that hold items, IVF layout over all main rows (empty rows are filtered
    at search time). ``bloom_features`` (rows = global ids, the features of the id-layout Bloom index,
    built with the same ``bloom_config``) adds the sorted-layout Bloom index for probe-then-filter.
    Rebuild after ``fresh_index.merge_fresh`` (the main table changes)."""
    emb = np.asarray(index.main.emb_NxD)
    ids_N = np.asarray(index.main.ids_N)
    valid = ids_N >= 0
    validation.check_positive("num_clusters", num_clusters)
    if num_clusters > valid.sum():
        raise ValueError(f"num_clusters: expected <= {valid.sum()} (main items), got {num_clusters}")
    cents = kmeans(emb[valid], KMeansConfig(num_clusters, iterations=iterations, seed=seed))
    ivf_index = build_ivf_index(emb, cents, block_n=block_n)
    if bloom_features is None:
        return MainIVF(ivf_index)
    rows = np.asarray(ivf_index.ids_sorted)
    order = np.where(rows >= 0, ids_N[np.maximum(rows, 0)], -1)  # global id held at each sorted row
    order = np.where(order < bloom_features.num_items, order, -1)  # uncovered ids: no bits
    bidx = bloom_lib.build_bloom_index(
        bloom_features,
        bloom_config or bloom_op.BloomConfig(),
        item_order=order,
        pad_words=ivf_index.max_tiles * block_n // 32,
    )
    return MainIVF(ivf_index, bidx.words_MxW, replace(bidx, words_MxW=None))


def check_main_ivf(main: MainIVF, index: FreshIndex, nprobe: int, bloom_index=None) -> None:
    """Boundary checks: the IVF covers the main table, nprobe fits, the sorted Bloom matches the plan's."""
    n, d = index.main.num_rows, index.dim
    if main.ivf.num_items != n or main.ivf.items.dim != d:
        raise ValueError(
            f"ivf: expected an IVF over the main table ({n} rows of dim {d}), got {main.ivf.num_items} "
            f"rows of dim {main.ivf.items.dim} (rebuild it after merge_fresh)"
        )
    if not 1 <= nprobe <= main.ivf.num_clusters:
        raise ValueError(
            f"UnifiedConfig.nprobe: expected 1 <= nprobe <= L={main.ivf.num_clusters}, got {nprobe}"
        )
    if bloom_index is not None:
        if main.bloom_meta is None:
            raise ValueError(
                "ivf: a Bloom filter with index='ivf' needs build_main_ivf(..., bloom_features=...)"
            )
        if main.bloom_meta.config != bloom_index.config:
            raise ValueError(
                f"ivf: the sorted Bloom index has {main.bloom_meta.config}, the plan's index "
                f"{bloom_index.config} (build both with the same BloomConfig)"
            )
        # other features would make every main item fail the filter silently (only fresh items returned)
        meta, want = main.bloom_meta, bloom_index
        if (meta.feature_names, meta.max_terms_per_item) != (want.feature_names, want.max_terms_per_item):
            raise ValueError(
                f"ivf: the sorted Bloom index covers features {meta.feature_names} (max "
                f"{meta.max_terms_per_item} terms per item), the plan's index {want.feature_names} (max "
                f"{want.max_terms_per_item}): build_main_ivf(..., bloom_features=) from the same features"
            )


def ivf_candidates(main: MainIVF, nprobe: int, *, plan=None, impl: str = "auto") -> Callable:
    """``candidate_fn(queries_BxD, table, allowed_BxN, k) -> (scores_BxK, rows_BxK)`` for the main table."""

    def candidate_fn(queries_BxD, table: ItemTable, allowed_BxN, k: int):
        bloom_index = None if plan is None else main.sorted_bloom()
        mask_BxW = ann.pack_mask(allowed_BxN)
        return ann.ivf_search(
            queries_BxD, main.ivf, k, nprobe, mask_BxW=mask_BxW, bloom_index=bloom_index, plan=plan, impl=impl
        )

    return candidate_fn


def bloom_on_fresh(
    bloom_index: bloom_op.BloomIndex, plan: bloom_op.BloomPlan, fresh: ItemTable, allowed_BxV, num_ids: int
) -> jax.Array:
    """``allowed_BxV`` (None = all) AND id covered by the (id-layout) Bloom index, AND, at the fresh ids
    only, the plan's bit (evaluated on the one word of each fresh id). Main ids are left to the IVF."""
    b = plan.rows_BxCxTxK.shape[0]
    covered_V = jnp.arange(num_ids) < bloom_index.num_items
    allowed = covered_V[None, :] if allowed_BxV is None else allowed_BxV & covered_V[None, :]
    allowed = jnp.broadcast_to(allowed, (b, num_ids))
    f = fresh.num_rows
    if f == 0:
        return allowed
    ids_F = fresh.ids_N
    ok_F = (ids_F >= 0) & (ids_F < bloom_index.num_items)
    words_BxFx1 = bloom_op.filter_words_probed(
        bloom_index,
        plan,
        jnp.broadcast_to(jnp.arange(f, dtype=jnp.int32), (b, f)),  # "probe" fresh slot s ...
        jnp.where(ok_F, ids_F // 32, 0),  # ... = the one word holding its id
        block_n=32,
        max_tiles=1,
        impl="reference",  # F words per query: plain JAX, no kernel launch
    )
    bit_BxF = ((words_BxFx1[..., 0] >> (jnp.maximum(ids_F, 0) % 32)) & 1) != 0
    at_F = jnp.where(ok_F, ids_F, num_ids)
    current = allowed[:, jnp.minimum(at_F, num_ids - 1)]
    return allowed.at[:, at_F].set(current & bit_BxF, mode="drop")
