"""Device mesh and the shardings the trainer uses: data parallel over a ``data`` axis, parameters placed
by logical-axis rules.

A parameter declares its logical axes as variable metadata, ``nnx.Param(value, logical_axes=("vocab",
"embed"))``; :func:`variable_shardings` maps them through ``rules`` (logical name -> mesh axis or None) to
``NamedSharding``s. Parameters without ``logical_axes`` and axes whose rule names no axis of the mesh are
replicated, so sharding embedding rows or experts is a rule change (``{"vocab": "data"}``), not a new code
path. Multi-host runs call ``jax.distributed.initialize()`` before building the mesh.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

DEFAULT_RULES: Mapping[str, str | None] = {
    "batch": "data",
    "embed": None,
    "vocab": None,  # item-table rows; {"vocab": "data"} shards them over the data axis
    "mlp": None,
    "expert": "expert",  # replicated on a mesh without an "expert" axis
}


def make_mesh(num_devices: int | None = None, axes: tuple[str, ...] = ("data",)) -> jax.sharding.Mesh:
    """A 1-d data mesh over the first ``num_devices`` devices (all by default)."""
    n = jax.device_count() if num_devices is None else num_devices
    if not 1 <= n <= jax.device_count():
        raise ValueError(f"num_devices: expected 1..{jax.device_count()}, got {n}")
    devices = np.asarray(jax.devices()[:n]).reshape((n,) + (1,) * (len(axes) - 1))
    return jax.sharding.Mesh(devices, axes)


def logical_to_spec(
    logical: tuple[str | None, ...],
    rules: Mapping[str, str | None] = DEFAULT_RULES,
    mesh: jax.sharding.Mesh | None = None,
) -> PartitionSpec:
    names = mesh.axis_names if mesh is not None else None
    out = []
    for axis in logical:
        target = rules.get(axis) if axis is not None else None
        out.append(target if names is None or target in names else None)
    return PartitionSpec(*out)


def variable_shardings(
    state: Any, mesh: jax.sharding.Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES
) -> Any:
    """A pytree like ``state`` (an ``nnx.State`` or any pytree of arrays / Variables) of ``NamedSharding``s:
    each Variable's ``logical_axes`` metadata through ``rules``; everything else replicated."""

    def one(x):
        axes = x.get_metadata().get("logical_axes") if isinstance(x, nnx.Variable) else None
        if axes is not None and len(axes) != np.ndim(x[...]):
            raise ValueError(
                f"logical_axes {axes}: expected one name per dimension of shape {np.shape(x[...])}"
            )
        spec = logical_to_spec(tuple(axes), rules, mesh) if axes is not None else PartitionSpec()
        sharding = NamedSharding(mesh, spec)
        return x.replace(sharding) if isinstance(x, nnx.Variable) else sharding

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data``."""
    return NamedSharding(mesh, logical_to_spec(("batch",), mesh=mesh))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Puts a host batch on the mesh; the batch size must divide the data axis size."""
    n = mesh.shape["data"]
    out = {}
    for k, v in batch.items():
        if v.shape[0] % n:
            raise ValueError(
                f"batch[{k!r}]: batch size {v.shape[0]} is not divisible by {n} data-parallel devices"
            )
        out[k] = jax.device_put(v, batch_sharding(mesh))
    return out
