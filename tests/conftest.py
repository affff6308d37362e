"""Test-wide setup: 8 simulated CPU devices (sharded paths are compared with one device) and data paths."""

import os
import pathlib
import zlib

# 8 simulated CPU devices; LLVM at -O0: the suite is dominated by compiling many small programs, which
# -O0 makes ~30 % faster (its programs run on toy sizes, where slower code costs little).
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache per xdist worker, shared with the subprocesses that worker starts one at a
# time (CLI runs, resumed runs, notebooks): XLA's CPU compiles dominate the suite and programs repeat across
# tests. Per worker because JAX writes entries without a lock (no filelock installed): two processes
# compiling the same program at once could read a half-written entry. Tests that start processes running
# side by side drop the variable (tests/sharding/test_multiprocess.py).
_jaxcache = pathlib.Path(__file__).resolve().parents[1] / ".jaxcache" / "tests"
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(_jaxcache / os.environ.get("PYTEST_XDIST_WORKER", "main"))
)

_default_data = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "RECJAX_DATA_DIR" not in os.environ and _default_data.is_dir():
    os.environ["RECJAX_DATA_DIR"] = str(_default_data)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng(request) -> np.random.Generator:
    """Random inputs from a fixed seed per test (its node id), so a statistical threshold cannot fail by
    chance from one run to the next; printed on failure."""
    seed = zlib.crc32(request.node.nodeid.encode())
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture
def assert_same_topk():
    """Compares two (scores_BxK, ids_BxK) results: scores exactly, ids where the score has no tie."""

    def check(a, b):
        va, ia = (np.asarray(x) for x in a)
        vb, ib = (np.asarray(x) for x in b)
        np.testing.assert_array_equal(va, vb)
        with np.errstate(invalid="ignore"):  # -inf - -inf
            step = np.diff(vb, axis=1) != 0
        unique = np.concatenate([step, np.ones((vb.shape[0], 1), bool)], 1)
        unique[:, 1:] &= step
        np.testing.assert_array_equal(ia[unique], ib[unique])

    return check


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    path = os.environ.get("RECJAX_DATA_DIR")
    if not path or not pathlib.Path(path).is_dir():
        pytest.skip("RECJAX_DATA_DIR not set; MovieLens tests need ../shared/data")
    return pathlib.Path(path)


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
