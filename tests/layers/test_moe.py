"""MoE layer: router and aux losses against hand-computed values, layer against a per-token numpy loop,
implementations against each other (outputs and gradients), masks, bad inputs, aux collection under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recjax.layers import moe
from recjax.ops import grouped_matmul as gmm_ops
from recjax.train.tasks import forward_with_aux, sown_values


def test_route_matches_hand_computed_values():
    logits = jnp.asarray([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]], jnp.float32)
    r = moe.route(logits, 1, renormalize=False)
    p = np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(r.expert_ids_LxK), [[0], [2]])
    np.testing.assert_allclose(np.asarray(r.weights_LxK), [[p[0, 0]], [p[1, 2]]], rtol=1e-6)
    # f = (1/2, 0, 1/2), P = column means of p; loss = E * sum f P
    want_balance = 3 * (0.5 * p[:, 0].mean() + 0.5 * p[:, 2].mean())
    np.testing.assert_allclose(float(r.load_balance_loss), want_balance, rtol=1e-6)
    lse = np.log(np.exp(np.asarray(logits)).sum(1))
    np.testing.assert_allclose(float(r.z_loss), np.mean(lse**2), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(r.load_E), [1, 0, 1])
    r2 = moe.route(logits, 2, renormalize=True)
    np.testing.assert_allclose(np.asarray(r2.weights_LxK).sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(r2.weights_LxK)[1], p[1, [2, 1]] / p[1, [2, 1]].sum(), rtol=1e-6)


def test_balance_loss_is_one_when_uniform_and_mask_excludes_tokens(rng):
    r = moe.route(jnp.zeros((8, 4)), 2)
    np.testing.assert_allclose(float(r.load_balance_loss), 1.0, rtol=1e-6)
    logits = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    mask = jnp.asarray([1, 1, 1, 0, 0, 0], bool)
    masked = moe.route(logits, 2, mask_L=mask)
    head = moe.route(logits[:3], 2)
    np.testing.assert_allclose(float(masked.load_balance_loss), float(head.load_balance_loss), rtol=1e-6)
    np.testing.assert_allclose(float(masked.z_loss), float(head.z_loss), rtol=1e-6)
    assert float(masked.load_E.sum()) == 6 and not np.asarray(masked.weights_LxK)[3:].any()


def _layer(activation="swiglu", impl="reference", **kw):
    return moe.MoEFeedForward(16, 32, 4, 2, activation, rngs=nnx.Rngs(0), impl=impl, **kw)


@pytest.mark.parametrize("activation", ["swiglu", "silu"])
def test_layer_matches_per_token_loop(rng, activation):
    layer = _layer(activation)
    x = rng.normal(size=(2, 3, 16)).astype(np.float32)
    y, aux = nnx.jit(lambda m, x: m.forward(x))(layer, jnp.asarray(x))
    wr, wg, w2 = (np.asarray(v[...], np.float64) for v in (layer.router, layer.w_gate, layer.w_down))
    wu = None if layer.w_up is None else np.asarray(layer.w_up[...], np.float64)
    want = np.zeros((6, 16))
    for t, xt in enumerate(x.reshape(6, 16).astype(np.float64)):
        logits = xt @ wr
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = np.argsort(-p)[:2]
        for e in top:
            a = xt @ wg[e]
            h = a / (1 + np.exp(-a)) * (xt @ wu[e] if wu is not None else 1.0)
            want[t] += p[e] / p[top].sum() * (h @ w2[e])
    np.testing.assert_allclose(np.asarray(y).reshape(6, 16), want, rtol=1e-4, atol=1e-5)
    assert float(aux["expert_load"].sum()) == 12
    assert float(aux["aux_loss"]) == pytest.approx(
        1e-2 * float(aux["load_balance_loss"]) + 1e-3 * float(aux["z_loss"]), rel=1e-6
    )


def test_xla_and_pallas_match_reference(rng):
    """Gradients through XLA here; the Pallas gradients are checked in tests/kernels (interpret mode)."""
    x = jnp.asarray(rng.normal(size=(20, 16)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(20, 16)), jnp.float32)
    params = nnx.state(_layer(), nnx.Param)

    def loss_and_grads(impl, grad=True):
        layer = _layer(impl=impl)
        nnx.update(layer, params)
        graphdef, p, rest = nnx.split(layer, nnx.Param, ...)

        def f(p, x):
            y, aux = nnx.merge(graphdef, p, rest).forward(x)
            return jnp.sum(y * cot) + aux["aux_loss"]

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)) if grad else f)(p, x)

    l_ref, (gp_ref, gx_ref) = loss_and_grads("reference")
    l, (gp, gx) = loss_and_grads("xla")
    # sums of random-sign terms cancel: compare with an absolute floor, not rtol alone
    np.testing.assert_allclose(float(l), float(l_ref), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(gx_ref), rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gp_ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        float(loss_and_grads("pallas", grad=False)), float(l_ref), rtol=1e-5, atol=1e-4
    )


def test_mask_zeroes_outputs_and_aux_collected_under_jit(rng):
    layer = _layer(impl="xla")
    x = jnp.asarray(rng.normal(size=(2, 4, 16)), jnp.float32)
    mask = jnp.asarray([[0, 1, 1, 1], [0, 0, 1, 1]], bool)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    @jax.jit
    def step(params, rest, x, mask):
        def loss(p):
            model = nnx.merge(graphdef, p, rest, copy=True)
            y, sown = nnx.capture(lambda m: m(x, mask), nnx.Intermediate)(model)
            values = sown_values(sown)
            return jnp.sum(y**2) + sum(values["aux_loss"]), (y, values["expert_load"][0])

        return jax.value_and_grad(loss, has_aux=True)(params)

    (total, (y, stats)), _ = step(params, rest, x, mask)
    assert not np.asarray(y)[~np.asarray(mask)].any() and np.asarray(y)[np.asarray(mask)].any()
    _, aux = layer.forward(x, mask)
    np.testing.assert_allclose(float(total), float(jnp.sum(y**2) + aux["aux_loss"]), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(stats), np.asarray(aux["expert_load"]))
    assert float(aux["expert_load"].sum()) == 5 * 2


def test_bad_inputs_rejected(rng):
    with pytest.raises(ValueError, match="top_k"):
        moe.MoEFeedForward(16, 32, 4, 5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="activation"):
        moe.MoEFeedForward(16, 32, 4, 2, "gelu", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="compute_dtype"):
        moe.MoEFeedForward(16, 32, 4, 2, rngs=nnx.Rngs(0), compute_dtype="int8")
    layer = _layer(impl="xla")
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 16\)"):
        layer(jnp.ones((3, 8)))
    with pytest.raises(ValueError, match="mask"):
        layer(jnp.ones((2, 3, 16)), jnp.ones((2, 4), bool))
    x = rng.normal(size=(3, 16)).astype(np.float32)
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match="router_logits_LxE: expected finite"):
        layer(jnp.asarray(x))
    with pytest.raises(ValueError, match="top_k"):
        moe.route(jnp.zeros((3, 4)), 5)
    xx = jnp.ones((5, 16))
    wg, w2 = jnp.ones((4, 16, 32)), jnp.ones((4, 32, 16))
    ids, w = jnp.zeros((5, 1), jnp.int32), jnp.ones((5, 1))
    with pytest.raises(ValueError, match="top_k"):
        gmm_ops.moe_expert_ffn(xx, jnp.zeros((5, 6), jnp.int32), jnp.ones((5, 6)), wg, wg, w2, impl="xla")
    with pytest.raises(ValueError, match="expert_ids_LxK: expected values in"):
        gmm_ops.moe_expert_ffn(xx, ids + 5, w, wg, wg, w2, impl="xla")
    with pytest.raises(ValueError, match="w_down_ExFxD: expected shape"):
        gmm_ops.moe_expert_ffn(xx, ids, w, wg, wg, w2[:, :8], impl="xla")
    with pytest.raises(ValueError, match="w_up_ExDxF: required"):
        gmm_ops.moe_expert_ffn(xx, ids, w, wg, None, w2, impl="xla")
    with pytest.raises(ValueError, match="impl"):
        gmm_ops.moe_expert_ffn(xx, ids, w, wg, wg, w2, impl="cuda")
    with pytest.raises(ValueError, match="weights_LxK: expected finite"):
        gmm_ops.moe_expert_ffn(xx, ids, w.at[0, 0].set(jnp.nan), wg, wg, w2, impl="xla")


def test_forward_under_grad_without_capture_still_computes(rng):
    # The aux loss is sown (nnx.sow); outside nnx.capture nothing collects it, but the output is unaffected.
    layer = _layer(impl="xla")
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    x = jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)

    @jax.jit
    def f(params, rest, x):
        return jax.value_and_grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x)))(params)

    value, _ = f(params, rest, x)
    np.testing.assert_allclose(float(value), float(jnp.sum(layer.forward(x)[0])), rtol=1e-5, atol=1e-5)


def test_grouped_matmul_op_rejects_bad_group_sizes(rng):
    x = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
    with pytest.raises(ValueError, match=r"group_sizes_G: expected values in \[0, 65\)"):
        gmm_ops.grouped_matmul(x, w, jnp.asarray([-16, 80], jnp.int32))
    with pytest.raises(ValueError, match="group_sizes_G: expected a total <= M=64"):
        gmm_ops.grouped_matmul(x, w, jnp.asarray([40, 30], jnp.int32))


def test_grouped_matmul_op_xla_matches_reference(rng):
    sizes = jnp.asarray([4, 0, 3], jnp.int32)
    lhs = jnp.asarray(rng.normal(size=(7, 8)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(3, 8, 5)), jnp.float32)
    np.testing.assert_allclose(
        np.asarray(gmm_ops.grouped_matmul(lhs, rhs, sizes, impl="xla")),
        np.asarray(gmm_ops.grouped_matmul(lhs, rhs, sizes, impl="reference")),
        rtol=1e-4,
        atol=1e-4,
    )


def test_sasrec_block_takes_moe_ffn(rng):
    """The SASRec ffn hook builds this layer; padded positions are dropped from routing."""
    from recjax.models.sasrec import SASRec, SASRecConfig

    cfg = SASRecConfig(
        num_items=30,
        max_len=8,
        embed_dim=16,
        ffn="moe",
        ffn_hidden_dim=32,
        ffn_options=(("num_experts", 4), ("top_k", 2), ("impl", "xla")),
    )
    model = SASRec(cfg, rngs=nnx.Rngs(0))
    inputs = jnp.asarray(rng.integers(1, 31, (2, 8)), jnp.int32).at[0, :3].set(0)
    model.eval()  # no dropout: the two calls below see the same inputs
    hidden, aux, metrics = forward_with_aux(model, inputs, inputs > 0)  # what every task's loss adds
    assert hidden.shape == (2, 8, 16) and np.isfinite(np.asarray(hidden)).all()
    _, sown = nnx.capture(lambda m: m(inputs, inputs > 0), nnx.Intermediate)(model)
    loads = [np.asarray(v) for v in jax.tree.leaves(sown) if v.shape == (4,)]
    assert len(loads) == cfg.num_blocks and all(load.sum() == 13 * 2 for load in loads)
    aux_sown = [float(v) for v in jax.tree.leaves(sown) if v.shape == ()]
    assert len(aux_sown) == cfg.num_blocks and float(aux) == pytest.approx(sum(aux_sown)) and float(aux) > 0
    assert 1.0 <= float(metrics["moe_max_load_ratio"]) <= 4.0


def test_pallas_path_pads_widths_that_are_not_multiples_of_16(rng):
    """D=20, F=12 (SASRec+MoE has d=50): the op zero-pads inside, so the kernel (interpret mode here) gives
    the reference's outputs and gradients, including a dropped assignment (id E)."""
    n, d, f, e = 24, 20, 12, 4
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.permutation(e)[:2] for _ in range(n)]), jnp.int32).at[3, 1].set(e)
    w = jnp.asarray(rng.random((n, 2)), jnp.float32)
    wg, wu = (jnp.asarray(rng.normal(size=(e, d, f)) / np.sqrt(d), jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.normal(size=(e, f, d)) / np.sqrt(f), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)

    def loss(impl):
        fn = lambda x, wg, wu, w2: jnp.sum(gmm_ops.moe_expert_ffn(x, ids, w, wg, wu, w2, impl=impl) * cot)  # noqa: E731
        return jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(x, wg, wu, w2)

    (l_ref, g_ref), (l, g) = loss("reference"), loss("pallas")
    np.testing.assert_allclose(float(l), float(l_ref), rtol=1e-4, atol=1e-4)
    for a, b in zip(g, g_ref, strict=True):
        assert a.shape == b.shape  # the padding does not leak into the gradients' shapes
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)
    same = gmm_ops.pad_to_tiles(x[:, :16], wg[:, :16, :16], None, w2[:, :16, :16])
    assert same[0].shape == (n, 16) and same[2] is None  # multiples of 16: untouched
    # padded widths take 64-wide tiles above 64 (F=200 -> 256, not 208 with 16-wide tiles)
    assert [gmm_ops.padded_width(w) for w in (12, 20, 50, 64, 80, 200)] == [16, 32, 64, 64, 80, 256]
