"""Train and evaluate one configuration: ``python -m experiments.run --config=experiments/configs/X.py[:ARG]
[--config.section.key=value ...] [--workdir=runs/NAME] [--verbosity=0]``.

Prints a metrics table (test split, best validation epoch) beside the popularity baseline and writes
``results.json``, ``metrics.jsonl`` and TensorBoard events (``tensorboard/``) to the workdir. Re-running with
the same workdir resumes from its last checkpoint (with the same config: a changed one is refused, naming
the keys, unless ``--allow_config_change=key1,key2`` or ``all``); a second run on a workdir in use is
refused, naming the holder; a finished workdir reports its results.

Config keys and values are checked before any data loads: an unknown key names the closest existing one, a
bad value names the field. Logging is WARNING and above unless ``--verbosity`` (absl's flag; 0 = INFO) is
given.
"""

from __future__ import annotations

import datetime
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from experiments import overrides

_DEFAULT_CONFIG = "experiments/configs/default.py"


def define_flags() -> None:
    # Defined on demand, after exit_on_unknown_override: config_flags loads the default config (and applies
    # the --config.* overrides) when the flag is defined.
    config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "experiment config file[:argument]")
    flags.DEFINE_string("workdir", None, "output directory (default: runs/<config>-<timestamp>)")
    flags.DEFINE_string(
        "allow_config_change",
        "",
        "on resume, config keys (or key prefixes, comma-separated, or 'all') allowed to differ from the "
        "config the workdir was started with",
    )


def run_name(config_filename: str) -> str:
    """``experiments/configs/default.py:ml1m`` -> ``default-ml1m`` (the workdir's stem)."""
    path, _, arg = config_filename.partition(":")
    return pathlib.Path(path).stem + (f"-{arg}" if arg else "")


def main(argv):
    del argv
    overrides.quiet_logging(flags.FLAGS)
    config = flags.FLAGS.config
    try:
        overrides.validate(config)  # fail in a second on a bad value, not after the data loads
    except (ValueError, TypeError) as e:
        sys.exit(f"error: invalid config: {e}")
    from experiments.train_lib import format_table, run_experiment

    name = run_name(config_flags.get_config_filename(flags.FLAGS["config"]))
    workdir = flags.FLAGS.workdir or f"runs/{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    print(f"workdir: {workdir}\ncommand: {' '.join(sys.argv)}", flush=True)
    allow = flags.FLAGS.allow_config_change
    from recjax.train.workdir import ConfigChangedError, WorkdirBusyError

    try:
        results = run_experiment(config, workdir, allow_change=True if allow == "all" else allow)
    except (WorkdirBusyError, ConfigChangedError) as e:  # one clear message, no traceback
        sys.exit(f"error: {e}")
    print(format_table(results))


if __name__ == "__main__":
    overrides.exit_on_unknown_override(sys.argv, default_config=_DEFAULT_CONFIG)
    define_flags()
    app.run(main)
