"""Device mesh and the shardings the trainer uses: data parallel over a ``data`` axis, parameters placed
by logical-axis rules.

A parameter declares its logical axes as variable metadata, ``nnx.Param(value, logical_axes=("vocab",
"embed"))``; :func:`variable_shardings` maps them through ``rules`` (logical name -> mesh axis or None) to
``NamedSharding``s. Parameters without ``logical_axes`` and axes whose rule names no axis of the mesh are
replicated, so sharding embedding rows or experts is a rule change (``{"vocab": "data"}``), not a new code
path. Multi-host runs call ``jax.distributed.initialize()`` before building the mesh.

N-d meshes (:class:`MeshConfig`, :func:`make_nd_mesh`): axes ``data`` (batch), ``model`` (embedding rows,
``recjax.sharding.embedding``) and ``expert`` (MoE experts); :func:`check_rules` rejects rules naming an
unknown axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from recjax.sharding import distributed

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

    def one(path, x):
        axes = x.get_metadata().get("logical_axes") if isinstance(x, nnx.Variable) else None
        if axes is not None and len(axes) != np.ndim(x[...]):
            raise ValueError(
                f"logical_axes {axes}: expected one name per dimension of shape {np.shape(x[...])}"
            )
        spec = logical_to_spec(tuple(axes), rules, mesh) if axes is not None else PartitionSpec()
        for dim, target in zip(np.shape(x[...]), spec):
            size = int(np.prod([mesh.shape[a] for a in (target if isinstance(target, tuple) else (target,))
                                if a is not None]))  # fmt: skip
            if dim % size:
                raise ValueError(
                    f"{jax.tree_util.keystr(path)}: shape {np.shape(x[...])} with logical axes {axes} -> "
                    f"{spec}: {dim} does not divide over {size} devices; pad it or change the rule"
                )
        sharding = NamedSharding(mesh, spec)
        return x.replace(sharding) if isinstance(x, nnx.Variable) else sharding

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data``."""
    return NamedSharding(mesh, logical_to_spec(("batch",), mesh=mesh))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Puts a host batch on the mesh; the batch size must divide the data axis size. With several
    processes every one holds the same global batch and puts the rows of its own devices."""
    n = mesh.shape["data"]
    out = {}
    for k, v in batch.items():
        if v.shape[0] % n:
            raise ValueError(
                f"batch[{k!r}]: batch size {v.shape[0]} is not divisible by {n} data-parallel devices"
            )
        out[k] = distributed.global_array(v, batch_sharding(mesh))  # each process: its own shards
    return out


# -- N-d meshes from config ---------------------------------------------------------------------------------
MESH_AXES = ("data", "model", "expert")  # the axis names a rule may name (a missing one means "replicated")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """An N-d mesh ``data x model x expert``. ``data=0`` takes the devices the other axes leave; every size
    must divide the device count, and their product must equal it (``num_devices``, 0 = all)."""

    data: int = 0
    model: int = 1
    expert: int = 1
    num_devices: int = 0

    def __post_init__(self):
        for name in ("data", "num_devices"):
            if getattr(self, name) < 0:
                raise ValueError(f"mesh.{name}: expected >= 0, got {getattr(self, name)}")
        for name in ("model", "expert"):
            if getattr(self, name) < 1:
                raise ValueError(f"mesh.{name}: expected >= 1, got {getattr(self, name)}")

    def shape(self, device_count: int) -> dict[str, int]:
        """Axis sizes for ``device_count`` devices; raises naming the field that does not fit."""
        n = self.num_devices or device_count
        if not 1 <= n <= device_count:
            raise ValueError(f"mesh.num_devices: expected 1..{device_count}, got {n}")
        for name in ("data", "model", "expert"):
            size = getattr(self, name)
            if size and n % size:
                raise ValueError(f"mesh.{name}: {size} does not divide the device count {n}")
        rest = self.model * self.expert
        if n % rest:
            raise ValueError(f"mesh.model x mesh.expert: {rest} does not divide the device count {n}")
        data = self.data or n // rest
        if data * rest != n:
            raise ValueError(
                f"mesh.data: data x model x expert = {data} x {self.model} x {self.expert} = {data * rest}, "
                f"expected the device count {n}"
            )
        return {"data": data, "model": self.model, "expert": self.expert}


def make_nd_mesh(cfg: MeshConfig) -> jax.sharding.Mesh:
    """The ``(data, model, expert)`` mesh of ``cfg`` (size-1 axes kept, so rules may always name them).
    Devices are laid out model-minor: the ``model`` group of one data shard are neighbours (one host's
    fast links carry the embedding all-to-all)."""
    sizes = cfg.shape(jax.device_count())
    n = sizes["data"] * sizes["model"] * sizes["expert"]
    devices = np.asarray(jax.devices()[:n]).reshape(sizes["data"], sizes["expert"], sizes["model"])
    return jax.sharding.Mesh(devices.transpose(0, 2, 1), MESH_AXES)


def check_rules(rules: Mapping[str, str | None], mesh: jax.sharding.Mesh | None = None) -> None:
    """Rejects a rule naming a mesh axis that is neither a standard one (:data:`MESH_AXES`) nor an axis
    of ``mesh``, naming the rule."""
    known = set(MESH_AXES) | set(mesh.axis_names if mesh is not None else ())
    for logical, target in rules.items():
        targets = target if isinstance(target, tuple) else (target,)
        for t in targets:
            if t is not None and t not in known:
                raise ValueError(
                    f"rules[{logical!r}]: unknown mesh axis {t!r}; expected one of {sorted(known)} or None"
                )
