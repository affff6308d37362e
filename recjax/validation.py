"""Input checks for public boundaries: fail early with a message naming the argument.

Checks run on concrete (host or device) arrays. Under ``jax.jit`` the values are tracers: shape and dtype
checks still run, value checks (ranges, NaN) are skipped because they cannot raise there; validate at the
boundary before entering jit.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def is_tracer(x) -> bool:
    """True under jit (value checks cannot run there)."""
    return isinstance(x, jax.core.Tracer)


def check_shape(name: str, x, expected: Sequence[int | None]) -> None:
    """``expected`` may hold None for a free dimension."""
    shape = tuple(np.shape(x))
    if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {shape}")


def check_dtype(name: str, x, kinds: str) -> None:
    """``kinds`` is a string of numpy dtype kinds: 'i' signed int, 'u' unsigned, 'f' float, 'b' bool."""
    # jnp.issubdtype, not numpy's dtype.kind: bfloat16 has kind 'V' in numpy.
    classes = {"i": jnp.signedinteger, "u": jnp.unsignedinteger, "f": jnp.floating, "b": jnp.bool_}
    if not any(jnp.issubdtype(x.dtype, classes[k]) for k in kinds):
        names = {"i": "signed integer", "u": "unsigned integer", "f": "floating", "b": "bool"}
        want = " or ".join(names[k] for k in kinds)
        raise TypeError(f"{name}: expected {want} dtype, got {x.dtype}")


def check_finite(name: str, x) -> None:
    if is_tracer(x):
        return
    arr = np.asarray(x)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name}: expected finite values, found {arr[tuple(bad)]} at index {tuple(bad)}")


def check_range(name: str, x, low: int, high: int, *, allow: Sequence[int] = ()) -> None:
    """Every value in [low, high) or in ``allow`` (e.g. 0 for padding)."""
    if is_tracer(x):
        return
    arr = np.asarray(x)
    ok = (arr >= low) & (arr < high)
    for a in allow:
        ok |= arr == a
    if not ok.all():
        idx = tuple(np.argwhere(~ok)[0])
        raise ValueError(f"{name}: expected values in [{low}, {high}), got {arr[idx]} at index {idx}")


def check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        want = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected {want}, got {value}")


def check_ids(name: str, ids, num_ids: int, *, padding: int | None = None) -> None:
    """Every value a valid id in [0, num_ids), or exactly ``padding`` (one marker value, not any negative:
    -2 or num_ids is a bug upstream, not padding). Skipped on tracers like the other value checks."""
    if is_tracer(ids):
        return
    arr = np.asarray(ids)
    ok = (arr >= 0) & (arr < num_ids)
    if padding is not None:
        ok |= arr == padding
    if not ok.all():
        idx = tuple(int(i) for i in np.argwhere(~ok)[0])
        pad = "" if padding is None else f" or {padding} (padding)"
        raise ValueError(f"{name}: expected ids in [0, {num_ids}){pad}, got {arr[idx]} at index {idx}")


def check_float_values(name: str, x, shape) -> None:
    """Shape (``None`` = any size), a floating dtype and no NaN/inf: the checks of an embedding input."""
    check_shape(name, x, shape)
    check_dtype(name, x, "f")
    check_finite(name, x)
