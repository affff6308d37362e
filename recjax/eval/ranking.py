"""Full-corpus ranking metrics for sequential recommendation (leave-one-out protocol).

Every item is scored for every user; the user's history before the target is excluded (the target itself is
never excluded, so a repeat consumption can still be ranked), as is the padding id 0. Metrics:
HR@K (target in the top K), NDCG@K (1 / log2(rank + 1) when rank <= K, one relevant item) and MRR
(1 / rank over the full corpus). Top-K lists come from :func:`recjax.ops.topk.topk_inner_product`, so a fused
ANN kernel can replace exact search; MRR uses the exact rank computed from float scores
(1 + number of non-excluded items scoring strictly higher than the target).

Letters: B queries (users), N items (row 0 = padding), D embedding dim, H excluded ids, K largest cutoff.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from recjax import validation
from recjax.ops.topk import exclusion_mask, topk_inner_product

DEFAULT_KS = (10, 50, 200)


def metrics_from_ranks(rank_B: jax.Array, topk_hit_BxK: jax.Array, ks: Sequence[int]) -> dict[str, jax.Array]:
    """Per-row metrics. ``rank_B`` is the exact 1-based rank; ``topk_hit_BxK`` marks where the top-K list
    holds the target (at most one True per row)."""
    pos_B = jnp.argmax(topk_hit_BxK, axis=1)  # 0-based position in the top-K list
    found_B = topk_hit_BxK.any(axis=1)
    out = {}
    for k in ks:
        hit = found_B & (pos_B < k)
        out[f"hr@{k}"] = hit.astype(jnp.float32)
        out[f"ndcg@{k}"] = jnp.where(hit, 1.0 / jnp.log2(pos_B + 2.0), 0.0)
    out["mrr"] = 1.0 / rank_B.astype(jnp.float32)
    return out


@partial(jax.jit, static_argnames=("ks", "impl"))
def rank_batch(
    queries_BxD: jax.Array,
    items_NxD: jax.Array,
    target_B: jax.Array,
    exclude_BxH: jax.Array,
    valid_B: jax.Array,
    *,
    ks: tuple[int, ...] = DEFAULT_KS,
    impl: str = "auto",
) -> dict[str, jax.Array]:
    """Sums of each metric over the valid rows of one batch (plus ``count``)."""
    # Never exclude the target; always exclude the padding id 0 (exclude rows are 0-padded).
    exclude_BxH = jnp.where(exclude_BxH == target_B[:, None], 0, exclude_BxH)
    exclude_BxH = jnp.concatenate([jnp.zeros_like(exclude_BxH[:, :1]), exclude_BxH], axis=1)
    _, topk_ids_BxK = topk_inner_product(queries_BxD, items_NxD, max(ks), exclude_BxH=exclude_BxH, impl=impl)
    scores_BxN = jnp.dot(queries_BxD, items_NxD.T, preferred_element_type=jnp.float32)
    target_score_B = jnp.take_along_axis(scores_BxN, target_B[:, None], axis=1)
    above_BxN = (scores_BxN > target_score_B) & ~exclusion_mask(exclude_BxH, items_NxD.shape[0])
    rank_B = 1 + above_BxN.sum(axis=1)
    per_row = metrics_from_ranks(rank_B, topk_ids_BxK == target_B[:, None], ks)
    w = valid_B.astype(jnp.float32)
    sums = {name: (v * w).sum() for name, v in per_row.items()}
    sums["count"] = w.sum()
    return sums


def evaluate(
    query_fn: Callable[[dict], jax.Array],
    items_NxD: jax.Array,
    batches: Iterable[dict],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    impl: str = "auto",
) -> dict[str, float]:
    """Mean metrics over all valid rows. ``query_fn(batch) -> queries_BxD`` (jit it yourself);
    batches follow the evaluation contract in recjax/data/types.py."""
    ks = tuple(sorted(set(int(k) for k in ks)))
    num_items = items_NxD.shape[0] - 1
    if ks[0] < 1 or ks[-1] > num_items:
        raise ValueError(f"ks: expected cutoffs in [1, {num_items}] (number of items), got {ks}")
    totals: dict[str, float] = {}
    for batch in batches:
        validation.check_range("batch['target']", batch["target"], 1, num_items + 1)
        sums = rank_batch(
            query_fn(batch),
            items_NxD,
            jnp.asarray(batch["target"]),
            jnp.asarray(batch["exclude"]),
            jnp.asarray(batch["valid"]),
            ks=ks,
            impl=impl,
        )
        for name, v in jax.device_get(sums).items():
            totals[name] = totals.get(name, 0.0) + float(v)
    count = totals.pop("count", 0.0)
    if count == 0:
        raise ValueError("batches: no valid evaluation rows")
    return {name: v / count for name, v in totals.items()}


def popularity_scores(train_sequences: Iterable[np.ndarray], num_items: int) -> np.ndarray:
    """Training-set item counts as a (num_items + 1, 1) score table (row 0 = padding): ranking by
    popularity is ``evaluate`` with a constant query of ones."""
    counts = np.zeros(num_items + 1, np.float32)
    for seq in train_sequences:
        np.add.at(counts, np.asarray(seq), 1.0)
    counts[0] = 0.0
    return counts[:, None]


def evaluate_popularity(
    train_sequences, num_items: int, batches: Iterable[dict], *, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    table = jnp.asarray(popularity_scores(train_sequences, num_items))
    return evaluate(lambda b: jnp.ones((len(b["target"]), 1), jnp.float32), table, batches, ks=ks, impl="xla")
