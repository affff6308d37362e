"""Causal self-attention for sequential recommenders on left-padded batches.

- :func:`causal_attention_mask`: (B, L, L) bool, query t may see key s iff s <= t and s is a real item. A
  query always sees itself, so padded rows never have an empty softmax (their outputs are garbage but
  finite, and they are never read by real positions).
- :class:`CausalSelfAttention`: SASRec's multi-head softmax attention (``torch.nn.MultiheadAttention`` as
  used by generative-recommenders: separate query and key/value inputs, biased query/value/output
  projections, dropout on the attention probabilities; the key bias is left out because it cannot change
  the output).
- :class:`RelativeAttentionBias` and :func:`hstu_pointwise_attention`: HSTU's attention ("Actions Speak
  Louder than Words", Zhai et al. 2024): ``A = silu(Q K^T + rab) / n`` masked causally, ``out = A V``,
  no softmax. ``rab`` is a learned scalar per relative-position bucket (and, when timestamps are given, per
  log-time-gap bucket), shared by all heads.

Deviations from generative-recommenders (research/modeling/sequential/hstu.py), documented in docs/MODELS.md:
- ``n`` (the normaliser) is a constant ``norm_length`` (the model's max_len); GR divides by the padded
  length of its batch, which is max_len(+1) there because it pads every batch to the maximum. A constant
  keeps outputs independent of how much padding a batch carries.
- Relative positions are bucketed as ``min(t - s, num_position_buckets - 1)``; GR keeps one weight per
  offset (num_position_buckets = max_len gives the same).
- The time bias uses ``ts[t] - ts[s]`` (query's own time); GR uses the *next* item's time for the query.
  MovieLens-1M sequential data here has no timestamps, so by default only the position bias is used.

Letters: B batch, L sequence (queries), S keys (= L for self-attention), C appended candidates, D model dim,
H heads, A per-head q/k dim, V per-head value dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from recjax import validation

_NEG_INF = -1e9  # finite so fully-masked rows cannot produce NaN


def causal_attention_mask(valid_BxL: jax.Array) -> jax.Array:
    """(B, L, L) bool: [b, t, s] = s <= t and (key s is valid or s == t)."""
    L = valid_BxL.shape[-1]
    causal_LxL = jnp.tril(jnp.ones((L, L), dtype=bool))
    eye_LxL = jnp.eye(L, dtype=bool)
    return causal_LxL[None] & (valid_BxL[:, None, :] | eye_LxL[None])


class CausalSelfAttention(nnx.Module):
    """Softmax multi-head attention: ``attn(query_BxLxD, kv_BxSxD, allowed_BxLxS) -> BxLxD``.

    Self-attention (SASRec: S = L, causal mask) or cross-attention (LIME's links querying the history:
    L = links, S = history); every query row needs at least one allowed key."""

    def __init__(self, d_model: int, num_heads: int, *, dropout: float = 0.0, rngs: nnx.Rngs):
        validation.check_positive("d_model", d_model)
        validation.check_positive("num_heads", num_heads)
        if d_model % num_heads:
            raise ValueError(f"num_heads: expected a divisor of d_model={d_model}, got {num_heads}")
        self.num_heads = num_heads
        init = nnx.initializers.xavier_normal()
        self.q_proj = nnx.Linear(d_model, d_model, kernel_init=init, rngs=rngs)
        # No key bias: it adds q.b_k to every logit of a row, which softmax ignores, so its gradient is
        # rounding noise that Adam would amplify into lr-sized random steps (torch's MHA has one; a no-op).
        self.k_proj = nnx.Linear(d_model, d_model, use_bias=False, kernel_init=init, rngs=rngs)
        self.v_proj = nnx.Linear(d_model, d_model, kernel_init=init, rngs=rngs)
        self.out_proj = nnx.Linear(d_model, d_model, kernel_init=init, rngs=rngs)
        self.attn_dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(
        self,
        query_BxLxD: jax.Array,
        kv_BxLxD: jax.Array,
        allowed_BxLxL: jax.Array,
        bias_BxHxLxS: jax.Array | None = None,
    ) -> jax.Array:
        """``bias_BxHxLxS`` (optional, broadcastable): added to the logits before the softmax."""
        B, L, D = query_BxLxD.shape
        S = kv_BxLxD.shape[1]
        H = self.num_heads
        q_BxLxHxA = self.q_proj(query_BxLxD).reshape(B, L, H, D // H)
        k_BxLxHxA = self.k_proj(kv_BxLxD).reshape(B, S, H, D // H)
        v_BxLxHxA = self.v_proj(kv_BxLxD).reshape(B, S, H, D // H)
        logits_BxHxLxL = jnp.einsum("bthd,bshd->bhts", q_BxLxHxA, k_BxLxHxA) / math.sqrt(D // H)
        if bias_BxHxLxS is not None:
            logits_BxHxLxL = logits_BxHxLxL + bias_BxHxLxS
        logits_BxHxLxL = jnp.where(allowed_BxLxL[:, None], logits_BxHxLxL, _NEG_INF)
        probs_BxHxLxL = self.attn_dropout(jax.nn.softmax(logits_BxHxLxL, axis=-1))
        out_BxLxHxA = jnp.einsum("bhts,bshd->bthd", probs_BxHxLxL, v_BxLxHxA)
        return self.out_proj(out_BxLxHxA.reshape(B, L, D))


def log_time_bucket(delta, num_time_buckets: int):
    """GR's bucketisation: floor(ln(max(|delta|, 1)) / 0.301), clipped to [0, num_time_buckets]."""
    delta = jnp.abs(delta).astype(jnp.float32)
    bucket = jnp.floor(jnp.log(jnp.maximum(delta, 1.0)) / 0.301).astype(jnp.int32)
    return jnp.clip(bucket, 0, num_time_buckets)


class RelativeAttentionBias(nnx.Module):
    """``rab(L, timestamps_BxL=None) -> (1 or B, L, L)``: learned bias by relative position (and time gap).

    Entry [t, s] = pos_w[min(t - s, P - 1)] (+ ts_w[log_time_bucket(ts[t] - ts[s])] with timestamps); the
    upper triangle (s > t) holds pos_w[0] too but is always masked by the caller.
    """

    def __init__(self, num_position_buckets: int, num_time_buckets: int = 128, *, rngs: nnx.Rngs):
        validation.check_positive("num_position_buckets", num_position_buckets)
        validation.check_positive("num_time_buckets", num_time_buckets)
        self.num_position_buckets = num_position_buckets
        self.num_time_buckets = num_time_buckets
        init = nnx.initializers.normal(0.02)
        self.pos_w = nnx.Param(init(rngs.params(), (num_position_buckets,), jnp.float32))
        self.ts_w = nnx.Param(init(rngs.params(), (num_time_buckets + 1,), jnp.float32))

    def position_buckets(self, L: int) -> jax.Array:
        pos_L = jnp.arange(L)
        dist_LxL = jnp.maximum(pos_L[:, None] - pos_L[None, :], 0)
        return jnp.minimum(dist_LxL, self.num_position_buckets - 1)

    def __call__(self, L: int, timestamps_BxL: jax.Array | None = None) -> jax.Array:
        bias_1xLxL = self.pos_w[...][self.position_buckets(L)][None]
        if timestamps_BxL is None:
            return bias_1xLxL
        delta_BxLxL = timestamps_BxL[:, :, None] - timestamps_BxL[:, None, :]
        return bias_1xLxL + self.ts_w[...][log_time_bucket(delta_BxLxL, self.num_time_buckets)]


def hstu_pointwise_attention(
    q_BxLxHxA: jax.Array,
    k_BxLxHxA: jax.Array,
    v_BxLxHxV: jax.Array,
    bias_BxLxL: jax.Array | None,
    allowed_BxLxL: jax.Array,
    norm_length: int,
) -> jax.Array:
    """HSTU attention (plain jax.numpy): ``sum_s [allowed] silu(q_t.k_s + bias_ts) / norm_length * v_s``.

    ``bias_BxLxL`` (B may be 1) is shared across heads. Returns (B, L, H, V).
    """
    logits_BxHxLxL = jnp.einsum("bthd,bshd->bhts", q_BxLxHxA, k_BxLxHxA)
    if bias_BxLxL is not None:
        logits_BxHxLxL = logits_BxHxLxL + bias_BxLxL[:, None]
    weights_BxHxLxL = jax.nn.silu(logits_BxHxLxL) / norm_length
    weights_BxHxLxL = jnp.where(allowed_BxLxL[:, None], weights_BxHxLxL, 0.0)
    return jnp.einsum("bhts,bshd->bthd", weights_BxHxLxL, v_BxLxHxV)


def hstu_candidate_attention(
    q_cand_BxCxHxA: jax.Array,
    k_cand_BxCxHxA: jax.Array,
    v_cand_BxCxHxV: jax.Array,
    k_hist_BxLxHxA: jax.Array,
    v_hist_BxLxHxV: jax.Array,
    valid_BxL: jax.Array,
    norm_length: int,
) -> jax.Array:
    """HSTU target attention of appended candidates (plain jax.numpy): each candidate attends to every real
    history item and to itself only, ``sum_s silu(q_c . k_s) / n * v_s + silu(q_c . k_c) / n * v_c``, so a
    candidate's output never depends on the other candidates. O(C L) instead of the (L + C)^2 of a dense
    mask. No relative bias on candidate rows (they have no position of their own). -> (B, C, H, V)."""
    w_BxHxCxL = jax.nn.silu(jnp.einsum("bcha,blha->bhcl", q_cand_BxCxHxA, k_hist_BxLxHxA)) / norm_length
    w_BxHxCxL = jnp.where(valid_BxL[:, None, None, :], w_BxHxCxL, 0.0)
    out_BxCxHxV = jnp.einsum("bhcl,blhv->bchv", w_BxHxCxL, v_hist_BxLxHxV)
    self_BxCxH = jax.nn.silu(jnp.sum(q_cand_BxCxHxA * k_cand_BxCxHxA, axis=-1)) / norm_length
    return out_BxCxHxV + self_BxCxH[..., None] * v_cand_BxCxHxV
