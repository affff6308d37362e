"""OverArch + multi-task heads: shapes, feature layout, loss against hand values, gradient flow, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from recjax.retrieval.overarch import (
    OverArch,
    OverArchConfig,
    TaskSpec,
    multitask_loss,
    task_predictions,
)

TASKS = (TaskSpec("click", "binary"), TaskSpec("rating", "regression"), TaskSpec("long", "binary"))


def _model(seed, **kw):
    cfg = OverArchConfig(
        embed_dim=6, tasks=TASKS, item_side_dim=3, user_side_dim=2, hidden_dims=(16, 8), **kw
    )
    return nnx.jit(lambda: OverArch(cfg, rngs=nnx.Rngs(seed)))()  # one compile for all initialisers


@pytest.fixture(scope="module")
def model():
    return _model(0, head_dim=0)  # linear heads here; hidden heads are exercised in test_unified.py


def _jitted(model):
    """The model's forward as one jitted function (eager NNX calls are slow on a loaded CPU)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda *a: nnx.merge(graphdef, state)(*a))


def _inputs(rng, b=3, k=5):
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return f(b, 6), f(b, k, 6), f(b, k, 3), f(b, 2)


def test_pair_features_layout_and_logit_shape(rng, model):
    u, c, side, us = _inputs(rng)
    x = np.asarray(model.pair_features(u, c, side, us))
    assert x.shape == (3, 5, 3 * 6 + 1 + 3 + 2)
    un, cn = np.asarray(u), np.asarray(c)
    np.testing.assert_allclose(x[:, :, :6], np.broadcast_to(un[:, None], cn.shape))
    np.testing.assert_allclose(x[:, :, 6:12], cn)
    np.testing.assert_allclose(x[:, :, 12:18], un[:, None] * cn, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(x[:, :, 18], np.einsum("bd,bkd->bk", un, cn), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x[:, :, 22:], np.broadcast_to(np.asarray(us)[:, None], (3, 5, 2)))
    fwd = _jitted(model)
    logits = fwd(u, c, side, us)
    assert logits.shape == (3, 5, 3) and np.isfinite(np.asarray(logits)).all()
    # each (user, candidate) pair is scored independently of the other candidates
    solo = fwd(u[:1], c[:1, 2:3], side[:1, 2:3], us[:1])
    np.testing.assert_allclose(np.asarray(solo)[0, 0], np.asarray(logits)[0, 2], rtol=1e-5, atol=1e-6)


def test_task_predictions_sigmoid_for_binary_identity_for_regression(rng):
    logits = rng.normal(size=(4, 3)).astype(np.float32)
    p = np.asarray(task_predictions(jnp.asarray(logits), TASKS))
    np.testing.assert_allclose(p[:, 0], 1 / (1 + np.exp(-logits[:, 0])), rtol=1e-6)
    np.testing.assert_allclose(p[:, 1], logits[:, 1])
    np.testing.assert_allclose(p[:, 2], 1 / (1 + np.exp(-logits[:, 2])), rtol=1e-6)


def test_multitask_loss_equals_hand_computed(rng):
    e = 7
    logits = rng.normal(size=(e, 3)).astype(np.float32)
    labels = np.stack([rng.integers(0, 2, e), rng.uniform(1, 5, e), rng.integers(0, 2, e)], 1).astype(
        np.float32
    )
    mask = rng.random((e, 3)) < 0.7
    mask[0] = True
    weights = (1.0, 0.5, 2.0)
    total, per = multitask_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), TASKS, weights)

    def bce(z, y):
        return np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))

    want = []
    for t, kind in enumerate(["b", "r", "b"]):
        terms = bce(logits[:, t], labels[:, t]) if kind == "b" else (logits[:, t] - labels[:, t]) ** 2
        want.append(terms[mask[:, t]].mean())
    np.testing.assert_allclose([float(per[n]) for n in ("click", "rating", "long")], want, rtol=1e-5)
    np.testing.assert_allclose(float(total), np.dot(weights, want), rtol=1e-5)


def test_gradient_reaches_every_parameter_and_training_lowers_loss(rng, model):
    u, c, side, us = _inputs(rng, b=16, k=4)
    # labels from a fixed rule of the inputs, so the loss can go down
    score = np.einsum("bd,bkd->bk", np.asarray(u), np.asarray(c))
    labels = np.stack([score > 0, score, np.asarray(side)[..., 0] > 0], -1).astype(np.float32).reshape(-1, 3)
    mask = np.ones_like(labels, bool)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_of(p):
        m = nnx.merge(graphdef, p, rest)
        return multitask_loss(m(u, c, side, us).reshape(-1, 3), labels, mask, TASKS)[0]

    grads = jax.jit(jax.grad(loss_of))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g)
        assert np.isfinite(g).all() and np.abs(g).sum() > 0, f"no gradient at {jax.tree_util.keystr(path)}"
    opt = optax.adam(1e-2)
    state = opt.init(params)
    step = jax.jit(
        lambda p, s: (lambda l_g: (l_g[0], *opt.update(l_g[1], s, p)))(jax.value_and_grad(loss_of)(p))
    )
    first = None
    for _ in range(40):
        loss, updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        first = float(loss) if first is None else first
    assert float(step(params, state)[0]) < 0.6 * first


def test_bad_configs_and_inputs(rng, model):
    with pytest.raises(ValueError, match="kind"):
        TaskSpec("x", "ordinal")
    with pytest.raises(ValueError, match="unique"):
        OverArchConfig(4, (TaskSpec("a", "binary"), TaskSpec("a", "regression")))
    with pytest.raises(ValueError, match="at least one"):
        OverArchConfig(4, ())
    with pytest.raises(ValueError, match="hidden_dims"):
        OverArchConfig(4, TASKS, hidden_dims=(8, 0))
    u, c, side, us = _inputs(rng)
    with pytest.raises(ValueError, match="cand_BxKxD"):
        model(u, c[:, :, :4], side, us)
    with pytest.raises(ValueError, match="cand_BxKxD"):
        model(u, c[:2], side, us)
    with pytest.raises(ValueError, match="item_side_BxKxS"):
        model(u, c, None, us)
    with pytest.raises(ValueError, match="user_side_BxU"):
        model(u, c, side, us[:, :1])
    with pytest.raises(TypeError, match="user_BxD"):
        model(u.astype(jnp.int32), c, side, us)
    with pytest.raises(ValueError, match="labels_ExT"):
        multitask_loss(jnp.zeros((4, 3)), jnp.zeros((4, 2)), jnp.ones((4, 3), bool), TASKS)
