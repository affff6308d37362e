"""Value Model: the configured weighted sum equals the hand value; learned weights recover a known rule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from recjax.retrieval.value_model import ValueModel, ValueModelConfig, value_loss


def test_fixed_value_equals_hand_weighted_sum(rng):
    w = tuple(float(x) for x in rng.normal(size=3))
    offsets, scales, bias = (0.0, 3.0, 0.0), (1.0, 2.0, 1.0), float(rng.normal())
    vm = ValueModel(ValueModelConfig(w, bias=bias, offsets=offsets, scales=scales), rngs=nnx.Rngs(0))
    preds = rng.uniform(0, 5, size=(4, 6, 3)).astype(np.float32)
    got = np.asarray(vm(jnp.asarray(preds)))
    want = np.zeros((4, 6))
    for t in range(3):
        want += w[t] * (preds[..., t] - offsets[t]) / scales[t]
    np.testing.assert_allclose(got, want + bias, rtol=1e-5, atol=1e-5)
    # configured weights are not trainable parameters
    assert jax.tree.leaves(nnx.state(vm, nnx.Param)) == []


def test_mlp_mode_starts_as_the_linear_sum(rng):
    cfg = dict(weights=(1.0, -0.5), bias=0.25)
    lin = ValueModel(ValueModelConfig(**cfg, mode="linear"), rngs=nnx.Rngs(1))
    mlp = ValueModel(ValueModelConfig(**cfg, mode="mlp", hidden_dim=8), rngs=nnx.Rngs(1))
    p = jnp.asarray(rng.random((10, 2)), jnp.float32)
    np.testing.assert_allclose(np.asarray(mlp(p)), np.asarray(lin(p)), rtol=1e-6, atol=1e-6)


def test_learned_weights_recover_the_generating_rule(rng):
    w_true = rng.normal(size=3).astype(np.float32)
    preds = jnp.asarray(rng.random((256, 3)), jnp.float32)
    target = preds @ w_true + 0.3
    vm = ValueModel(ValueModelConfig((0.0, 0.0, 0.0), mode="linear"), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(vm, nnx.Param, ...)
    opt = optax.adam(0.05)
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(lambda q: value_loss(nnx.merge(graphdef, q, rest)(preds), target))(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    for _ in range(400):
        params, state, loss = step(params, state)
    learned = nnx.merge(graphdef, params, rest)
    np.testing.assert_allclose(np.asarray(learned.w_T[...]), w_true, atol=0.05)
    assert abs(float(learned.b[...]) - 0.3) < 0.05


def test_value_loss_mask(rng):
    v, t = rng.normal(size=5).astype(np.float32), rng.normal(size=5).astype(np.float32)
    m = np.array([True, False, True, True, False])
    np.testing.assert_allclose(float(value_loss(v, t, m)), np.mean((v - t)[m] ** 2), rtol=1e-6)


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="mode"):
        ValueModelConfig((1.0,), mode="softmax")
    with pytest.raises(ValueError, match="offsets"):
        ValueModelConfig((1.0, 2.0), offsets=(0.0,))
    with pytest.raises(ValueError, match="scales"):
        ValueModelConfig((1.0,), scales=(0.0,))
    with pytest.raises(ValueError, match="weights"):
        ValueModelConfig(())
    vm = ValueModel(ValueModelConfig((1.0, 2.0)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="preds_NxT"):
        vm(jnp.zeros((4, 3)))
    with pytest.raises(TypeError, match="preds_NxT"):
        vm(jnp.zeros((4, 2), jnp.int32))
