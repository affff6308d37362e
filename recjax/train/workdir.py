"""Guards for a training workdir: one writer at a time, resume only with the config the run started with,
and recognising a finished run.

* ``WorkdirLock(workdir)``: an exclusive ``fcntl.flock`` on ``workdir/.lock``; the holder (pid, host, start
  time, command) is written into the file, and a second run is refused with a message naming it. The kernel
  releases a flock when its holder dies (SIGKILL included), so a lock left by a killed run is simply taken
  over, with one warning line naming the dead holder. Re-entrant within one process.
* ``check_resume_config(workdir, config, allow_change)``: the resolved config is stored as
  ``workdir/config.json`` on the first start; on resume a differing config is refused with the dotted keys
  and old -> new values, unless the keys are allowed. Allowed without asking: ``RESULT_NEUTRAL_KEYS``
  (display, checkpoint cadence, buffer donation) and a larger ``train.num_epochs``
  (continuing a run); a smaller one is refused, as the run may already be past it.
* ``finished_results(workdir, config)``: the stored ``results.json`` when the run finished with this config.

Notes: flock works on local filesystems (verified on ext4) and on NFS through Linux's fcntl emulation; on
several hosts only process 0 should take the lock and write the config. Forked children inherit the lock
(it belongs to the open file), so a child outliving a killed parent keeps the workdir locked; the refusal
message says so when the recorded pid is gone.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import pathlib
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
CHECKPOINT_DIR = "checkpoints"  # the Trainer's checkpoint directory inside the workdir

# Keys whose change cannot change the results: display, checkpoint cadence (resume is exact at any save
# point), buffer donation (memory only), the wall-clock budget (it only says where a run pauses; a run
# that ran out of time is not finished, and running it again goes on along the same trajectory).
RESULT_NEUTRAL_KEYS = frozenset(
    {
        "train.progress", "train.checkpoint_every_steps", "train.checkpoint_every_epochs", "train.donate",
        "train.max_train_seconds",
    }
)  # fmt: skip
# Keys that may grow without asking: more epochs continue a run.
GROWABLE_KEYS = frozenset({"train.num_epochs"})


class WorkdirBusyError(RuntimeError):
    """Another live process holds the workdir lock."""


class ConfigChangedError(ValueError):
    """The config differs from the one the workdir was started with."""


# -- one writer per workdir ---------------------------------------------------------------------------------
_held: dict[pathlib.Path, list[int]] = {}  # lock file -> [fd, depth]: re-entrant within the process


def _holder_info() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
    }


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        text = os.pread(fd, 1 << 16, 0).decode(errors="replace").strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def describe_holder(holder: Mapping[str, Any] | None) -> str:
    if not holder:
        return "an unknown process (lock file empty)"
    return (
        f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
        f"(command: {holder.get('command')})"
    )


def _busy_message(workdir: pathlib.Path, holder: Mapping[str, Any] | None) -> str:
    text = f"workdir {workdir} is in use by {describe_holder(holder)}"
    pid = (holder or {}).get("pid")
    if (holder or {}).get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
        text += "; that pid has exited, so a process it forked still holds the lock"
    return text + "; wait for it to end or stop it, or use another workdir"


class WorkdirLock:
    """``with WorkdirLock(workdir):`` — exclusive use of ``workdir`` by this process (see module doc)."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = pathlib.Path(workdir)
        self.path = (self.workdir / LOCK_FILE).resolve()

    def acquire(self) -> None:
        if self.path in _held:
            _held[self.path][1] += 1
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            for _ in range(10):  # the holder may be between taking the lock and writing its info
                if holder:
                    break
                time.sleep(0.05)
                holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirBusyError(_busy_message(self.workdir, holder)) from None
        # A clean release empties the file: content left means the previous holder died holding it.
        if (previous := _read_holder(fd)) is not None:
            log.warning(
                "workdir %s: taking over the lock left by %s", self.workdir, describe_holder(previous)
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder_info()) + "\n").encode(), 0)
        _held[self.path] = [fd, 1]

    def release(self) -> None:
        entry = _held.get(self.path)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1]:
            return
        del _held[self.path]
        fd = entry[0]
        os.ftruncate(fd, 0)  # the file stays: unlinking it would let two processes lock different inodes
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- resume guard -------------------------------------------------------------------------------------------
class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


ABSENT: Any = _Absent()  # the value of a key missing on one side of a diff


class Change(NamedTuple):
    key: str  # dotted, e.g. "train.loss.num_negatives"
    old: Any
    new: Any


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):  # numpy arrays and scalars
        return x.tolist()
    if hasattr(x, "to_dict"):  # ml_collections.ConfigDict
        return x.to_dict()
    return str(x)


def normalize(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as it reads back from JSON: tuples become lists, numpy values Python ones."""
    return json.loads(json.dumps(config, default=_jsonable))


def _same(a: Any, b: Any) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)  # True == 1 in Python, not in a config


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """Differences between two nested configs, sorted by dotted key; compared after a JSON round trip (a
    tuple equals the list it is stored as). A key present on one side only has ``ABSENT`` on the other; a
    subtree added or removed whole is one change; lists are compared whole."""
    changes: list[Change] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k, ABSENT), b.get(k, ABSENT), f"{prefix}{k}.")
        elif a is ABSENT or b is ABSENT or not _same(a, b):
            changes.append(Change(prefix[:-1], a, b))

    walk(normalize(old), normalize(new), "")
    return changes


def _show(value: Any) -> str:
    return repr(value) if value is ABSENT else json.dumps(value)


def _allowed(key: str, allow: bool | frozenset[str]) -> bool:
    if isinstance(allow, bool):
        return allow
    return any(key == a or key.startswith(a + ".") for a in allow)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Writes JSON to a temporary file beside ``path`` and renames it over ``path``: a kill leaves the old
    file or the new one, never a truncated one."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=_jsonable)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def has_progress(workdir: str | os.PathLike) -> bool:
    """Whether the workdir holds anything to resume or report: a checkpoint directory entry or results."""
    workdir = pathlib.Path(workdir)
    ckpt = workdir / CHECKPOINT_DIR
    return (workdir / RESULTS_FILE).exists() or (
        ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())
    )


def check_resume_config(
    workdir: str | os.PathLike,
    config: Mapping[str, Any],
    allow_change: bool | str | Iterable[str] = False,
) -> list[Change]:
    """Stores ``config`` as ``workdir/config.json`` on the first start; on resume refuses a differing one.

    ``allow_change``: ``True`` allows every change; keys or key prefixes (an iterable, or a comma-separated
    string: ``"train.learning_rate,model"``) allow those. Returns the accepted changes that can change the
    results (a larger ``train.num_epochs`` included; ``RESULT_NEUTRAL_KEYS`` left out) and stores the new
    config when anything changed. Without a checkpoint or results in the workdir there is nothing to
    resume: the config is stored and ``[]`` returned (a run that failed before its first save is no
    constraint). Raises ``ConfigChangedError`` naming every refused key with its stored and new value.
    """
    workdir = pathlib.Path(workdir)
    path = workdir / CONFIG_FILE
    new = normalize(config)
    if isinstance(allow_change, str):
        allow_change = [k.strip() for k in allow_change.split(",") if k.strip()]
    allow = allow_change if isinstance(allow_change, bool) else frozenset(allow_change)
    old = None
    if path.exists() and has_progress(workdir):
        try:
            old = json.loads(path.read_text())
        except ValueError:
            log.warning("workdir %s: unreadable %s replaced by the current config", workdir, CONFIG_FILE)
    if old is None:
        workdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, new)
        return []
    changes = config_diff(old, new)
    significant = [c for c in changes if c.key not in RESULT_NEUTRAL_KEYS]
    refused = [
        c
        for c in significant
        if not _allowed(c.key, allow)
        and not (
            c.key in GROWABLE_KEYS
            and isinstance(c.old, int | float)
            and isinstance(c.new, int | float)
            and c.new >= c.old
        )
    ]
    if refused:
        lines = "\n".join(f"  {c.key}: {_show(c.old)} -> {_show(c.new)}" for c in refused)
        raise ConfigChangedError(
            f"refusing to resume {workdir}: the config differs from the one it was started with "
            f"({path}), stored -> now:\n{lines}\nTo resume anyway allow these keys "
            f"({','.join(c.key for c in refused)}); to start afresh use another workdir."
        )
    if changes:
        write_json_atomic(path, new)
    return significant


def format_changes(changes: Iterable[Change]) -> str:
    """One line: ``config changed on resume: train.num_epochs 10 -> 20, ...``."""
    return "config changed on resume: " + ", ".join(
        f"{c.key} {_show(c.old)} -> {_show(c.new)}" for c in changes
    )


def resume_message(step: int, epoch: int, batch: int = 0) -> str:
    """``step``, ``epoch``, ``batch``: the restored state's (epoch = epochs completed, batch = batches done
    in the current epoch). Epochs are printed 1-based, like the trainer's ``epoch N: valid ...`` lines."""
    where = f"after epoch {epoch}" if batch == 0 else f"batch {batch} of epoch {epoch + 1}"
    return f"resumed from step {step} ({where})"


def finished_results(
    workdir: str | os.PathLike, config: Mapping[str, Any], *, accept_out_of_time: bool = False
) -> dict[str, Any] | None:
    """The parsed ``workdir/results.json`` when it records a finished run of ``config`` (its ``"config"``
    entry equal up to ``RESULT_NEUTRAL_KEYS``); ``None`` when absent, unreadable, without a config, or
    written with another config (e.g. ``train.num_epochs`` raised to continue the run), or when the run
    stopped because ``train.max_train_seconds`` was spent (running it again continues it) unless
    ``accept_out_of_time`` (a report that reads results without training: experiments.sweep's workers)."""
    path = pathlib.Path(workdir) / RESULTS_FILE
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(results, dict) or not isinstance(results.get("config"), dict):
        return None
    if results.get("out_of_time") and not accept_out_of_time:
        return None
    if any(c.key not in RESULT_NEUTRAL_KEYS for c in config_diff(results["config"], config)):
        return None
    return results
