"""LIME (arXiv 2510.18239) as a complete model: history -> personalized links; candidates scored from the
links through item-only weights, in ranking mode (a candidate set per user) or retrieval mode (every item
through the item cache).

``model(inputs_BxL, mask_BxL, user_features_BxU=None) -> personal_BxRxD`` (the personalized links);
``model.score(personal, candidates)`` scores candidate ids on the fly from the current parameters;
``model.build_item_cache()`` precomputes the item side (link weights A and the scorer's item vectors) for
every item, and ``model.score_cached(personal, cache, candidates=None)`` scores through it: O(R D) per
candidate, independent of the history length. ``item_version`` (``recjax.train.item_version``) is a tag of
the parameters that the Trainer advances every step; a cache built under another tag (older parameters,
another model) is refused (an error outside jit; NaN scores, which rank last, inside a jit the caller built).

Training (``LimeNextItemTask``): a request is (history prefix, next item), the LIME request form (the links
summarise the whole prefix they see). Per training sequence the loss takes ``cuts_per_sequence`` prefixes
(0, the default: every position, as many targets as HSTU's per-position loss; K > 0: the whole training
history plus K - 1 cuts drawn uniformly inside the jitted step) and a sampled softmax over [next item,
shared uniform negatives]. The prefixes of one sequence share its embedding and every computation that
does not depend on the request (all of a 2-layer model's history side), so K requests cost O(K R L D)
attention, not K forwards.

Letters: B batch, L history, R links, C candidates, N item rows (row 0 = padding), D embed dim,
U user feature fields, E = B * K examples (K cuts per sequence), M negatives, G item chunks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recjax import validation
from recjax.eval import ranking
from recjax.layers.lime import (
    SCORERS,
    CandidateScorer,
    LimeItemCache,
    LimeXorBlock,
    LinkAttentionBlock,
    LinkEmbeddings,
    combine_links,
    link_weights,
    recency_distance,
)
from recjax.models.sasrec import SequenceEmbedding, validate_sequence_inputs
from recjax.ops import lime_xor as lime_xor_ops
from recjax.train import losses
from recjax.train.item_version import new_item_version
from recjax.train.tasks import LossConfig, NextItemTask

ATTENTIONS = ("xor", "mha")


@dataclasses.dataclass(frozen=True)
class LimeConfig:
    """Defaults sized like our ML-1M HSTU (d=50, 2 layers, 1 head, dqk = dv = 50) with 16 links."""

    num_items: int
    max_len: int = 200
    embed_dim: int = 50
    num_links: int = 16
    attention: str = "xor"  # "xor" (LIME-XOR) or "mha" (LIME-MHA)
    num_layers: int = 2
    num_heads: int = 1
    attention_dim: int = 50  # XOR: per-head q/k dim
    linear_dim: int = 50  # XOR: per-head value dim
    ffn_hidden_dim: int = 50  # MHA blocks' feed-forward
    num_position_buckets: int = 200  # recency bias of the link->history logits; 0 = none
    dropout: float = 0.2
    contextualize: bool = False  # links + MLP(user features); needs user_feature_sizes
    user_feature_sizes: tuple[int, ...] = ()
    context_hidden: int = 64
    scorer: str = "dot"  # "dot" (cosine when l2_normalize) or "mlp"
    scorer_hidden: int = 64
    l2_normalize: bool = True
    l2_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-6
    xor_impl: str = "auto"  # links' read of the history: recjax.ops.lime_xor ("auto" = XLA for now)

    def __post_init__(self):
        for name in (
            "num_items", "max_len", "embed_dim", "num_links", "num_layers", "num_heads", "attention_dim",
            "linear_dim", "ffn_hidden_dim", "context_hidden", "scorer_hidden",
        ):  # fmt: skip
            validation.check_positive(f"lime.{name}", getattr(self, name))
        validation.check_positive("lime.num_position_buckets", self.num_position_buckets, allow_zero=True)
        if self.attention not in ATTENTIONS:
            raise ValueError(f"lime.attention: expected one of {ATTENTIONS}, got {self.attention!r}")
        if self.xor_impl not in lime_xor_ops.IMPLS:
            raise ValueError(f"lime.xor_impl: expected one of {lime_xor_ops.IMPLS}, got {self.xor_impl!r}")
        if self.attention != "xor" and self.xor_impl != "auto":
            raise ValueError(f"lime.xor_impl: for attention='xor' only, got attention={self.attention!r}")
        if self.scorer not in SCORERS:
            raise ValueError(f"lime.scorer: expected one of {SCORERS}, got {self.scorer!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lime.dropout: expected a rate in [0, 1), got {self.dropout}")
        if self.attention == "mha" and self.embed_dim % self.num_heads:
            raise ValueError(f"lime.num_heads: expected a divisor of embed_dim={self.embed_dim}")
        if self.contextualize and not self.user_feature_sizes:
            raise ValueError("lime.user_feature_sizes: contextualize=True needs the user feature sizes")


class LIME(nnx.Module):
    def __init__(self, cfg: LimeConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        D = cfg.embed_dim
        self.embedding = SequenceEmbedding(cfg.num_items, cfg.max_len, D, cfg.dropout, rngs=rngs)
        self.links = LinkEmbeddings(
            cfg.num_links,
            D,
            contextualize=cfg.contextualize,
            user_feature_sizes=cfg.user_feature_sizes,
            context_hidden=cfg.context_hidden,
            rngs=rngs,
        )
        eps = cfg.layer_norm_eps
        if cfg.attention == "xor":
            self.blocks = nnx.List(
                [
                    LimeXorBlock(
                        D,
                        cfg.num_heads,
                        cfg.attention_dim,
                        cfg.linear_dim,
                        cfg.max_len,
                        cfg.num_links,
                        cfg.num_position_buckets,
                        dropout=cfg.dropout,
                        eps=eps,
                        xor_impl=cfg.xor_impl,
                        rngs=rngs,
                    )  # fmt: skip
                    for _ in range(cfg.num_layers)
                ]
            )
        else:
            self.blocks = nnx.List(
                [
                    LinkAttentionBlock(
                        D,
                        cfg.num_heads,
                        cfg.ffn_hidden_dim,
                        cfg.num_links,
                        cfg.num_position_buckets,
                        dropout=cfg.dropout,
                        eps=eps,
                        rngs=rngs,
                    )  # fmt: skip
                    for _ in range(cfg.num_layers)
                ]
            )
        self.scorer = CandidateScorer(cfg.scorer, D, cfg.scorer_hidden, rngs=rngs)
        self.item_version = new_item_version()  # the Trainer advances it every step

    # -- user side ------------------------------------------------------------------------------------
    def __call__(
        self,
        inputs_BxL: jax.Array,
        mask_BxL: jax.Array,
        user_features_BxU: jax.Array | None = None,
        cuts_BxK: jax.Array | None = None,
    ) -> jax.Array:
        """-> personal_BxRxD; with ``cuts_BxK`` (column positions), K requests per row, request k seeing
        the items at columns <= cuts[b, k]: -> personal_BxKxRxD. The K requests share the history's
        embedding and every computation that does not depend on the request."""
        cfg = self.config
        validate_sequence_inputs(inputs_BxL, mask_BxL, num_items=cfg.num_items, max_len=cfg.max_len)
        B, L = inputs_BxL.shape
        valid_BxL = mask_BxL & (inputs_BxL != 0)
        if cuts_BxK is None:
            valid_BxKxL = valid_BxL[:, None, :]
        else:
            validation.check_shape("cuts_BxK", cuts_BxK, (B, None))
            validation.check_dtype("cuts_BxK", cuts_BxK, "iu")
            validation.check_range("cuts_BxK", cuts_BxK, 0, L)
            valid_BxKxL = valid_BxL[:, None, :] & (jnp.arange(L)[None, None, :] <= cuts_BxK[:, :, None])
        K = valid_BxKxL.shape[1]
        distance_BxKxL = recency_distance(valid_BxL, valid_BxKxL)
        history_BxLxD = self.embedding(inputs_BxL.astype(jnp.int32), valid_BxL)
        links_BxKxRxD = self.links(B, user_features_BxU)[:, None]
        if cfg.attention == "xor":
            history_BxKxLxD = history_BxLxD[:, None]  # K = 1 until the links differ per request
            for i, block in enumerate(self.blocks):
                last = i == len(self.blocks) - 1
                links_BxKxRxD, history_BxKxLxD = block(
                    links_BxKxRxD, history_BxKxLxD, valid_BxKxL, distance_BxKxL, update_history=not last
                )
        else:
            links_BxKxRxD = jnp.broadcast_to(links_BxKxRxD, (B, K) + links_BxKxRxD.shape[2:])
            for block in self.blocks:
                links_BxKxRxD = block(links_BxKxRxD, history_BxLxD, valid_BxKxL, distance_BxKxL)
        links_BxKxRxD = jnp.broadcast_to(links_BxKxRxD, (B, K) + links_BxKxRxD.shape[2:]).astype(jnp.float32)
        return links_BxKxRxD[:, 0] if cuts_BxK is None else links_BxKxRxD

    # -- item side ------------------------------------------------------------------------------------
    def item_embeddings(self) -> jax.Array:
        """(N, D) raw item table (shared with the history input); row 0 = padding."""
        return self.embedding.items[...]

    def normalize(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        return losses.l2_normalize(x, cfg.l2_norm_eps) if cfg.l2_normalize else x

    def _item_side(self, items_xD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(link weights A, scorer item vectors) of raw item rows."""
        scaled = items_xD * jnp.sqrt(jnp.float32(self.config.embed_dim))  # as the history input sees it
        return link_weights(scaled, self.links.base()), self.normalize(items_xD)

    def _score(self, personal_BxRxD, weights_xR, items_xD) -> jax.Array:
        return self.scorer(self.normalize(combine_links(weights_xR, personal_BxRxD)), items_xD)

    def score(self, personal_BxRxD: jax.Array, candidates: jax.Array) -> jax.Array:
        """Logits of candidate ids, (C,) shared by the batch or (B, C) per row, from the current
        parameters (training path). -> (B, C) float32."""
        self._check_candidates("candidates", candidates, personal_BxRxD.shape[0])
        weights, items = self._item_side(self.item_embeddings()[candidates.astype(jnp.int32)])
        return self._score(personal_BxRxD, weights, items)

    def candidate_logits(
        self,
        inputs_BxL: jax.Array,
        mask_BxL: jax.Array,
        candidates_BxC: jax.Array,
        user_features_BxU: jax.Array | None = None,
    ) -> jax.Array:
        """Ranking mode (``recjax.models.rankers``): logits of a candidate set per request (id 0 =
        padding, scored as item 1 and ignored by the caller)."""
        personal_BxRxD = self(inputs_BxL, mask_BxL, user_features_BxU)
        return self.score(personal_BxRxD, jnp.maximum(candidates_BxC, 1))

    def build_item_cache(self) -> LimeItemCache:
        weights_NxR, items_NxD = self._item_side(self.item_embeddings())
        return LimeItemCache(weights_NxR, items_NxD, self.item_version[...])

    def score_cached(
        self,
        personal_BxRxD: jax.Array,
        cache: LimeItemCache,
        candidates: jax.Array | None = None,
        *,
        item_chunk: int = 8192,
    ) -> jax.Array:
        """Logits through ``cache``: every item row (B, N) when ``candidates`` is None, else (B, C) for
        ids (C,) or (B, C). A cache older than the model is refused (NaN scores under an outer jit).
        Every-item scoring runs over blocks of ``item_chunk`` rows (``lax.map``), so its working set is
        B x item_chunk x D, not the B x N x D candidate representations (1M items would not fit)."""
        if not isinstance(cache, LimeItemCache):
            raise TypeError(f"cache: expected a LimeItemCache, got {type(cache).__name__}")
        rows = self.config.num_items + 1
        validation.check_shape("cache.weights_NxR", cache.weights_NxR, (rows, self.config.num_links))
        version = self.item_version[...]
        stale = cache.version != version
        if not validation.is_tracer(stale) and bool(stale):
            raise ValueError(
                f"cache: built at item version {int(cache.version)}, the model is at {int(version)} (its "
                "items or links changed since, or it is another model); rebuild it with "
                "model.build_item_cache()"
            )
        if candidates is None:
            validation.check_positive("item_chunk", item_chunk)
            scores = self._score_in_chunks(personal_BxRxD, cache.weights_NxR, cache.items_NxD, item_chunk)
        else:
            self._check_candidates("candidates", candidates, personal_BxRxD.shape[0])
            ids = candidates.astype(jnp.int32)
            scores = self._score(personal_BxRxD, cache.weights_NxR[ids], cache.items_NxD[ids])
        return jnp.where(stale, jnp.nan, scores)

    def _score_in_chunks(self, personal_BxRxD, weights_NxR, items_NxD, chunk: int) -> jax.Array:
        n = weights_NxR.shape[0]
        if n <= chunk:
            return self._score(personal_BxRxD, weights_NxR, items_NxD)
        pad = -n % chunk  # zero rows: finite scores, sliced off below
        w_GxCxR = jnp.pad(weights_NxR, ((0, pad), (0, 0))).reshape(-1, chunk, weights_NxR.shape[1])
        t_GxCxD = jnp.pad(items_NxD, ((0, pad), (0, 0))).reshape(-1, chunk, items_NxD.shape[1])
        s_GxBxC = jax.lax.map(lambda wt: self._score(personal_BxRxD, *wt), (w_GxCxR, t_GxCxD))
        return jnp.moveaxis(s_GxBxC, 0, 1).reshape(personal_BxRxD.shape[0], -1)[:, :n]

    def _check_candidates(self, name: str, ids, batch: int) -> None:
        validation.check_dtype(name, ids, "iu")
        if ids.ndim == 2:
            validation.check_shape(name, ids, (batch, None))
        elif ids.ndim != 1:
            raise ValueError(f"{name}: expected shape (C,) or (B, C), got {tuple(ids.shape)}")
        validation.check_range(name, ids, 1, self.config.num_items + 1)


def user_feature_matrix(user_features: dict[str, np.ndarray], fields: Sequence[str] = ()) -> np.ndarray:
    """(num_users, U) int32 codes of the dataset's categorical user fields (``fields`` order, default all
    single-column fields sorted by name)."""
    names = list(fields) or sorted(k for k, v in user_features.items() if v.ndim == 2 and v.shape[1] == 1)
    unknown = [n for n in names if n not in user_features]
    if unknown:
        raise ValueError(f"fields: unknown user feature {unknown[0]!r}; available {sorted(user_features)}")
    if not names:
        raise ValueError("user_features: no single-column categorical user fields to contextualize with")
    return np.concatenate([np.asarray(user_features[n], np.int32).reshape(-1, 1) for n in names], axis=1)


def user_feature_sizes(matrix_UxF: np.ndarray) -> tuple[int, ...]:
    return tuple(int(m) for m in np.max(matrix_UxF, axis=0))


def sample_cuts(rng: jax.Array, valid_BxL: jax.Array, num_cuts: int) -> jax.Array:
    """(B, K) positions: the last column (the whole training history) and K - 1 drawn uniformly among
    each row's valid positions (the last column again for a row without any). ``num_cuts=0``: every
    column (K = L; padded columns are invalid requests), the per-position targets of HSTU's loss."""
    B, L = valid_BxL.shape
    if num_cuts == 0:
        return jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    last_Bx1 = jnp.full((B, 1), L - 1, jnp.int32)
    if num_cuts == 1:
        return last_Bx1
    logits_BxL = jnp.where(valid_BxL, 0.0, -jnp.inf)
    logits_BxL = jnp.where(valid_BxL.any(axis=1, keepdims=True), logits_BxL, 0.0)
    drawn_BxK = jax.random.categorical(rng, logits_BxL, axis=1, shape=(num_cuts - 1, B)).T
    return jnp.concatenate([last_Bx1, drawn_BxK.astype(jnp.int32)], axis=1)


def lime_next_item_loss(
    cfg: LossConfig, num_cuts: int, model: LIME, batch: dict, rng: jax.Array
) -> tuple[jax.Array, dict]:
    """Sampled softmax of (prefix -> next item) requests; see the module docstring."""
    inputs_BxL, targets_BxL, mask_BxL = batch["inputs"], batch["targets"].astype(jnp.int32), batch["mask"]
    B, L = inputs_BxL.shape
    valid_BxL = mask_BxL & (targets_BxL > 0)
    cut_rng, neg_rng = jax.random.split(rng)
    cuts_BxK = sample_cuts(cut_rng, valid_BxL, num_cuts)
    K = cuts_BxK.shape[1]
    target_E = jnp.take_along_axis(targets_BxL, cuts_BxK, axis=1).reshape(-1)
    valid_E = jnp.take_along_axis(valid_BxL, cuts_BxK, axis=1).reshape(-1)
    personal = model(inputs_BxL, mask_BxL, batch.get("user_features"), cuts_BxK)
    personal_ExRxD = personal.reshape((B * K,) + personal.shape[2:])
    pos_E = model.score(personal_ExRxD, jnp.maximum(target_E, 1)[:, None])[:, 0]
    rows = model.config.num_items + 1
    neg_M = jax.random.randint(neg_rng, (cfg.num_negatives,), 1, rows, dtype=jnp.int32)
    neg_ExM = model.score(personal_ExRxD, neg_M)
    hit_ExM = neg_M[None, :] == target_E[:, None]
    return losses.softmax_over_sampled(pos_E, neg_ExM, hit_ExM, valid_E, cfg.temperature)


@partial(jax.jit, static_argnums=0)
def _cache(graphdef, state) -> LimeItemCache:
    return nnx.merge(graphdef, state).build_item_cache()


@partial(jax.jit, static_argnums=0)
def _all_scores(graphdef, state, cache, inputs_BxL, mask_BxL, user_features_BxU):
    model = nnx.merge(graphdef, state)
    return model.score_cached(model(inputs_BxL, mask_BxL, user_features_BxU), cache)


class LimeNextItemTask(NextItemTask):
    """LIME in retrieval mode on a leave-one-out split: training as in the module docstring, validation
    and test by full-corpus ranking of every item through the item cache (``recjax.eval.ranking``).

    ``user_features``: (num_users, U) int codes (:func:`user_feature_matrix`) for contextualized links;
    batches then carry ``user_features`` looked up by their ``user`` row."""

    def __init__(
        self,
        split,
        *,
        max_len: int,
        batch_size: int,
        cuts_per_sequence: int = 0,
        user_features: np.ndarray | None = None,
        loss: LossConfig = LossConfig(),  # noqa: B008 -- frozen dataclass, as NextItemTask's
        eval_batch_size: int = 256,
        ks: Sequence[int] = ranking.DEFAULT_KS,
        early_stop_metric: str = "ndcg@10",
        batch_iter: Callable[..., Iterator[dict]] | None = None,
    ):
        if loss.name != "sampled_softmax":
            raise ValueError(f"train.loss.name: LIME trains with 'sampled_softmax', got {loss.name!r}")
        if loss.negatives != "uniform":
            raise ValueError(
                f"train.loss.negatives: LIME draws shared 'uniform' negatives, got {loss.negatives!r}"
            )
        validation.check_positive("cuts_per_sequence", cuts_per_sequence, allow_zero=True)
        super().__init__(
            split,
            max_len=max_len,
            batch_size=batch_size,
            loss=loss,
            eval_batch_size=eval_batch_size,
            ks=ks,
            early_stop_metric=early_stop_metric,
            batch_iter=batch_iter,
        )
        self.num_cuts = cuts_per_sequence
        if user_features is not None:
            user_features = np.asarray(user_features)
            validation.check_shape("user_features", user_features, (split.dataset.num_users, None))
            validation.check_dtype("user_features", user_features, "iu")
        self.user_features = user_features

    def check_model(self, model) -> None:
        if not isinstance(model, LIME):
            raise TypeError(f"model: LimeNextItemTask trains a LIME model, got {type(model).__name__}")
        super().check_model(model)
        if model.config.contextualize and self.user_features is None:
            raise ValueError("user_features: the model contextualizes its links; give the task user_features")

    def _with_features(self, batches: Iterator[dict]) -> Iterator[dict]:
        for b in batches:
            if self.user_features is not None:
                b = {**b, "user_features": self.user_features[np.asarray(b["user"])].astype(np.int32)}
            yield b

    def loss(self, model, batch, rng):
        return lime_next_item_loss(self.loss_cfg, self.num_cuts, model, batch, rng)

    def train_batches(self, epoch: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        return self._with_features(super().train_batches(epoch, seed))

    def rank(self, model, batches, row_rates: Sequence[str] = ()) -> dict[str, float]:
        graphdef, state = nnx.split(model)
        cache = _cache(graphdef, state)

        def score_fn(b):
            return _all_scores(graphdef, state, cache, b["inputs"], b["mask"], b.get("user_features"))

        return ranking.evaluate_scores(
            score_fn,
            self.split.num_items,
            self._with_features(batches),
            ks=self.ks,
            row_rates=tuple(row_rates),
        )
