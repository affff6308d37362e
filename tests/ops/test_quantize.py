"""Symmetric per-row int8 quantizer."""

import numpy as np
import pytest

from recjax.ops import quantize


def test_quantize_roundtrip_within_half_step_and_range(rng):
    x = rng.normal(size=(50, 24)).astype(np.float32) * rng.uniform(0.01, 10, (50, 1)).astype(np.float32)
    x[3] = 0.0
    emb = quantize.quantize_items(x)
    v = np.asarray(emb.values_NxD)
    assert v.dtype == np.int8 and v.min() >= -127 and v.max() <= 127
    s = np.asarray(emb.scales_N)
    assert (s > 0).all() and s[3] == 1.0 and (v[3] == 0).all()
    # the largest |x| of each nonzero row maps to +-127
    assert (np.abs(v[np.arange(50) != 3]).max(axis=1) == 127).all()
    err = np.abs(np.asarray(emb.dequantize()) - x)
    assert (err <= np.asarray(quantize.quantization_error_bound(emb))[:, None] * (1 + 1e-5)).all()


def test_quantize_rejects_bad_input(rng):
    x = rng.normal(size=(4, 8)).astype(np.float32)
    x[2, 5] = np.nan
    with pytest.raises(ValueError, match="queries_BxD: expected finite"):
        quantize.quantize_queries(x)
    x[2, 5] = np.inf
    with pytest.raises(ValueError, match="items_NxD: expected finite"):
        quantize.quantize_items(x)
    with pytest.raises(TypeError, match="items_NxD: expected floating"):
        quantize.quantize_items(np.ones((3, 4), np.int32))
    with pytest.raises(ValueError, match="items_NxD: expected shape"):
        quantize.quantize_items(np.ones((3,), np.float32))
