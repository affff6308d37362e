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


def timed_in_loop(fn: Callable[..., object], args: tuple, reps: int, inner: int = 50) -> np.ndarray:
    """Seconds per call of ``fn(*args)`` measured as ``inner`` calls inside one jitted ``fori_loop`` (so the
    ~50 us of Python dispatch and launch per jitted call is paid once per ``inner`` calls): ``reps`` samples.
    Each iteration's first argument depends on the previous output (a 1e-30 multiple of its sum), so XLA
    can neither hoist the call out of the loop nor drop it. The first argument must be a float array."""
    import jax.numpy as jnp

    first, rest = args[0], args[1:]

    @jax.jit
    def loop(first, *rest):
        def body(_, acc):
            out = fn((first + acc * 1e-30).astype(first.dtype), *rest)
            return sum(jnp.sum(x).astype(jnp.float32) for x in jax.tree.leaves(out)) * 1e-30

        return jax.lax.fori_loop(0, inner, body, jnp.float32(0))

    return timed(lambda: loop(first, *rest), reps) / inner
