"""Bit-sliced Bloom plan evaluation kernel (interpret mode) against the plain-JAX reference."""

import jax.numpy as jnp
import numpy as np

from pallas_kernels import bloom


def test_bloom_kernel_matches_reference_with_offsets(rng):
    m, w, r, c, t, k = 40, 150, 7, 3, 4, 3
    index = rng.integers(-(2**31), 2**31, (m, w), dtype=np.int64).astype(np.int32)
    index &= rng.integers(-(2**31), 2**31, (m, w), dtype=np.int64).astype(np.int32)  # ~25% bits set
    rows = rng.integers(0, m, (r, c, t, k)).astype(np.int32)
    kinds = rng.integers(0, 4, (r, c, t)).astype(np.int32)
    offsets = rng.integers(0, 40, r).astype(np.int32)
    num_words = 37  # not a multiple of block_w
    got = bloom.bloom_filter_words(
        jnp.asarray(index), rows, kinds, jnp.asarray(offsets), num_words=num_words, block_w=32, interpret=True
    )
    want = bloom.bloom_filter_words_reference(
        jnp.asarray(index), rows, kinds, jnp.asarray(offsets), num_words=num_words
    )
    assert got.shape == (r, num_words)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # one literal by hand: row 0, clause 0 = OR over literals, checked bit by bit against numpy
    lit = []
    for tt in range(t):
        test = np.bitwise_and.reduce(index[rows[0, 0, tt]][:, offsets[0] : offsets[0] + num_words], axis=0)
        lit.append({0: np.zeros_like(test), 1: test, 2: ~test, 3: np.full_like(test, -1)}[kinds[0, 0, tt]])
    clause0 = np.bitwise_or.reduce(lit, axis=0)
    assert (np.asarray(got)[0] & ~clause0 == 0).all()  # the AND over clauses implies clause 0
