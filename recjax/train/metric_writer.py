"""Metrics as JSON lines (one object per record) plus TensorBoard event files.

JSONL is the source of truth for tables and plots; TensorBoard (tensorboardX, no TensorFlow needed) is for
watching a run. After a resume, records logged between the last checkpoint and the kill appear twice in the
JSONL with the same step: readers keep the last record per (step, key), see :func:`read_jsonl`.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Mapping

import numpy as np


class MetricWriter:
    def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True):
        self.dir = pathlib.Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.dir / "metrics.jsonl", "a", buffering=1)
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float], *, prefix: str = "") -> None:
        values = {f"{prefix}{k}": float(np.asarray(v)) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **values}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, int(step))

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
