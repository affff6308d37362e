"""Metrics as JSON lines (one object per record) plus TensorBoard event files.

JSONL is the source of truth for tables and plots; TensorBoard (tensorboardX, no TensorFlow needed) is for
watching a run: ``pip install tensorboard; tensorboard --logdir runs/<name>/tensorboard``. Without
tensorboardX the writer keeps JSONL only and warns once.

Names: the JSONL keeps the metric names as given (``valid/hr@10``); TensorBoard tags may only hold
``[A-Za-z0-9_./-]``, so there ``@`` becomes ``_at_`` and any other character ``_`` (``valid/hr_at_10``),
see :func:`tensorboard_tag`.

Resume: a resumed run appends to the same ``metrics.jsonl`` and writes a new event file into the same
``tensorboard/`` folder (TensorBoard reads every event file of a folder, so earlier events stay). Records
logged between the last checkpoint and the kill appear twice with the same step: JSONL readers keep the last
record per (step, key), see :func:`read_jsonl`; pass ``purge_step=<resumed step>`` and TensorBoard hides the
old copies of steps >= it.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import time
import uuid
import warnings
from collections.abc import Mapping

import numpy as np

_TB_ILLEGAL = re.compile(r"[^A-Za-z0-9_./-]")


def tensorboard_tag(name: str) -> str:
    """A TensorBoard-legal tag for a metric name: ``valid/hr@10`` -> ``valid/hr_at_10``."""
    return _TB_ILLEGAL.sub("_", name.replace("@", "_at_"))


class _EventFile:
    """One TensorBoard event file, written synchronously. tensorboardX's SummaryWriter queues events for a
    background thread and its ``flush()`` does not drain that queue, so events could lag a whole epoch."""

    def __init__(self, logdir: pathlib.Path, purge_step: int | None, modules):
        event_file_writer, event_pb2, summary_pb2 = modules
        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        logdir.mkdir(parents=True, exist_ok=True)
        # tensorboardX names the file by the second and opens it "wb": a unique suffix keeps two writers
        # started within one second (a quick resume) from overwriting each other.
        suffix = f".{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self._file = event_file_writer.EventsWriter(str(logdir / "events"), suffix)
        if purge_step is not None:  # TensorBoard hides earlier-written events with step >= purge_step
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._file.write_event(self._event(wall_time=time.time(), step=purge_step, session_log=start))

    def add_scalars(self, step: int, values: Mapping[str, float]) -> None:
        summary = self._summary(value=[self._summary.Value(tag=k, simple_value=v) for k, v in values.items()])
        self._file.write_event(self._event(wall_time=time.time(), step=step, summary=summary))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _tensorboard_modules():
    """tensorboardX's event-file writer and protos, or None (with a warning) where it is not installed."""
    try:
        import tensorboardX  # noqa: F401  (first, so a missing package fails here)
        from tensorboardX import event_file_writer
        from tensorboardX.proto import event_pb2, summary_pb2
    except ImportError:
        # Training must not depend on a viewer: fall back to JSONL (the tables and plots read only that).
        warnings.warn(
            "tensorboardX is not installed: metrics go to metrics.jsonl only (pip install tensorboardX "
            "for TensorBoard event files)",
            stacklevel=3,
        )
        return None
    return event_file_writer, event_pb2, summary_pb2


class MetricWriter:
    """``write(step, metrics, prefix=)`` appends one JSONL record and the TensorBoard scalars; ``flush()``
    makes both visible on disk (call it at each epoch end); ``close()`` at the end of the run."""

    def __init__(
        self, workdir: str | pathlib.Path, *, tensorboard: bool = True, purge_step: int | None = None
    ):
        self.dir = pathlib.Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.dir / "metrics.jsonl", "a", buffering=1)
        modules = _tensorboard_modules() if tensorboard else None
        self._tb = _EventFile(self.dir / "tensorboard", purge_step, modules) if modules else None

    @property
    def tensorboard(self) -> bool:
        """Whether TensorBoard event files are written."""
        return self._tb is not None

    def write(self, step: int, metrics: Mapping[str, float], *, prefix: str = "") -> None:
        values = {f"{prefix}{k}": float(np.asarray(v)) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **values}) + "\n")
        if self._tb is not None:
            self._tb.add_scalars(int(step), {tensorboard_tag(k): v for k, v in values.items()})

    def flush(self) -> None:
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
    """Records in step order, keeping the last record written for each step and key."""
    merged: dict[int, dict] = {}
    for line in pathlib.Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            merged.setdefault(rec["step"], {}).update(rec)
    return [merged[s] for s in sorted(merged)]
