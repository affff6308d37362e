"""SASRec and HSTU: shapes, causality, padding invariance, determinism, gradients, split/merge, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recjax.models import build_model
from recjax.train import losses

NUM_ITEMS, MAX_LEN, D = 25, 12, 8
SMALL = dict(max_len=MAX_LEN, embed_dim=D, num_heads=2)
HSTU_SMALL = dict(SMALL, attention_dim=4, linear_dim=4, num_position_buckets=MAX_LEN)
OVERRIDES = {"sasrec": SMALL, "hstu": HSTU_SMALL}
NAMES = ("sasrec", "hstu")


def _model(name, seed=0, **extra):
    return build_model(
        name, NUM_ITEMS, rngs=nnx.Rngs(params=seed, dropout=seed + 1), **OVERRIDES[name], **extra
    )


def _batch(rng, B=3, L=10, lengths=(10, 4, 7)):
    inputs = np.zeros((B, L), np.int32)
    for b, n in enumerate(lengths):
        inputs[b, L - n :] = rng.integers(1, NUM_ITEMS + 1, size=n)
    return inputs, inputs > 0


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_tables(name, rng):
    model = _model(name)
    inputs, mask = _batch(rng)
    hidden = model(jnp.asarray(inputs), jnp.asarray(mask))
    assert hidden.shape == (3, 10, D) and hidden.dtype == jnp.float32
    assert np.isfinite(np.asarray(hidden)).all()
    assert model.item_embeddings().shape == (NUM_ITEMS + 1, D)
    user = model.user_embedding(hidden)
    assert user.shape == (3, D)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(user), axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(user),
        np.asarray(hidden[:, -1]) / np.linalg.norm(np.asarray(hidden[:, -1]), axis=-1)[:, None],
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(model.candidate_embeddings()), axis=-1), 1.0, rtol=1e-5
    )
    raw = _model(name, l2_normalize=False)
    np.testing.assert_array_equal(np.asarray(raw.normalize(hidden)), np.asarray(hidden))


@pytest.mark.parametrize("name", NAMES)
def test_causality(name, rng):
    model = _model(name)
    model.eval()
    inputs, mask = _batch(rng, lengths=(10, 10, 8))
    t = int(rng.integers(3, 8))
    changed = inputs.copy()
    changed[:, t + 1 :] = (inputs[:, t + 1 :] % NUM_ITEMS) + 1  # every future item differs
    base = np.asarray(model(jnp.asarray(inputs), jnp.asarray(mask)))
    other = np.asarray(model(jnp.asarray(changed), jnp.asarray(mask)))
    np.testing.assert_allclose(other[:, : t + 1], base[:, : t + 1], rtol=1e-5, atol=1e-6)
    assert np.abs(other[:, t + 1 :] - base[:, t + 1 :]).max() > 1e-3  # the test can fail


@pytest.mark.parametrize("name", NAMES)
def test_padding_invariance(name, rng):
    model = _model(name)
    model.eval()
    inputs, mask = _batch(rng, B=2, L=6, lengths=(6, 3))
    wide = np.zeros((2, MAX_LEN), np.int32)
    wide[:, -6:] = inputs
    base = np.asarray(model(jnp.asarray(inputs), jnp.asarray(mask)))
    padded = np.asarray(model(jnp.asarray(wide), jnp.asarray(wide > 0)))
    np.testing.assert_allclose(padded[:, -1], base[:, -1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(padded[0, -6:], base[0], rtol=1e-5, atol=1e-6)
    # A row of padding only (e.g. filler rows of the last eval batch) stays finite, its query too.
    empty = np.asarray(model(jnp.asarray(np.zeros((1, 6), np.int32)), jnp.zeros((1, 6), bool)))
    assert (
        np.isfinite(empty).all() and np.isfinite(np.asarray(model.user_embedding(jnp.asarray(empty)))).all()
    )
    # Garbage ids under mask=False must not reach real positions either.
    noisy = inputs.copy()
    noisy[1, :3] = rng.integers(1, NUM_ITEMS + 1, size=3)
    out = np.asarray(model(jnp.asarray(noisy), jnp.asarray(mask)))
    np.testing.assert_allclose(out[:, -3:], base[:, -3:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_dropout_train_vs_eval(name, rng):
    model = _model(name, dropout=0.5)
    inputs, mask = map(jnp.asarray, _batch(rng))
    model.eval()
    a, b = model(inputs, mask), model(inputs, mask)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    model.train()
    c, d = model(inputs, mask), model(inputs, mask)
    assert np.abs(np.asarray(c) - np.asarray(d)).max() > 1e-3  # fresh dropout masks each call
    same_seed = _model(name, dropout=0.5)
    same_seed.eval()
    np.testing.assert_array_equal(np.asarray(same_seed(inputs, mask)), np.asarray(a))


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_every_parameter(name, rng):
    model = _model(name)
    model.eval()
    inputs, mask = _batch(rng, L=MAX_LEN, lengths=(MAX_LEN, 5, 9))
    targets = np.zeros_like(inputs)
    targets[:, :-1] = inputs[:, 1:]
    targets[:, -1] = rng.integers(1, NUM_ITEMS + 1, size=3)
    kwargs = {}
    if name == "hstu":  # time buckets only get gradient with timestamps
        kwargs["timestamps_BxL"] = jnp.asarray(np.cumsum(rng.integers(0, 5000, size=inputs.shape), axis=1))

    def loss_fn(m):
        hidden = m(jnp.asarray(inputs), jnp.asarray(mask), **kwargs)
        return losses.sampled_softmax_loss(
            hidden,
            jnp.asarray(targets),
            jnp.asarray(mask),
            m.item_embeddings(),
            jax.random.key(0),
            num_negatives=8,
        )[0]

    grads = nnx.grad(loss_fn)(model)
    for path, g in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads)):
        assert np.isfinite(np.asarray(g)).all(), path
        assert float(jnp.abs(g).sum()) > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("name", NAMES)
def test_split_merge_round_trip_and_jit(name, rng):
    model = _model(name)
    model.eval()
    inputs, mask = map(jnp.asarray, _batch(rng))
    expected = np.asarray(model(inputs, mask))
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, state)
    np.testing.assert_array_equal(np.asarray(merged(inputs, mask)), expected)

    @jax.jit
    def apply(state, inputs, mask):
        return nnx.merge(graphdef, state)(inputs, mask)

    np.testing.assert_allclose(np.asarray(apply(state, inputs, mask)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs(name, rng):
    model = _model(name)
    inputs, mask = map(jnp.asarray, _batch(rng))
    with pytest.raises(ValueError, match=r"inputs_BxL: expected shape \(B, L\)"):
        model(inputs[0], mask[0])
    with pytest.raises(TypeError, match="inputs_BxL: expected signed integer"):
        model(inputs.astype(jnp.float32), mask)
    with pytest.raises(ValueError, match="mask_BxL: expected shape"):
        model(inputs, mask[:, 1:])
    with pytest.raises(TypeError, match="mask_BxL: expected bool"):
        model(inputs, mask.astype(jnp.int32))
    with pytest.raises(ValueError, match=rf"inputs_BxL: expected values in \[0, {NUM_ITEMS + 1}\)"):
        model(inputs.at[0, -1].set(NUM_ITEMS + 1), mask)
    with pytest.raises(ValueError, match="inputs_BxL: expected values"):
        model(inputs.at[1, 0].set(-3), mask)
    with pytest.raises(ValueError, match=f"inputs_BxL: expected L <= max_len={MAX_LEN}"):
        model(jnp.ones((2, MAX_LEN + 1), jnp.int32), jnp.ones((2, MAX_LEN + 1), bool))
    with pytest.raises(ValueError, match="hidden_BxLxD: expected shape"):
        model.user_embedding(jnp.ones((2, D)))


def test_hstu_timestamps_validation_and_effect(rng):
    model = _model("hstu")
    model.eval()
    inputs, mask = map(jnp.asarray, _batch(rng))
    ts = jnp.asarray(np.cumsum(rng.integers(1, 10**6, size=inputs.shape), axis=1))
    with pytest.raises(ValueError, match="timestamps_BxL: expected shape"):
        model(inputs, mask, ts[:, 1:])
    with pytest.raises(TypeError, match="timestamps_BxL: expected"):
        model(inputs, mask, ts > 0)
    assert np.abs(np.asarray(model(inputs, mask, ts)) - np.asarray(model(inputs, mask))).max() > 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_moe_feedforward_plugs_in(name, rng):
    model = _model(name, ffn="moe", ffn_hidden_dim=8, ffn_options={"num_experts": 4, "top_k": 2})
    model.eval()
    inputs, mask = _batch(rng, lengths=(10, 10, 8))
    assert type(model.blocks[0].ffn).__name__ == "MoEFeedForward"
    hidden = model(jnp.asarray(inputs), jnp.asarray(mask))
    assert hidden.shape == (3, 10, D) and np.isfinite(np.asarray(hidden)).all()
