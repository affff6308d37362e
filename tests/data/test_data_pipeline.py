"""The grain pipeline yields exactly the numpy batches, for training and evaluation examples."""

import subprocess
import sys

import numpy as np
import pytest

from recjax.data import batching, leave_one_out, make_synthetic
from recjax.data.pipeline import grain_dataset, grain_iterator


@pytest.fixture(scope="module")
def split():
    return leave_one_out(make_synthetic(seed=7, num_users=150, num_items=120, min_len=3, max_len=90))


def _assert_same(a_batches, b_batches):
    a_batches, b_batches = list(a_batches), list(b_batches)
    assert len(a_batches) == len(b_batches) > 0
    for a, b in zip(a_batches, b_batches, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("epoch, drop_remainder", [(0, True), (3, False)])
def test_grain_equals_numpy_train(split, epoch, drop_remainder):
    ex = split.train_examples(max_len=24)
    kw = dict(shuffle=True, seed=11, epoch=epoch, drop_remainder=drop_remainder)
    _assert_same(grain_dataset(ex, 32, **kw), batching.batches(ex, 32, **kw))
    _assert_same(grain_iterator(ex, 32, num_threads=2, **kw), batching.batches(ex, 32, **kw))


def test_grain_equals_numpy_eval_and_random_access(split):
    ex = split.eval_examples("test", max_len=24, exclude_bucket=16)
    kw = dict(shuffle=False, drop_remainder=False, exclude_bucket=16)
    ds = grain_dataset(ex, 40, **kw)
    ref = list(batching.batches(ex, 40, **kw))
    _assert_same(ds, ref)
    assert len(ds) == len(ref) == 4 and not ref[-1]["valid"][150 - 120 :].any()
    np.testing.assert_array_equal(ds[2]["exclude"], ref[2]["exclude"])  # resume at any batch


def test_grain_bad_inputs(split):
    with pytest.raises(ValueError, match="batch_size: expected > 0"):
        grain_dataset(split.train_examples(8), 0)
    with pytest.raises(ValueError, match="same leading dimension"):
        grain_dataset({"a": np.zeros(2), "b": np.zeros(3)}, 2)


def test_data_package_imports_without_grain():
    """The GPU image has no grain: everything but pipeline.py must import without it."""
    code = (
        "import sys; sys.modules['grain'] = None\n"
        "import recjax.data as d\n"
        "from recjax.data import batching, splits, synthetic, movielens, download, paths\n"
        "assert 'grain' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "try:\n    import recjax.data.pipeline\nexcept ImportError: print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
