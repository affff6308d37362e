"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import numpy as np


def timed(fn: Callable[[], object], reps: int, warmup: int = 2) -> np.ndarray:
    """Wall seconds of ``reps`` calls of ``fn`` after ``warmup`` calls, each synchronised on its result."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return np.array(out)
