"""Full-corpus ranking metrics for sequential recommendation (leave-one-out protocol).

Every item is scored for every user; the user's history before the target is excluded (the target itself is
never excluded, so a repeat consumption can still be ranked), as is the padding id 0.

One rank per row, ties counted against the target (pessimistic):
``rank = 1 + #{non-excluded items n != target : score[n] >= score[target]}``, and every metric comes from it:
HR@K = [rank <= K], NDCG@K = [rank <= K] / log2(rank + 1) (one relevant item), MRR = 1 / rank. A model that
scores everything alike (e.g. a zero query) therefore gets the worst rank, never rank 1.

NaN is the worst score: a NaN item never counts against a target (finite or +-inf), and a NaN target ranks
below every candidate, tying with the other NaN ones, so its rank is the number of non-excluded candidates.
A diverging model thus gets the worst rank (MRR 1 / #candidates), not rank 1; NaN queries are ranked, not
rejected.

No top-K list is built (only ``exclusion_mask`` comes from :mod:`recjax.ops.topk`): the exact rank needs
every score anyway (one (B, N) float32 matrix plus a (B, N) bool exclusion mask; nothing larger), and a
fused ANN kernel's approximate scores would change the ranks. ``impl`` only picks how that score matmul
runs (:func:`score_matrix`).

Rows: ``valid`` False rows do not count at all; ``valid & ~scoreable`` rows count in the denominator as
misses (every metric 0), e.g. a target with no model row under ID remapping.

Letters: B queries (users), N items (row 0 = padding), D embedding dim, H excluded ids, K cutoff.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from recjax import validation
from recjax.ops.topk import exclusion_mask

DEFAULT_KS = (10, 50, 200)
IMPLS = ("auto", "xla", "reference")


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(
            f"impl: expected one of {IMPLS} (the exact rank needs float scores; approximate kernels such as "
            f"ops.topk's 'pallas' do not apply), got {impl!r}"
        )


def score_matrix(queries_BxD: jax.Array, items_NxD: jax.Array, impl: str = "auto") -> jax.Array:
    """(B, N) float32 scores. ``"auto"``/``"xla"``: the inputs' dtype, float32 accumulation (as before);
    ``"reference"``: both cast to float32, HIGHEST precision."""
    check_impl(impl)
    if impl == "reference":
        q, it = queries_BxD.astype(jnp.float32), items_NxD.astype(jnp.float32)
        return jnp.dot(q, it.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.dot(queries_BxD, items_NxD.T, preferred_element_type=jnp.float32)


def pessimistic_rank(scores_BxN: jax.Array, target_B: jax.Array, exclude_BxH: jax.Array) -> jax.Array:
    """(B,) int32 1-based rank of the target, ties and NaN as in the module docstring. ``exclude_BxH``: ids
    removed from the ranking (0 = padding, negative = padding too; the target is never removed)."""
    b, n = scores_BxN.shape
    target_score_B = jnp.take_along_axis(scores_BxN, target_B[:, None], axis=1)
    cols_N = jnp.arange(n)
    # Candidates competing with the target: not excluded, not padding, not the target itself.
    cand_BxN = ~exclusion_mask(exclude_BxH, n) & (cols_N != 0) & (cols_N != target_B[:, None])
    # `>=` is False for a NaN item (never beats a target); a NaN target loses to every candidate.
    beats_BxN = (scores_BxN >= target_score_B) | jnp.isnan(target_score_B)
    return 1 + jnp.sum(cand_BxN & beats_BxN, axis=1, dtype=jnp.int32)


def metrics_from_rank(rank_B: jax.Array, ks: Sequence[int]) -> dict[str, jax.Array]:
    """Per-row ``hr@k``, ``ndcg@k`` (each k) and ``mrr`` from the one 1-based rank."""
    rank_B = rank_B.astype(jnp.float32)
    out = {}
    for k in ks:
        hit = rank_B <= k
        out[f"hr@{k}"] = hit.astype(jnp.float32)
        out[f"ndcg@{k}"] = jnp.where(hit, 1.0 / jnp.log2(rank_B + 1.0), 0.0)
    out["mrr"] = 1.0 / rank_B
    return out


def _score_stats(scores_BxN, target_B, exclude_BxH, valid_B, scoreable_B, ks):
    """(metric sums over valid & scoreable rows, count of valid rows)."""
    rank_B = pessimistic_rank(scores_BxN, target_B, exclude_BxH)
    valid_B = valid_B.astype(bool)
    hit_w = (valid_B & scoreable_B.astype(bool)).astype(jnp.float32)
    sums = {name: (v * hit_w).sum() for name, v in metrics_from_rank(rank_B, ks).items()}
    return sums, valid_B.astype(jnp.float32).sum()


@partial(jax.jit, static_argnames=("ks", "impl"))
def rank_batch(
    queries_BxD: jax.Array,
    items_NxD: jax.Array,
    target_B: jax.Array,
    exclude_BxH: jax.Array,
    valid_B: jax.Array,
    scoreable_B: jax.Array | None = None,
    *,
    ks: tuple[int, ...] = DEFAULT_KS,
    impl: str = "auto",
) -> dict[str, jax.Array]:
    """Sums of each metric over the ``valid & scoreable`` rows of one batch, plus ``count`` = number of
    valid rows (the denominator: valid but unscoreable rows are misses). ``scoreable_B`` None = all.
    No value checks (jitted); :func:`evaluate` validates."""
    scoreable_B = valid_B if scoreable_B is None else scoreable_B
    scores_BxN = score_matrix(queries_BxD, items_NxD, impl)
    sums, count = _score_stats(scores_BxN, target_B, exclude_BxH, valid_B, scoreable_B, ks)
    return {**sums, "count": count}


@partial(jax.jit, static_argnames=("ks",))
def _evaluate_scores_batch(scores_BxN, target_B, exclude_BxH, valid_B, scoreable_B, rate_B, ks):
    """Metric sums of one batch from its score matrix, plus the sums of ``rate_B`` masks over valid rows
    and out-of-range counts, so that ``evaluate_scores`` checks device batches with one transfer."""
    num_items = scores_BxN.shape[1] - 1
    sums, count = _score_stats(scores_BxN, target_B, exclude_BxH, valid_B, scoreable_B, ks)
    valid_B = valid_B.astype(bool)
    rates = {name: (m.astype(bool) & valid_B).sum() for name, m in rate_B.items()}
    bad_target = (valid_B & ((target_B < 1) | (target_B > num_items))).sum()
    bad_exclude = (valid_B[:, None] & (exclude_BxH > num_items)).sum()
    return sums, count, rates, bad_target, bad_exclude


_score_matrix_jit = jax.jit(score_matrix, static_argnames=("impl",))


def _raise_out_of_range(name: str, x, valid_B, low: float, high: int, want: str) -> None:
    """Error path only: fetches the batch to name the first bad value (on a valid row)."""
    arr, valid_B = np.asarray(x), np.asarray(valid_B, bool)
    bad = ((arr < low) | (arr > high)) & valid_B.reshape(valid_B.shape + (1,) * (arr.ndim - 1))
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"{name}: expected {want} on valid rows, got {arr[idx]} at index {idx}")


def evaluate(
    query_fn: Callable[[dict], jax.Array],
    items_NxD: jax.Array,
    batches: Iterable[dict],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    impl: str = "auto",
    row_rates: Sequence[str] = (),
) -> dict[str, float]:
    """Mean metrics over all valid rows of dot-product retrieval. ``query_fn(batch) -> queries_BxD`` (jit it
    yourself); batches follow the evaluation contract in recjax/data/types.py, optionally with ``scoreable``
    (B,) bool (``valid & ~scoreable`` rows are misses). Each name in ``row_rates`` is a (B,) bool batch key
    whose mean over valid rows is returned as ``<name>_rate``. Batches may be numpy or device arrays."""
    validation.check_shape("items_NxD", items_NxD, (None, None))
    validation.check_dtype("items_NxD", items_NxD, "f")
    check_impl(impl)

    def score_fn(batch: dict) -> jax.Array:
        queries_BxD = query_fn(batch)
        b = np.shape(batch["target"])[0]
        validation.check_shape("query_fn(batch)", queries_BxD, (b, items_NxD.shape[1]))
        validation.check_dtype("query_fn(batch)", queries_BxD, "f")
        return _score_matrix_jit(queries_BxD, items_NxD, impl=impl)

    return evaluate_scores(score_fn, items_NxD.shape[0] - 1, batches, ks=ks, row_rates=row_rates)


def evaluate_scores(
    score_fn: Callable[[dict], jax.Array],
    num_items: int,
    batches: Iterable[dict],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    row_rates: Sequence[str] = (),
) -> dict[str, float]:
    """:func:`evaluate` for models whose scores are not one query vector times an item table (e.g. LIME's
    item-specific link weights): ``score_fn(batch) -> scores_BxN`` float, N = num_items + 1 (column 0 =
    padding). Same rows, ranks and metrics as :func:`evaluate`."""
    ks = tuple(sorted(set(int(k) for k in ks)))
    if not ks or ks[0] < 1 or ks[-1] > num_items:
        raise ValueError(f"ks: expected cutoffs in [1, {num_items}] (number of items), got {ks}")
    totals: dict[str, float] = {}
    rate_totals = {name: 0.0 for name in row_rates}
    count = 0.0
    for batch in batches:
        b = np.shape(batch["target"])[0]
        validation.check_dtype("batch['target']", batch["target"], "iu")
        validation.check_shape("batch['exclude']", batch["exclude"], (b, None))
        validation.check_dtype("batch['exclude']", batch["exclude"], "iu")
        validation.check_shape("batch['valid']", batch["valid"], (b,))
        scoreable = batch.get("scoreable", batch["valid"])
        validation.check_shape("batch['scoreable']", scoreable, (b,))
        rate_B = {name: batch[name] for name in row_rates}
        for name, m in rate_B.items():
            validation.check_shape(f"batch[{name!r}]", m, (b,))
        scores_BxN = score_fn(batch)
        validation.check_shape("score_fn(batch)", scores_BxN, (b, num_items + 1))
        validation.check_dtype("score_fn(batch)", scores_BxN, "f")
        stats = _evaluate_scores_batch(
            scores_BxN,
            jnp.asarray(batch["target"]),
            jnp.asarray(batch["exclude"]),
            jnp.asarray(batch["valid"]),
            jnp.asarray(scoreable),
            {k: jnp.asarray(v) for k, v in rate_B.items()},
            ks=ks,
        )
        sums, c, rates, bad_target, bad_exclude = jax.device_get(stats)  # one transfer per batch
        if bad_target:
            _raise_out_of_range(
                "batch['target']", batch["target"], batch["valid"], 1, num_items, f"ids in [1, {num_items}]"
            )
        if bad_exclude:
            want, ex = f"ids <= {num_items} (0 and negative = padding)", batch["exclude"]
            _raise_out_of_range("batch['exclude']", ex, batch["valid"], -np.inf, num_items, want)
        count += float(c)
        for name, v in sums.items():
            totals[name] = totals.get(name, 0.0) + float(v)
        for name, v in rates.items():
            rate_totals[name] += float(v)
    if count == 0:
        raise ValueError("batches: no valid evaluation rows (every batch['valid'] is False, or no batches)")
    out = {name: v / count for name, v in totals.items()}
    out.update({f"{name}_rate": v / count for name, v in rate_totals.items()})
    return out


def popularity_scores(train_sequences: Iterable[np.ndarray], num_items: int) -> np.ndarray:
    """Training-set item counts as a (num_items + 1, 1) score table (row 0 = padding): ranking by
    popularity is ``evaluate`` with a constant query of ones (equal counts tie, pessimistically)."""
    counts = np.zeros(num_items + 1, np.float32)
    for seq in train_sequences:
        np.add.at(counts, np.asarray(seq), 1.0)
    counts[0] = 0.0
    return counts[:, None]


def evaluate_popularity(
    train_sequences: Iterable[np.ndarray],
    num_items: int,
    batches: Iterable[dict],
    *,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    table = jnp.asarray(popularity_scores(train_sequences, num_items))
    return evaluate(lambda b: jnp.ones((len(b["target"]), 1), jnp.float32), table, batches, ks=ks, impl="xla")
