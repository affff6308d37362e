"""LIME building blocks ("Link-based user-item Interaction Modeling with decoupled XOR attention",
Jiang et al., arXiv 2510.18239): link embeddings, their personalization over the history, and the
candidate side that depends on the item alone.

- :class:`LinkEmbeddings`: R learned link embeddings (R << L), optionally contextualized per user: an MLP of
  the user's categorical features adds a (R, D) offset (``contextualize``).
- Personalization, two kinds:
  * :class:`LinkAttentionBlock` (LIME-MHA): the links are the queries of softmax multi-head attention over
    the history (pre-norm, residual, feed-forward); O(R L) per block.
  * :class:`LimeXorBlock` (LIME-XOR): an HSTU-style unit (pointwise ``silu`` attention, U-gating, no
    softmax) over the joint sequence [links; history] with the XOR mask: a link attends to every real
    history item, a history item to every link, and nothing else (no history<->history, no link<->link).
    :func:`xor_pointwise_attention` computes the two R x L blocks only, so a block is O(R L), never
    O((R + L)^2).
- Candidate side: :func:`link_weights` ``A = softmax(T L0^T / sqrt(D))`` from the item embedding T and the
  global (not personalized, not contextualized) links L0, so it is a function of the item alone and can be
  cached (:class:`LimeItemCache`); a candidate's representation is ``A . L_personal``
  (:func:`combine_links`), O(R D) per candidate, then :class:`CandidateScorer` (cosine/dot with the item
  embedding, or a shallow MLP of [c, t, c * t]).

Where this follows the paper's notes and where it had to choose (documented in docs/LIME.md): phi is a
softmax over the links; the XOR attention normalises a link's sum over history items by the constant
``norm_length`` (the model's max_len, as HSTU does, so outputs do not depend on padding) and a history
item's sum over links by R; the projections of the XOR unit are shared by links and history items (one
unit over the joint sequence); positions are added to the history embedding only.

Letters: B batch, L history length, R links (the paper's l), C candidates, N item rows, D model dim,
H heads, A per-head q/k dim, V per-head value dim, U user feature fields.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from recjax import validation
from recjax.layers.attention import CausalSelfAttention
from recjax.layers.feedforward import PointwiseFeedForward
from recjax.ops import lime_xor as lime_xor_ops

SCORERS = ("dot", "mlp")


def _plain_layer_norm(d: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(d, epsilon=eps, use_scale=False, use_bias=False, rngs=rngs)


class LinkEmbeddings(nnx.Module):
    """``links(batch_size, user_features_BxU=None) -> links_BxRxD``; ``base()`` is L0 (R, D).

    ``user_feature_sizes``: the number of codes of each categorical user field (codes 1..size, 0 = missing);
    with ``contextualize`` the links become ``L0 + MLP(concat(field embeddings))`` per user."""

    def __init__(
        self,
        num_links: int,
        dim: int,
        *,
        contextualize: bool = False,
        user_feature_sizes: Sequence[int] = (),
        context_hidden: int = 64,
        rngs: nnx.Rngs,
    ):
        validation.check_positive("num_links", num_links)
        validation.check_positive("dim", dim)
        self.num_links, self.dim = num_links, dim
        self.links = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (num_links, dim), jnp.float32))
        self.contextualize = bool(contextualize)
        self.user_feature_sizes = tuple(int(s) for s in user_feature_sizes)
        if self.contextualize and not self.user_feature_sizes:
            raise ValueError(
                "user_feature_sizes: contextualize=True needs at least one user feature field (the dataset "
                "has no user features?); set contextualize=False"
            )
        if self.contextualize:
            for i, size in enumerate(self.user_feature_sizes):
                validation.check_positive(f"user_feature_sizes[{i}]", size)
            validation.check_positive("context_hidden", context_hidden)
            field_dim = max(4, dim // 4)
            self.fields = nnx.List([nnx.Embed(s + 1, field_dim, rngs=rngs) for s in self.user_feature_sizes])
            self.context_up = nnx.Linear(field_dim * len(self.user_feature_sizes), context_hidden, rngs=rngs)
            # Zero-initialised output: training starts from the shared links and learns the offsets.
            self.context_down = nnx.Linear(
                context_hidden, num_links * dim, kernel_init=nnx.initializers.zeros, rngs=rngs
            )

    def base(self) -> jax.Array:
        return self.links[...]

    def __call__(self, batch_size: int, user_features_BxU: jax.Array | None = None) -> jax.Array:
        links_BxRxD = jnp.broadcast_to(self.links[...], (batch_size, self.num_links, self.dim))
        if not self.contextualize:
            return links_BxRxD
        if user_features_BxU is None:
            raise ValueError(
                f"user_features_BxU: this model contextualizes its links with {len(self.user_feature_sizes)} "
                "user feature fields; pass them (or build it with contextualize=False)"
            )
        validation.check_shape("user_features_BxU", user_features_BxU, (batch_size, len(self.fields)))
        validation.check_dtype("user_features_BxU", user_features_BxU, "iu")
        for i, size in enumerate(self.user_feature_sizes):
            validation.check_range(f"user_features_BxU[:, {i}]", user_features_BxU[:, i], 0, size + 1)
        fields_BxF = jnp.concatenate(
            [emb(user_features_BxU[:, i].astype(jnp.int32)) for i, emb in enumerate(self.fields)], axis=-1
        )
        offset_BxRD = self.context_down(jax.nn.silu(self.context_up(fields_BxF)))
        return links_BxRxD + offset_BxRD.reshape(batch_size, self.num_links, self.dim)


class LinkRecencyBias(nnx.Module):
    """``bias(distance_BxKxL) -> (B, K, H, R, L)``: a learned logit offset per head, link and distance of a
    history item from the request's most recent visible item (0 = most recent; distances >= P share the
    last bucket). The links get their own recency profiles (one may read the last item, another the long
    term); HSTU's relative attention bias plays this role between history items."""

    def __init__(self, num_heads: int, num_links: int, num_buckets: int, *, rngs: nnx.Rngs):
        validation.check_positive("num_position_buckets", num_buckets)
        self.num_buckets = num_buckets
        self.weights = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (num_heads, num_links, num_buckets))
        )

    @classmethod
    def optional(
        cls, num_heads: int, num_links: int, num_buckets: int, rngs: nnx.Rngs
    ) -> LinkRecencyBias | None:
        """The bias, or None when ``num_buckets`` is 0 (no recency bias)."""
        return cls(num_heads, num_links, num_buckets, rngs=rngs) if num_buckets else None

    def __call__(self, distance_BxKxL: jax.Array) -> jax.Array:
        bucket_BxKxL = jnp.clip(distance_BxKxL, 0, self.num_buckets - 1)
        w_HxRxP = self.weights[...]
        return jnp.moveaxis(w_HxRxP[:, :, bucket_BxKxL], (0, 1), (2, 3))  # (B, K, H, R, L)


def recency_distance(valid_BxL: jax.Array, visible_BxKxL: jax.Array) -> jax.Array:
    """(B, K, L) int32: for each request, how many visible items are more recent than column l."""
    pos_BxL = jnp.cumsum(valid_BxL, axis=1) - 1  # index among the real items, 0 = oldest
    newest_BxK = jnp.max(jnp.where(visible_BxKxL, pos_BxL[:, None, :], 0), axis=-1)
    return (newest_BxK[:, :, None] - pos_BxL[:, None, :]).astype(jnp.int32)


class LinkAttentionBlock(nnx.Module):
    """LIME-MHA: ``block(links_BxKxRxD, history_BxLxD, valid_BxKxL) -> links_BxKxRxD`` (pre-norm, residual).

    K requests per history (K prefixes of one sequence in training, K = 1 in serving) share the history's
    keys and values; ``valid_BxKxL`` says which history items each request sees."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_hidden: int,
        num_links: int,
        num_position_buckets: int,
        *,
        dropout: float,
        eps: float,
        rngs: nnx.Rngs,
    ):
        self.recency = LinkRecencyBias.optional(num_heads, num_links, num_position_buckets, rngs)
        self.query_norm = _plain_layer_norm(dim, eps, rngs)
        self.kv_norm = _plain_layer_norm(dim, eps, rngs)
        self.attention = CausalSelfAttention(dim, num_heads, dropout=dropout, rngs=rngs)
        self.ffn_norm = _plain_layer_norm(dim, eps, rngs)
        self.ffn = PointwiseFeedForward(dim, ffn_hidden, activation="relu", dropout=dropout, rngs=rngs)

    def __call__(
        self,
        links_BxKxRxD: jax.Array,
        history_BxLxD: jax.Array,
        valid_BxKxL: jax.Array,
        distance_BxKxL: jax.Array | None = None,
    ) -> jax.Array:
        B, K, R, D = links_BxKxRxD.shape
        L = history_BxLxD.shape[1]
        bias = None
        if self.recency is not None:
            bias_BxKxHxRxL = self.recency(distance_BxKxL)
            bias = jnp.moveaxis(bias_BxKxHxRxL, 2, 1).reshape(B, -1, K * R, L)  # (B, H, K R, L)
        # Queries of all K requests in one call; a request without any visible item attends uniformly to
        # zeros (finite).
        allowed_BxKRxL = jnp.broadcast_to(valid_BxKxL[:, :, None, :], (B, K, R, L)).reshape(B, K * R, L)
        q_BxKRxD = self.query_norm(links_BxKxRxD).reshape(B, K * R, D)
        update = self.attention(q_BxKRxD, self.kv_norm(history_BxLxD), allowed_BxKRxL, bias)
        links_BxKxRxD = links_BxKxRxD + update.reshape(B, K, R, D)
        return links_BxKxRxD + self.ffn(self.ffn_norm(links_BxKxRxD))


def xor_pointwise_attention(
    q_links_xRxHxA: jax.Array,
    k_links_xRxHxA: jax.Array,
    v_links_xRxHxV: jax.Array,
    q_hist_xLxHxA: jax.Array,
    k_hist_xLxHxA: jax.Array,
    v_hist_xLxHxV: jax.Array,
    valid_xL: jax.Array,
    norm_length: int,
    bias_xHxRxL: jax.Array | None = None,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """The two blocks of XOR attention (plain jax.numpy, the reference of any kernel):

    ``links_out[r] = sum_{s visible} silu(q_r . k_s) / norm_length * v_s`` and
    ``hist_out[s] = sum_r silu(q_s . k_r) / R * v_r`` (``bias_xHxRxL``, optional, added to the link->history
    logits). Leading dims (``x``: e.g. (B,) or (B, K)) broadcast
    between links, history and ``valid_xL`` (a history shared by K requests has K = 1). -> links
    (..., R, H, V), history (..., L, H, V); the caller zeroes history rows that are padding. The links'
    half, O(R L) and growing with the history, goes through ``recjax.ops.lime_xor`` (``impl``: its XLA
    form or the Pallas kernel); the history's half is pointwise per item and stays in XLA."""
    R = q_links_xRxHxA.shape[-3]
    links_out = lime_xor_ops.xor_link_attention(
        q_links_xRxHxA, k_hist_xLxHxA, v_hist_xLxHxV, valid_xL, norm_length, bias_xHxRxL, impl=impl
    )
    w_xHxLxR = jax.nn.silu(jnp.einsum("...lha,...rha->...hlr", q_hist_xLxHxA, k_links_xRxHxA)) / R
    hist_out = jnp.einsum("...hlr,...rhv->...lhv", w_xHxLxR, v_links_xRxHxV)
    return links_out, hist_out


class LimeXorBlock(nnx.Module):
    """LIME-XOR unit: ``block(links_BxKxRxD, history_BxKxLxD, valid_BxKxL, update_history) -> (links,
    history)``; K (or 1 where shared) requests per sequence as in :class:`LinkAttentionBlock`.

    HSTU's sequential transduction unit (``u, v, q, k = split(silu(LN(z) W))``, ``z += W_o(u * LN(a))``)
    on z = [links; history], with :func:`xor_pointwise_attention` for ``a``. The last block's history
    output is never read, so ``update_history=False`` skips it."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention_dim: int,
        linear_dim: int,
        norm_length: int,
        num_links: int,
        num_position_buckets: int,
        *,
        dropout: float,
        eps: float,
        xor_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.recency = LinkRecencyBias.optional(num_heads, num_links, num_position_buckets, rngs)
        self.xor_impl = xor_impl
        self.num_heads, self.attention_dim, self.linear_dim = num_heads, attention_dim, linear_dim
        self.norm_length = norm_length
        H, A, V = num_heads, attention_dim, linear_dim
        self.input_norm = _plain_layer_norm(dim, eps, rngs)
        self.uvqk = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (dim, H * (2 * V + 2 * A))))
        self.attn_norm = _plain_layer_norm(H * V, eps, rngs)
        self.out_dropout = nnx.Dropout(dropout, rngs=rngs)
        self.out_proj = nnx.Linear(H * V, dim, kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs)

    def _uvqk(self, z_xTxD: jax.Array):
        H, A, V = self.num_heads, self.attention_dim, self.linear_dim
        f = jax.nn.silu(self.input_norm(z_xTxD) @ self.uvqk[...])
        u, v, q, k = jnp.split(f, [H * V, 2 * H * V, 2 * H * V + H * A], axis=-1)
        lead = z_xTxD.shape[:-1]
        return u, v.reshape(lead + (H, V)), q.reshape(lead + (H, A)), k.reshape(lead + (H, A))

    def _out(self, z_xTxD, u_xTxHV, a_xTxHxV):
        gated = u_xTxHV * self.attn_norm(a_xTxHxV.reshape(a_xTxHxV.shape[:-2] + (-1,)))
        return z_xTxD + self.out_proj(self.out_dropout(gated))

    def __call__(
        self,
        links_BxKxRxD: jax.Array,
        history_BxKxLxD: jax.Array,
        valid_BxKxL: jax.Array,
        distance_BxKxL: jax.Array | None = None,
        update_history: bool = True,
    ) -> tuple[jax.Array, jax.Array]:
        ul, vl, ql, kl = self._uvqk(links_BxKxRxD)
        uh, vh, qh, kh = self._uvqk(history_BxKxLxD)
        bias = None if self.recency is None else self.recency(distance_BxKxL)
        links_a, hist_a = xor_pointwise_attention(
            ql, kl, vl, qh, kh, vh, valid_BxKxL, self.norm_length, bias, impl=self.xor_impl
        )
        links_BxKxRxD = self._out(links_BxKxRxD, ul, links_a)
        if update_history:
            history_BxKxLxD = self._out(history_BxKxLxD, uh, hist_a)
        return links_BxKxRxD, history_BxKxLxD


def link_weights(items_NxD: jax.Array, links_RxD: jax.Array) -> jax.Array:
    """``A = softmax(T L0^T / sqrt(D))`` over the links: (N, R) float32, a function of the item alone."""
    logits_NxR = jnp.dot(items_NxD, links_RxD.T, preferred_element_type=jnp.float32)
    return jax.nn.softmax(logits_NxR / math.sqrt(items_NxD.shape[-1]), axis=-1)


def combine_links(weights_xR: jax.Array, personal_BxRxD: jax.Array) -> jax.Array:
    """Candidate representations ``A . L_personal``: weights (C, R) shared by the batch -> (B, C, D), or
    per row (B, C, R) -> (B, C, D)."""
    if weights_xR.ndim == 2:
        return jnp.einsum("cr,brd->bcd", weights_xR, personal_BxRxD)
    return jnp.einsum("bcr,brd->bcd", weights_xR, personal_BxRxD)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LimeItemCache:
    """The item side of LIME, built once from the model's parameters (``LIME.build_item_cache``).

    ``weights_NxR``: link weights A of every item row; ``items_NxD``: the item vectors the scorer reads
    (L2-normalised when the model normalises); ``version``: the model's item version when it was built.
    A model whose items or links changed since (every training step advances the tag) refuses it."""

    weights_NxR: jax.Array
    items_NxD: jax.Array
    version: jax.Array  # uint32 scalar tag


class CandidateScorer(nnx.Module):
    """``scorer(cand_BxCxD, items_BxCxD or CxD) -> logits_BxC``: ``"dot"`` (inner product of the two; the
    model normalises both when it L2-normalises) or ``"mlp"`` (one hidden layer on [c, t, c * t])."""

    def __init__(self, kind: str, dim: int, hidden: int = 64, *, rngs: nnx.Rngs):
        if kind not in SCORERS:
            raise ValueError(f"scorer: expected one of {SCORERS}, got {kind!r}")
        self.kind = kind
        if kind == "mlp":
            validation.check_positive("scorer_hidden", hidden)
            self.up = nnx.Linear(3 * dim, hidden, rngs=rngs)
            self.down = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, cand_BxCxD: jax.Array, items_xD: jax.Array) -> jax.Array:
        items_BxCxD = jnp.broadcast_to(items_xD, cand_BxCxD.shape)
        if self.kind == "dot":
            return jnp.sum(cand_BxCxD * items_BxCxD, axis=-1)
        feats = jnp.concatenate([cand_BxCxD, items_BxCxD, cand_BxCxD * items_BxCxD], axis=-1)
        return self.down(jax.nn.relu(self.up(feats)))[..., 0]
