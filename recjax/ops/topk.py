"""Top-k inner-product retrieval: the op every ranking path (evaluation, retrieval models) goes through.

``topk_inner_product(queries_BxD, items_NxD, k, exclude_BxH=..., impl=...)`` returns the k best items per
query by inner product, excluded ids removed. Implementations:
- ``"xla"``: one ``jnp.dot`` + mask + ``lax.top_k`` (exact, float32 accumulation).
- ``"reference"``: the same in float32 with HIGHEST precision; the definition the others are tested against.
- ``"pallas"``: the fused Int8 ANN kernel (``recjax.ops.ann.int8_search``; float queries and items quantized
  on the fly, excluded ids cleared from its allow-mask). Approximate (int8 scores), so explicit only.
``"auto"`` picks, on a GPU that supports Pallas, the first of ``_AUTO_ON_GPU`` (none today), and ``"xla"``
otherwise. The implementations are the explicit table ``_IMPLS`` below; nothing registers itself.

Letters: B queries, N items, D embedding dim, H excluded ids per query, K results.
``exclude_BxH`` entries are item ids in [0, N) or -1 (padding); anything else is a ValueError (checked on
concrete arrays only: under ``jax.jit`` the values are tracers and an out-of-range id is ignored, so
validate before entering jit). Excluded and padding positions come back with score ``-inf`` and id ``-1``
when fewer than k items remain.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from recjax import validation
from recjax.ops import dispatch

EXCLUDE_PADDING = -1


def exclusion_mask(exclude_BxH: jax.Array, num_items: int) -> jax.Array:
    """(B, N) bool, True where item n is listed in the query's exclude row. Negative ids are padding and
    ids >= N are dropped: a jittable helper with no checks (``topk_inner_product`` validates its input;
    evaluation passes 0-padded rows and masks id 0 itself)."""
    b = exclude_BxH.shape[0]
    ids = jnp.where(exclude_BxH >= 0, exclude_BxH, num_items)  # out of range -> dropped by the scatter
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], ids.shape)
    return jnp.zeros((b, num_items), bool).at[rows, ids].set(True, mode="drop")


def _masked_topk(scores_BxN: jax.Array, k: int, drop_BxN: jax.Array | None):
    if drop_BxN is not None:
        scores_BxN = jnp.where(drop_BxN, -jnp.inf, scores_BxN)
    values, ids = jax.lax.top_k(scores_BxN, k)
    return values, jnp.where(jnp.isneginf(values), -1, ids).astype(jnp.int32)


def _xla(queries_BxD, items_NxD, k, exclude_BxH, precision=None):
    scores = jnp.dot(queries_BxD, items_NxD.T, preferred_element_type=jnp.float32, precision=precision)
    drop = None if exclude_BxH is None else exclusion_mask(exclude_BxH, items_NxD.shape[0])
    return _masked_topk(scores, k, drop)


def _reference(queries_BxD, items_NxD, k, exclude_BxH):
    return _xla(
        queries_BxD.astype(jnp.float32),
        items_NxD.astype(jnp.float32),
        k,
        exclude_BxH,
        precision=jax.lax.Precision.HIGHEST,
    )


def _pallas(queries_BxD, items_NxD, k, exclude_BxH):
    # Imported on first use: ann loads the Int8 ANN kernel module, which exact ranking never needs.
    from recjax.ops import ann, quantize

    mask = None
    if exclude_BxH is not None:
        mask = ann.pack_mask(~exclusion_mask(exclude_BxH, items_NxD.shape[0]))
    return ann.int8_search(queries_BxD, quantize.quantize_items(items_NxD), k, mask_BxW=mask, impl="pallas")


_IMPLS: dict[str, Callable] = {"xla": _xla, "reference": _reference, "pallas": _pallas}
# What "auto" may pick on a Pallas-capable GPU, best first. Empty: the only fused top-k is the int8 kernel,
# whose scores are approximate, and evaluation and retrieval expect exact float ranking from "auto".
_AUTO_ON_GPU: tuple[str, ...] = ()


def available_impls() -> list[str]:
    return list(_IMPLS)


def _resolve(impl: str) -> str:
    if impl != "auto":
        if impl not in _IMPLS:
            raise ValueError(f"impl: expected one of {['auto', *available_impls()]}, got {impl!r}")
        return impl
    if _AUTO_ON_GPU and dispatch.pallas_supported():
        return _AUTO_ON_GPU[0]
    return "xla"


def topk_inner_product(
    queries_BxD: jax.Array,
    items_NxD: jax.Array,
    k: int,
    *,
    exclude_BxH: jax.Array | None = None,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Returns (scores_BxK float32, ids_BxK int32), best first. ``exclude_BxH`` holds item ids (rows of
    ``items_NxD``, in [0, N)) to skip per query; -1 entries are padding. Out-of-range ids raise ValueError
    on concrete arrays (not under jit, see the module docstring)."""
    validation.check_shape("queries_BxD", queries_BxD, (None, None))
    validation.check_shape("items_NxD", items_NxD, (None, queries_BxD.shape[1]))
    validation.check_dtype("queries_BxD", queries_BxD, "f")
    validation.check_dtype("items_NxD", items_NxD, "f")
    validation.check_finite("queries_BxD", queries_BxD)
    validation.check_finite("items_NxD", items_NxD)
    if not 0 < k <= items_NxD.shape[0]:
        raise ValueError(f"k: expected 1 <= k <= N={items_NxD.shape[0]}, got {k}")
    if exclude_BxH is not None:
        validation.check_shape("exclude_BxH", exclude_BxH, (queries_BxD.shape[0], None))
        validation.check_dtype("exclude_BxH", exclude_BxH, "iu")
        # exclusion_mask would silently drop an id >= N (or treat -2 as padding): a bug upstream, not padding
        validation.check_ids("exclude_BxH", exclude_BxH, items_NxD.shape[0], padding=EXCLUDE_PADDING)
    return _IMPLS[_resolve(impl)](queries_BxD, items_NxD, k, exclude_BxH)
