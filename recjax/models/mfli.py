"""MFLI ("Rethinking ANN-based Retrieval: Multifaceted Learnable Index", arXiv 2602.16124), the model half:
a sequential user tower (SASRec or HSTU, ``encoder``) whose item embeddings are co-trained with a
multifaceted residual quantizer (``recjax.layers.residual_quantizer``), so that the codes can serve as the
retrieval index (``recjax.retrieval.mfli_index``) without an ANN structure.

``MFLI(cfg)(inputs_BxL, mask_BxL) -> hidden_BxLxD`` (the encoder's); ``user_embedding`` /
``candidate_embeddings`` as SASRec/HSTU (the raw embeddings: evaluation ranks every item by them);
``quantizer_inputs()`` -> the vectors quantized: ``normalize(item table)`` (what is scored) and the valid
rows (row 0, padding, never takes part); ``item_codes()`` -> codes_NxFxL and ``quantized_items()`` ->
quantized_NxFxD of every row at the current step's active levels.

Training (:class:`MFLITask`), per step:
- the Trainer's ``prepare`` hook: at the step at which quantizer level l activates, its codebooks are
  replaced by k-means of the level's residuals over the whole item table (``lax.cond`` on the Trainer's
  step, inside the jitted step, before the loss sees them; the Adam moments of those codewords are zero
  then, since an inactive level gets no gradient, so nothing is reset). The hook also passes the
  Trainer's step to the loss, which stores it in the quantizer's ``QuantizerStep`` variable (model state;
  without the hook, e.g. a loop of one's own, the loss adds 1 to it): delayed start and the level schedule
  read it there, and evaluation uses the levels active at the latest training step.
- loss = sum over label types t of ``w_t * (SSM_raw_t + quantized_weight * started * mean_f SSM_q_t,f)``
  + the quantizer's loss (codebook + commitment + usage penalty) + sown aux losses, where SSM is
  ``recjax.train.losses.sampled_softmax_loss`` with the same negatives for every term, SSM_raw scores the
  raw item table and SSM_q_t,f the straight-through quantized table of facet f (the facet losses are
  averaged, so the quantized term's scale does not grow with F), and ``started`` is 0 before the
  quantizer's start step (raw embeddings only).
- label types (``label_weights``): ``next_item`` / ``any_rating`` (every next item is a positive; the latter
  needs a rated dataset), ``rating_ge_4`` (a position is a positive only when the user rated that next item
  >= 4). MovieLens-1M: ``{"next_item": 1}``; MovieLens-100K: ``{"any_rating": w1, "rating_ge_4": w2}``.
- validation / test: full-corpus ranking by the raw embeddings (``NextItemTask.rank``) plus the code usage
  of the item table (``recjax.layers.residual_quantizer.code_usage_metrics``) and its relative
  quantization error.

The quantizer quantizes the whole item table every step (O(N F L M D); exact catalog-level usage
statistics), not only the batch's items; for catalogs of millions a sampled subset would be needed.

Letters: B batch, L sequence, N item rows (row 0 = padding), D embed dim, F facets, Q levels (the
quantizer's L), M codes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recjax import validation
from recjax.data import batching
from recjax.layers import residual_quantizer as rq
from recjax.models.hstu import HSTU, HSTUConfig
from recjax.models.sasrec import SASRec, SASRecConfig
from recjax.train import losses
from recjax.train.tasks import LossConfig, NextItemTask, forward_with_aux

# The user towers MFLI can use (the model registry imports this module, so it cannot be used here).
ENCODERS: dict[str, tuple[type, type]] = {"sasrec": (SASRec, SASRecConfig), "hstu": (HSTU, HSTUConfig)}
LABEL_TYPES = ("next_item", "any_rating", "rating_ge_4")
_RATED_LABELS = ("any_rating", "rating_ge_4")
_QUANTIZER_FIELDS = (
    "num_facets", "num_levels", "codebook_size", "commitment_weight", "start_step", "level_schedule",
    "level_interval",
    "usage_penalty", "usage_decay", "usage_temperature", "facet_projection", "projection_noise",
    "kmeans_iterations", "kmeans_sample",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class MFLIConfig:
    """Encoder fields (``embed_dim`` ... ``l2_norm_eps``, plus any other SASRecConfig / HSTUConfig field
    through ``encoder_options``) and the quantizer's (``ResidualQuantizerConfig``; ``quantizer_seed`` its
    k-means seed)."""

    num_items: int
    max_len: int = 200
    encoder: str = "sasrec"  # "sasrec" | "hstu"
    embed_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    l2_normalize: bool = True
    l2_norm_eps: float = 1e-6
    encoder_options: tuple[tuple[str, Any], ...] = ()
    num_facets: int = 3
    num_levels: int = 2
    codebook_size: int = 64
    commitment_weight: float = 0.25
    start_step: int = 0
    level_schedule: tuple[int, ...] = ()
    level_interval: int = 0
    usage_penalty: float = 0.1
    usage_decay: float = 0.99
    usage_temperature: float = 1.0
    facet_projection: bool = True
    projection_noise: float = 0.1
    kmeans_iterations: int = 10
    kmeans_sample: int = 8192
    quantizer_seed: int = 0

    def __post_init__(self):
        if isinstance(self.encoder_options, Mapping):
            object.__setattr__(self, "encoder_options", tuple(sorted(self.encoder_options.items())))
        object.__setattr__(self, "level_schedule", tuple(int(s) for s in self.level_schedule))
        if self.encoder not in ENCODERS:
            raise ValueError(f"mfli.encoder: expected one of {sorted(ENCODERS)}, got {self.encoder!r}")
        _, enc_cfg = ENCODERS[self.encoder]
        valid = {f.name for f in dataclasses.fields(enc_cfg)} - set(self._encoder_fields())
        unknown = sorted(set(dict(self.encoder_options)) - valid)
        if unknown:
            raise ValueError(
                f"mfli.encoder_options: unknown {self.encoder} fields {unknown}; valid: {sorted(valid)}"
            )
        self.encoder_config()  # validated by the encoder's config
        self.quantizer_config()

    def _encoder_fields(self) -> tuple[str, ...]:
        return ("num_items", "max_len", "embed_dim", "num_blocks", "num_heads", "dropout", "l2_normalize",
                "l2_norm_eps")  # fmt: skip

    def encoder_config(self):
        _, enc_cfg = ENCODERS[self.encoder]
        fields = {k: getattr(self, k) for k in self._encoder_fields()}
        return enc_cfg(**fields, **dict(self.encoder_options))

    def quantizer_config(self) -> rq.ResidualQuantizerConfig:
        fields = {k: getattr(self, k) for k in _QUANTIZER_FIELDS}
        return rq.ResidualQuantizerConfig(dim=self.embed_dim, seed=self.quantizer_seed, **fields)


class MFLI(nnx.Module):
    """User tower + item table + residual quantizer; see the module docstring."""

    def __init__(self, cfg: MFLIConfig, *, rngs: nnx.Rngs):
        if cfg.codebook_size > cfg.num_items:
            raise ValueError(
                f"mfli.codebook_size: k-means needs at least as many items as codes, expected <= num_items="
                f"{cfg.num_items}, got {cfg.codebook_size}"
            )
        self.config = cfg
        encoder_cls, _ = ENCODERS[cfg.encoder]
        self.encoder = encoder_cls(cfg.encoder_config(), rngs=rngs)
        self.quantizer = rq.ResidualQuantizer(cfg.quantizer_config(), rngs=rngs)

    def __call__(self, inputs_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
        return self.encoder(inputs_BxL, mask_BxL)

    def item_embeddings(self) -> jax.Array:
        return self.encoder.item_embeddings()

    def normalize(self, x: jax.Array) -> jax.Array:
        return self.encoder.normalize(x)

    def candidate_embeddings(self) -> jax.Array:
        return self.encoder.candidate_embeddings()

    def user_embedding(self, hidden_BxLxD: jax.Array) -> jax.Array:
        return self.encoder.user_embedding(hidden_BxLxD)

    def quantizer_inputs(self) -> tuple[jax.Array, jax.Array]:
        """(items_NxD, valid_N): the scored item vectors and which rows are items (not padding row 0)."""
        table = self.candidate_embeddings()
        return table, jnp.arange(table.shape[0]) > 0

    def item_codes(self) -> jax.Array:
        """codes_NxFxL of every row (row 0 is padding) at the current step's active levels."""
        return self.quantizer.quantize(self.quantizer_inputs()[0])[1]

    def quantized_items(self) -> jax.Array:
        """quantized_NxFxD of every row at the current step's active levels."""
        return self.quantizer.quantize(self.quantizer_inputs()[0])[0]

    def initialize_levels(self, step: jax.Array, done_L: jax.Array | None = None) -> jax.Array:
        """k-means initialization of every level that is due (its activation step reached, ``step``
        traced) and not ``done_L`` yet, in level order, each from the residuals of the levels before it.
        -> the new ``done_L``. Called by ``MFLITask.prepare``, which keeps ``done_L`` in the task state, so
        a non-finite step (whose state the Trainer throws away) leaves the level due for the next step."""
        c = self.quantizer.config
        items_NxD, valid_N = self.quantizer_inputs()
        x_NxFxD = jax.lax.stop_gradient(self.quantizer.facet_inputs(items_NxD))
        key = jax.random.key(c.seed)
        cb = self.quantizer.codebooks[...]
        done_L = jnp.zeros((len(c.level_steps),), bool) if done_L is None else done_L
        for level, at in enumerate(c.level_steps):

            def init(cb, level=level):
                return rq.kmeans_level(
                    cb, x_NxFxD, valid_N, level, jax.random.fold_in(key, level), c.kmeans_iterations,
                    c.kmeans_sample,
                )  # fmt: skip

            due = (step >= at) & ~done_L[level]
            cb = jax.lax.cond(due, init, lambda cb: cb, cb)
            done_L = done_L.at[level].set(done_L[level] | due)
        self.quantizer.codebooks[...] = cb
        return done_L


def label_examples(split, label_types: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
    """Per-position label masks aligned with ``split.train_examples(max_len)['targets']``: key
    ``label_<type>`` (N, L) bool for the rated types (``any_rating``: every rated next item; ``rating_ge_4``:
    next items rated >= 4)."""
    ratings = split.dataset.ratings
    out = {}
    for name in label_types:
        if name not in _RATED_LABELS:
            continue
        if ratings is None:
            raise ValueError(
                f"label_weights: label type {name!r} needs ratings; dataset {split.dataset.name!r} has none "
                "(use 'next_item')"
            )
        rows = []
        for u, seq in enumerate(split.train):
            if len(seq) < 2:  # make_train_examples skips these users too
                continue
            r = np.asarray(ratings[u][: len(seq)])[1:]  # the training targets' ratings
            rows.append((r >= 4.0 if name == "rating_ge_4" else np.ones_like(r, bool)).astype(np.int32))
        out[f"label_{name}"] = batching.left_pad(rows, max_len) != 0
    return out


def mfli_loss(
    cfg: LossConfig,
    label_weights: Sequence[tuple[str, float]],
    quantized_weight: float,
    model: MFLI,
    batch: dict,
    rng: jax.Array,
) -> tuple[jax.Array, dict]:
    """The training objective of the module docstring -> (loss, metrics)."""
    quantizer = model.quantizer
    # The Trainer's step (MFLITask.prepare); a loop of its own just counts.
    step = batch["quantizer_step"] if "quantizer_step" in batch else quantizer.step[...] + 1
    quantizer.step[...] = jnp.asarray(step, jnp.int32)
    hidden_BxLxD, aux, aux_metrics = forward_with_aux(model, batch["inputs"], batch["mask"])
    items_NxD, valid_N = model.quantizer_inputs()
    qout = quantizer(items_NxD, valid_N)
    started = (qout.metrics["rq/active_levels"] > 0).astype(jnp.float32)
    targets_BxL = batch["targets"]
    kwargs = dict(
        num_negatives=cfg.num_negatives,
        negatives=cfg.negatives,
        temperature=cfg.temperature,
        l2_normalize=model.config.l2_normalize,
        l2_norm_eps=model.config.l2_norm_eps,
    )
    # One vmapped sampled softmax per label type over [raw table, facet 0, ..., facet F-1] (same negatives).
    tables_KxNxD = jnp.concatenate([model.item_embeddings()[None], jnp.moveaxis(qout.st_NxFxD, 1, 0)])

    def ssm(table_NxD, mask_BxL):
        loss, m = losses.sampled_softmax_loss(hidden_BxLxD, targets_BxL, mask_BxL, table_NxD, rng, **kwargs)
        return loss, m["sampled_accuracy"], m["num_valid"]

    total = jnp.zeros((), jnp.float32)
    metrics: dict[str, jax.Array] = {}
    for name, weight in label_weights:
        mask_BxL = batch["mask"] if name == "next_item" else batch["mask"] & batch[f"label_{name}"]
        loss_K, accuracy_K, count_K = jax.vmap(ssm, in_axes=(0, None))(tables_KxNxD, mask_BxL)
        raw, quant = loss_K[0], jnp.mean(loss_K[1:])  # facet losses averaged
        total = total + weight * (raw + quantized_weight * started * quant)
        metrics |= {
            f"{name}/raw_loss": raw,
            f"{name}/quantized_loss": quant,
            f"{name}/sampled_accuracy": accuracy_K[0],
            f"{name}/num_valid": count_K[0],
        }
    metrics |= {**qout.metrics, **aux_metrics, "quantizer_loss": qout.loss}
    return total + qout.loss + aux, metrics


@partial(jax.jit, static_argnums=0)
def _code_metrics(graphdef, state) -> dict:
    model = nnx.merge(graphdef, state)
    items_NxD, valid_N = model.quantizer_inputs()
    quant_NxFxD, codes_NxFxL = model.quantizer.quantize(items_NxD)
    x_NxFxD = model.quantizer.facet_inputs(items_NxD)
    w = valid_N.astype(jnp.float32)[:, None]
    err = jnp.sum(jnp.sum(jnp.square(quant_NxFxD - x_NxFxD), -1) * w)
    rel = err / jnp.maximum(jnp.sum(jnp.sum(jnp.square(x_NxFxD), -1) * w), 1e-12)
    out = rq.code_usage_metrics(codes_NxFxL, model.quantizer.config.codebook_size, valid_N)
    return {**out, "rq/relative_error": rel, "rq/active_levels": model.quantizer.active_levels()}


class MFLITask(NextItemTask):
    """MFLI on a leave-one-out split; see the module docstring. ``label_weights``: label type -> weight
    (a mapping or pairs); ``quantized_weight``: the weight of the quantized-embedding softmax."""

    def __init__(
        self,
        split,
        *,
        label_weights: Mapping[str, float] | Sequence[tuple[str, float]] = (("next_item", 1.0),),
        quantized_weight: float = 1.0,
        **kwargs: Any,
    ):
        """``kwargs``: NextItemTask's (``max_len``, ``batch_size``, ``loss``, ``eval_batch_size``, ``ks``,
        ``early_stop_metric``, ``eval_impl``, ``batch_iter``)."""
        loss = kwargs.get("loss", LossConfig())
        if loss.name != "sampled_softmax":
            raise ValueError(f"train.loss.name: MFLI trains with 'sampled_softmax', got {loss.name!r}")
        pairs = tuple(sorted(dict(label_weights).items()))
        if not pairs:
            raise ValueError(f"label_weights: expected at least one label type of {LABEL_TYPES}, got none")
        for name, weight in pairs:
            if name not in LABEL_TYPES:
                raise ValueError(f"label_weights: unknown label type {name!r}; expected one of {LABEL_TYPES}")
            if not weight >= 0:
                raise ValueError(f"label_weights[{name!r}]: expected a weight >= 0, got {weight}")
        validation.check_positive("quantized_weight", quantized_weight, allow_zero=True)
        super().__init__(split, **kwargs)
        max_len = self.max_len
        self.label_weights, self.quantized_weight = pairs, float(quantized_weight)
        self.train_examples = {**self.train_examples, **label_examples(split, [n for n, _ in pairs], max_len)}
        self._graphdef = None

    def check_model(self, model) -> None:
        if not isinstance(model, MFLI):
            raise TypeError(f"model: MFLITask trains an MFLI model, got {type(model).__name__}")
        super().check_model(model)
        # prepare() rebuilds the module from the step's params to run the k-means initialization; the
        # other state (dropout counters, the quantizer's step and usage) is not read there.
        self._graphdef, _, self._rest = nnx.split(model, nnx.Param, ...)

    def prepare(self, params, opt_state, task_state, batch, rng, step):
        if self._graphdef is None:
            raise RuntimeError("MFLITask.prepare: check_model(model) was not called (the Trainer calls it)")
        model = nnx.merge(self._graphdef, params, self._rest)
        done_L = model.initialize_levels(step, task_state["levels_initialized"])
        _, params, _ = nnx.split(model, nnx.Param, ...)
        task_state = {**task_state, "levels_initialized": done_L}
        return params, opt_state, task_state, {**batch, "quantizer_step": step}, {}

    def init_state(self, params) -> dict:
        if self._graphdef is None:
            raise RuntimeError("MFLITask.init_state: check_model(model) first (the Trainer calls it)")
        num_levels = len(nnx.merge(self._graphdef, params, self._rest).quantizer.config.level_steps)
        return {"levels_initialized": jnp.zeros((num_levels,), bool)}

    def loss(self, model, batch, rng):
        return mfli_loss(self.loss_cfg, self.label_weights, self.quantized_weight, model, batch, rng)

    def code_metrics(self, model: MFLI) -> dict[str, float]:
        """Code usage of the item table (per facet / level) and its relative quantization error."""
        graphdef, state = nnx.split(model)
        return {k: float(v) for k, v in jax.device_get(_code_metrics(graphdef, state)).items()}

    def evaluate(self, model, split, task_state=None):
        return {**self.rank(model, self.eval_batches(split)), **self.code_metrics(model)}
