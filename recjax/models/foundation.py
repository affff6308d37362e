"""The foundation model (FM) of Foundation–Expert / HyperCast ("Realizing Scaling Laws in Recommender
Systems", arXiv 2508.02929) and its training task, HyperCast logging and the per-surface metrics.

Model: HSTU blocks (``recjax.models.hstu.HSTUBlock``) over [cross-surface history; C candidate tokens]::

    x_hist = dropout(E[item] * sqrt(D) + P[position]) * valid            (SASRec/HSTU input preprocessor)
    x_cand = dropout(E[cand] * sqrt(D) + P[n_hist] + e_cand) * valid     (all at the next position)
    x = HSTU blocks over [x_hist; x_cand], history causal, each candidate attending to the history and
        itself only (``HSTUBlock.with_candidates``: O(C L) per block, never the dense (L + C)^2 mask)
    TAE = LN(x[candidates])  (target-aware embeddings);  logits_s = W_s TAE + b_s  (one head per surface)

Loss: binary cross-entropy of every head on every candidate, masked by the valid-sample mask (the
candidate is real and labelled for that surface: a request is labelled for its own surface only), averaged
over the valid samples.

Deviations: the blocks run without HSTU's relative attention bias (``use_relative_bias=False``): its
positions are sequence columns, which would give each appended candidate a different bias by its slot;
positions enter through the absolute embeddings instead, where all candidates share the next position.
The paper's FM also reads action types and features; here only item ids (MovieLens has no more per event).

Letters: B batch (requests), L history, C candidates, D embed_dim, S surfaces, E impressions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recjax import validation
from recjax.data.surfaces import SurfaceData
from recjax.eval import ranking
from recjax.eval.classification import auc, normalized_entropy
from recjax.layers.attention import causal_attention_mask
from recjax.models.hstu import HSTUBlock, HSTUConfig
from recjax.models.sasrec import SequenceEmbedding
from recjax.train.tasks import Task


@dataclasses.dataclass(frozen=True)
class FoundationConfig:
    num_items: int
    num_surfaces: int
    max_len: int = 200  # history length L
    embed_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 2
    attention_dim: int = 25
    linear_dim: int = 25
    dropout: float = 0.2
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        for name in (
            "num_items",
            "num_surfaces",
            "max_len",
            "embed_dim",
            "num_blocks",
            "num_heads",
            "attention_dim",
            "linear_dim",
        ):
            validation.check_positive(f"fm.{name}", getattr(self, name))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"fm.dropout: expected a rate in [0, 1), got {self.dropout}")

    def hstu(self) -> HSTUConfig:
        return HSTUConfig(
            num_items=self.num_items,
            max_len=self.max_len,
            embed_dim=self.embed_dim,
            num_blocks=self.num_blocks,
            num_heads=self.num_heads,
            attention_dim=self.attention_dim,
            linear_dim=self.linear_dim,
            dropout=self.dropout,
            use_relative_bias=False,
            layer_norm_eps=self.layer_norm_eps,
        )


class FoundationModel(nnx.Module):
    """``fm(history_BxL, history_mask_BxL, candidates_BxC, candidate_mask_BxC) -> tae_BxCxD``."""

    def __init__(self, cfg: FoundationConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        D = cfg.embed_dim
        # max_len + 1 positions: the candidates sit at position n_hist <= max_len
        self.embedding = SequenceEmbedding(cfg.num_items, cfg.max_len + 1, D, cfg.dropout, rngs=rngs)
        self.candidate_type = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (D,), jnp.float32))
        self.blocks = nnx.List([HSTUBlock(cfg.hstu(), rngs=rngs) for _ in range(cfg.num_blocks)])
        self.out_norm = nnx.LayerNorm(D, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.heads = nnx.Linear(D, cfg.num_surfaces, rngs=rngs)

    def __call__(self, history_BxL, history_mask_BxL, candidates_BxC, candidate_mask_BxC) -> jax.Array:
        cfg = self.config
        if history_BxL.ndim != 2 or history_BxL.shape[1] > cfg.max_len:
            raise ValueError(f"history_BxL: expected shape (B, L <= {cfg.max_len}), got {history_BxL.shape}")
        B = history_BxL.shape[0]
        validation.check_dtype("history_BxL", history_BxL, "iu")
        validation.check_shape("history_mask_BxL", history_mask_BxL, history_BxL.shape)
        validation.check_dtype("history_mask_BxL", history_mask_BxL, "b")
        validation.check_shape("candidates_BxC", candidates_BxC, (B, None))
        validation.check_dtype("candidates_BxC", candidates_BxC, "iu")
        validation.check_shape("candidate_mask_BxC", candidate_mask_BxC, candidates_BxC.shape)
        validation.check_dtype("candidate_mask_BxC", candidate_mask_BxC, "b")
        validation.check_range("history_BxL", history_BxL, 0, cfg.num_items + 1)
        validation.check_range("candidates_BxC", candidates_BxC, 0, cfg.num_items + 1)
        valid_h = history_mask_BxL & (history_BxL != 0)
        valid_c = candidate_mask_BxC & (candidates_BxC != 0)
        x_h = self.embedding(history_BxL.astype(jnp.int32), valid_h)
        emb = self.embedding
        next_pos_B = jnp.minimum(jnp.sum(valid_h, axis=1), cfg.max_len)
        x_c = emb.items[...][candidates_BxC.astype(jnp.int32)] * math.sqrt(cfg.embed_dim)
        x_c = x_c + emb.positions[...][next_pos_B][:, None, :] + self.candidate_type[...]
        x_c = emb.dropout(x_c) * valid_c[..., None]
        allowed_BxLxL = causal_attention_mask(valid_h)
        for block in self.blocks:
            x_h, x_c = block.with_candidates(x_h, x_c, valid_h, allowed_BxLxL, None)
        return (self.out_norm(x_c) * valid_c[..., None]).astype(jnp.float32)

    def logits(self, tae_BxCxD: jax.Array) -> jax.Array:
        """(B, C, S) per-surface head logits."""
        return self.heads(tae_BxCxD)


def multitask_loss(logits_BxCxS, labels_BxC, candidate_mask_BxC, surface_B) -> tuple[jax.Array, jax.Array]:
    """Masked BCE: (loss, number of valid samples). Sample (b, c, s) is valid when candidate c is real
    and request b is labelled for surface s (its own surface)."""
    S = logits_BxCxS.shape[-1]
    mask_BxCxS = candidate_mask_BxC[..., None] & (surface_B[:, None, None] == jnp.arange(S))
    bce = optax.sigmoid_binary_cross_entropy(
        logits_BxCxS, jnp.broadcast_to(labels_BxC[..., None], mask_BxCxS.shape)
    )
    n = jnp.sum(mask_BxCxS)
    return jnp.sum(jnp.where(mask_BxCxS, bce, 0.0)) / jnp.maximum(n, 1), n


REQUEST_KEYS = ("history", "history_mask", "candidates", "candidate_mask")


@partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, batch):
    fm = nnx.merge(graphdef, state)
    tae = fm(*(batch[k] for k in REQUEST_KEYS))
    return tae, fm.logits(tae)


def _request_batches(requests: dict[str, np.ndarray], batch_size: int) -> Iterator[tuple[int, dict]]:
    """Fixed-shape batches (the last one padded with copies of row 0, never read back)."""
    R = len(requests["surface"])
    for lo in range(0, R, batch_size):
        idx = np.arange(lo, lo + batch_size)
        idx = np.where(idx < R, idx, lo)
        yield min(batch_size, R - lo), {k: v[idx] for k, v in requests.items()}


def fm_infer(fm: FoundationModel, requests: dict, num_impressions: int, batch_size: int = 256, *, tae=False):
    """FM head scores (logit of the request's surface) per impression, (E,); with ``tae``, also the
    (E, D) float32 TAE. Eval mode is the caller's (``fm.eval()``)."""
    graphdef, state = nnx.split(fm)
    scores = np.full(num_impressions, np.nan, np.float32)
    out_tae = np.zeros((num_impressions, fm.config.embed_dim), np.float32) if tae else None
    for n, b in _request_batches(requests, batch_size):
        t, logits = jax.device_get(_forward(graphdef, state, {k: b[k] for k in REQUEST_KEYS}))
        idx, m = b["index"][:n], b["candidate_mask"][:n]
        surf = b["surface"][:n]
        s = np.take_along_axis(logits[:n], surf[:, None, None].repeat(logits.shape[1], 1), axis=2)[..., 0]
        scores[idx[m]] = s[m]
        if tae:
            out_tae[idx[m]] = t[:n][m]
    return (scores, out_tae) if tae else scores


def log_tae(
    fm: FoundationModel,
    data: SurfaceData,
    imp: dict,
    writer,
    *,
    num_candidates: int,
    batch_size: int = 256,
    flush_rows: int = 1 << 18,
) -> int:
    """HyperCast: the FM's inference over ``imp`` appended to a TAE store table (``writer``), keyed by
    (user, item) in impression order. -> rows written."""
    requests = data.requests(imp, num_candidates)
    _, tae = fm_infer(fm, requests, len(imp["user"]), batch_size, tae=True)
    for lo in range(0, len(tae), flush_rows):
        writer.append(
            imp["user"][lo : lo + flush_rows], imp["item"][lo : lo + flush_rows], tae[lo : lo + flush_rows]
        )
    return len(tae)


# ------------------------------------------------------------------------------------------------ metrics
def metric_names_for(kind: str, ks: Sequence[int] = (10,)) -> tuple[str, ...]:
    rank = tuple(f"{m}@{k}" for k in ks for m in ("hr", "ndcg")) + ("mrr",)
    return (rank if kind == "next_item" else ("auc",)) + ("ne",)


def surface_metrics(
    data: SurfaceData,
    imp: dict,
    scores_E: np.ndarray,
    surface: int,
    ks: Sequence[int] = (10,),
    batch_rows: int = 256,
) -> dict[str, float]:
    """Metrics of one surface from per-impression logits: full-surface ranking of the target (HR, NDCG,
    MRR through ``recjax.eval.ranking``) for next-item surfaces, AUC for rating surfaces; NE on the
    impressions marked ``ne``."""
    sel = imp["surface"] == surface
    if not sel.any():
        return {name: float("nan") for name in metric_names_for(data.surfaces.kind, ks)}
    scores, labels, ne = scores_E[sel], imp["label"][sel], imp["ne"][sel]
    out = {"ne": normalized_entropy(scores[ne], labels[ne])}
    if data.surfaces.kind == "rating":
        return {"auc": auc(scores, labels), **out}
    rows, items = imp["row"][sel], imp["item"][sel]
    uniq, local = np.unique(rows, return_inverse=True)
    target_of = np.zeros(len(uniq), np.int32)
    target_of[local[labels > 0]] = items[labels > 0]
    N = data.num_items

    def batches():
        for lo in range(0, len(uniq), batch_rows):
            m = (local >= lo) & (local < lo + batch_rows)
            mat = np.full((batch_rows, N + 1), -np.inf, np.float32)  # not a candidate: never beats the target
            mat[local[m] - lo, items[m]] = scores[m]
            n = min(batch_rows, len(uniq) - lo)
            target = np.ones(batch_rows, np.int32)
            target[:n] = target_of[lo : lo + n]
            valid = np.arange(batch_rows) < n
            yield {
                "scores": mat,
                "target": target,
                "exclude": np.zeros((batch_rows, 1), np.int32),
                "valid": valid,
            }

    out.update(ranking.evaluate_scores(lambda b: jnp.asarray(b["scores"]), N, batches(), ks=ks))
    return out


def all_surface_metrics(data: SurfaceData, imp: dict, scores_E: np.ndarray, ks=(10,)) -> dict[str, float]:
    """``<surface>/<metric>`` for every surface, plus ``mean/<metric>`` over the surfaces."""
    out = {}
    per = [surface_metrics(data, imp, scores_E, s, ks) for s in range(data.surfaces.num_surfaces)]
    for name, m in zip(data.surfaces.names, per, strict=True):
        out.update({f"{name}/{k}": v for k, v in m.items()})
    for k in per[0]:
        out[f"mean/{k}"] = float(np.nanmean([m[k] for m in per]))
    return out


# --------------------------------------------------------------------------------------------------- task
def fixed_batches(examples: dict[str, np.ndarray], batch_size: int, num_batches: int, seed, epoch: int):
    """``num_batches`` shuffled full batches (wrapping around), order a pure function of (seed, epoch)."""
    n = len(next(iter(examples.values())))
    perm = np.random.default_rng([int(seed), int(epoch), 7]).permutation(n)
    order = np.resize(perm, num_batches * batch_size)
    for i in range(num_batches):
        idx = order[i * batch_size : (i + 1) * batch_size]
        yield {k: v[idx] for k, v in examples.items()}


class FoundationTask(Task):
    """Trains the FM on every surface at once. Training requests per epoch: ``data.train_impressions``
    drawn with seed (seed, epoch) (``positions_per_user`` cuts per user, or all of them) in rows of
    ``num_candidates``; evaluation: per-surface metrics on "valid" (at most ``max_valid_rows`` evaluation
    rows, a fixed random subset) and "test" (all rows)."""

    def __init__(
        self,
        data: SurfaceData,
        *,
        batch_size: int = 128,
        num_candidates: int | None = None,
        positions_per_user: int | None = None,
        eval_candidates: int = 256,
        eval_batch_size: int = 64,
        max_valid_rows: int = 0,
        ks: Sequence[int] = (10,),
        early_stop_metric: str | None = None,
    ):
        for name, v in (
            ("batch_size", batch_size),
            ("eval_candidates", eval_candidates),
            ("eval_batch_size", eval_batch_size),
        ):
            validation.check_positive(name, v)
        validation.check_positive("max_valid_rows", max_valid_rows, allow_zero=True)
        self.data, self.ks = data, tuple(ks)
        self.batch_size, self.eval_candidates, self.eval_batch_size = (
            batch_size,
            eval_candidates,
            eval_batch_size,
        )
        self.num_candidates = num_candidates or (
            1 + data.num_negatives if data.surfaces.kind == "next_item" else 8
        )
        self.positions_per_user = positions_per_user
        self.eval_imp = {s: data.eval_impressions(s) for s in self.splits}
        if max_valid_rows:
            rows = np.unique(self.eval_imp["valid"]["row"])
            keep = np.random.default_rng(0).permutation(rows)[:max_valid_rows]
            m = np.isin(self.eval_imp["valid"]["row"], keep)
            self.eval_imp["valid"] = {k: v[m] for k, v in self.eval_imp["valid"].items()}
        self.eval_requests = {s: data.requests(imp, eval_candidates) for s, imp in self.eval_imp.items()}
        n0 = len(self._train_requests(0, 0)["surface"])
        self._num_batches = n0 // batch_size
        if not self._num_batches:
            raise ValueError(f"batch_size: {batch_size} is more than the {n0} training requests")
        default = "mean/ndcg@10" if data.surfaces.kind == "next_item" else "mean/auc"
        self.early_stop_metric = early_stop_metric or default
        if self.early_stop_metric not in self.metric_names():
            raise ValueError(
                f"early_stop_metric: expected one of {self.metric_names()}, got {early_stop_metric!r}"
            )

    def metric_names(self) -> tuple[str, ...]:
        per = metric_names_for(self.data.surfaces.kind, self.ks)
        return tuple(f"{s}/{m}" for s in (*self.data.surfaces.names, "mean") for m in per)

    def check_model(self, model: nnx.Module) -> None:
        if not isinstance(model, FoundationModel):
            raise TypeError(f"model: expected a FoundationModel, got {type(model).__name__}")
        cfg = model.config
        if cfg.num_items != self.data.num_items or cfg.num_surfaces != self.data.surfaces.num_surfaces:
            raise ValueError(
                f"model: {cfg.num_items} items / {cfg.num_surfaces} surfaces, the data has "
                f"{self.data.num_items} / {self.data.surfaces.num_surfaces}"
            )
        if cfg.max_len != self.data.max_len:
            raise ValueError(f"model: max_len {cfg.max_len}, the data's histories have {self.data.max_len}")

    def _train_requests(self, epoch: int, seed: int) -> dict[str, np.ndarray]:
        imp = self.data.train_impressions(seed * 100_003 + epoch, self.positions_per_user)
        req = self.data.requests(imp, self.num_candidates)
        req.pop("index")
        return req

    def loss(self, model, batch, rng):
        del rng
        tae = model(*(batch[k] for k in REQUEST_KEYS))
        loss, n = multitask_loss(
            model.logits(tae), batch["labels"], batch["candidate_mask"], batch["surface"]
        )
        return loss, {"valid_samples": n}

    def num_train_batches(self) -> int:
        return self._num_batches

    def train_batches(self, epoch: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        return fixed_batches(
            self._train_requests(epoch, seed), self.batch_size, self._num_batches, seed, epoch
        )

    def scores(self, model: nnx.Module, split: str) -> np.ndarray:
        self.check_split(split)
        return fm_infer(
            model, self.eval_requests[split], len(self.eval_imp[split]["user"]), self.eval_batch_size
        )

    def evaluate(self, model, split, task_state=None) -> dict[str, float]:
        return all_surface_metrics(self.data, self.eval_imp[split], self.scores(model, split), self.ks)


def fm_flops_per_request(cfg: FoundationConfig, history_len: int, num_candidates: int) -> float:
    """Multiply-adds x 2 of one FM request: projections of L + C tokens, causal history attention counted
    dense (L^2, as implemented), each candidate's attention over the history and itself (C (L + 1))."""
    T, D, H, A, V = (
        history_len + num_candidates,
        cfg.embed_dim,
        cfg.num_heads,
        cfg.attention_dim,
        cfg.linear_dim,
    )
    L, C = history_len, num_candidates
    attention = 2 * (L * L + C * (L + 1)) * H * (A + V)
    per_block = 2 * T * D * H * (2 * V + 2 * A) + attention + 2 * T * H * V * D
    return float(cfg.num_blocks * per_block + 2 * num_candidates * D * cfg.num_surfaces)
