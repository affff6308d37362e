"""Attention / FFN layers and whole SASRec / HSTU forwards against plain numpy re-implementations."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recjax.layers import attention, feedforward
from recjax.models import HSTU, HSTUConfig, SASRec, SASRecConfig


def _silu(x):
    return x / (1 + np.exp(-x))


def _ln(x, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _lin(layer, x):
    return x @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])


def _allowed(valid):
    L = valid.shape[1]
    return np.tril(np.ones((L, L), bool))[None] & (valid[:, None, :] | np.eye(L, dtype=bool)[None])


def _mha(att, q_in, kv_in, allowed, H):
    B, L, D = q_in.shape
    q = _lin(att.q_proj, q_in).reshape(B, L, H, D // H)
    k = (kv_in @ np.asarray(att.k_proj.kernel[...])).reshape(B, L, H, D // H)  # no key bias
    v = _lin(att.v_proj, kv_in).reshape(B, L, H, D // H)
    out = np.zeros((B, L, H, D // H))
    for b in range(B):
        for h in range(H):
            s = q[b, :, h] @ k[b, :, h].T / np.sqrt(D // H)
            s = np.where(allowed[b], s, -np.inf)
            out[b, :, h] = _softmax(s) @ v[b, :, h]
    return _lin(att.out_proj, out.reshape(B, L, D))


def _embed(model, inputs, valid):
    D = model.config.embed_dim
    pos = np.clip(np.cumsum(valid, 1) - 1, 0, model.config.max_len - 1)
    x = (
        np.asarray(model.embedding.items[...])[inputs] * np.sqrt(D)
        + np.asarray(model.embedding.positions[...])[pos]
    )
    return x * valid[..., None]


def _batch(rng, num_items, B=2, L=9):
    lengths = rng.integers(1, L + 1, size=B)
    inputs = np.zeros((B, L), np.int32)
    for b, n in enumerate(lengths):
        inputs[b, L - n :] = rng.integers(1, num_items + 1, size=n)
    return inputs, inputs > 0


def test_causal_attention_mask(rng):
    valid = rng.random((3, 6)) < 0.6
    np.testing.assert_array_equal(
        np.asarray(attention.causal_attention_mask(jnp.asarray(valid))), _allowed(valid)
    )


def test_sasrec_forward_matches_numpy(rng):
    cfg = SASRecConfig(num_items=30, max_len=9, embed_dim=8, num_heads=2, ffn_hidden_dim=12, num_blocks=2)
    model = SASRec(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    model.eval()
    inputs, valid = _batch(rng, 30)
    x = _embed(model, inputs, valid)
    allowed = _allowed(valid)
    for blk in model.blocks:
        q = _ln(x, cfg.layer_norm_eps)
        y = _ln(q + _mha(blk.attention, q, x, allowed, cfg.num_heads), cfg.layer_norm_eps)
        ffn = _lin(blk.ffn.down, np.maximum(_lin(blk.ffn.up, y), 0.0)) * valid[..., None]
        x = (y + ffn) * valid[..., None]
    got = np.asarray(model(jnp.asarray(inputs), jnp.asarray(valid)))
    np.testing.assert_allclose(got[valid], x[valid], rtol=1e-4, atol=1e-4)


def _time_bucket(delta):
    return np.clip(np.floor(np.log(np.maximum(np.abs(delta), 1.0)) / 0.301), 0, 128).astype(int)


def test_relative_attention_bias(rng):
    P, L = 4, 7
    rab = attention.RelativeAttentionBias(P, 128, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    pos_w, ts_w = np.asarray(rab.pos_w[...]), np.asarray(rab.ts_w[...])
    bias = np.asarray(rab(L))
    assert bias.shape == (1, L, L)
    for t in range(L):
        for s in range(t + 1):
            assert bias[0, t, s] == pos_w[min(t - s, P - 1)]
    ts = np.cumsum(rng.integers(0, 10**6, size=(2, L)), axis=1)
    with_ts = np.asarray(rab(L, jnp.asarray(ts)))
    assert with_ts.shape == (2, L, L)
    expected = bias + ts_w[_time_bucket(ts[:, :, None] - ts[:, None, :])]
    np.testing.assert_allclose(with_ts, expected, rtol=1e-6)


def test_hstu_pointwise_attention(rng):
    B, L, H, A, V, n = 2, 6, 2, 3, 4, 10
    q, k = rng.normal(size=(2, B, L, H, A)).astype(np.float32)
    v = rng.normal(size=(B, L, H, V)).astype(np.float32)
    bias = rng.normal(size=(1, L, L)).astype(np.float32)
    allowed = _allowed(rng.random((B, L)) < 0.7)
    got = np.asarray(attention.hstu_pointwise_attention(*map(jnp.asarray, (q, k, v, bias, allowed)), n))
    expected = np.zeros((B, L, H, V))
    for b in range(B):
        for h in range(H):
            for t in range(L):
                for s in range(L):
                    if allowed[b, t, s]:
                        expected[b, t, h] += _silu(q[b, t, h] @ k[b, s, h] + bias[0, t, s]) / n * v[b, s, h]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("with_timestamps", [False, True])
def test_hstu_forward_matches_numpy(rng, with_timestamps):
    cfg = HSTUConfig(
        num_items=30,
        max_len=9,
        embed_dim=8,
        num_heads=2,
        attention_dim=3,
        linear_dim=4,
        num_position_buckets=5,
    )
    model = HSTU(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    model.eval()
    inputs, valid = _batch(rng, 30)
    ts = np.cumsum(rng.integers(0, 10**5, size=inputs.shape), axis=1) if with_timestamps else None
    B, L = inputs.shape
    H, A, V = cfg.num_heads, cfg.attention_dim, cfg.linear_dim
    x = _embed(model, inputs, valid)
    allowed = _allowed(valid)
    dist = np.minimum(np.maximum(np.arange(L)[:, None] - np.arange(L)[None], 0), cfg.num_position_buckets - 1)
    for blk in model.blocks:
        bias = np.asarray(blk.relative_bias.pos_w[...])[dist][None]
        if ts is not None:
            bias = (
                bias + np.asarray(blk.relative_bias.ts_w[...])[_time_bucket(ts[:, :, None] - ts[:, None, :])]
            )
        uvqk = _silu(_ln(x, cfg.layer_norm_eps) @ np.asarray(blk.uvqk[...]))
        u, v, q, k = np.split(uvqk, [H * V, 2 * H * V, 2 * H * V + H * A], axis=-1)
        q, k, v = q.reshape(B, L, H, A), k.reshape(B, L, H, A), v.reshape(B, L, H, V)
        w = _silu(np.einsum("bthd,bshd->bhts", q, k) + bias[:, None]) / cfg.max_len
        a = np.einsum("bhts,bshd->bthd", np.where(allowed[:, None], w, 0.0), v).reshape(B, L, H * V)
        x = (x + _lin(blk.out_proj, u * _ln(a, cfg.layer_norm_eps))) * valid[..., None]
    got = np.asarray(model(jnp.asarray(inputs), jnp.asarray(valid), None if ts is None else jnp.asarray(ts)))
    np.testing.assert_allclose(got[valid], x[valid], rtol=1e-4, atol=1e-4)


def test_pointwise_feedforward_and_factory(rng):
    ffn = feedforward.make_ffn("dense", 5, 7, activation="gelu", rngs=nnx.Rngs(0))
    ffn.eval()
    x = rng.normal(size=(2, 3, 5)).astype(np.float32)
    mask = rng.random((2, 3)) < 0.5
    h = _lin(ffn.up, x)
    gelu = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))  # jax.nn.gelu's tanh form
    expected = _lin(ffn.down, gelu) * mask[..., None]
    np.testing.assert_allclose(
        np.asarray(ffn(jnp.asarray(x), jnp.asarray(mask))), expected, rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="ffn: expected one of"):
        feedforward.make_ffn("sparse", 5, 7, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="activation: expected one of"):
        feedforward.make_ffn("dense", 5, 7, activation="tanh", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unexpected options"):
        feedforward.make_ffn("dense", 5, 7, rngs=nnx.Rngs(0), num_experts=2)
    with pytest.raises(ValueError, match="num_heads: expected a divisor"):
        attention.CausalSelfAttention(6, 4, rngs=nnx.Rngs(0))
