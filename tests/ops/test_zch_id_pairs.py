"""recjax.ops.zch.as_id_pairs at the boundary: the empty marker cannot come in as a raw ID."""

import numpy as np
import pytest

from recjax.ops import zch as ops


def test_as_id_pairs_rejects_the_empty_marker_as_uint64(rng):
    ids = rng.integers(0, 2**63 - 1, size=7, dtype=np.uint64) + np.uint64(2**63)  # top bit set
    ids = ids[ids != np.uint64(2**64 - 1)]
    pairs = np.asarray(ops.as_id_pairs(ids, name="item_ids"))
    np.testing.assert_array_equal(ops.join_ids(pairs).astype(np.uint64), ids)  # large IDs round-trip
    bad = ids.copy()
    bad[3] = np.uint64(2**64 - 1)
    with pytest.raises(ValueError, match=r"item_ids: expected raw IDs < 2\*\*64 - 1 .* at \(3,\)"):
        ops.as_id_pairs(bad, name="item_ids")
    with pytest.raises(ValueError, match=r"ids: expected raw IDs < 2\*\*64 - 1"):
        ops.as_id_pairs(np.array([1, 2**64 - 1], np.uint64))
    with pytest.raises(ValueError, match=r"ids: expected raw IDs >= 0"):
        ops.as_id_pairs(np.array([5, -1]))
