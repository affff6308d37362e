"""HSTU ("Actions Speak Louder than Words", Zhai et al., ICML'24) for sequential retrieval.

Architecture (generative-recommenders research/modeling/sequential/hstu.py, ML-1M config
configs/ml-1m/hstu-sampled-softmax-n128-final.gin):
  x_0 = dropout(E[item] * sqrt(D) + P[position]) * valid          (same input preprocessor as SASRec)
  per block (sequential transduction unit):
    u, v, q, k = split(silu(LN(x) W_uvqk))                         (W_uvqk: D -> H*(2V + 2A), no bias)
    a = sum_s causal silu(q_t.k_s + rab(t, s)) / n * v_s           (pointwise, no softmax)
    x = x + W_o dropout(u * LN(a))                                 (U-gating instead of an FFN)
  hidden = x
with the tied item table, L2 normalisation and user embedding of :class:`SequentialRecommender`.

Where an MoE goes: HSTU has no FFN; its "FFN path" is the gated output projection ``W_o(u * LN(a))``. The
config field ``ffn`` (default "none", i.e. the paper) appends an extra pre-norm feed-forward sub-layer
``x = x + FFN(LN(x))`` to every block, built by :func:`recjax.layers.feedforward.make_ffn` -- ``ffn="moe"``
makes that an MoE. This is a recjax extension, not in the paper.

Deviations (see also recjax/layers/attention.py): the normaliser n is the constant max_len (GR: the padded
batch length, = max_len + 1 there); the relative bias uses the position bias always and the time bias only
when timestamps are passed (GR adds both, only when timestamps exist; ML-1M here has none); time gaps are
``ts[t] - ts[s]`` (GR uses the next item's time for the query); positions count real items as in SASRec;
no attention dropout (GR's attn_dropout_rate is stored but never used).

Letters: B batch, L sequence, D embed_dim, H heads, A attention_dim (q/k per head), V linear_dim (per head).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from recjax import validation
from recjax.layers.attention import (
    RelativeAttentionBias,
    causal_attention_mask,
    hstu_candidate_attention,
    hstu_pointwise_attention,
)
from recjax.layers.feedforward import ACTIVATIONS, ffn_kinds, make_ffn
from recjax.models.sasrec import SequenceEmbedding, SequentialRecommender


@dataclasses.dataclass(frozen=True)
class HSTUConfig:
    """Defaults: generative-recommenders configs/ml-1m/hstu-sampled-softmax-n128-final.gin (dqk = dv = 50).

    The HSTU-large ML-1M config is num_blocks=8, num_heads=2, attention_dim=linear_dim=25.
    """

    num_items: int
    max_len: int = 200
    embed_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    attention_dim: int = 50  # per head (GR dqk)
    linear_dim: int = 50  # per head (GR dv)
    dropout: float = 0.2  # embedding dropout and the dropout before W_o (GR linear_dropout_rate)
    use_relative_bias: bool = True
    num_position_buckets: int = 200  # relative distances 0..P-1 (larger ones share the last bucket)
    num_time_buckets: int = 128  # GR: 128 log buckets of the time gap
    ffn: str = "none"  # "none" (paper) or a recjax.layers.feedforward kind added after each block
    ffn_hidden_dim: int = 50
    ffn_activation: str = "relu"
    ffn_options: tuple[tuple[str, Any], ...] = ()
    l2_normalize: bool = True
    l2_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        for name in (
            "num_items",
            "max_len",
            "embed_dim",
            "num_blocks",
            "num_heads",
            "attention_dim",
            "linear_dim",
            "num_position_buckets",
            "num_time_buckets",
            "ffn_hidden_dim",
        ):
            validation.check_positive(f"hstu.{name}", getattr(self, name))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"hstu.dropout: expected a rate in [0, 1), got {self.dropout}")
        if self.ffn != "none" and self.ffn not in ffn_kinds():
            raise ValueError(f"hstu.ffn: expected 'none' or one of {ffn_kinds()}, got {self.ffn!r}")
        if self.ffn_activation not in ACTIVATIONS:
            raise ValueError(
                f"hstu.ffn_activation: expected one of {sorted(ACTIVATIONS)}, got {self.ffn_activation!r}"
            )


def _plain_layer_norm(d: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # GR normalises with F.layer_norm, without learned scale/bias.
    return nnx.LayerNorm(d, epsilon=eps, use_scale=False, use_bias=False, rngs=rngs)


class HSTUBlock(nnx.Module):
    """One sequential transduction unit (plus the optional FFN sub-layer)."""

    def __init__(self, cfg: HSTUConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        D, H, A, V = cfg.embed_dim, cfg.num_heads, cfg.attention_dim, cfg.linear_dim
        self.input_norm = _plain_layer_norm(D, cfg.layer_norm_eps, rngs)
        self.uvqk = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (D, H * (2 * V + 2 * A)), jnp.float32)
        )
        self.relative_bias = (
            RelativeAttentionBias(cfg.num_position_buckets, cfg.num_time_buckets, rngs=rngs)
            if cfg.use_relative_bias
            else None
        )
        self.attn_norm = _plain_layer_norm(H * V, cfg.layer_norm_eps, rngs)
        self.out_dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.out_proj = nnx.Linear(H * V, D, kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs)
        if cfg.ffn != "none":
            self.ffn_norm = _plain_layer_norm(D, cfg.layer_norm_eps, rngs)
            self.ffn = make_ffn(
                cfg.ffn,
                D,
                cfg.ffn_hidden_dim,
                activation=cfg.ffn_activation,
                dropout=cfg.dropout,
                rngs=rngs,
                **dict(cfg.ffn_options),
            )
        else:
            self.ffn_norm = None
            self.ffn = None

    def _uvqk(self, x_BxTxD: jax.Array):
        cfg = self.config
        B, T, _ = x_BxTxD.shape
        H, A, V = cfg.num_heads, cfg.attention_dim, cfg.linear_dim
        uvqk_BxTxF = jax.nn.silu(self.input_norm(x_BxTxD) @ self.uvqk[...])
        u, v, q, k = jnp.split(uvqk_BxTxF, [H * V, 2 * H * V, 2 * H * V + H * A], axis=-1)
        return u, v.reshape(B, T, H, V), q.reshape(B, T, H, A), k.reshape(B, T, H, A)

    def _update(
        self, x_BxTxD: jax.Array, u_BxTxHV: jax.Array, attn_BxTxHxV: jax.Array, valid_BxT
    ) -> jax.Array:
        B, T, _ = x_BxTxD.shape
        gated_BxTxHV = u_BxTxHV * self.attn_norm(attn_BxTxHxV.reshape(B, T, -1))
        x_BxTxD = x_BxTxD + self.out_proj(self.out_dropout(gated_BxTxHV))
        if self.ffn is not None:
            x_BxTxD = x_BxTxD + self.ffn(self.ffn_norm(x_BxTxD), valid_BxT)
        return x_BxTxD * valid_BxT[..., None]

    def __call__(
        self,
        x_BxLxD: jax.Array,
        valid_BxL: jax.Array,
        allowed_BxLxL: jax.Array,
        timestamps_BxL: jax.Array | None,
    ) -> jax.Array:
        L = x_BxLxD.shape[1]
        u_BxLxHV, v_BxLxHxV, q_BxLxHxA, k_BxLxHxA = self._uvqk(x_BxLxD)
        bias_BxLxL = None if self.relative_bias is None else self.relative_bias(L, timestamps_BxL)
        attn_BxLxHxV = hstu_pointwise_attention(
            q_BxLxHxA, k_BxLxHxA, v_BxLxHxV, bias_BxLxL, allowed_BxLxL, self.config.max_len
        )
        return self._update(x_BxLxD, u_BxLxHV, attn_BxLxHxV, valid_BxL)

    def with_candidates(
        self,
        x_BxLxD: jax.Array,
        cand_BxCxD: jax.Array,
        valid_BxL: jax.Array,
        allowed_BxLxL: jax.Array,
        timestamps_BxL: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array]:
        """The block over [history; candidates]: history causal (as ``__call__``), each candidate attending
        to the history and itself (:func:`hstu_candidate_attention`). -> (history, candidates)."""
        _, v_h, _, k_h = self._uvqk(x_BxLxD)
        u_c, v_c, q_c, k_c = self._uvqk(cand_BxCxD)
        attn_c = hstu_candidate_attention(q_c, k_c, v_c, k_h, v_h, valid_BxL, self.config.max_len)
        cand_valid_BxC = jnp.ones(cand_BxCxD.shape[:2], bool)
        new_x = self(x_BxLxD, valid_BxL, allowed_BxLxL, timestamps_BxL)
        return new_x, self._update(cand_BxCxD, u_c, attn_c, cand_valid_BxC)


class HSTU(SequentialRecommender):
    """``model(inputs_BxL, mask_BxL, timestamps_BxL=None) -> hidden_BxLxD`` (float32, causal)."""

    def __init__(self, cfg: HSTUConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embedding = SequenceEmbedding(cfg.num_items, cfg.max_len, cfg.embed_dim, cfg.dropout, rngs=rngs)
        self.blocks = nnx.List([HSTUBlock(cfg, rngs=rngs) for _ in range(cfg.num_blocks)])

    def __call__(
        self, inputs_BxL: jax.Array, mask_BxL: jax.Array, timestamps_BxL: jax.Array | None = None
    ) -> jax.Array:
        valid_BxL = self._valid(inputs_BxL, mask_BxL)
        if timestamps_BxL is not None:
            validation.check_shape("timestamps_BxL", timestamps_BxL, inputs_BxL.shape)
            validation.check_dtype("timestamps_BxL", timestamps_BxL, "iuf")
        inputs_BxL = inputs_BxL.astype(jnp.int32)
        allowed_BxLxL = causal_attention_mask(valid_BxL)
        x_BxLxD = self.embedding(inputs_BxL, valid_BxL)
        for block in self.blocks:
            x_BxLxD = block(x_BxLxD, valid_BxL, allowed_BxLxL, timestamps_BxL)
        return x_BxLxD.astype(jnp.float32)

    def with_candidates(
        self,
        inputs_BxL: jax.Array,
        mask_BxL: jax.Array,
        candidates_BxC: jax.Array,
        timestamps_BxL: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Target-aware HSTU: candidate tokens (item ids, (B, C)) appended after the history; history
        causal, each candidate attends to the history and itself. -> (hidden_BxLxD, candidates_BxCxD);
        a candidate's output does not depend on the other candidates."""
        valid_BxL = self._valid(inputs_BxL, mask_BxL)
        validation.check_shape("candidates_BxC", candidates_BxC, (inputs_BxL.shape[0], None))
        validation.check_range("candidates_BxC", candidates_BxC, 1, self.config.num_items + 1)
        allowed_BxLxL = causal_attention_mask(valid_BxL)
        x_BxLxD = self.embedding(inputs_BxL.astype(jnp.int32), valid_BxL)
        c_BxCxD = self.embedding.items[...][candidates_BxC.astype(jnp.int32)] * math.sqrt(
            self.config.embed_dim
        )
        for block in self.blocks:
            x_BxLxD, c_BxCxD = block.with_candidates(
                x_BxLxD, c_BxCxD, valid_BxL, allowed_BxLxL, timestamps_BxL
            )
        return x_BxLxD.astype(jnp.float32), c_BxCxD.astype(jnp.float32)
