"""Both models learn a toy deterministic sequence pattern (next = f(current)) to near-perfect accuracy.

A pure jitted step on (graphdef, params, rest) as the trainer does, sampled softmax with uniform negatives.
Accuracy: full-catalogue argmax of ``normalize(hidden) . candidate_embeddings()`` on the last fresh batches,
before the step trains on them (dropout 0, so train-mode outputs equal eval-mode ones; no eager calls,
which are slow to dispatch on CPU).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from recjax.models import build_model
from recjax.train import losses

NUM_ITEMS, L, B = 16, 8, 32


def _toy_batch(rng):
    # Items follow a fixed random permutation cycle; sequences have random lengths (left padding).
    succ = np.random.default_rng(0).permutation(NUM_ITEMS) + 1  # succ[i - 1] = item after i
    inputs = np.zeros((B, L), np.int32)
    targets = np.zeros((B, L), np.int32)
    for b in range(B):
        n = rng.integers(2, L + 1)
        seq = [rng.integers(1, NUM_ITEMS + 1)]
        for _ in range(n):
            seq.append(succ[seq[-1] - 1])
        inputs[b, L - n :] = seq[:-1]
        targets[b, L - n :] = seq[1:]
    return inputs, targets, inputs > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_overfits_toy_pattern(name, rng):
    model = build_model(
        name,
        NUM_ITEMS,
        rngs=nnx.Rngs(params=1, dropout=2),
        max_len=L,
        embed_dim=16,
        dropout=0.1,
        num_blocks=1,
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, rest, opt_state, inputs, targets, mask, key):
        def loss_fn(m):
            hidden = m(inputs, mask)
            loss = losses.sampled_softmax_loss(
                hidden, targets, mask, m.item_embeddings(), key, num_negatives=8, temperature=0.1
            )[0]
            return loss, m.normalize(hidden) @ m.candidate_embeddings().T

        m = nnx.merge(graphdef, params, rest)
        (loss, scores), grads = nnx.value_and_grad(
            loss_fn, argnums=nnx.DiffState(0, nnx.Param), has_aux=True
        )(m)
        _, _, rest = nnx.split(m, nnx.Param, ...)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss, scores

    key = jax.random.key(int(rng.integers(1 << 30)))
    hits = []
    for i in range(160):
        batch = _toy_batch(rng)
        inputs, targets, mask = map(jnp.asarray, batch)
        params, rest, opt_state, loss, scores = step(
            params, rest, opt_state, inputs, targets, mask, jax.random.fold_in(key, i)
        )
        if i >= 150:
            scores = np.array(scores)
            scores[..., 0] = -np.inf  # padding row is never a candidate
            hits.append((scores.argmax(-1) == batch[1])[batch[2]])
    accuracy = np.concatenate(hits).mean()
    assert accuracy > 0.95, f"{name}: next-item accuracy {accuracy:.3f}, last loss {float(loss):.3f}"
