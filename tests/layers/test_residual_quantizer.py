"""MFLI residual quantizer: numpy references for residual quantization and k-means, straight-through
gradients, delayed start and progressive levels, the usage penalty, usage metrics, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recjax.layers import residual_quantizer as rq


def _quantizer(**kw) -> rq.ResidualQuantizer:
    fields = dict(dim=6, num_facets=2, num_levels=3, codebook_size=8) | kw
    return rq.ResidualQuantizer(rq.ResidualQuantizerConfig(**fields), rngs=nnx.Rngs(0))


def _items(n=64, d=6, seed=0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, d)), jnp.float32)


def _np_residual_quantize(x_NxFxD, codebooks_FxLxMxD, active):
    """The plain definition: per facet and level, nearest codeword of the residual."""
    n, F, D = x_NxFxD.shape
    L = codebooks_FxLxMxD.shape[1]
    quant, codes = np.zeros((n, F, D)), np.zeros((n, F, L), np.int64)
    for i in range(n):
        for f in range(F):
            r = x_NxFxD[i, f].astype(np.float64)
            for level in range(active):
                c = codebooks_FxLxMxD[f, level].astype(np.float64)
                m = int(np.argmin(((r[None] - c) ** 2).sum(-1)))
                codes[i, f, level] = m
                quant[i, f] += c[m]
                r = r - c[m]
    return quant, codes


def _np_kmeans(x, w, init, iterations):
    c = init.astype(np.float64).copy()
    for _ in range(iterations):
        d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        a = d.argmin(1)
        new = c.copy()
        counts = np.array([w[a == m].sum() for m in range(len(c))])
        for m in range(len(c)):
            if counts[m] > 0:
                new[m] = (x[a == m] * w[a == m, None]).sum(0) / counts[m]
        err = np.where(w > 0, d.min(1), -np.inf)
        far = np.argsort(-err, kind="stable")
        for rank, m in enumerate(np.flatnonzero(counts <= 0)):
            new[m] = x[far[rank]]
        c = new
    return c


def test_codes_match_numpy_reference_and_error_decreases_with_levels():
    q = _quantizer(facet_projection=True)
    x = _items()
    for level in range(3):
        q.kmeans_init(x, level, jax.random.key(level))
    xf = np.asarray(q.facet_inputs(x))
    cb = np.asarray(q.codebooks_FxLxMxD)
    errors = []
    for active in range(4):
        quant, codes = q.quantize(x, active)
        ref_q, ref_c = _np_residual_quantize(xf, cb, active)
        np.testing.assert_array_equal(np.asarray(codes), ref_c)
        np.testing.assert_allclose(np.asarray(quant), ref_q, atol=1e-5)
        assert codes.dtype == jnp.int32 and int(codes.min()) >= 0 and int(codes.max()) < 8
        errors.append(float(np.mean(((np.asarray(quant) - xf) ** 2).sum(-1))))
    assert errors[0] == pytest.approx(float(np.mean((xf**2).sum(-1))), rel=1e-5)  # nothing active: q = 0
    assert errors[0] > errors[1] > errors[2] > errors[3], errors
    # The pure serving-side assignment gives the same codes.
    codes = rq.assign_codes(x, q.codebooks_FxLxMxD, 3, q.projection_FxDxD)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(q.quantize(x, 3)[1]))


def test_straight_through_gradient_is_identity():
    q = _quantizer(facet_projection=False)
    x = _items(16)
    q.kmeans_init(x, 0, jax.random.key(0))
    q.step[...] = 0
    w = jnp.asarray(np.random.default_rng(1).standard_normal((16, 2, 6)), jnp.float32)
    out = q(x)
    np.testing.assert_allclose(np.asarray(out.st_NxFxD), np.asarray(q.quantize(x)[0]), atol=1e-6)
    grad = nnx.grad(lambda m, items: jnp.sum(w * m(items).st_NxFxD), argnums=1)(q, x)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(w.sum(1)), atol=1e-6)  # facets share x


def test_kmeans_matches_numpy_and_beats_random_codebook():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4, 3)) * 4
    x = np.concatenate([c + 0.3 * rng.standard_normal((20, 3)) for c in centers]).astype(np.float32)
    w = (rng.random(80) > 0.1).astype(np.float32)
    # Two init centroids far from every point: their clusters are empty and get re-seeded.
    init = np.concatenate([x[:3], np.full((2, 3), 50.0, np.float32)])
    got = rq.kmeans(jnp.asarray(x), jnp.asarray(w), jnp.asarray(init), 6)
    np.testing.assert_allclose(np.asarray(got), _np_kmeans(x, w, init, 6), atol=1e-4)
    # Initialization through the module: lower quantization error than the random placeholder.
    q = _quantizer(dim=3, num_facets=1, num_levels=1, codebook_size=4)
    xj = jnp.asarray(x)
    before = float(jnp.mean(jnp.sum((q.quantize(xj, 1)[0] - q.facet_inputs(xj)) ** 2, -1)))
    q.kmeans_init(xj, 0, jax.random.key(3))
    after = float(jnp.mean(jnp.sum((q.quantize(xj, 1)[0] - q.facet_inputs(xj)) ** 2, -1)))
    assert after < 0.25 * before, (before, after)
    # Seeded: the same key gives the same codebook.
    q2 = _quantizer(dim=3, num_facets=1, num_levels=1, codebook_size=4)
    q2.kmeans_init(xj, 0, jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(q.codebooks_FxLxMxD), np.asarray(q2.codebooks_FxLxMxD))


def test_delayed_start_and_progressive_levels():
    q = _quantizer(start_step=3, level_schedule=(3, 5, 5), commitment_weight=0.5, usage_penalty=1.0)
    x = _items()
    for level in range(3):
        q.kmeans_init(x, level, jax.random.key(level))
    active = []
    for step in (-1, 2, 3, 4, 5, 9):
        q.step[...] = step
        out = q(x)
        active.append(int(out.metrics["rq/active_levels"]))
        codes = np.asarray(out.codes_NxFxL)
        assert (codes[..., active[-1] :] == 0).all()  # inactive levels: code 0
        if active[-1] == 0:  # inactive: no loss, the quantized vectors are 0
            assert float(out.loss) == 0.0 and float(jnp.abs(out.st_NxFxD).max()) == 0.0
            assert float(jnp.abs(q.quantize(x)[0]).max()) == 0.0
        else:
            assert float(out.loss) > 0.0
    assert active == [0, 0, 1, 1, 3, 3]
    interval = rq.ResidualQuantizerConfig(dim=4, num_levels=3, start_step=2, level_interval=4)
    assert interval.level_steps == (2, 6, 10) and [int(interval.active_levels(s)) for s in (1, 6, 9)] == [
        0,
        2,
        2,
    ]


def test_usage_penalty_grows_with_over_use():
    q = _quantizer(num_facets=1, num_levels=1, usage_decay=0.0)
    x = _items(128)
    q.kmeans_init(x, 0, jax.random.key(0))
    q.step[...] = 0
    _, _, dists = rq.residual_quantize(q.facet_inputs(x), q.codebooks_FxLxMxD, 1)
    valid = jnp.ones((128,), bool)

    def penalty(usage_M):
        return float(rq.usage_penalty(dists, jnp.asarray(usage_M)[None, None], valid, 1, 1.0))

    uniform = np.full(8, 1 / 8)
    assert penalty(uniform) == 0.0
    skewed = [np.array([p] + [(1 - p) / 7] * 7) for p in (0.3, 0.6, 0.9)]
    values = [penalty(u) for u in skewed]
    assert 0 < values[0] < values[1] < values[2], values
    # Through the module (decay 0: the EMA is this call's usage): all items on one code -> a large penalty.
    crowded = jnp.zeros_like(x) + x[:1] + 1e-3 * x
    assert float(q(crowded).metrics["rq/usage_penalty"]) > float(q(x).metrics["rq/usage_penalty"])
    # Its gradient moves mass off the over-used code: one step lowers the soft mass there.
    usage = jnp.asarray(skewed[2])[None, None]

    def mass_and_penalty(items):
        _, _, d = rq.residual_quantize(q.facet_inputs(items), q.codebooks_FxLxMxD, 1)
        return rq.usage_penalty(d, usage, valid, 1, 1.0)

    g = jax.grad(mass_and_penalty)(x)
    assert float(mass_and_penalty(x - 0.05 * g)) < float(mass_and_penalty(x))


def test_code_usage_metrics_match_numpy():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, (50, 2, 2)).astype(np.int32)
    codes[:, 1, 1] = 2  # one code takes everything
    valid = rng.random(50) > 0.2
    m = rq.code_usage_metrics(jnp.asarray(codes), 4, jnp.asarray(valid))
    for f in range(2):
        for level in range(2):
            counts = np.bincount(codes[valid, f, level], minlength=4)
            p = counts / counts.sum()
            ppl = np.exp(-np.sum(p[p > 0] * np.log(p[p > 0])))
            assert float(m[f"rq/f{f}_l{level}/perplexity"]) == pytest.approx(ppl, rel=1e-5)
            assert float(m[f"rq/f{f}_l{level}/used"]) == pytest.approx((counts > 0).mean())
            assert float(m[f"rq/f{f}_l{level}/max_over_mean"]) == pytest.approx(counts.max() / counts.mean())
    assert float(m["rq/min_perplexity"]) == pytest.approx(1.0) and float(m["rq/max_over_mean"]) == 4.0


def test_bad_input_is_rejected_naming_the_argument():
    cfg = rq.ResidualQuantizerConfig
    with pytest.raises(ValueError, match="quantizer.num_facets: expected > 0"):
        cfg(dim=4, num_facets=0)
    with pytest.raises(ValueError, match="quantizer.num_levels: expected > 0"):
        cfg(dim=4, num_levels=0)
    with pytest.raises(ValueError, match="quantizer.codebook_size: expected >= 2"):
        cfg(dim=4, codebook_size=1)
    with pytest.raises(ValueError, match=r"quantizer.level_schedule: expected 2 steps"):
        cfg(dim=4, level_schedule=(0,))
    with pytest.raises(ValueError, match=r"level_schedule\[0\] == start_step=5"):
        cfg(dim=4, start_step=5, level_schedule=(0, 5))
    with pytest.raises(ValueError, match="quantizer.level_schedule: expected non-decreasing"):
        cfg(dim=4, level_schedule=(0, 5, 3), num_levels=3)
    with pytest.raises(ValueError, match=r"quantizer.usage_decay: expected a value in \[0, 1\)"):
        cfg(dim=4, usage_decay=1.0)
    q = _quantizer()
    with pytest.raises(ValueError, match=r"items_NxD: expected shape \(\*, 6\), got \(4, 5\)"):
        q.quantize(jnp.zeros((4, 5)))
    with pytest.raises(ValueError, match="items_NxD: expected finite values, found nan"):
        q.quantize(jnp.full((4, 6), jnp.nan))
    with pytest.raises(TypeError, match="items_NxD: expected floating dtype"):
        q.quantize(jnp.zeros((4, 6), jnp.int32))
    with pytest.raises(ValueError, match=r"active_levels: expected a value in \[0, 3\], got 4"):
        q.quantize(_items(4), 4)
    with pytest.raises(ValueError, match=r"codebooks_FxLxMxD: expected a codebook size M >= 2"):
        rq.assign_codes(_items(4), jnp.zeros((1, 1, 1, 6)), 1)
    with pytest.raises(ValueError, match=r"codebooks_FxLxMxD: expected shape \(F, L, M, D\)"):
        rq.assign_codes(_items(4), jnp.zeros((1, 4, 6)), 1)
    with pytest.raises(ValueError, match=r"items_NxD: expected shape \(\*, 6\)"):
        rq.assign_codes(jnp.zeros((4, 3)), q.codebooks_FxLxMxD, 1)
    with pytest.raises(ValueError, match=r"projection_FxDxD: expected shape \(2, 6, 6\)"):
        rq.assign_codes(_items(4), q.codebooks_FxLxMxD, 1, jnp.zeros((1, 6, 6)))
    with pytest.raises(ValueError, match=r"active_levels: expected a value in \[0, 3\], got -1"):
        rq.assign_codes(_items(4), q.codebooks_FxLxMxD, -1)
    with pytest.raises(
        ValueError, match="items_NxD: k-means of 8 codes needs at least that many valid items"
    ):
        q.kmeans_init(_items(5), 0, jax.random.key(0))
    with pytest.raises(ValueError, match=r"level: expected a level in \[0, 3\)"):
        q.kmeans_init(_items(), 3, jax.random.key(0))
    with pytest.raises(ValueError, match=r"valid_N: expected shape \(64\), got \(3,\)"):
        q(_items(), jnp.ones((3,), bool))
