"""Multi-process launch: ``jax.distributed.initialize()`` from flags or the environment, global batches fed
by every process from its own copy, and host reads of arrays that span processes.

One process per GPU (or per host with all its GPUs), or several CPU processes on one host (the CPU
backend's collectives go through gloo, jax 0.11's default, set explicitly here). Every process runs the
same program on the same global mesh (``jax.devices()`` lists every process's devices); the data
pipeline is a pure function of (seed, epoch), so every process builds the same global batch and
:func:`global_batch` puts only its addressable shards on its devices (``jax.make_array_from_callback``):
no batch exchange between processes.

Configuration (:class:`DistributedConfig`), flags of ``experiments.run`` or the environment:

- ``RECJAX_COORDINATOR=host:port`` (``--coordinator``): process 0's address, reachable by all;
- ``RECJAX_NUM_PROCESSES`` (``--num_processes``), ``RECJAX_PROCESS_ID`` (``--process_id``);
- ``RECJAX_LOCAL_DEVICE_IDS=0`` (``--local_device_ids``): the local devices this process drives (one
  process per GPU on a host of several: process i takes GPU i); empty: all visible devices.

``--distributed`` with nothing else calls ``jax.distributed.initialize()`` with no arguments, which detects
a cluster launcher (SLURM, Open MPI, Kubernetes / TPU pods).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

ENV = {
    "coordinator": "RECJAX_COORDINATOR",
    "num_processes": "RECJAX_NUM_PROCESSES",
    "process_id": "RECJAX_PROCESS_ID",
    "local_device_ids": "RECJAX_LOCAL_DEVICE_IDS",
}


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """``jax.distributed.initialize`` arguments. ``enabled`` with every other field empty: auto-detect
    (cluster launchers). ``num_processes`` 0 and ``process_id`` -1 mean "not given"."""

    enabled: bool = False
    coordinator: str = ""
    num_processes: int = 0
    process_id: int = -1
    local_device_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.coordinator and (
            ":" not in self.coordinator or not self.coordinator.rsplit(":", 1)[1].isdigit()
        ):
            raise ValueError(f"distributed.coordinator: expected 'host:port', got {self.coordinator!r}")
        if self.num_processes < 0:
            raise ValueError(
                f"distributed.num_processes: expected >= 1 (0 = not given), got {self.num_processes}"
            )
        if self.process_id < -1 or (self.num_processes and self.process_id >= self.num_processes):
            raise ValueError(
                f"distributed.process_id: expected 0..num_processes-1 ({self.num_processes}), "
                f"got {self.process_id}"
            )
        if self.coordinator and (self.num_processes == 0 or self.process_id < 0):
            raise ValueError(
                "distributed.coordinator given: distributed.num_processes and distributed.process_id are "
                f"needed too, got num_processes={self.num_processes}, process_id={self.process_id}"
            )
        if any(i < 0 for i in self.local_device_ids):
            raise ValueError(f"distributed.local_device_ids: expected ids >= 0, got {self.local_device_ids}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, enabled: bool = False) -> DistributedConfig:
        """From ``RECJAX_*`` variables (:data:`ENV`); enabled when ``enabled`` or a coordinator is set."""
        env = os.environ if env is None else env

        def num(key: str, default: int) -> int:
            raw = env.get(ENV[key], "").strip()
            if not raw:
                return default
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{ENV[key]}: expected an integer, got {raw!r}") from None

        coordinator = env.get(ENV["coordinator"], "").strip()
        ids = env.get(ENV["local_device_ids"], "").strip()
        try:
            local = tuple(int(x) for x in ids.split(",") if x.strip())
        except ValueError:
            raise ValueError(
                f"{ENV['local_device_ids']}: expected comma-separated integers, got {ids!r}"
            ) from None
        return cls(
            enabled=enabled or bool(coordinator),
            coordinator=coordinator,
            num_processes=num("num_processes", 0),
            process_id=num("process_id", -1),
            local_device_ids=local,
        )


def initialize(cfg: DistributedConfig) -> bool:
    """``jax.distributed.initialize`` per ``cfg`` (before any other JAX call starts a backend); returns
    whether it ran. A second call, or a disabled ``cfg``, does nothing."""
    if not cfg.enabled or jax.distributed.is_initialized():
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes' collectives
    kwargs: dict[str, Any] = {}
    if cfg.coordinator:
        kwargs.update(
            coordinator_address=cfg.coordinator, num_processes=cfg.num_processes, process_id=cfg.process_id
        )
    if cfg.local_device_ids:
        kwargs["local_device_ids"] = list(cfg.local_device_ids)
    jax.distributed.initialize(**kwargs)
    return True


def check_checkpoints(every_steps: int, every_epochs: int) -> None:
    """Refuses checkpoints in a multi-process run: the Orbax checkpointer (``recjax.train.checkpoint``) and
    its crash-safety renames are wired for one process (every process would have to save into one
    directory together)."""
    if jax.process_count() > 1 and (every_steps or every_epochs):
        raise ValueError(
            f"train.checkpoint_every_steps={every_steps} / train.checkpoint_every_epochs={every_epochs}: "
            f"checkpoints are single-process only, this run has {jax.process_count()} processes; set both "
            "to 0"
        )


def is_primary() -> bool:
    """Process 0 (writes the run's files)."""
    return jax.process_index() == 0


def global_array(x: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """``x`` (the same global value on every process) as a global array: each process puts the slices of
    its addressable shards only."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _put_one(x: Any, sharding: jax.sharding.Sharding) -> Any:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # already global: a reshard
    if _is_key(x):  # typed PRNG keys travel as their raw data
        data = global_array(np.asarray(jax.random.key_data(x)), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return global_array(np.asarray(x), sharding)


def put(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)`` (one sharding or a matching pytree prefix) that also works when
    the shardings span several processes: every process then holds the same ``tree`` (same seeds, same
    data) and puts its own shards."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: _put_one(x, shardings), tree)
    return jax.tree.map(
        lambda s, sub: jax.tree.map(lambda x: _put_one(x, s), sub),
        shardings,
        tree,
        is_leaf=lambda s: isinstance(s, jax.sharding.Sharding),
    )


def host_value(x: Any) -> np.ndarray:
    """``x`` as one numpy array on every process: a plain fetch when this process holds all of it, else an
    all-gather between processes (a collective: every process must call it, in the same order)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def host_tree(tree: Any) -> Any:
    """:func:`host_value` over a pytree."""
    return jax.tree.map(host_value, tree)
