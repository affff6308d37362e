"""Unified retrieval model (SilverTorch): one jit-compiled function from user inputs to the final top-N.

    inputs_BxL, mask_BxL --user tower--> user_BxD
      --filtered top-K over main + fresh index (fresh_index.search; filtered items never compete)-->
      candidates (ids_BxK, emb_BxKxD, side_BxKxS)
      --OverArch--> logits_BxKxT --task heads--> predictions_BxKxT --Value Model--> value_BxK
      --top-N by value--> ids_BxN, values_BxN, task_scores_BxNxT

The user tower is any recjax sequence model with ``model(inputs_BxL, mask_BxL) -> hidden_BxLxD``,
``model.user_embedding(hidden) -> user_BxD`` (and ``model.normalize(x)`` when ``normalize_queries``).
Shapes are fixed: missing candidates (fewer than K allowed items, or fewer than N scored) come back as
id -1 with value -inf and task scores 0.

The main-table search is chosen by ``UnifiedConfig.index``: "brute" (``retrieval`` = "exact": ops.topk;
"int8": the fused Int8 ANN op with the filter mask inside the kernel) or "ivf" (``ops.ann.ivf_search`` over
``nprobe`` clusters of a ``unified_ivf.MainIVF``: the filter mask gathered onto the probed clusters inside
the kernel, a Bloom plan evaluated only on the probed clusters' words), or replaced by ``candidate_fn``
(see fresh_index.search). The fresh table is searched exactly in every mode, with the same filter.

Training (``make_scorer_train_step``): the OverArch, heads and value model are trained jointly on
precomputed user embeddings of a frozen tower; the value loss sees the task predictions through
``stop_gradient`` by default, so the value model learns how to weigh tasks without bending them.

Letters: B users, L sequence length, D dim, K candidates, N final results, T tasks, S item side width,
U user side width, V global item ids, E training examples, H excluded ids per user.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from recjax import validation
from recjax.ops import bloom as bloom_op
from recjax.ops import topk
from recjax.retrieval import fresh_index as fresh_lib
from recjax.retrieval import unified_ivf
from recjax.retrieval.overarch import OverArch, multitask_loss, task_predictions
from recjax.retrieval.value_model import ValueModel, value_loss


@dataclass(frozen=True)
class UnifiedConfig:
    k: int = 100  # candidates retrieved
    n_final: int = 10  # results returned after value ranking
    retrieval: str = "exact"  # "exact" | "int8"
    topk_impl: str = "auto"  # ops.topk impl for exact search (and the fresh table)
    ann_impl: str = "auto"  # ops.ann impl for int8 search
    normalize_queries: bool = False  # apply tower.normalize to the user embedding
    bloom_impl: str = (
        "auto"  # ops.bloom impl for the Bloom plan: "auto" (pallas on GPU) | "pallas" | "xla" | ...
    )
    index: str = "brute"  # main table: "brute" (``retrieval``) | "ivf" (int8 IVF, ``ann_impl``)
    nprobe: int = 1  # clusters probed per query with index="ivf"

    def __post_init__(self):
        validation.check_positive("UnifiedConfig.k", self.k)
        validation.check_positive("UnifiedConfig.n_final", self.n_final)
        if self.n_final > self.k:
            raise ValueError(f"UnifiedConfig.n_final: expected <= k={self.k}, got {self.n_final}")
        if self.retrieval not in fresh_lib.SEARCH_IMPLS:
            raise ValueError(
                f"UnifiedConfig.retrieval: expected one of {fresh_lib.SEARCH_IMPLS}, got {self.retrieval!r}"
            )
        if self.index not in ("brute", "ivf"):
            raise ValueError(f"UnifiedConfig.index: expected 'brute' or 'ivf', got {self.index!r}")
        validation.check_positive("UnifiedConfig.nprobe", self.nprobe)
        if self.bloom_impl not in bloom_op.IMPLS:
            raise ValueError(
                f"UnifiedConfig.bloom_impl: expected one of {bloom_op.IMPLS}, got {self.bloom_impl!r}"
            )


class Scorer(nnx.Module):
    """OverArch + heads + value model: the trainable second stage."""

    def __init__(self, overarch: OverArch, value_model: ValueModel):
        if overarch.config.num_tasks != value_model.config.num_tasks:
            raise ValueError(
                f"value_model: expected {overarch.config.num_tasks} task weights (one per OverArch task), "
                f"got {value_model.config.num_tasks}"
            )
        self.overarch = overarch
        self.value_model = value_model

    @property
    def tasks(self):
        return self.overarch.config.tasks

    def __call__(self, user_BxD, cand_BxKxD, item_side_BxKxS=None, user_side_BxU=None):
        """-> (logits_BxKxT, predictions_BxKxT, values_BxK)."""
        logits = self.overarch(user_BxD, cand_BxKxD, item_side_BxKxS, user_side_BxU)
        preds = task_predictions(logits, self.tasks)
        return logits, preds, self.value_model(preds)


class UnifiedModel(nnx.Module):
    def __init__(self, tower: nnx.Module, scorer: Scorer):
        self.tower = tower
        self.scorer = scorer


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class UnifiedOutput:
    ids_BxN: jax.Array  # global item ids, best value first; -1 = missing
    values_BxN: jax.Array  # value-model output; -inf = missing
    task_scores_BxNxT: jax.Array  # per-task predictions (probabilities / regressed values); 0 = missing
    candidate_ids_BxK: jax.Array  # the retrieval stage's output, best score first
    candidate_scores_BxK: jax.Array


def bloom_allowed(
    bloom_index: bloom_op.BloomIndex, plan: bloom_op.BloomPlan, num_ids: int, *, impl: str = "auto"
) -> jax.Array:
    """(B, V) bool allow-mask from a compiled Bloom plan over an index whose layout row r is global id r.
    Ids the Bloom index does not cover (e.g. fresh items added after it was built) are not allowed.
    Jittable; AND/OR queries have no false negatives, false positives at the Bloom rate (see bloom.py)."""
    words_BxW = bloom_op.filter_words(bloom_index, plan, impl=impl)
    b = words_BxW.shape[0]
    bits = (words_BxW[..., None] >> jnp.arange(32, dtype=words_BxW.dtype)) & 1  # bit j = item 32 w + j
    n = min(bloom_index.num_items, num_ids)
    allowed_BxN = bits.reshape(b, -1)[:, :n].astype(bool)
    return jnp.pad(allowed_BxN, ((0, 0), (0, num_ids - n)))


def serve(
    model: UnifiedModel,
    config: UnifiedConfig,
    index: fresh_lib.FreshIndex,
    inputs_BxL: jax.Array,
    mask_BxL: jax.Array,
    *,
    allowed=None,
    exclude_BxH=None,
    user_side_BxU=None,
    bloom: tuple[bloom_op.BloomIndex, bloom_op.BloomPlan] | None = None,
    candidate_fn: Callable | None = None,
    ivf: unified_ivf.MainIVF | None = None,
) -> UnifiedOutput:
    """The whole pipeline as a traceable function (UnifiedRetrieval jits it once). ``allowed`` (V,) or
    (B, V) bool, ``exclude_BxH`` ids (<= 0 padding) and a Bloom (index, plan) filter are ANDed.
    ``ivf``: the main index when ``config.index == "ivf"``."""
    tower = model.tower
    user_BxD = tower.user_embedding(tower(inputs_BxL, mask_BxL)).astype(jnp.float32)
    if config.normalize_queries:
        user_BxD = tower.normalize(user_BxD)
    b = user_BxD.shape[0]
    allowed_BxV = None if allowed is None else jnp.broadcast_to(allowed, (b, index.id_capacity))
    plan_in_ivf = None
    if bloom is not None and config.index == "ivf":  # main: probe, then filter; fresh: its ids' words
        allowed_BxV = unified_ivf.bloom_on_fresh(*bloom, index.fresh, allowed_BxV, index.id_capacity)
        plan_in_ivf = bloom[1]
    elif bloom is not None:
        from_bloom = bloom_allowed(*bloom, index.id_capacity, impl=config.bloom_impl)
        allowed_BxV = from_bloom if allowed_BxV is None else allowed_BxV & from_bloom
    if exclude_BxH is not None:  # e.g. the user's history; ids <= 0 are padding
        ex = jnp.where(exclude_BxH > 0, exclude_BxH, -1)
        keep = ~topk.exclusion_mask(ex, index.id_capacity)
        allowed_BxV = keep if allowed_BxV is None else allowed_BxV & keep
    if config.index == "ivf":
        candidate_fn = unified_ivf.ivf_candidates(ivf, config.nprobe, plan=plan_in_ivf, impl=config.ann_impl)
    cands = fresh_lib.search(
        index,
        user_BxD,
        config.k,
        allowed=allowed_BxV,
        impl=config.retrieval,
        topk_impl=config.topk_impl,
        ann_impl=config.ann_impl,
        candidate_fn=candidate_fn,
    )
    side = cands.side_BxKxS if model.scorer.overarch.config.item_side_dim else None
    _, preds_BxKxT, values_BxK = model.scorer(user_BxD, cands.emb_BxKxD, side, user_side_BxU)
    present = cands.ids_BxK >= 0
    values_BxK = jnp.where(present, values_BxK, -jnp.inf)
    top_BxN, pos_BxN = jax.lax.top_k(values_BxK, config.n_final)
    got = ~jnp.isneginf(top_BxN)
    ids = jnp.where(got, jnp.take_along_axis(cands.ids_BxK, pos_BxN, axis=1), -1)
    scores = jnp.take_along_axis(preds_BxKxT, pos_BxN[..., None], axis=1)
    return UnifiedOutput(
        ids, top_BxN, jnp.where(got[..., None], scores, 0.0), cands.ids_BxK, cands.scores_BxK
    )


def tower_index(
    tower: nnx.Module,
    *,
    side_NxS=None,
    fresh_capacity: int = 0,
    id_capacity: int | None = None,
    quantize: bool = False,
) -> fresh_lib.FreshIndex:
    """Main index over a tower's scoring table (row = item id, row 0 = padding): ``candidate_embeddings()``
    if the tower has it, else ``normalize(item_embeddings())`` / ``item_embeddings()``."""
    if hasattr(tower, "candidate_embeddings"):
        table = tower.candidate_embeddings()
    elif hasattr(tower, "normalize"):
        table = tower.normalize(tower.item_embeddings())
    else:
        table = tower.item_embeddings()
    return fresh_lib.build_index(
        jax.device_get(table),
        side_NxS=side_NxS,
        fresh_capacity=fresh_capacity,
        id_capacity=id_capacity,
        quantize=quantize,
    )


class UnifiedRetrieval:
    """Holds (graphdef, state) of a UnifiedModel and one jitted serve function. The model is put in eval
    mode first (``model.eval()``: dropout off), since serving is deterministic.

    ``trace_count`` counts how often the pipeline was traced (a new trace = a compilation): calling
    again with the same shapes, dtypes and argument structure (e.g. ``allowed`` given or None) reuses it.
    """

    def __init__(self, model: UnifiedModel, config: UnifiedConfig, *, candidate_fn: Callable | None = None):
        if candidate_fn is not None and config.index == "ivf":
            raise ValueError("candidate_fn: expected None with UnifiedConfig.index='ivf' (IVF is the search)")
        self.config = config
        model.eval()
        self.graphdef, self.state = nnx.split(model)
        self.trace_count = 0
        self._oa_config = model.scorer.overarch.config

        def fn(
            state,
            index,
            inputs_BxL,
            mask_BxL,
            allowed,
            exclude_BxH,
            user_side_BxU,
            bloom_arrays,
            ivf,
            bloom_static,
        ):
            self.trace_count += 1  # runs only while tracing
            bloom = None
            if bloom_static is not None:  # BloomIndex / BloomPlan are plain dataclasses: rebuilt in the trace
                words_MxW, rows, kinds = bloom_arrays
                bloom = (replace(bloom_static, words_MxW=words_MxW), bloom_op.BloomPlan(rows, kinds))
            return serve(
                nnx.merge(self.graphdef, state),
                config,
                index,
                inputs_BxL,
                mask_BxL,
                allowed=allowed,
                exclude_BxH=exclude_BxH,
                user_side_BxU=user_side_BxU,
                bloom=bloom,
                candidate_fn=candidate_fn,
                ivf=ivf,
            )

        self._serve = jax.jit(fn, static_argnames=("bloom_static",))

    def model(self) -> UnifiedModel:
        return nnx.merge(self.graphdef, self.state)

    def update_scorer(self, scorer_params: nnx.State) -> None:
        """New OverArch / heads / value parameters (same shapes: no retrace)."""
        model = self.model()
        nnx.update(model.scorer, scorer_params)
        self.state = nnx.state(model)

    def __call__(
        self,
        index: fresh_lib.FreshIndex,
        inputs_BxL,
        mask_BxL,
        *,
        allowed=None,
        exclude_BxH=None,
        user_side_BxU=None,
        bloom: tuple[bloom_op.BloomIndex, bloom_op.BloomPlan] | None = None,
        ivf: unified_ivf.MainIVF | None = None,
    ) -> UnifiedOutput:
        """``bloom``: a Bloom index whose layout row r is global id r (built over ``id_capacity`` rows or
        fewer) and a plan with one query per user (``bloom.compile_queries``). ``ivf``: the main index
        for ``UnifiedConfig.index="ivf"`` (``unified_ivf.build_main_ivf``; with a Bloom filter, built with
        its ``bloom_features``)."""
        cfg, oa = self.config, self._oa_config
        validation.check_shape("inputs_BxL", inputs_BxL, (None, None))
        validation.check_dtype("inputs_BxL", inputs_BxL, "iu")
        validation.check_shape("mask_BxL", mask_BxL, inputs_BxL.shape)
        validation.check_dtype("mask_BxL", mask_BxL, "b")
        b = inputs_BxL.shape[0]
        if index.dim != oa.embed_dim:
            raise ValueError(
                f"index: expected embedding dim {oa.embed_dim} (the OverArch's), got {index.dim}"
            )
        if index.side_dim != oa.item_side_dim:
            raise ValueError(f"index: expected item side width {oa.item_side_dim}, got {index.side_dim}")
        impl = cfg.retrieval if cfg.index == "brute" else "exact"  # "ivf" needs no int8 copy of main
        fresh_lib.check_search_inputs(index, cfg.k, batch=b, allowed=allowed, impl=impl)
        if (ivf is None) != (cfg.index == "brute"):
            raise ValueError(
                f"ivf: expected a MainIVF exactly when UnifiedConfig.index='ivf', got "
                f"{'None' if ivf is None else 'a MainIVF'} with index={cfg.index!r}"
            )
        if exclude_BxH is not None:
            validation.check_shape("exclude_BxH", exclude_BxH, (b, None))
            validation.check_dtype("exclude_BxH", exclude_BxH, "iu")
        if oa.user_side_dim:
            if user_side_BxU is None:
                raise ValueError(f"user_side_BxU: the OverArch expects width {oa.user_side_dim}, got None")
            validation.check_shape("user_side_BxU", user_side_BxU, (b, oa.user_side_dim))
            validation.check_finite("user_side_BxU", user_side_BxU)
        elif user_side_BxU is not None:
            raise ValueError("user_side_BxU: the OverArch has no user side features (width 0)")
        bloom_arrays = bloom_static = None
        if bloom is not None:
            bloom_index, plan = bloom
            if bloom_index.num_items > index.id_capacity:
                v, got = index.id_capacity, bloom_index.num_items
                raise ValueError(f"bloom: expected an index over at most V={v} ids, got {got}")
            validation.check_shape("bloom plan rows_BxCxTxK", plan.rows_BxCxTxK, (b, None, None, None))
            bloom_arrays = (bloom_index.words_MxW, plan.rows_BxCxTxK, plan.kinds_BxCxT)
            bloom_static = replace(bloom_index, words_MxW=None)
        if ivf is not None:
            unified_ivf.check_main_ivf(ivf, index, cfg.nprobe, None if bloom is None else bloom[0])
        return self._serve(
            self.state, index, inputs_BxL, mask_BxL, allowed, exclude_BxH, user_side_BxU, bloom_arrays, ivf,
            bloom_static=bloom_static,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------ training


def scorer_loss(
    scorer: Scorer,
    batch: Mapping[str, jax.Array],
    *,
    task_weights=None,
    value_weight: float = 1.0,
    stop_value_grad: bool = True,
):
    """Batch of E single (user, item) examples: ``user_emb`` (E, D), ``item_emb`` (E, D), optional
    ``item_side`` (E, S) / ``user_side`` (E, U), ``labels`` / ``label_mask`` (E, T), ``value_target`` (E,)."""
    side = batch.get("item_side")
    logits = scorer.overarch(
        batch["user_emb"], batch["item_emb"][:, None], None if side is None else side[:, None],
        batch.get("user_side"),
    )[:, 0]  # fmt: skip
    task_loss, per_task = multitask_loss(
        logits, batch["labels"], batch["label_mask"], scorer.tasks, task_weights
    )
    preds = task_predictions(logits, scorer.tasks)
    values = scorer.value_model(jax.lax.stop_gradient(preds) if stop_value_grad else preds)
    v_loss = value_loss(values, batch["value_target"])
    metrics = {**{f"loss/{k}": v for k, v in per_task.items()}, "loss/value": v_loss}
    return task_loss + value_weight * v_loss, metrics


def make_scorer_train_step(graphdef, optimizer: optax.GradientTransformation, **loss_kwargs) -> Callable:
    """(params, rest, opt_state, batch) -> (params, opt_state, metrics); pure and jitted. ``graphdef``,
    ``params``, ``rest`` from ``nnx.split(scorer, nnx.Param, ...)``: fixed value weights stay in ``rest``.
    The scorer has no mutable state (no dropout / batch statistics), so ``rest`` is read, never updated;
    a scorer with dropout would need the ``nnx.value_and_grad`` pattern of recjax/train/trainer.py."""

    @jax.jit
    def step(params, rest, opt_state, batch):
        def loss_of(p):
            return scorer_loss(nnx.merge(graphdef, p, rest), batch, **loss_kwargs)

        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step
