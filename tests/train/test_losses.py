"""Losses vs numpy references on fresh random inputs; masking, accidental hits, bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recjax.train import losses

B, L, D, NUM_ITEMS = 3, 7, 6, 40


def _inputs(rng, num_items=NUM_ITEMS):
    hidden = rng.normal(size=(B, L, D)).astype(np.float32)
    table = rng.normal(size=(num_items + 1, D)).astype(np.float32)
    targets = rng.integers(1, num_items + 1, size=(B, L)).astype(np.int32)
    mask = np.ones((B, L), bool)
    mask[0, :3] = False  # left padding
    mask[2, :5] = False
    targets[~mask] = 0
    targets[1, -1] = 0  # a real input whose next item is unknown
    return hidden, targets, mask, table


def _normalize(x, on):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6) if on else x


def _softmax_reference(hidden, targets, mask, table, neg_ids, temperature, l2):
    """Loop over positions: -log softmax over [pos, negatives without accidental hits or id 0]."""
    q_all, t_all = _normalize(hidden.astype(np.float64), l2), _normalize(table.astype(np.float64), l2)
    total, count = 0.0, 0
    for b in range(B):
        for i in range(L):
            if not (mask[b, i] and targets[b, i] > 0):
                continue
            negs = neg_ids[b, i] if neg_ids.ndim == 3 else neg_ids
            negs = [n for n in negs if n != targets[b, i] and n != 0]
            logits = [q_all[b, i] @ t_all[targets[b, i]]] + [q_all[b, i] @ t_all[n] for n in negs]
            logits = np.array(logits) / temperature
            m = logits.max()
            total += m + np.log(np.exp(logits - m).sum()) - logits[0]
            count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("negatives", losses.NEGATIVE_SAMPLERS)
@pytest.mark.parametrize("l2", [True, False])
def test_sampled_softmax_matches_reference(rng, negatives, l2):
    hidden, targets, mask, table = _inputs(rng)
    key = jax.random.key(int(rng.integers(1 << 30)))
    temperature = float(rng.uniform(0.05, 1.0))
    loss, metrics = losses.sampled_softmax_loss(
        jnp.asarray(hidden),
        jnp.asarray(targets),
        jnp.asarray(mask),
        jnp.asarray(table),
        key,
        num_negatives=16,
        negatives=negatives,
        temperature=temperature,
        l2_normalize=l2,
    )
    valid = jnp.asarray(mask & (targets > 0))
    neg_ids = np.asarray(
        losses.sample_negative_ids(key, jnp.asarray(targets), valid, NUM_ITEMS + 1, 16, negatives)
    )
    expected = _softmax_reference(hidden, targets, mask, table, neg_ids, temperature, l2)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-4)
    assert int(metrics["num_valid"]) == int((mask & (targets > 0)).sum())
    assert 0.0 <= float(metrics["sampled_accuracy"]) <= 1.0


def test_negative_samplers(rng):
    _, targets, mask, _ = _inputs(rng)
    valid = jnp.asarray(mask & (targets > 0))
    key = jax.random.key(int(rng.integers(1 << 30)))
    uniform = np.asarray(
        losses.sample_negative_ids(key, jnp.asarray(targets), valid, NUM_ITEMS + 1, 500, "uniform")
    )
    assert uniform.shape == (500,) and uniform.min() >= 1 and uniform.max() <= NUM_ITEMS
    assert len(np.unique(uniform)) > NUM_ITEMS // 2  # spread over the catalogue, never 0
    per_pos = losses.sample_negative_ids(
        key, jnp.asarray(targets), valid, NUM_ITEMS + 1, 5, "uniform_per_position"
    )
    assert per_pos.shape == (B, L, 5)
    in_batch = np.asarray(
        losses.sample_negative_ids(key, jnp.asarray(targets), valid, NUM_ITEMS + 1, 300, "in_batch")
    )
    assert set(in_batch.tolist()) <= set(targets[np.asarray(valid)].tolist())  # only valid positions' targets


def test_masked_positions_do_not_matter(rng):
    hidden, targets, mask, table = _inputs(rng)
    key = jax.random.key(int(rng.integers(1 << 30)))
    for fn in (
        lambda h, t: losses.sampled_softmax_loss(
            h, t, jnp.asarray(mask), jnp.asarray(table), key, num_negatives=8
        ),
        lambda h, t: losses.bce_loss(h, t, jnp.asarray(mask), jnp.asarray(table), key),
    ):
        base, _ = fn(jnp.asarray(hidden), jnp.asarray(targets))
        hidden2, targets2 = hidden.copy(), targets.copy()
        hidden2[~mask] = rng.normal(size=hidden2[~mask].shape) * 10
        targets2[~mask] = rng.integers(1, NUM_ITEMS + 1, size=(~mask).sum())
        other, _ = fn(jnp.asarray(hidden2), jnp.asarray(targets2))
        np.testing.assert_allclose(float(base), float(other), rtol=1e-6)
        hidden3 = hidden.copy()
        hidden3[mask] += 1.0  # a real position must change it
        moved, _ = fn(jnp.asarray(hidden3), jnp.asarray(targets))
        assert abs(float(moved) - float(base)) > 1e-4


def test_accidental_hits_are_masked():
    # One item only: every negative is the positive, so the softmax has a single column and the loss is 0.
    hidden = jnp.ones((2, 3, 4))
    table = jnp.arange(8, dtype=jnp.float32).reshape(2, 4)
    targets = jnp.ones((2, 3), jnp.int32)
    mask = jnp.ones((2, 3), bool)
    for negatives in losses.NEGATIVE_SAMPLERS:
        loss, metrics = losses.sampled_softmax_loss(
            hidden, targets, mask, table, jax.random.key(0), num_negatives=4, negatives=negatives
        )
        assert float(loss) == pytest.approx(0.0, abs=1e-6)
        assert float(metrics["accidental_hit_rate"]) == 1.0
    loss, metrics = losses.bce_loss(hidden, targets, mask, table, jax.random.key(0))
    # Only the positive term remains: softplus(-<h, e_1>) with <h, e_1> = 4+5+6+7.
    assert float(loss) == pytest.approx(float(jax.nn.softplus(-22.0)), abs=1e-7)


def test_bce_matches_reference(rng):
    hidden, targets, mask, table = _inputs(rng, num_items=5)  # small catalogue: some accidental hits
    hidden *= 0.3
    key = jax.random.key(int(rng.integers(1 << 30)))
    loss, metrics = losses.bce_loss(
        jnp.asarray(hidden), jnp.asarray(targets), jnp.asarray(mask), jnp.asarray(table), key
    )
    neg = np.asarray(jax.random.randint(key, (B, L), 1, 6, dtype=jnp.int32))
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    total, count = 0.0, 0
    for b in range(B):
        for i in range(L):
            if mask[b, i] and targets[b, i] > 0:
                pos = hidden[b, i] @ table[targets[b, i]]
                term = -np.log(sig(pos))
                if neg[b, i] != targets[b, i]:
                    term += -np.log(1 - sig(hidden[b, i] @ table[neg[b, i]]))
                total, count = total + term, count + 1
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)
    assert int(metrics["num_valid"]) == count


def test_gradients_finite_and_jittable(rng):
    hidden, targets, mask, table = map(jnp.asarray, _inputs(rng))
    hidden = jnp.where(mask[..., None], hidden, 0.0)  # models zero padded outputs: no NaN from the L2 norm

    @jax.jit
    def f(h, t):
        return losses.sampled_softmax_loss(h, targets, mask, t, jax.random.key(1), num_negatives=8)[0]

    g_h, g_t = jax.grad(f, argnums=(0, 1))(hidden, table)
    assert np.isfinite(np.asarray(g_h)).all() and np.isfinite(np.asarray(g_t)).all()
    assert float(jnp.abs(g_h).sum()) > 0 and float(jnp.abs(g_h[~mask]).sum()) == 0.0


def test_empty_batch_gives_zero(rng):
    hidden, targets, _, table = map(jnp.asarray, _inputs(rng))
    mask = jnp.zeros((B, L), bool)
    for negatives in losses.NEGATIVE_SAMPLERS:
        loss, metrics = losses.sampled_softmax_loss(
            hidden, targets, mask, table, jax.random.key(0), num_negatives=4, negatives=negatives
        )
        assert float(loss) == 0.0 and int(metrics["num_valid"]) == 0


def test_bad_inputs(rng):
    hidden, targets, mask, table = map(jnp.asarray, _inputs(rng))
    key = jax.random.key(0)
    ssl = losses.sampled_softmax_loss
    with pytest.raises(ValueError, match="hidden_BxLxD: expected shape"):
        ssl(hidden[0], targets, mask, table, key)
    with pytest.raises(ValueError, match="targets_BxL: expected shape"):
        ssl(hidden, targets[:, 1:], mask, table, key)
    with pytest.raises(TypeError, match="targets_BxL: expected signed integer"):
        ssl(hidden, targets.astype(jnp.float32), mask, table, key)
    with pytest.raises(TypeError, match="mask_BxL: expected bool"):
        ssl(hidden, targets, mask.astype(jnp.int32), table, key)
    with pytest.raises(ValueError, match="item_table_NxD: expected shape"):
        ssl(hidden, targets, mask, table[:, :-1], key)
    with pytest.raises(ValueError, match=r"targets_BxL: expected values in \[0, 41\)"):
        ssl(hidden, targets.at[0, 0].set(41), mask, table, key)
    with pytest.raises(ValueError, match="hidden_BxLxD: expected finite"):
        ssl(hidden.at[1, 2, 3].set(jnp.nan), targets, mask, table, key)
    with pytest.raises(ValueError, match="negatives: expected one of"):
        ssl(hidden, targets, mask, table, key, negatives="popular")
    with pytest.raises(ValueError, match="temperature: expected > 0"):
        ssl(hidden, targets, mask, table, key, temperature=0.0)
    with pytest.raises(ValueError, match="num_negatives: expected > 0"):
        ssl(hidden, targets, mask, table, key, num_negatives=0)
    with pytest.raises(ValueError, match=r"targets_BxL: expected values in \[0, 41\)"):
        losses.bce_loss(hidden, targets.at[0, 0].set(-1), mask, table, key)
