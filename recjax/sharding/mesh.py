"""Device mesh and the shardings the trainer uses: data parallel over a ``data`` axis, parameters replicated.

Logical axes map to mesh axes through rules so larger systems (expert, model parallel) add entries instead of
new code paths. Multi-host runs call ``jax.distributed.initialize()`` before building the mesh.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

DEFAULT_RULES: Mapping[str, str | None] = {"batch": "data", "embed": None, "vocab": None, "expert": "expert"}


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
