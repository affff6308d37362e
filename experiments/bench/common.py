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
    The arguments ride in the loop carry through ``lax.optimization_barrier`` each iteration, so nothing that
    depends on them (the call, or any relayout inside it) can be hoisted out of the loop, and the outputs
    are summed into the carry, so the call cannot be dropped; the inputs are never modified."""
    import jax.numpy as jnp

    if inner < 1:
        raise ValueError(f"inner: expected >= 1 calls per loop, got {inner}")

    @jax.jit
    def loop(*args):
        def body(_, carry):
            args, acc = jax.lax.optimization_barrier(carry)
            out = fn(*args)
            return args, acc + sum(jnp.sum(x).astype(jnp.float32) for x in jax.tree.leaves(out))

        return jax.lax.fori_loop(0, inner, body, (args, jnp.float32(0)))[1]

    return timed(lambda: loop(*args), reps) / inner
