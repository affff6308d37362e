"""Orbax checkpoints behind one small interface: save a pytree at a training step, restore the newest.

Crash safety (SIGKILL at any moment leaves the newest committed checkpoint readable):

* Checkpoints are keyed by a monotone *save index*, not by the training step (which is recorded in the
  checkpoint's metadata): saving twice at one step (the trainer does, after an epoch-end validation changed
  the early-stopping state) writes a new checkpoint beside the old one instead of deleting the old one first.
* Orbax writes each checkpoint into ``<index>.orbax-checkpoint-tmp-*`` and renames it to ``<index>`` when
  complete; a kill before the rename leaves a temporary directory that no reader sees (removed on the next
  start). Old checkpoints beyond ``max_to_keep`` are removed only after the new one is committed, renamed
  aside (``.deleting-<index>``) before the recursive delete so a half-deleted one is never read; one found
  unreadable does not count towards ``max_to_keep``.
* ``restore`` falls back to the newest readable checkpoint, with one warning line, when newer ones are
  unreadable (disk corruption, a file truncated outside this process).

Everything needed to continue bit-for-bit goes into the pytree: parameters, optimizer state, RNG keys, the
step, and the data position (epoch and batch index) kept by the caller.

Fault injection for the crash tests: with ``RECJAX_CHECKPOINT_KILL_AT=<point>`` in the environment the
process SIGKILLs itself at that point of ``save``: ``save`` (before anything is written), ``committed``
(the new checkpoint is committed, old ones not yet removed), ``delete`` (an old checkpoint renamed aside,
half removed).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

KILL_ENV = "RECJAX_CHECKPOINT_KILL_AT"
_DELETING = ".deleting-"
_STEP_METADATA = "_CHECKPOINT_METADATA"  # Orbax's per-checkpoint JSON, holding custom_metadata


def _maybe_kill(point: str) -> None:
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = str(error).strip().splitlines()
    return text[0][:limit] if text else ""


def committed_steps(directory: str | pathlib.Path) -> list[int | None]:
    """Training steps of the committed checkpoints in ``directory``, oldest first, without opening it (safe
    while another process writes there: a ``Checkpointer`` would remove that writer's temporary
    directories). ``None`` where a checkpoint's metadata is unreadable."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    indices = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    return [_read_step(directory / str(i), i) for i in indices]


def _read_step(path: pathlib.Path, index: int) -> int | None:
    # The small step-metadata JSON, read directly: Orbax's metadata() also parses the array tree and fails
    # on damaged data that restore reports anyway.
    try:
        meta = json.loads((path / _STEP_METADATA).read_text())
    except (OSError, ValueError):
        return None
    custom = meta.get("custom_metadata") or {}
    return int(custom.get("step", index))  # checkpoints written before save indices: keyed by their step


class CheckpointError(RuntimeError):
    """No checkpoint in the directory could be read."""


class Checkpointer:
    """Open one only in the process that writes the directory (it removes temporary leftovers on opening);
    other processes read progress with ``committed_steps``."""

    def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 2):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep: expected >= 1, got {max_to_keep}")
        self.directory = pathlib.Path(directory).absolute()
        self.max_to_keep = max_to_keep
        # Retention is done here (after the commit, rename-aside first); Orbax only writes and reads.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, enable_async_checkpointing=False, create=True, cleanup_tmp_directories=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        for leftover in self.directory.glob(_DELETING + "*"):  # a kill in the middle of a removal
            shutil.rmtree(leftover, ignore_errors=True)
        self._steps: dict[int, int] = {}  # save index -> training step (metadata read once per index)
        self._unreadable: set[int] = set()  # indices restore failed on: not counted by max_to_keep

    def _indices(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def _step_of(self, index: int) -> int | None:
        if index not in self._steps:
            step = _read_step(self.directory / str(index), index)
            if step is None:
                return None
            self._steps[index] = step
        return self._steps[index]

    def has_checkpoints(self) -> bool:
        return bool(self._indices())

    def steps(self) -> list[int | None]:
        """Training steps of the committed checkpoints, oldest first (a step appears twice when saved
        twice; ``None`` where the metadata file is unreadable)."""
        return [self._step_of(i) for i in self._indices()]

    def latest_step(self) -> int | None:
        """Training step of the newest committed checkpoint with readable metadata; ``None`` if none (test
        for something to resume with ``has_checkpoints``)."""
        known = [s for s in self.steps() if s is not None]
        return known[-1] if known else None

    def save(self, step: int, state: Any, *, force: bool = True) -> None:
        """Saves ``state`` as training step ``step``; a later ``restore`` returns it, also when ``step`` was
        saved before with other content. ``force`` is accepted for compatibility: every call saves."""
        del force
        _maybe_kill("save")
        indices = self._indices()
        index = indices[-1] + 1 if indices else 1
        self._manager.save(
            index, args=ocp.args.StandardSave(state), custom_metadata={"step": int(step)}, force=True
        )
        self._manager.wait_until_finished()
        self._steps[index] = int(step)
        _maybe_kill("committed")
        self._remove(self._to_remove())

    def _to_remove(self) -> list[int]:
        """Indices older than the newest ``max_to_keep`` readable ones (unreadable ones do not count, so a
        damaged checkpoint never pushes out the older good one; it goes once it is older than those)."""
        indices = self._indices()
        good = [i for i in indices if i not in self._unreadable]
        if len(good) < self.max_to_keep:
            return []
        return [i for i in indices if i < good[-self.max_to_keep]]

    def _remove(self, indices: list[int]) -> None:
        for index in indices:
            path = self.directory / str(index)
            aside = self.directory / f"{_DELETING}{index}"
            path.rename(aside)  # atomic: readers see the whole checkpoint or none of it
            _maybe_kill("delete")
            shutil.rmtree(aside, ignore_errors=True)
            self._steps.pop(index, None)
            self._unreadable.discard(index)
        if indices:
            self._manager.reload()

    def restore(self, target: Any, step: int | None = None) -> Any:
        """Restores the newest readable checkpoint (of training step ``step`` if given) into the structure,
        dtypes and shardings of ``target`` (arrays or ShapeDtypeStructs). Unreadable newer checkpoints are
        skipped with one warning line; raises ``CheckpointError`` if none is readable."""
        indices = [i for i in reversed(self._indices()) if step is None or self._step_of(i) == step]
        if not indices:
            which = "" if step is None else f" of step {step}"
            raise FileNotFoundError(f"no checkpoint{which} in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        failed: list[tuple[int, Exception]] = []
        for index in indices:
            try:
                restored = self._manager.restore(index, args=ocp.args.StandardRestore(abstract))
            except Exception as e:  # torn or corrupted files: try the next older checkpoint
                failed.append((index, e))
                self._unreadable.add(index)
                continue
            if failed:
                skipped = "; ".join(self._describe(i, e) for i, e in failed)
                log.warning(
                    "unreadable checkpoint skipped: %s; restored step %s instead",
                    skipped,
                    self._step_of(index),
                )
            return restored
        details = "; ".join(self._describe(i, e) for i, e in failed)
        raise CheckpointError(f"no readable checkpoint in {self.directory}: {details}") from failed[0][1]

    def _describe(self, index: int, error: Exception) -> str:
        step = self._step_of(index)
        return (
            f"step {'?' if step is None else step} ({self.directory / str(index)}): "
            f"{type(error).__name__}: {_first_line(error)}"
        )

    def close(self) -> None:
        self._manager.close()
