"""Train and evaluate one configuration: ``python -m experiments.run --config=experiments/configs/X.py
[--config.section.key=value ...] [--workdir=runs/NAME]``.

Prints a metrics table (test split, best validation epoch) beside the popularity baseline and writes
``results.json``, ``metrics.jsonl`` and TensorBoard events to the workdir. Re-running with the same workdir
resumes from its last checkpoint.
"""

from __future__ import annotations

import datetime
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.train_lib import format_table, run_experiment

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/default.py", "experiment config file"
)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (default: runs/<config>-<timestamp>)")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    config = _CONFIG.value
    name = pathlib.Path(config_flags.get_config_filename(flags.FLAGS["config"])).stem
    workdir = _WORKDIR.value or f"runs/{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    print(f"workdir: {workdir}\ncommand: {' '.join(sys.argv)}")
    print(format_table(run_experiment(config, workdir)))


if __name__ == "__main__":
    app.run(main)
