"""Orbax checkpoints behind one small interface: save a pytree every N steps, restore the latest.

Saves are synchronous and atomic (Orbax writes to a temporary directory and renames it when complete), so a
process killed at any moment — SIGKILL included — leaves either the previous or the new checkpoint, never a
torn one. Everything needed to continue bit-for-bit goes into the pytree: parameters, optimizer state, RNG
keys, the step, and the data position (epoch and batch index) kept by the caller.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 2):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, *, force: bool = False) -> None:
        """Saves ``state`` as ``step``, replacing a checkpoint of the same step (the trainer saves again at
        the end of an epoch after validation changed the early-stopping state). The older checkpoint kept by
        ``max_to_keep`` covers a kill between the delete and the new save."""
        if int(step) in self._manager.all_steps():
            self._manager.delete(int(step))
        self._manager.save(int(step), args=ocp.args.StandardSave(state), force=force)
        self._manager.wait_until_finished()

    def restore(self, target: Any, step: int | None = None) -> Any:
        """Restores into the structure, dtypes and shardings of ``target`` (arrays or ShapeDtypeStructs)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self._manager.close()
