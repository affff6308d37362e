"""Gather + score kernel (MFLI rerank) in interpret mode and the op's implementations against the
plain-JAX reference, on ragged candidate counts with padding rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gather_score as kernel
from recjax.ops import gather_score as op


def inputs(rng, b, c, r, d):
    q = rng.normal(size=(b, d)).astype(np.float32)
    table = rng.normal(size=(r, d)).astype(np.float32)
    rows = rng.integers(-1, r, (b, c)).astype(np.int32)  # ~1/(r+1) padding
    rows[0, -3:] = -1
    return q, table, rows


def check(got, want):
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    ok = ~np.isneginf(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b,c,r,d,block_c", [(3, 130, 50, 64, 32), (2, 16, 7, 32, 16), (1, 5, 300, 128, 128)])
def test_kernel_matches_reference(rng, b, c, r, d, block_c):
    q, table, rows = inputs(rng, b, c, r, d)
    got = kernel.gather_score(q, table, rows, block_c=block_c, interpret=True)
    want = kernel.gather_score_reference(q, table, rows)
    assert got.shape == (b, c)
    check(got, want)
    # by hand for one entry that is a real row
    i = int(np.flatnonzero(rows[0] >= 0)[0])
    assert abs(float(got[0, i]) - float(table[rows[0, i]] @ q[0])) < 1e-4


def test_op_impls_agree(rng):
    q, table, rows = inputs(rng, 4, 40, 30, 24)  # D not a power of two: auto/xla only
    want = op.gather_score(q, table, rows, impl="reference")
    check(op.gather_score(q, table, rows, impl="xla"), want)
    check(op.gather_score(q, table, rows, impl="auto"), want)
    with pytest.raises(ValueError, match="D: expected a power of two"):
        op.gather_score(q, table, rows, impl="pallas")
    q, table, rows = inputs(rng, 2, 20, 30, 32)
    check(op.gather_score(q, table, rows, impl="pallas"), op.gather_score(q, table, rows, impl="reference"))
    with pytest.raises(ValueError, match="rows_BxC"):
        op.gather_score(q, table, rows[:1])
    with pytest.raises(TypeError, match="rows_BxC"):
        op.gather_score(q, table, rows.astype(np.float32))
    with pytest.raises(ValueError, match="impl"):
        op.gather_score(q, table, jnp.asarray(rows), impl="cuda")


def test_pallas_refuses_a_table_past_int32_offsets():
    table = jax.ShapeDtypeStruct((1 << 25, 64), jnp.float32)  # R * D = 2^31: shapes only, nothing allocated
    q, rows = jax.ShapeDtypeStruct((2, 64), jnp.float32), jax.ShapeDtypeStruct((2, 8), jnp.int32)
    with pytest.raises(ValueError, match=r"table_RxD: the pallas kernel needs R \* D < 2\^31"):
        jax.eval_shape(lambda t, a, b: op.gather_score(a, t, b, impl="pallas"), table, q, rows)
    out = jax.eval_shape(lambda t, a, b: op.gather_score(a, t, b, impl="auto"), table, q, rows)
    assert out.shape == (2, 8)
