"""SASRec (Kang & McAuley, ICDM'18) as trained by generative-recommenders (sampled softmax, L2-normalised).

Architecture (matching generative-recommenders research/modeling/sequential/sasrec.py, ML-1M config
configs/ml-1m/sasrec-sampled-softmax-n128-final.gin):
  x_0 = dropout(E[item] * sqrt(D) + P[position]) * valid
  per block:  q = LN(x);  a = MHA(query=q, key/value=x, causal);  y = LN(q + a);  x = (y + FFN(y)) * valid
  hidden = x  (no final LayerNorm in GR; ``final_layer_norm=True`` gives the original paper's)
The output/scoring table is the input item embedding E (tied, row 0 = padding). ``normalize`` (L2, GR's
``L2NormEmbeddingPostprocessor`` + ``item_l2_norm``) is applied by the loss and by evaluation, not inside
``__call__``, so the hidden states stay the raw encoder outputs.

Deviations: positions count real items from the oldest one (cumsum of the mask) instead of columns, which is
what GR's right-padded batches do and makes outputs independent of extra left padding. LayerNorms have no
learned affine by default (GR calls ``F.layer_norm`` without weights); ``layer_norm_affine=True`` adds them.

Letters: B batch, L sequence (<= max_len), D embed_dim, N num_items + 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from recjax import validation
from recjax.layers.attention import CausalSelfAttention, causal_attention_mask
from recjax.layers.feedforward import ACTIVATIONS, ffn_kinds, make_ffn
from recjax.sharding import embedding as embedding_lib
from recjax.train.losses import l2_normalize


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
    """Defaults: generative-recommenders configs/ml-1m/sasrec-sampled-softmax-n128-final.gin."""

    num_items: int
    max_len: int = 200
    embed_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2  # embedding, attention-probability and FFN dropout (GR uses one rate)
    ffn: str = "dense"  # recjax.layers.feedforward kind ("dense", "moe", or registered)
    ffn_hidden_dim: int = 50
    ffn_activation: str = "relu"
    ffn_options: tuple[
        tuple[str, Any], ...
    ] = ()  # extra kwargs for the FFN factory, e.g. (("num_experts", 8),)
    l2_normalize: bool = True
    l2_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-8
    layer_norm_affine: bool = False
    final_layer_norm: bool = False

    def __post_init__(self):
        for name in ("num_items", "max_len", "embed_dim", "num_blocks", "num_heads", "ffn_hidden_dim"):
            validation.check_positive(f"sasrec.{name}", getattr(self, name))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"sasrec.dropout: expected a rate in [0, 1), got {self.dropout}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"sasrec.num_heads: expected a divisor of embed_dim={self.embed_dim}, got {self.num_heads}"
            )
        if self.ffn not in ffn_kinds():
            raise ValueError(f"sasrec.ffn: expected one of {ffn_kinds()}, got {self.ffn!r}")
        if self.ffn_activation not in ACTIVATIONS:
            raise ValueError(
                f"sasrec.ffn_activation: expected one of {sorted(ACTIVATIONS)}, got {self.ffn_activation!r}"
            )


def validate_sequence_inputs(inputs_BxL, mask_BxL, *, num_items: int, max_len: int) -> None:
    """The public-boundary checks shared by the sequential models (value checks skipped under jit)."""
    if inputs_BxL.ndim != 2:
        raise ValueError(f"inputs_BxL: expected shape (B, L), got {tuple(inputs_BxL.shape)}")
    validation.check_dtype("inputs_BxL", inputs_BxL, "iu")
    if inputs_BxL.shape[1] > max_len:
        raise ValueError(f"inputs_BxL: expected L <= max_len={max_len}, got shape {tuple(inputs_BxL.shape)}")
    validation.check_shape("mask_BxL", mask_BxL, inputs_BxL.shape)
    validation.check_dtype("mask_BxL", mask_BxL, "b")
    validation.check_range("inputs_BxL", inputs_BxL, 0, num_items + 1)


class SequenceEmbedding(nnx.Module):
    """Item table (tied output table) + learned absolute positions, GR's input preprocessor."""

    def __init__(self, num_items: int, max_len: int, embed_dim: int, dropout: float, *, rngs: nnx.Rngs):
        self.embed_dim = embed_dim
        self.max_len = max_len
        # GR: items truncated-normal std 0.02, positions truncated-normal std sqrt(1/D).
        item_init = nnx.initializers.truncated_normal(0.02)
        pos_init = nnx.initializers.truncated_normal(math.sqrt(1.0 / embed_dim))
        # Logical axes: sharding the table's rows is the rule {"vocab": <mesh axis>} (recjax.sharding.mesh).
        self.items = nnx.Param(
            item_init(rngs.params(), (num_items + 1, embed_dim), jnp.float32), logical_axes=("vocab", "embed")
        )
        self.positions = nnx.Param(pos_init(rngs.params(), (max_len, embed_dim), jnp.float32))
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, inputs_BxL: jax.Array, valid_BxL: jax.Array) -> jax.Array:
        # Position = index among the real items (0 = oldest), so left padding does not shift positions.
        pos_BxL = jnp.clip(jnp.cumsum(valid_BxL, axis=1) - 1, 0, self.max_len - 1)
        # Through the active embedding plan (row-/table-wise all-to-all lookups); a plain gather without one.
        items_BxLxD = embedding_lib.lookup(self.items[...], inputs_BxL, "items")
        x_BxLxD = items_BxLxD * math.sqrt(self.embed_dim) + self.positions[...][pos_BxL]
        return self.dropout(x_BxLxD) * valid_BxL[..., None]


def _layer_norm(d: int, cfg, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        d,
        epsilon=cfg.layer_norm_eps,
        use_scale=cfg.layer_norm_affine,
        use_bias=cfg.layer_norm_affine,
        rngs=rngs,
    )


class SASRecBlock(nnx.Module):
    def __init__(self, cfg: SASRecConfig, *, rngs: nnx.Rngs):
        d = cfg.embed_dim
        self.query_norm = _layer_norm(d, cfg, rngs)
        self.attention = CausalSelfAttention(d, cfg.num_heads, dropout=cfg.dropout, rngs=rngs)
        self.ffn_norm = _layer_norm(d, cfg, rngs)
        self.ffn = make_ffn(
            cfg.ffn,
            d,
            cfg.ffn_hidden_dim,
            activation=cfg.ffn_activation,
            dropout=cfg.dropout,
            rngs=rngs,
            **dict(cfg.ffn_options),
        )

    def __call__(self, x_BxLxD: jax.Array, valid_BxL: jax.Array, allowed_BxLxL: jax.Array) -> jax.Array:
        q_BxLxD = self.query_norm(x_BxLxD)
        y_BxLxD = self.ffn_norm(q_BxLxD + self.attention(q_BxLxD, x_BxLxD, allowed_BxLxL))
        y_BxLxD = y_BxLxD + self.ffn(y_BxLxD, valid_BxL)
        return y_BxLxD * valid_BxL[..., None]


class SequentialRecommender(nnx.Module):
    """Shared public surface of SASRec and HSTU (tied item table, normalisation, user embedding)."""

    config: Any
    embedding: SequenceEmbedding

    def item_embeddings(self) -> jax.Array:
        """(num_items + 1, D) raw scoring table, tied with the input item embedding; row 0 = padding."""
        return self.embedding.items[...]

    def normalize(self, x: jax.Array) -> jax.Array:
        """The one normalisation of queries and items used by loss and eval (identity if not l2_normalize)."""
        return l2_normalize(x, self.config.l2_norm_eps) if self.config.l2_normalize else x

    def candidate_embeddings(self) -> jax.Array:
        """``normalize(item_embeddings())``: the table retrieval scores against."""
        return self.normalize(self.item_embeddings())

    def user_embedding(self, hidden_BxLxD: jax.Array) -> jax.Array:
        """(B, D) retrieval query: the last (most recent, left-padded) position, normalised."""
        if hidden_BxLxD.ndim != 3:
            raise ValueError(f"hidden_BxLxD: expected shape (B, L, D), got {tuple(hidden_BxLxD.shape)}")
        return self.normalize(hidden_BxLxD[:, -1, :])

    def _valid(self, inputs_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
        validate_sequence_inputs(
            inputs_BxL, mask_BxL, num_items=self.config.num_items, max_len=self.config.max_len
        )
        return mask_BxL & (inputs_BxL != 0)


class SASRec(SequentialRecommender):
    """``model(inputs_BxL, mask_BxL) -> hidden_BxLxD`` (float32, causal)."""

    def __init__(self, cfg: SASRecConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embedding = SequenceEmbedding(cfg.num_items, cfg.max_len, cfg.embed_dim, cfg.dropout, rngs=rngs)
        self.blocks = nnx.List([SASRecBlock(cfg, rngs=rngs) for _ in range(cfg.num_blocks)])
        self.final_norm = _layer_norm(cfg.embed_dim, cfg, rngs) if cfg.final_layer_norm else None

    def __call__(self, inputs_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
        valid_BxL = self._valid(inputs_BxL, mask_BxL)
        inputs_BxL = inputs_BxL.astype(jnp.int32)
        allowed_BxLxL = causal_attention_mask(valid_BxL)
        x_BxLxD = self.embedding(inputs_BxL, valid_BxL)
        for block in self.blocks:
            x_BxLxD = block(x_BxLxD, valid_BxL, allowed_BxLxL)
        if self.final_norm is not None:
            x_BxLxD = self.final_norm(x_BxLxD) * valid_BxL[..., None]
        return x_BxLxD.astype(jnp.float32)
