"""Multifaceted residual quantizer of MFLI ("Rethinking ANN-based Retrieval: Multifaceted Learnable Index",
arXiv 2602.16124): per facet f an independent residual quantization of the item embeddings, L levels of M
codewords each, co-trained with the retrieval model.

Quantization (facet f, active levels A): ``r_0 = x_f``; level l picks ``c_l = argmin_m |r_l - C[f, l, m]|^2``
and ``r_{l+1} = r_l - C[f, l, c_l]``; the quantized embedding is ``q_f = sum_{l < A} C[f, l, c_l]``. Levels
at or beyond A (not active yet) contribute zero and report code 0.

Facets: with ``facet_projection`` each facet quantizes its own linear projection ``x_f = P_f x``, rescaled to
the norm of x (so the losses cannot shrink P_f; an l2-normalized item stays a unit vector) (P_f starts
at the identity plus a small seeded perturbation, so the facets differ from the first step and can drift
apart with training); without it every facet quantizes the raw x and the facets differ only by their
k-means seeds. The paper's facets are separate codings of one item; a projection per facet is our choice
of how they come to differ (a retrieval through facet f scores ``<u, q_f>``, so P_f is part of the index).

Training forward (:meth:`ResidualQuantizer.__call__`):
- straight-through: ``st_f = x_f + stop_gradient(q_f - x_f)`` (value q_f, gradient identity w.r.t. x_f);
- VQ-VAE loss, per item and facet: ``|q_f - sg(x_f)|^2 + beta |sg(q_f) - x_f|^2`` (codebook + commitment,
  beta = ``commitment_weight``), summed over D, averaged over the valid items and the facets, on the total
  quantized vector (all active levels together, not one term per level);
- usage penalty (``usage_penalty`` weight): an EMA ``u[f, l, m]`` of the hard assignment frequencies of the
  valid items (decay ``usage_decay``, updated in training for the active levels) marks the over-used codes
  ``over = relu(u - 1/M)``; the penalty is ``M * sum_m over[f, l, m] * P[f, l, m]``, averaged over facets
  and active levels, where ``P`` is the soft assignment mass of this call's items,
  ``P[f, l, m] = mean_n softmax_m(-d[n, f, l, m] / (tau * sg(mean_n min_m d[n, f, l, m])))`` (d the squared
  distances of the level's residual to its codewords, tau = ``usage_temperature``). It is 0 at uniform
  usage and grows with the excess mass on over-used codes; its gradient moves items and codewords so that
  less mass lands on those codes (the hard argmin itself has no gradient).
- delayed start and progressive levels: level l becomes active at step ``level_schedule[l]``
  (``level_schedule[0] == start_step``), or, with no schedule, at ``start_step + l * level_interval``
  (default interval 0: every level at the start). Before ``start_step`` nothing is active: the
  quantized vectors and every quantizer loss are zero (the model's loss then uses raw embeddings only).
- k-means initialization: the step at which level l activates first replaces ``C[:, l]`` by a k-means of
  the level's residuals ``r_l`` (computed with the levels before it as trained so far), per facet:
  :func:`kmeans_codebook` (fixed shapes, jit friendly, seeded: M distinct valid rows of a seeded sample as
  the initial centroids, Lloyd iterations, an empty cluster re-seeded by the valid point farthest from its
  centroid). The model triggers it (``recjax.models.mfli``: inside the Trainer's ``prepare`` hook).

The step counter (:class:`QuantizerStep`) and the usage EMA (:class:`CodeUsage`) are non-parameter module
state, so they live in the Trainer's state and are checkpointed with it.

Serving-side interface (used by ``recjax.retrieval.mfli_index``): :func:`assign_codes` (plain jnp nearest
codeword residual assignment of new items), :meth:`ResidualQuantizer.quantize`,
``codebooks_FxLxMxD`` and ``projection_FxDxD`` properties; :func:`code_usage_metrics` (perplexity, fraction
of codes used, max/mean usage per facet and level).

Letters: N items, F facets, L levels, M codes per codebook, D dim, S k-means sample rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recjax import validation

_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class ResidualQuantizerConfig:
    dim: int
    num_facets: int = 1
    num_levels: int = 2
    codebook_size: int = 64
    commitment_weight: float = 0.25
    start_step: int = 0
    level_schedule: tuple[int, ...] = ()  # step at which each level activates; () = by level_interval
    level_interval: int = 0  # without a schedule, level l activates at start_step + l * level_interval
    usage_penalty: float = 0.0
    usage_decay: float = 0.99
    usage_temperature: float = 1.0
    facet_projection: bool = False
    projection_noise: float = 0.1  # std of the perturbation of the identity, times 1/sqrt(D)
    kmeans_iterations: int = 10
    kmeans_sample: int = 8192  # rows k-means sees at most (a seeded sample of the valid items)
    seed: int = 0

    def __post_init__(self):
        for name in ("dim", "num_facets", "num_levels", "kmeans_sample"):
            validation.check_positive(f"quantizer.{name}", getattr(self, name))
        if self.codebook_size < 2:
            raise ValueError(f"quantizer.codebook_size: expected >= 2, got {self.codebook_size}")
        if self.kmeans_sample < self.codebook_size:
            raise ValueError(
                f"quantizer.kmeans_sample: expected >= codebook_size={self.codebook_size}, got "
                f"{self.kmeans_sample}"
            )
        for name in (
            "commitment_weight",
            "usage_penalty",
            "start_step",
            "level_interval",
            "kmeans_iterations",
        ):
            validation.check_positive(f"quantizer.{name}", getattr(self, name), allow_zero=True)
        if not 0.0 <= self.usage_decay < 1.0:
            raise ValueError(f"quantizer.usage_decay: expected a value in [0, 1), got {self.usage_decay}")
        validation.check_positive("quantizer.usage_temperature", self.usage_temperature)
        validation.check_positive("quantizer.projection_noise", self.projection_noise, allow_zero=True)
        sched = tuple(self.level_schedule)
        if sched:
            if len(sched) != self.num_levels:
                raise ValueError(
                    f"quantizer.level_schedule: expected {self.num_levels} steps (one per level), got {sched}"
                )
            if sched[0] != self.start_step:
                raise ValueError(
                    f"quantizer.level_schedule: level 0 starts the quantizer, expected level_schedule[0] == "
                    f"start_step={self.start_step}, got {sched}"
                )
            if any(b < a for a, b in zip(sched, sched[1:])):
                raise ValueError(f"quantizer.level_schedule: expected non-decreasing steps, got {sched}")

    @property
    def level_steps(self) -> tuple[int, ...]:
        """The step at which each level activates."""
        if self.level_schedule:
            return tuple(int(s) for s in self.level_schedule)
        return tuple(self.start_step + level * self.level_interval for level in range(self.num_levels))

    def active_levels(self, step) -> jax.Array:
        """Number of active levels at ``step`` (int32; 0 before ``start_step``)."""
        steps_L = jnp.asarray(self.level_steps, jnp.int32)
        return jnp.sum(steps_L <= jnp.asarray(step, jnp.int32)).astype(jnp.int32)


class QuantizerStep(nnx.Variable):
    """The step of the latest training forward (-1 before any); drives delayed start and the level
    schedule (levels active at that step are the ones :meth:`ResidualQuantizer.quantize` uses)."""


class CodeUsage(nnx.Variable):
    """EMA of each code's share of the valid items' hard assignments, (F, L, M); starts uniform."""


# -- pure functions ---------------------------------------------------------------------------------------


def _check_codebooks(codebooks_FxLxMxD) -> None:
    validation.check_dtype("codebooks_FxLxMxD", codebooks_FxLxMxD, "f")
    if np.ndim(codebooks_FxLxMxD) != 4:
        raise ValueError(f"codebooks_FxLxMxD: expected shape (F, L, M, D), got {np.shape(codebooks_FxLxMxD)}")
    F, L, M, D = np.shape(codebooks_FxLxMxD)
    if F < 1 or L < 1 or D < 1:
        raise ValueError(f"codebooks_FxLxMxD: expected F, L, D >= 1, got shape {(F, L, M, D)}")
    if M < 2:
        raise ValueError(f"codebooks_FxLxMxD: expected a codebook size M >= 2, got shape {(F, L, M, D)}")
    validation.check_finite("codebooks_FxLxMxD", codebooks_FxLxMxD)


def _check_items(name: str, items_NxD, dim: int) -> None:
    validation.check_dtype(name, items_NxD, "f")
    validation.check_shape(name, items_NxD, (None, dim))
    validation.check_finite(name, items_NxD)


def facet_inputs(
    items_NxD: jax.Array, num_facets: int, projection_FxDxD: jax.Array | None = None
) -> jax.Array:
    """-> x_NxFxD: each facet's input (``items @ P_f`` with projections, else the items repeated)."""
    x = jnp.asarray(items_NxD, jnp.float32)
    if projection_FxDxD is None:
        return jnp.broadcast_to(x[:, None, :], (x.shape[0], num_facets, x.shape[1]))
    y = jnp.einsum("nd,fde->nfe", x, projection_FxDxD.astype(jnp.float32))
    # Rescaled to the input's norm: shrinking P_f would otherwise shrink the commitment loss for free.
    norm_in = jnp.sqrt(jnp.sum(x * x, -1, keepdims=True))[:, None]
    return y * norm_in * jax.lax.rsqrt(jnp.maximum(jnp.sum(y * y, -1, keepdims=True), _EPS))


def _sq_distances(r_NxFxD: jax.Array, cb_FxMxD: jax.Array) -> jax.Array:
    """|r - c|^2 per item, facet and code -> (N, F, M), clamped at 0 (the expansion can round below)."""
    cross = jnp.einsum("nfd,fmd->nfm", r_NxFxD, cb_FxMxD, preferred_element_type=jnp.float32)
    d = jnp.sum(r_NxFxD * r_NxFxD, -1)[..., None] - 2.0 * cross + jnp.sum(cb_FxMxD * cb_FxMxD, -1)[None]
    return jnp.maximum(d, 0.0)


def residual_quantize(
    x_NxFxD: jax.Array, codebooks_FxLxMxD: jax.Array, active_levels
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Residual quantization of facet inputs -> (quantized_NxFxD, codes_NxFxL, distances_LxNxFxM). Levels
    ``>= active_levels`` (may be traced) contribute zero and get code 0. Differentiable w.r.t. the
    codebooks through the gathered codewords (the argmin is not)."""
    F, L, M, _ = codebooks_FxLxMxD.shape
    active = jnp.asarray(active_levels, jnp.int32)
    resid, quant = x_NxFxD, jnp.zeros_like(x_NxFxD)
    codes, dists = [], []
    facet_F = jnp.arange(F)
    for level in range(L):
        cb_FxMxD = codebooks_FxLxMxD[:, level].astype(jnp.float32)
        d_NxFxM = _sq_distances(resid, cb_FxMxD)  # differentiable: the usage penalty reads it
        code_NxF = jnp.argmin(jax.lax.stop_gradient(d_NxFxM), axis=-1).astype(jnp.int32)
        on = level < active
        chosen_NxFxD = jnp.where(on, cb_FxMxD[facet_F[None, :], code_NxF], 0.0)
        quant, resid = quant + chosen_NxFxD, resid - chosen_NxFxD
        codes.append(jnp.where(on, code_NxF, 0))
        dists.append(d_NxFxM)
    return quant, jnp.stack(codes, axis=-1), jnp.stack(dists)


def assign_codes(
    items_NxD: jax.Array,
    codebooks_FxLxMxD: jax.Array,
    active_levels: int,
    projection_FxDxD: jax.Array | None = None,
) -> jax.Array:
    """Nearest-codeword residual assignment -> codes_NxFxL int32 in [0, M) (levels ``>= active_levels``:
    code 0). ``projection_FxDxD``: the quantizer's facet projections, if it has them. Plain jnp (jit it or
    not); value checks run on concrete inputs."""
    _check_codebooks(codebooks_FxLxMxD)
    F, L, _, D = np.shape(codebooks_FxLxMxD)
    _check_items("items_NxD", items_NxD, D)
    if not validation.is_tracer(active_levels) and not 0 <= int(active_levels) <= L:
        raise ValueError(f"active_levels: expected a value in [0, {L}], got {active_levels}")
    if projection_FxDxD is not None:
        validation.check_shape("projection_FxDxD", projection_FxDxD, (F, D, D))
        validation.check_finite("projection_FxDxD", projection_FxDxD)
    x = facet_inputs(items_NxD, F, projection_FxDxD)
    return residual_quantize(x, jnp.asarray(codebooks_FxLxMxD, jnp.float32), active_levels)[1]


def kmeans(x_SxD: jax.Array, weight_S: jax.Array, init_MxD: jax.Array, iterations: int) -> jax.Array:
    """Weighted Lloyd iterations from ``init_MxD`` (fixed shapes). Rows of weight 0 are ignored; a cluster
    left empty is re-seeded by a valid point farthest from its centroid (distinct points for distinct empty
    clusters, farthest first in cluster order)."""
    M = init_MxD.shape[0]
    w = weight_S.astype(jnp.float32)

    def step(_, cents_MxD):
        d_SxM = _sq_distances(x_SxD[:, None, :], cents_MxD[None])[:, 0]
        assign_S = jnp.argmin(d_SxM, axis=1)
        sums_MxD = jax.ops.segment_sum(x_SxD * w[:, None], assign_S, num_segments=M)
        counts_M = jax.ops.segment_sum(w, assign_S, num_segments=M)
        new = jnp.where(counts_M[:, None] > 0, sums_MxD / jnp.maximum(counts_M, _EPS)[:, None], cents_MxD)
        err_S = jnp.where(w > 0, jnp.min(d_SxM, axis=1), -jnp.inf)
        far_M = jax.lax.top_k(err_S, M)[1]  # the M farthest valid points, farthest first
        empty_M = counts_M <= 0
        rank_M = jnp.cumsum(empty_M) - 1
        return jnp.where(empty_M[:, None], x_SxD[far_M[jnp.maximum(rank_M, 0)]], new)

    return jax.lax.fori_loop(0, iterations, step, init_MxD.astype(jnp.float32))


def kmeans_sample(valid_N: jax.Array, key: jax.Array, sample: int) -> tuple[jax.Array, jax.Array]:
    """A seeded sample of ``min(sample, N)`` rows, valid rows first in random order -> (rows_S, valid_S)."""
    n = valid_N.shape[0]
    s = min(sample, n)
    order = jnp.argsort(jnp.where(valid_N, jax.random.uniform(key, (n,)), 2.0))
    rows_S = order[:s]
    return rows_S, valid_N[rows_S]


def kmeans_codebook(
    x_NxD: jax.Array, valid_N: jax.Array, key: jax.Array, num_codes: int, iterations: int, sample: int
) -> jax.Array:
    """k-means codebook (M, D) of the valid rows of ``x_NxD``: the first M rows of a seeded sample
    (:func:`kmeans_sample`, distinct valid rows when there are >= M) start Lloyd's :func:`kmeans`."""
    rows_S, valid_S = kmeans_sample(valid_N, key, sample)
    x_SxD = x_NxD[rows_S].astype(jnp.float32)
    return kmeans(x_SxD, valid_S, x_SxD[:num_codes], iterations)


def kmeans_level(
    codebooks_FxLxMxD: jax.Array,
    x_NxFxD: jax.Array,
    valid_N: jax.Array,
    level: int,
    key: jax.Array,
    iterations: int,
    sample: int,
) -> jax.Array:
    """The codebooks with level ``level`` (static) replaced, per facet f, by :func:`kmeans_codebook` of the
    level's residuals (the levels before it as they are now) with key ``fold_in(key, f)``."""
    F, L, M, _ = codebooks_FxLxMxD.shape
    if not 0 <= level < L:
        raise ValueError(f"level: expected a level in [0, {L}), got {level}")
    quant, _, _ = residual_quantize(x_NxFxD, codebooks_FxLxMxD, level)
    resid_NxFxD = jax.lax.stop_gradient(x_NxFxD - quant)
    keys_F = jax.vmap(lambda f: jax.random.fold_in(key, f))(jnp.arange(F))
    new_FxMxD = jax.vmap(
        lambda x_NxD, k: kmeans_codebook(x_NxD, valid_N, k, M, iterations, sample), in_axes=(1, 0)
    )(resid_NxFxD, keys_F)
    return codebooks_FxLxMxD.at[:, level].set(new_FxMxD.astype(codebooks_FxLxMxD.dtype))


def code_usage_metrics(codes_NxFxL: jax.Array, num_codes: int, valid_N: jax.Array | None = None) -> dict:
    """Per facet f and level l, over the valid items: ``rq/f{f}_l{l}/perplexity`` (exp of the entropy of
    the code frequencies; M at uniform use), ``used`` (fraction of the M codes with an item),
    ``max_over_mean`` (largest code's item count over the mean count N / M), and their worst values over
    facets and levels (``rq/min_perplexity``, ``rq/min_used``, ``rq/max_over_mean``)."""
    n, F, L = codes_NxFxL.shape
    valid = jnp.ones((n,), jnp.float32) if valid_N is None else valid_N.astype(jnp.float32)
    onehot_NxFxLxM = jax.nn.one_hot(codes_NxFxL, num_codes, dtype=jnp.float32)
    counts_FxLxM = jnp.einsum("n,nflm->flm", valid, onehot_NxFxLxM)
    total = jnp.maximum(jnp.sum(valid), 1.0)
    freq = counts_FxLxM / total
    perplexity = jnp.exp(-jnp.sum(jnp.where(freq > 0, freq * jnp.log(jnp.maximum(freq, _EPS)), 0.0), -1))
    used = jnp.mean(counts_FxLxM > 0, axis=-1)
    max_over_mean = jnp.max(counts_FxLxM, -1) / (total / num_codes)
    out = {}
    for f in range(F):
        for level in range(L):
            out[f"rq/f{f}_l{level}/perplexity"] = perplexity[f, level]
            out[f"rq/f{f}_l{level}/used"] = used[f, level]
            out[f"rq/f{f}_l{level}/max_over_mean"] = max_over_mean[f, level]
    out.update(
        {
            "rq/min_perplexity": jnp.min(perplexity),
            "rq/min_used": jnp.min(used),
            "rq/max_over_mean": jnp.max(max_over_mean),
        }
    )
    return out


def usage_penalty(
    dists_LxNxFxM: jax.Array, usage_FxLxM: jax.Array, valid_N: jax.Array, active, temperature: float
) -> jax.Array:
    """The over-use penalty of the module docstring, averaged over facets and active levels (0 if none)."""
    L, _, F, M = dists_LxNxFxM.shape
    valid = valid_N.astype(jnp.float32)
    scale = jnp.sum(jnp.min(dists_LxNxFxM, -1) * valid[None, :, None], axis=1) / jnp.maximum(valid.sum(), 1)
    scale_LxF = jax.lax.stop_gradient(temperature * scale) + 1e-6
    p_LxNxFxM = jax.nn.softmax(-dists_LxNxFxM / scale_LxF[:, None, :, None], axis=-1)
    mass_LxFxM = jnp.einsum("n,lnfm->lfm", valid, p_LxNxFxM) / jnp.maximum(valid.sum(), 1)
    over_LxFxM = jax.nn.relu(jnp.swapaxes(jax.lax.stop_gradient(usage_FxLxM), 0, 1) - 1.0 / M)
    per_LxF = M * jnp.sum(over_LxFxM * mass_LxFxM, -1)
    on_L = (jnp.arange(L) < active).astype(jnp.float32)
    return jnp.sum(per_LxF * on_L[:, None]) / jnp.maximum(on_L.sum() * F, 1.0)


# -- module ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantizerOutput:
    """What a training forward returns: the straight-through vectors, the codes, the weighted loss terms
    (``codebook + commitment_weight * commitment + usage_penalty * usage``, zero before the start) and
    scalar metrics."""

    st_NxFxD: jax.Array
    codes_NxFxL: jax.Array
    loss: jax.Array
    metrics: dict


class ResidualQuantizer(nnx.Module):
    """F facets x L levels x M codes; see the module docstring."""

    def __init__(self, config: ResidualQuantizerConfig, *, rngs: nnx.Rngs):
        self.config = c = config
        F, L, M, D = c.num_facets, c.num_levels, c.codebook_size, c.dim
        # Placeholder codewords: each level is replaced by k-means when it activates.
        init = nnx.initializers.normal(1.0 / np.sqrt(D))
        self.codebooks = nnx.Param(init(rngs.params(), (F, L, M, D), jnp.float32))
        if c.facet_projection:
            noise = init(rngs.params(), (F, D, D), jnp.float32) * c.projection_noise
            self.projection = nnx.Param(jnp.eye(D, dtype=jnp.float32)[None] + noise)
        else:
            self.projection = None
        self.step = QuantizerStep(jnp.full((), -1, jnp.int32))  # no training step yet
        self.usage = CodeUsage(jnp.full((F, L, M), 1.0 / M, jnp.float32))

    @property
    def codebooks_FxLxMxD(self) -> jax.Array:
        return self.codebooks[...]

    @property
    def projection_FxDxD(self) -> jax.Array | None:
        return None if self.projection is None else self.projection[...]

    def active_levels(self) -> jax.Array:
        return self.config.active_levels(self.step[...])

    def facet_inputs(self, items_NxD: jax.Array) -> jax.Array:
        """-> x_NxFxD, the vectors each facet quantizes."""
        _check_items("items_NxD", items_NxD, self.config.dim)
        return facet_inputs(items_NxD, self.config.num_facets, self.projection_FxDxD)

    def quantize(self, items_NxD: jax.Array, active_levels=None) -> tuple[jax.Array, jax.Array]:
        """-> (quantized_NxFxD, codes_NxFxL) at the current step's active levels (or ``active_levels``);
        no straight-through, no state change."""
        active = self.active_levels() if active_levels is None else active_levels
        num_levels = self.config.num_levels
        if not validation.is_tracer(active) and not 0 <= int(active) <= num_levels:
            raise ValueError(f"active_levels: expected a value in [0, {num_levels}], got {active}")
        quant, codes, _ = residual_quantize(self.facet_inputs(items_NxD), self.codebooks[...], active)
        return quant, codes

    def __call__(self, items_NxD: jax.Array, valid_N: jax.Array | None = None) -> QuantizerOutput:
        """Training forward over ``items_NxD`` (``valid_N`` False for rows such as padding that take no part
        in the losses and the usage statistics); updates the usage EMA of the active levels."""
        c = self.config
        x_NxFxD = self.facet_inputs(items_NxD)
        n = x_NxFxD.shape[0]
        if valid_N is None:
            valid_N = jnp.ones((n,), bool)
        validation.check_shape("valid_N", valid_N, (n,))
        validation.check_dtype("valid_N", valid_N, "b")
        active = self.active_levels()
        started = (active > 0).astype(jnp.float32)
        quant, codes, dists = residual_quantize(x_NxFxD, self.codebooks[...], active)
        sg = jax.lax.stop_gradient
        st = x_NxFxD + sg(quant - x_NxFxD)
        w = valid_N.astype(jnp.float32)
        count = jnp.maximum(w.sum(), 1.0)

        def mean_sq(a, b):  # sum over D, mean over valid items and facets
            return jnp.sum(jnp.sum(jnp.square(a - b), -1).mean(-1) * w) / count

        codebook = mean_sq(quant, sg(x_NxFxD)) * started
        commitment = mean_sq(sg(quant), x_NxFxD) * started
        usage_metrics = code_usage_metrics(codes, c.codebook_size, valid_N)
        freq_NxFxLxM = jax.nn.one_hot(codes, c.codebook_size, dtype=jnp.float32)
        freq_FxLxM = jnp.einsum("n,nflm->flm", w, freq_NxFxLxM) / count
        on_L = jnp.arange(c.num_levels) < active
        old = self.usage[...]
        new = c.usage_decay * old + (1.0 - c.usage_decay) * freq_FxLxM
        self.usage[...] = jnp.where(on_L[None, :, None], new, old)
        usage = usage_penalty(dists, self.usage[...], valid_N, active, c.usage_temperature) * started
        loss = codebook + c.commitment_weight * commitment + c.usage_penalty * usage
        rel = jnp.sum(jnp.sum(jnp.square(quant - x_NxFxD), -1).mean(-1) * w) / jnp.maximum(
            jnp.sum(jnp.sum(jnp.square(x_NxFxD), -1).mean(-1) * w), _EPS
        )
        metrics = {
            "rq/active_levels": active,
            "rq/codebook_loss": codebook,
            "rq/commitment_loss": commitment,
            "rq/usage_penalty": usage,
            "rq/relative_error": rel,
            **usage_metrics,
        }
        return QuantizerOutput(st, codes, loss, metrics)

    def kmeans_init(self, items_NxD: jax.Array, level: int, key: jax.Array, valid_N: jax.Array | None = None):
        """Replaces level ``level``'s codebooks (every facet) by k-means of the level's residuals
        (:func:`kmeans_level`). Traceable."""
        c = self.config
        x_NxFxD = self.facet_inputs(items_NxD)
        valid_N = jnp.ones((x_NxFxD.shape[0],), bool) if valid_N is None else valid_N
        if not validation.is_tracer(valid_N) and int(np.sum(np.asarray(valid_N))) < c.codebook_size:
            raise ValueError(
                f"items_NxD: k-means of {c.codebook_size} codes needs at least that many valid items, got "
                f"{int(np.sum(np.asarray(valid_N)))}"
            )
        self.codebooks[...] = kmeans_level(
            self.codebooks[...], x_NxFxD, valid_N, level, key, c.kmeans_iterations, c.kmeans_sample
        )
