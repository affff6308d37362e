"""Ranking mode: models that score a candidate set per request, and the rating task that trains and
evaluates them on (history, candidates, ``rating >= threshold`` labels) requests
(recjax/data/rating_requests.py).

Every ranker has ``candidate_logits(inputs_BxL, mask_BxL, candidates_BxC, user_features_BxU=None) ->
logits_BxC`` (candidate id 0 = padding, its logit is ignored):
- :class:`recjax.models.lime.LIME` (its own method; scorer ``"mlp"`` is the shallow scorer of the paper);
- :class:`HSTURanker`: target-aware HSTU, candidates appended after the history, each attending to the
  history and itself (``HSTU.with_candidates``), then the same shallow scorer on [c, t, c * t];
- :class:`SASRecRanker`: SASRec's user state (last position) with the same scorer (no target attention).

:class:`RatingRankingTask`: masked BCE on training requests; validation / test: AUC over every held-out
(user, item), GAUC (per-user AUC weighted by the user's impressions) and NE (``recjax.eval.classification``).

Letters: B requests, L history, C candidates, D embed dim, U user feature fields.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recjax import validation
from recjax.data import batching
from recjax.data.rating_requests import RatingSplit, eval_requests, train_requests
from recjax.eval.classification import auc, gauc, normalized_entropy
from recjax.layers.lime import CandidateScorer
from recjax.models.hstu import HSTU, HSTUConfig
from recjax.models.sasrec import SASRec, SASRecConfig
from recjax.train.tasks import Task


class HSTURanker(nnx.Module):
    def __init__(self, cfg: HSTUConfig, *, scorer_hidden: int = 64, rngs: nnx.Rngs):
        self.config = cfg
        self.hstu = HSTU(cfg, rngs=rngs)
        self.scorer = CandidateScorer("mlp", cfg.embed_dim, scorer_hidden, rngs=rngs)

    def candidate_logits(self, inputs_BxL, mask_BxL, candidates_BxC, user_features_BxU=None) -> jax.Array:
        ids = jnp.maximum(candidates_BxC, 1)
        _, cand_BxCxD = self.hstu.with_candidates(inputs_BxL, mask_BxL, ids)
        items_BxCxD = self.hstu.item_embeddings()[ids.astype(jnp.int32)]
        return self.scorer(cand_BxCxD, items_BxCxD)


class SASRecRanker(nnx.Module):
    def __init__(self, cfg: SASRecConfig, *, scorer_hidden: int = 64, rngs: nnx.Rngs):
        self.config = cfg
        self.sasrec = SASRec(cfg, rngs=rngs)
        self.scorer = CandidateScorer("mlp", cfg.embed_dim, scorer_hidden, rngs=rngs)

    def candidate_logits(self, inputs_BxL, mask_BxL, candidates_BxC, user_features_BxU=None) -> jax.Array:
        ids = jnp.maximum(candidates_BxC, 1).astype(jnp.int32)
        user_BxD = self.sasrec(inputs_BxL, mask_BxL)[:, -1]
        items_BxCxD = self.sasrec.item_embeddings()[ids]
        return self.scorer(jnp.broadcast_to(user_BxD[:, None], items_BxCxD.shape), items_BxCxD)


def rating_loss(model, batch: dict) -> tuple[jax.Array, dict]:
    logits_BxC = model.candidate_logits(
        batch["inputs"], batch["mask"], batch["candidates"], batch.get("user_features")
    )
    mask_BxC = batch["candidate_mask"]
    bce = optax.sigmoid_binary_cross_entropy(logits_BxC, batch["labels"])
    n = jnp.sum(mask_BxC)
    loss = jnp.sum(jnp.where(mask_BxC, bce, 0.0)) / jnp.maximum(n, 1)
    return loss, {"loss": loss, "num_valid": n}


@partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, batch):
    model = nnx.merge(graphdef, state)
    return model.candidate_logits(
        batch["inputs"], batch["mask"], batch["candidates"], batch.get("user_features")
    )


class RatingRankingTask(Task):
    """Trains any ranker above on rating requests; metrics ``auc``, ``gauc`` (higher is better) and ``ne``."""

    def __init__(
        self,
        split: RatingSplit,
        *,
        max_len: int,
        batch_size: int,
        num_candidates: int = 10,
        requests_per_user: int = 8,
        eval_batch_size: int = 256,
        user_features: np.ndarray | None = None,
        early_stop_metric: str = "auc",
    ):
        for name, v in (
            ("max_len", max_len),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
        ):
            validation.check_positive(name, v)
        self.split, self.max_len, self.batch_size, self.eval_batch_size = (
            split,
            max_len,
            batch_size,
            eval_batch_size,
        )
        self.num_candidates, self.requests_per_user = num_candidates, requests_per_user
        higher_is_better = [m for m in self.metric_names() if m != "ne"]  # the Trainer maximises it
        if early_stop_metric not in higher_is_better:
            raise ValueError(
                f"early_stop_metric: expected one of {higher_is_better} (the Trainer keeps the highest; NE "
                f"is lower-is-better), got {early_stop_metric!r}"
            )
        self.early_stop_metric = early_stop_metric
        if user_features is not None:
            validation.check_shape("user_features", user_features, (split.dataset.num_users, None))
        self.user_features = user_features
        self.requests = {s: self._with_features(eval_requests(split, s, max_len)) for s in self.splits}
        train_requests(split, max_len, num_candidates, requests_per_user, 0, 0)  # checks the settings

    def metric_names(self) -> tuple[str, ...]:
        return ("auc", "gauc", "ne")

    def check_model(self, model) -> None:
        if not hasattr(model, "candidate_logits"):
            raise TypeError(
                f"model: a ranker with candidate_logits(...) expected, got {type(model).__name__}"
            )
        num_items = getattr(getattr(model, "config", None), "num_items", None)
        if num_items is not None and num_items != self.split.dataset.num_items:
            raise ValueError(
                f"model.config.num_items: expected the dataset's {self.split.dataset.num_items} items, got "
                f"{num_items}"
            )

    def _with_features(self, requests: dict) -> dict:
        if self.user_features is not None:
            requests = {**requests, "user_features": self.user_features[requests["user"]].astype(np.int32)}
        return requests

    def loss(self, model, batch, rng):
        return rating_loss(model, batch)

    def num_train_batches(self) -> int:
        n = int((self.split.train_len >= 2).sum()) * self.requests_per_user
        return batching.num_batches(n, self.batch_size, drop_remainder=False)

    def train_batches(self, epoch: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        req = train_requests(
            self.split, self.max_len, self.num_candidates, self.requests_per_user, seed, epoch
        )
        return batching.batches(
            self._with_features(req), self.batch_size, shuffle=True, seed=seed, epoch=epoch
        )

    def logits(self, model, split: str) -> np.ndarray:
        """(num eval users, holdout) logits of ``split``'s requests."""
        self.check_split(split)
        graphdef, state = nnx.split(model)
        req = self.requests[split]
        n = len(req["user"])
        out = [
            np.asarray(_logits(graphdef, state, b))
            for b in batching.batches(req, self.eval_batch_size, shuffle=False)
        ]
        return np.concatenate(out)[:n]

    def evaluate(self, model, split, task_state=None) -> dict[str, float]:
        logits_BxC = self.logits(model, split)
        req = self.requests[split]
        m = req["candidate_mask"]
        scores, labels = logits_BxC[m], req["labels"][m]
        users = np.broadcast_to(req["user"][:, None], m.shape)[m]
        return {
            "auc": auc(scores, labels),
            "gauc": gauc(scores, labels, users),
            "ne": normalized_entropy(scores, labels),
        }
