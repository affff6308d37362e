"""LIME-XOR link-side attention: the Pallas kernel (interpret mode off a GPU) and the op's XLA form against
the HIGHEST-precision definition, with padding of R/A/V/L, broadcast leading dims, the bias, and a LIME-XOR
block giving the same links and history through the kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels import lime_xor as kernel
from recjax.layers.lime import LimeXorBlock
from recjax.models.lime import LimeConfig
from recjax.ops import lime_xor as ops


def _inputs(seed, lead=(2,), R=5, L=70, H=2, A=6, V=10, bias=True):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=lead + (R, H, A)), jnp.float32)
    k = jnp.asarray(r.normal(size=lead + (L, H, A)), jnp.float32)
    v = jnp.asarray(r.normal(size=lead + (L, H, V)), jnp.float32)
    valid = jnp.asarray(r.random(lead + (L,)) < 0.8)
    b = jnp.asarray(0.3 * r.normal(size=lead + (H, R, L)), jnp.float32) if bias else None
    return q, k, v, valid, b


def _numpy_definition(q, k, v, valid, b, norm):
    q, k, v, valid = (np.asarray(x, np.float64) for x in (q, k, v, valid))
    logits = np.einsum("...rha,...lha->...hrl", q, k) + (0.0 if b is None else np.asarray(b, np.float64))
    w = logits / (1.0 + np.exp(-logits)) / norm * valid[..., None, None, :]
    return np.einsum("...hrl,...lhv->...rhv", w, v)


@pytest.mark.parametrize("impl", ["pallas", "xla", "reference"])
@pytest.mark.parametrize("bias", [True, False])
def test_every_impl_matches_the_definition(impl, bias):
    q, k, v, valid, b = _inputs(0, bias=bias)
    want = _numpy_definition(q, k, v, valid, b, 50)
    got = ops.xor_link_attention(q, k, v, valid, 50, b, impl=impl)
    assert got.shape == want.shape == (2, 5, 2, 10)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-3, atol=2e-3)


def test_kernel_splits_the_history_into_tiles_and_broadcasts_a_shared_history():
    # Links of K = 3 requests over one history (history leading dims (B, 1)): broadcast, then 3 tiles of
    # the default 128 rows, the last one padded.
    r = np.random.default_rng(1)
    q = jnp.asarray(r.normal(size=(2, 3, 16, 1, 16)), jnp.float32)
    k = jnp.asarray(r.normal(size=(2, 1, 300, 1, 16)), jnp.float32)
    v = jnp.asarray(r.normal(size=(2, 1, 300, 1, 16)), jnp.float32)
    valid = jnp.asarray(r.random((2, 3, 300)) < 0.5)
    want = _numpy_definition(q, k, v, valid, None, 300)
    got = ops.xor_link_attention(q, k, v, valid, 300, impl="pallas")
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-3, atol=2e-3)


def test_lime_xor_block_is_the_same_through_the_kernel():
    def block(impl):
        return LimeXorBlock(16, 2, 8, 8, 24, 4, 24, dropout=0.0, eps=1e-6, xor_impl=impl, rngs=nnx.Rngs(0))

    r = np.random.default_rng(2)
    links = jnp.asarray(r.normal(size=(2, 1, 4, 16)), jnp.float32)
    history = jnp.asarray(r.normal(size=(2, 1, 24, 16)), jnp.float32)
    valid = jnp.asarray(r.random((2, 1, 24)) < 0.7)
    distance = jnp.asarray(r.integers(0, 24, (2, 1, 24)), jnp.int32)
    want = block("xla")(links, history, valid, distance)
    got = block("pallas")(links, history, valid, distance)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-3, atol=2e-3)


def test_bad_arguments_are_named():
    q, k, v, valid, b = _inputs(3)
    with pytest.raises(ValueError, match="impl: expected one of"):
        ops.xor_link_attention(q, k, v, valid, 50, b, impl="triton")
    with pytest.raises(ValueError, match="k_hist_xLxHxA"):
        ops.xor_link_attention(q, k[..., :3], v, valid, 50, b)
    with pytest.raises(ValueError, match="valid_xL"):
        ops.xor_link_attention(q, k, v, valid[..., :5], 50, b)
    with pytest.raises(ValueError, match="lime.xor_impl"):
        LimeConfig(num_items=10, xor_impl="cuda")
    with pytest.raises(ValueError, match="lime.xor_impl: for attention='xor' only"):
        LimeConfig(num_items=10, attention="mha", xor_impl="pallas")
    with pytest.raises(ValueError, match="bias_xHxRxL"):
        ops.xor_link_attention(q, k, v, valid, 50, b[..., :1, :, :])
    assert jax.numpy.isfinite(ops.xor_link_attention(q, k, v, valid, 50, b)).all()


def test_kernel_bias_over_several_tiles_and_gradients_through_the_pallas_path():
    q, k, v, valid, b = _inputs(4, L=300)
    want = _numpy_definition(q, k, v, valid, b, 300)
    got = ops.xor_link_attention(q, k, v, valid, 300, b, impl="pallas")  # 3 tiles of 128, bias tiled too
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="block_l: expected a power of two"):
        kernel.xor_link_attention(q, k, v, valid, None, norm_length=300, block_l=100, interpret=True)

    def loss(impl):
        return lambda q, k, v, b: jnp.sum(ops.xor_link_attention(q, k, v, valid, 300, b, impl=impl) ** 2)

    g_pallas = jax.grad(loss("pallas"), argnums=(0, 1, 2, 3))(q, k, v, b)
    g_xla = jax.grad(loss("xla"), argnums=(0, 1, 2, 3))(q, k, v, b)
    for gp, gx in zip(g_pallas, g_xla, strict=True):
        np.testing.assert_allclose(np.asarray(gp), np.asarray(gx), rtol=2e-3, atol=2e-3)
