import jax.numpy as jnp
import numpy as np
import pytest

from recjax.ops import topk
from recjax.ops.topk import topk_inner_product


@pytest.mark.parametrize("impl", ["xla", "reference", "auto"])
def test_topk_matches_numpy(rng, impl):
    b, n, d, k = 5, 97, 16, 10
    q = rng.normal(size=(b, d)).astype(np.float32)
    items = rng.normal(size=(n, d)).astype(np.float32)
    exclude = rng.integers(-1, n, size=(b, 7)).astype(np.int32)
    scores, ids = topk_inner_product(
        jnp.asarray(q), jnp.asarray(items), k, exclude_BxH=jnp.asarray(exclude), impl=impl
    )
    full = q.astype(np.float64) @ items.T.astype(np.float64)
    for i in range(b):
        full[i, exclude[i][exclude[i] >= 0]] = -np.inf
        want = np.argsort(-full[i])[:k]
        np.testing.assert_array_equal(np.asarray(ids[i]), want)
        np.testing.assert_allclose(np.asarray(scores[i]), full[i, want], rtol=1e-4, atol=1e-5)


def test_fewer_items_than_k_pad_with_minus_one(rng):
    q = jnp.asarray(rng.normal(size=(1, 4)), jnp.float32)
    items = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    scores, ids = topk_inner_product(q, items, 3, exclude_BxH=jnp.asarray([[0, 2]]), impl="xla")
    assert ids.tolist()[0][1:] == [-1, -1] and ids[0, 0] == 1
    assert np.isneginf(np.asarray(scores[0, 1:])).all()


def test_bad_inputs(rng):
    q = jnp.ones((2, 4))
    with pytest.raises(ValueError, match="k:"):
        topk_inner_product(q, jnp.ones((3, 4)), 4)
    with pytest.raises(ValueError, match="items_NxD"):
        topk_inner_product(q, jnp.ones((3, 5)), 1)
    with pytest.raises(TypeError, match="queries_BxD"):
        topk_inner_product(jnp.ones((2, 4), jnp.int32), jnp.ones((3, 4)), 1)
    with pytest.raises(ValueError, match="items_NxD: expected finite"):
        topk_inner_product(q, jnp.ones((3, 4)).at[1, 2].set(jnp.nan), 1)
    with pytest.raises(ValueError, match="impl"):
        topk_inner_product(q, jnp.ones((3, 4)), 1, impl="nope")


@pytest.mark.parametrize("bad", [3, 10, -2])
def test_exclude_ids_outside_range_are_rejected(bad):
    # exclusion_mask used to drop ids >= N silently and read any negative as padding
    q, items = jnp.ones((2, 4)), jnp.ones((3, 4))
    exclude = jnp.asarray([[0, -1], [bad, 1]], jnp.int32)
    want = rf"exclude_BxH: expected ids in \[0, 3\) or -1 \(padding\), got {bad} at index \(1, 0\)"
    for impl in ("xla", "reference"):
        with pytest.raises(ValueError, match=want):
            topk_inner_product(q, items, 1, exclude_BxH=exclude, impl=impl)


def test_implementation_table():
    assert topk.available_impls() == ["xla", "reference", "pallas"]
    assert topk._resolve("auto") == "xla"  # int8 "pallas" is approximate: never chosen by "auto"
