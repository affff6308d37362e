"""Next-item losses for sequential recommenders (left-padded batches, see recjax/data/types.py).

- :func:`sampled_softmax_loss`: generative-recommenders' ``SampledSoftmaxLoss`` (KDD'23 "Revisiting Neural
  Retrieval on Accelerators"): for every valid position, softmax over [positive, R negatives] of cosine (or
  dot) similarities divided by a temperature; negatives that equal the positive ("accidental hits") are
  masked out. Negatives:
    * ``"uniform"``: R ids uniform in [1, num_items], one draw shared by the whole batch (a single
      (B*L, D) x (D, R) matmul). Deviation: GR's ``LocalNegativesSampler`` draws R ids *per position*;
    * ``"uniform_per_position"``: GR's exact scheme (R ids per position; B*L*R*D gathered floats, costly);
    * ``"in_batch"``: R positions drawn uniformly among the batch's valid (target, mask) positions; their
      targets are the negatives (popularity-distributed, as GR's ``InBatchNegativesSampler``; no logQ
      correction, like GR).
- :func:`bce_loss`: SASRec's original loss (Kang & McAuley 2018): per valid position, one uniformly random
  negative; ``-log sigmoid(<h, e_pos>) - log(1 - sigmoid(<h, e_neg>))`` on raw dot products. Deviation: the
  paper draws the negative outside the user's history; we draw from all items and drop the negative term
  when it hits the positive.
- :func:`l2_normalize`: the one normalisation used by the losses and by the models' ``normalize`` (and so by
  evaluation), GR's ``x / max(||x||, eps)``.

Every loss returns ``(scalar loss, metrics dict of scalars)`` and averages over valid positions
(``targets > 0`` and ``mask``); a batch without any valid position gives loss 0.

Letters: B batch, L sequence, D embedding dim, N table rows (num_items + 1, row 0 = padding), R negatives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from recjax import validation

NEGATIVE_SAMPLERS = ("uniform", "uniform_per_position", "in_batch")
_MASKED_LOGIT = -1e9


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    # x / max(||x||, eps) written without sqrt at 0: padded positions hold zero vectors, and
    # jnp.linalg.norm's gradient there is NaN (which a later mask does not remove: NaN * 0 = NaN).
    sq_norm = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq_norm, eps * eps))


_normalize = l2_normalize  # the loss's keyword argument of the same name shadows the function


def _validate(hidden_BxLxD, targets_BxL, mask_BxL, item_table_NxD) -> None:
    validation.check_dtype("hidden_BxLxD", hidden_BxLxD, "f")
    if hidden_BxLxD.ndim != 3:
        raise ValueError(f"hidden_BxLxD: expected shape (B, L, D), got {tuple(hidden_BxLxD.shape)}")
    B, L, D = hidden_BxLxD.shape
    validation.check_shape("targets_BxL", targets_BxL, (B, L))
    validation.check_dtype("targets_BxL", targets_BxL, "iu")
    validation.check_shape("mask_BxL", mask_BxL, (B, L))
    validation.check_dtype("mask_BxL", mask_BxL, "b")
    validation.check_dtype("item_table_NxD", item_table_NxD, "f")
    validation.check_shape("item_table_NxD", item_table_NxD, (None, D))
    N = item_table_NxD.shape[0]
    if N < 2:
        raise ValueError(f"item_table_NxD: expected at least 2 rows (padding + 1 item), got {N}")
    validation.check_range("targets_BxL", targets_BxL, 0, N)
    validation.check_finite("hidden_BxLxD", hidden_BxLxD)


def _masked_mean(per_position_BxL: jax.Array, valid_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    count = valid_BxL.sum()
    total = jnp.where(valid_BxL, per_position_BxL, 0.0).sum()
    return total / jnp.maximum(count, 1), count


def sample_negative_ids(
    rng: jax.Array,
    targets_BxL: jax.Array,
    valid_BxL: jax.Array,
    num_rows: int,
    num_negatives: int,
    negatives: str,
) -> jax.Array:
    """Negative ids of :func:`sampled_softmax_loss`: (R,) for "uniform"/"in_batch", (B, L, R) per position.

    ``num_rows`` = num_items + 1; uniform ids lie in [1, num_items]. "in_batch" returns 0 (masked by the
    loss) only when the batch has no valid position at all.
    """
    B, L = targets_BxL.shape
    R = num_negatives
    if negatives == "uniform_per_position":
        return jax.random.randint(rng, (B, L, R), 1, num_rows, dtype=jnp.int32)
    if negatives == "uniform":
        return jax.random.randint(rng, (R,), 1, num_rows, dtype=jnp.int32)
    if negatives == "in_batch":
        valid_T = valid_BxL.reshape(-1)
        pick_logits_T = jnp.where(valid_T, 0.0, -jnp.inf)
        pick_logits_T = jnp.where(valid_T.any(), pick_logits_T, 0.0)
        picks_R = jax.random.categorical(rng, pick_logits_T, shape=(R,))
        return jnp.where(valid_T[picks_R], targets_BxL.reshape(-1)[picks_R], 0).astype(jnp.int32)
    raise ValueError(f"negatives: expected one of {NEGATIVE_SAMPLERS}, got {negatives!r}")


def softmax_over_sampled(
    pos_logit_E: jax.Array,
    neg_logit_ExR: jax.Array,
    hit_ExR: jax.Array,
    valid_E: jax.Array,
    temperature: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The sampled-softmax objective from its logits (any leading shape E): per valid row,
    ``logsumexp([pos, negs] / T) - pos / T`` with ``hit`` negatives (accidental hits, padding) masked out;
    averaged over valid rows. Shared by :func:`sampled_softmax_loss` and models whose logits are not one
    query times an item table (LIME). Metrics as :func:`sampled_softmax_loss`'s."""
    logits_Ex1pR = jnp.concatenate(
        [pos_logit_E[..., None], jnp.where(hit_ExR, _MASKED_LOGIT, neg_logit_ExR)], axis=-1
    ) / jnp.float32(temperature)
    # The positive column is never masked, so the logsumexp is finite even when every negative is a hit.
    per_row_E = jax.nn.logsumexp(logits_Ex1pR, axis=-1) - logits_Ex1pR[..., 0]
    loss, count = _masked_mean(per_row_E, valid_E)
    best_neg_E = jnp.max(jnp.where(hit_ExR, -jnp.inf, neg_logit_ExR), axis=-1)
    metrics = {
        "loss": loss,
        "num_valid": count,
        "sampled_accuracy": _masked_mean((pos_logit_E > best_neg_E).astype(jnp.float32), valid_E)[0],
        "positive_logit": _masked_mean(pos_logit_E, valid_E)[0],
        "accidental_hit_rate": _masked_mean(hit_ExR.mean(axis=-1), valid_E)[0],
    }
    return loss, metrics


def sampled_softmax_loss(
    hidden_BxLxD: jax.Array,
    targets_BxL: jax.Array,
    mask_BxL: jax.Array,
    item_table_NxD: jax.Array,
    rng: jax.Array,
    *,
    num_negatives: int = 128,
    negatives: str = "uniform",
    temperature: float = 0.05,
    l2_normalize: bool = True,
    l2_norm_eps: float = 1e-6,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sampled softmax over [positive, negatives]; see the module docstring.

    Metrics: ``loss``, ``num_valid``, ``sampled_accuracy`` (positive beats every unmasked negative),
    ``positive_logit`` (mean, before the temperature), ``accidental_hit_rate``.
    """
    _validate(hidden_BxLxD, targets_BxL, mask_BxL, item_table_NxD)
    validation.check_positive("num_negatives", num_negatives)
    validation.check_positive("temperature", temperature)
    if negatives not in NEGATIVE_SAMPLERS:
        raise ValueError(f"negatives: expected one of {NEGATIVE_SAMPLERS}, got {negatives!r}")
    N = item_table_NxD.shape[0]
    norm = (lambda x: _normalize(x, l2_norm_eps)) if l2_normalize else (lambda x: x)
    targets_BxL = targets_BxL.astype(jnp.int32)
    valid_BxL = mask_BxL & (targets_BxL > 0)

    query_BxLxD = norm(hidden_BxLxD.astype(jnp.float32))
    positive_BxLxD = norm(item_table_NxD[targets_BxL].astype(jnp.float32))
    pos_logit_BxL = jnp.sum(query_BxLxD * positive_BxLxD, axis=-1)

    neg_ids = sample_negative_ids(rng, targets_BxL, valid_BxL, N, num_negatives, negatives)
    if negatives == "uniform_per_position":
        neg_BxLxRxD = norm(item_table_NxD[neg_ids].astype(jnp.float32))
        neg_logit_BxLxR = jnp.einsum("bld,blrd->blr", query_BxLxD, neg_BxLxRxD)
        hit_BxLxR = neg_ids == targets_BxL[..., None]
    else:
        neg_RxD = norm(item_table_NxD[neg_ids].astype(jnp.float32))
        neg_logit_BxLxR = jnp.einsum("bld,rd->blr", query_BxLxD, neg_RxD)
        hit_BxLxR = (neg_ids[None, None, :] == targets_BxL[..., None]) | (neg_ids == 0)[None, None, :]

    return softmax_over_sampled(pos_logit_BxL, neg_logit_BxLxR, hit_BxLxR, valid_BxL, temperature)


def bce_loss(
    hidden_BxLxD: jax.Array,
    targets_BxL: jax.Array,
    mask_BxL: jax.Array,
    item_table_NxD: jax.Array,
    rng: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SASRec's binary cross-entropy with one uniform negative per position (raw dot products).

    Metrics: ``loss``, ``num_valid``, ``sampled_accuracy`` (positive logit > negative logit),
    ``accidental_hit_rate``.
    """
    _validate(hidden_BxLxD, targets_BxL, mask_BxL, item_table_NxD)
    B, L, _ = hidden_BxLxD.shape
    N = item_table_NxD.shape[0]
    targets_BxL = targets_BxL.astype(jnp.int32)
    valid_BxL = mask_BxL & (targets_BxL > 0)
    neg_ids_BxL = jax.random.randint(rng, (B, L), 1, N, dtype=jnp.int32)
    hit_BxL = neg_ids_BxL == targets_BxL
    h_BxLxD = hidden_BxLxD.astype(jnp.float32)
    table_NxD = item_table_NxD.astype(jnp.float32)
    pos_logit_BxL = jnp.sum(h_BxLxD * table_NxD[targets_BxL], axis=-1)
    neg_logit_BxL = jnp.sum(h_BxLxD * table_NxD[neg_ids_BxL], axis=-1)
    # -log sigmoid(x) = softplus(-x); -log(1 - sigmoid(x)) = softplus(x)
    per_position_BxL = jax.nn.softplus(-pos_logit_BxL) + jnp.where(
        hit_BxL, 0.0, jax.nn.softplus(neg_logit_BxL)
    )
    loss, count = _masked_mean(per_position_BxL, valid_BxL)
    metrics = {
        "loss": loss,
        "num_valid": count,
        "sampled_accuracy": _masked_mean((pos_logit_BxL > neg_logit_BxL).astype(jnp.float32), valid_BxL)[0],
        "accidental_hit_rate": _masked_mean(hit_BxL.astype(jnp.float32), valid_BxL)[0],
    }
    return loss, metrics
