"""Bloom filter op (SilverTorch): evaluates compiled boolean plans over a bit-sliced Bloom index.

``filter_words(index, plan, impl=...)`` -> (B, ceil(N / 32)) int32 packed allow-mask over all items;
``filter_words_probed(index, plan, probes_BxP, tile_start_L, block_n=, max_tiles=, impl=...)`` -> (B, P, V)
int32, only the words of each query's probed clusters (the index in the IVF sorted layout).
The mask layout is the kernels' (bit j of word w = item 32 w + j), so ``ops.ann`` reads it as is.

The types the op reads live here too: ``BloomIndex`` (the bit-sliced words and what they were built with,
``BloomConfig``) and ``BloomPlan`` (the fixed-shape CNF). Building an index and compiling queries into a
plan is ``recjax.retrieval.bloom``.
Implementations:
- ``"pallas"``: the Triton-lowering kernel (``pallas_kernels.bloom``); off a GPU it runs in interpret mode
  (slow; for tests). ``filter_words`` can evaluate in two stages (``two_stage``, pallas only).
- ``"xla"`` / ``"reference"``: the plain-JAX gather definition from the kernel module (the same function;
  it is already jit-friendly).
``"auto"`` is Pallas on an NVIDIA GPU (sm_80+) and XLA elsewhere, for any batch size.

Letters: N items (layout rows), M bits per item, K hashes, W words, B queries, C clauses, T literals per
clause, U distinct terms of a batch, P probes, V words per probed cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import bloom as bloom_kernel
from recjax.ops import dispatch

IMPLS = dispatch.IMPLS
# Literal kinds of a plan (the kernel's encoding; plans are compiled against these names).
KIND_FALSE, KIND_TERM, KIND_NOT_TERM, KIND_TRUE = (
    bloom_kernel.KIND_FALSE,
    bloom_kernel.KIND_TERM,
    bloom_kernel.KIND_NOT_TERM,
    bloom_kernel.KIND_TRUE,
)


@dataclass(frozen=True)
class BloomConfig:
    bits_per_item: int = 512  # M
    num_hashes: int = 5  # K


@dataclass(frozen=True)
class BloomIndex:
    words_MxW: jax.Array  # int32, bit-sliced; zero padding words at the end
    config: BloomConfig
    num_items: int  # rows of the layout (items, or IVF sorted rows)
    feature_names: tuple[str, ...]
    max_terms_per_item: int

    @property
    def num_words(self) -> int:
        return -(-self.num_items // 32)


@dataclass(frozen=True)
class BloomPlan:
    """``rows_BxCxTxK`` / ``kinds_BxCxT``: the CNF plan. ``term_rows_UxK`` / ``term_of_BxCxT``: the same
    literals deduplicated over the batch (U distinct terms), for the two-stage evaluation."""

    rows_BxCxTxK: jax.Array
    kinds_BxCxT: jax.Array
    term_rows_UxK: np.ndarray | None = None
    term_of_BxCxT: np.ndarray | None = None

    @property
    def num_distinct_terms(self) -> int:
        return 0 if self.term_rows_UxK is None else self.term_rows_UxK.shape[0]


def resolve_impl(impl: str) -> str:
    return dispatch.resolve_impl(impl, IMPLS)


def filter_words(
    index: BloomIndex, plan: BloomPlan, *, impl: str = "auto", two_stage: bool | None = None
) -> jax.Array:
    """Packed allow-mask over all items, (B, ceil(N / 32)) int32.

    ``two_stage`` (pallas only; None = when it reads fewer index rows): first the U distinct terms of the
    batch (AND of K index rows each) into a (U, W) term table (U W 4 bytes of scratch), then each query's
    CNF over that table with one row per literal: B C T K row reads become U K + B C T. Same kernel, same
    bits. Measured on an H200 at B=1024, 10M items (benchmarks/RESULTS.md): 4.4 ms vs 7.2 ms one-stage."""
    name = resolve_impl(impl)
    args = (index.words_MxW, plan.rows_BxCxTxK, plan.kinds_BxCxT)
    if name != "pallas":
        return bloom_kernel.bloom_filter_words_reference(*args, num_words=index.num_words)
    interpret = not dispatch.pallas_supported()
    b, c, t, k = plan.rows_BxCxTxK.shape
    u = plan.num_distinct_terms
    if two_stage is None:
        two_stage = u > 0 and u * k + b * c * t < b * c * t * k
    if not two_stage:
        return bloom_kernel.bloom_filter_words(*args, num_words=index.num_words, interpret=interpret)
    if plan.term_rows_UxK is None:
        raise ValueError("plan: two_stage needs a plan from compile_queries (term table missing)")
    w = index.num_words
    term_kinds = jnp.full((u, 1, 1), KIND_TERM, jnp.int32)
    terms_UxW = bloom_kernel.bloom_filter_words(
        index.words_MxW,
        jnp.asarray(plan.term_rows_UxK)[:, None, None, :],
        term_kinds,
        num_words=w,
        interpret=interpret,
    )
    return bloom_kernel.bloom_filter_words(
        terms_UxW,
        jnp.asarray(plan.term_of_BxCxT)[..., None],
        plan.kinds_BxCxT,
        num_words=w,
        interpret=interpret,
    )


def filter_words_probed(
    index: BloomIndex,
    plan: BloomPlan,
    probes_BxP: jax.Array,
    tile_start_L: jax.Array,
    *,
    block_n: int,
    max_tiles: int,
    impl: str = "auto",
) -> jax.Array:
    """Probe, then filter: only the words of each query's probed clusters, (B, P, V) int32 with
    V = max_tiles * block_n / 32 words per probe (the layout must be the IVF sorted order)."""
    name = resolve_impl(impl)
    b, p = probes_BxP.shape
    v = max_tiles * block_n // 32
    offsets = (jnp.asarray(tile_start_L)[probes_BxP] * (block_n // 32)).reshape(-1).astype(jnp.int32)
    rows = jnp.repeat(plan.rows_BxCxTxK, p, axis=0)
    kinds = jnp.repeat(plan.kinds_BxCxT, p, axis=0)
    if name != "pallas":
        out = bloom_kernel.bloom_filter_words_reference(index.words_MxW, rows, kinds, offsets, num_words=v)
    else:
        block_w = min(256, 1 << max(0, (v - 1).bit_length()))
        out = bloom_kernel.bloom_filter_words(
            index.words_MxW,
            rows,
            kinds,
            offsets,
            num_words=v,
            block_w=block_w,
            interpret=not dispatch.pallas_supported(),
        )
    return out.reshape(b, p, v)
