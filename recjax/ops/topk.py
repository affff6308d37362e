"""Top-k inner-product retrieval: the op every ranking path (evaluation, retrieval models) goes through.

``topk_inner_product(queries_BxD, items_NxD, k, exclude_BxH=..., impl=...)`` returns the k best items per
query by inner product, excluded ids removed. Implementations:
- ``"xla"``: one ``jnp.dot`` + mask + ``lax.top_k`` (exact, float32 accumulation).
- ``"reference"``: the same in float32 with HIGHEST precision; the definition the others are tested against.
- ``"pallas"``: fused kernels registered by ``pallas_kernels`` users (e.g. the Int8 ANN kernel) through
  :func:`register_impl`; ``"auto"`` picks it on a GPU that supports it and ``"xla"`` elsewhere.

Letters: B queries, N items, D embedding dim, H excluded ids per query, K results.
Excluded and padding positions come back with score ``-inf`` and id ``-1`` when fewer than k items remain.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from recjax import validation

_IMPLS: dict[str, Callable] = {}
_AUTO_PALLAS: dict[str, Callable[[], bool]] = {}


def register_impl(name: str, fn: Callable, *, auto_when: Callable[[], bool] | None = None) -> None:
    """Adds an implementation; ``auto_when()`` True makes ``impl="auto"`` choose it."""
    _IMPLS[name] = fn
    if auto_when is not None:
        _AUTO_PALLAS[name] = auto_when


def available_impls() -> list[str]:
    return ["xla", "reference", *sorted(_IMPLS)]


def exclusion_mask(exclude_BxH: jax.Array, num_items: int) -> jax.Array:
    """(B, N) bool, True where item n is listed in the query's exclude row. Negative ids are padding."""
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


def _resolve(impl: str) -> str:
    if impl == "pallas" and "pallas" not in _IMPLS:
        import recjax.ops.ann  # noqa: F401  (registers the fused Int8 ANN kernel as "pallas")
    if impl != "auto":
        return impl
    for name, ok in _AUTO_PALLAS.items():
        if ok():
            return name
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
    ``items_NxD``) to skip per query; negative entries are padding."""
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
    name = _resolve(impl)
    if name == "xla":
        return _xla(queries_BxD, items_NxD, k, exclude_BxH)
    if name == "reference":
        return _reference(queries_BxD, items_NxD, k, exclude_BxH)
    if name not in _IMPLS:
        raise ValueError(f"impl: expected one of {['auto', *available_impls()]}, got {impl!r}")
    return _IMPLS[name](queries_BxD, items_NxD, k, exclude_BxH=exclude_BxH)
