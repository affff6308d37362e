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
    # Multi-process runs (README, "Multi-process training"); each flag defaults to its RECJAX_* variable.
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (auto-detects a cluster)")
    flags.DEFINE_string("coordinator", None, "host:port of process 0 (env RECJAX_COORDINATOR)")
    flags.DEFINE_integer("num_processes", None, "number of processes (env RECJAX_NUM_PROCESSES)")
    flags.DEFINE_integer("process_id", None, "this process, 0..num_processes-1 (env RECJAX_PROCESS_ID)")
    flags.DEFINE_string(
        "local_device_ids", None, "this process's devices, e.g. 0 (env RECJAX_LOCAL_DEVICE_IDS)"
    )


def run_name(config_filename: str) -> str:
    """``experiments/configs/default.py:ml1m`` -> ``default-ml1m`` (the workdir's stem)."""
    path, _, arg = config_filename.partition(":")
    return pathlib.Path(path).stem + (f"-{arg}" if arg else "")


def start_processes(fv, config) -> str | None:
    """``jax.distributed.initialize()`` when asked (flags, else RECJAX_* variables); returns the workdir
    suffix of this process (process 0: none; the others write their own files below it)."""
    import os

    from recjax.sharding import distributed

    env = dict(os.environ)
    for key, var in distributed.ENV.items():
        if fv[key].value is not None:
            env[var] = str(fv[key].value)
    cfg = distributed.DistributedConfig.from_env(env, enabled=fv.distributed)
    if not distributed.initialize(cfg):
        return None
    import jax

    if jax.process_count() > 1 and not fv.workdir:
        raise ValueError("--workdir: required with several processes (every process must name the same run)")
    distributed.check_checkpoints(config.train.checkpoint_every_steps, config.train.checkpoint_every_epochs)
    return f"process_{jax.process_index()}" if jax.process_index() else None


def main(argv):
    del argv
    overrides.quiet_logging(flags.FLAGS)
    config = flags.FLAGS.config
    try:
        overrides.validate(config)  # fail in a second on a bad value, not after the data loads
    except (ValueError, TypeError) as e:
        sys.exit(f"error: invalid config: {e}")
    try:
        suffix = start_processes(flags.FLAGS, config)
    except ValueError as e:
        sys.exit(f"error: {e}")
    from experiments.train_lib import format_table, run_experiment

    name = run_name(config_flags.get_config_filename(flags.FLAGS["config"]))
    workdir = flags.FLAGS.workdir or f"runs/{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    workdir = f"{workdir}/{suffix}" if suffix else workdir
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
