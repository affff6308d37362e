"""MoEBlaze kernels in Pallas interpret mode against the plain-JAX definition (outputs and all gradients)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import grouped_matmul as gm

L, D, F, E = 22, 32, 32, 4
BLOCKS = gm.Blocks(bm=8, bn=16, bk=16, bn_out=16)


def _routing(rng, kind, k):
    if kind == "ragged_empty":  # expert 2 gets nothing, expert 0 most of the tokens
        head = [np.concatenate([[0], rng.permutation([1, 3])[: k - 1]]) for _ in range(L // 2)]
        ids = np.stack(head + [rng.permutation([0, 1, 3])[:k] for _ in range(L - L // 2)])
    elif kind == "ragged_empty_dropped":  # as above, plus id E = dropped (padding token / over capacity)
        ids, w = _routing(rng, "ragged_empty", k)
        ids = np.asarray(ids).copy()
        ids[rng.random((L, k)) < 0.25] = E
        ids[:3] = E
        return jnp.asarray(ids, jnp.int32), jnp.asarray(rng.random((L, k)) + 0.1, jnp.float32)
    elif kind == "all_to_one":
        ids = np.tile(np.array([3, 1, 0, 2][:k]), (L, 1))
    else:
        ids = np.stack([rng.permutation(E)[:k] for _ in range(L)])
    assert all(len(set(r)) == k for r in ids)
    return jnp.asarray(ids, jnp.int32), jnp.asarray(rng.random((L, k)) + 0.1, jnp.float32)


def _params(rng, activation):
    x = jnp.asarray(rng.normal(size=(L, D)), jnp.float32)
    wg = jnp.asarray(rng.normal(size=(E, D, F)) / np.sqrt(D), jnp.float32)
    wu = jnp.asarray(rng.normal(size=(E, D, F)) / np.sqrt(D), jnp.float32) if activation == "swiglu" else None
    w2 = jnp.asarray(rng.normal(size=(E, F, D)) / np.sqrt(F), jnp.float32)
    return x, wg, wu, w2


_plan = jax.jit(lambda ids, w: gm.make_dispatch_plan(ids, w, E, BLOCKS.bm))


@pytest.mark.parametrize("kind", ["random", "ragged_empty", "all_to_one", "ragged_empty_dropped"])
@pytest.mark.parametrize("k", [1, 3])
def test_dispatch_plan_invariants(rng, kind, k):
    ids, w = _routing(rng, kind, k)
    plan = jax.tree.map(np.asarray, _plan(ids, w))
    ids, w = np.asarray(ids), np.asarray(w)
    kept = ids < E
    tok_LxK = np.broadcast_to(np.arange(L)[:, None], (L, k))
    # inverse map: kept assignment (t, s) sits at its own row, reading token t with weight w[t, s]
    rows = plan.pos_LxK[kept]
    assert len(np.unique(rows)) == kept.sum()
    np.testing.assert_array_equal(plan.token_P[rows], tok_LxK[kept])
    np.testing.assert_array_equal(plan.weight_P[rows], w[kept])
    # dropped assignments point at a padding row; every other row is padding (sentinel token, weight 0)
    assert (plan.token_P[plan.pos_LxK[~kept]] == L).all()
    pad = np.setdiff1d(np.arange(plan.token_P.shape[0]), rows)
    assert (plan.token_P[pad] == L).all() and (plan.weight_P[pad] == 0).all()
    # each tile is one expert; its rows are exactly that expert's assignments
    np.testing.assert_array_equal(plan.tile_expert_T[rows // BLOCKS.bm], ids[kept])
    np.testing.assert_array_equal(plan.load_E, np.bincount(ids[kept], minlength=E))
    for e in range(E):
        first, last = plan.expert_tiles_Ex2[e]
        assert set(np.flatnonzero(plan.tile_expert_T == e)) == set(range(first, last))
    # combine map: slot s's tiles hold each token with a kept slot-s assignment exactly once
    for s in range(k):
        tiles = plan.slot_tiles_KxTs[s][plan.slot_tiles_KxTs[s] >= 0]
        np.testing.assert_array_equal(np.sort(tiles), np.unique(plan.pos_LxK[kept[:, s], s] // BLOCKS.bm))
        toks = plan.token_P[(tiles[:, None] * BLOCKS.bm + np.arange(BLOCKS.bm)).ravel()]
        np.testing.assert_array_equal(np.sort(toks[toks < L]), np.flatnonzero(kept[:, s]))


@pytest.mark.parametrize(
    "activation,kind,k,recompute",
    [
        ("swiglu", "ragged_empty_dropped", 2, True),
        ("silu", "all_to_one", 1, True),
        ("swiglu", "random", 2, False),
    ],
)
def test_moe_ffn_matches_reference_with_gradients(rng, activation, kind, k, recompute):
    ids, w = _routing(rng, kind, k)
    x, wg, wu, w2 = _params(rng, activation)
    cot = jnp.asarray(rng.normal(size=(L, D)), jnp.float32)

    def outputs_and_grads(fn):  # one jit: y and the vjp of y against a random cotangent
        @jax.jit
        def run(x, w, wg, wu, w2):
            y, vjp = jax.vjp(
                lambda x, w, wg, wu, w2: fn(x, ids, w, wg, wu, w2, activation=activation), x, w, wg, wu, w2
            )
            return y, vjp(cot)

        return run(x, w, wg, wu, w2)

    fused = functools.partial(gm.moe_ffn, blocks=BLOCKS, interpret=True, recompute=recompute)
    y, grads = outputs_and_grads(fused)
    y_ref, grads_ref = outputs_and_grads(gm.moe_ffn_reference)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-4, atol=1e-4)
    for name, g, g_ref in zip(["x", "weights", "w_gate", "w_up", "w_down"], grads, grads_ref, strict=True):
        if g_ref is None:  # w_up of the SiLU MLP
            continue
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-4, atol=1e-4, err_msg=name)
    if kind == "all_to_one":  # experts that got no token get exactly zero gradient
        unused = sorted(set(range(E)) - set(np.asarray(ids).ravel().tolist()))
        assert unused and not np.asarray(grads[2])[unused].any()


def test_grouped_matmul_reference_matches_numpy(rng):
    sizes = np.array([3, 0, 5, 2], np.int32)
    lhs = rng.normal(size=(12, 8)).astype(np.float32)  # 2 rows past the groups
    rhs = rng.normal(size=(4, 8, 6)).astype(np.float32)
    out = np.asarray(gm.grouped_matmul_reference(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes)))
    group = np.repeat(np.arange(4), sizes)
    want = np.concatenate([np.einsum("mk,mkn->mn", lhs[:10], rhs[group]), np.zeros((2, 6))])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_bad_blocks_and_activation_rejected(rng):
    ids, w = _routing(rng, "random", 1)
    x, wg, wu, w2 = _params(rng, "swiglu")
    with pytest.raises(ValueError, match="multiple of blocks.bn"):
        gm.moe_ffn(x, ids, w, wg, wu, w2, blocks=gm.Blocks(bm=8, bn=24, bk=16, bn_out=16), interpret=True)
    with pytest.raises(ValueError, match="activation"):
        gm.moe_ffn(x, ids, w, wg, wu, w2, activation="gelu", interpret=True)
