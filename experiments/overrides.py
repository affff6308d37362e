"""Config keys and values from the command line, checked before anything trains or loads data.

- :func:`lookup` / :func:`set_value`: a dotted key (``model.num_blocks``) of a ConfigDict; an unknown key
  is a KeyError naming the whole key and the closest existing one.
- :func:`parse_value`: a string typed like the config's current value (``'x' is not an int``).
- :func:`check_flag_overrides`: the ``--config.a.b=...`` overrides in argv, for ``experiments.run`` and
  ``experiments.sweep`` (ml_collections' own error for an unknown key is a bare AttributeError traceback).
- :func:`validate`: builds the train config (``TrainConfig``), the model config and the synthetic-data
  config, so a bad value fails in a second instead of after the dataset loads.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import re
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; fields there: {sorted(candidates)}"


def lookup(
    config: ml_collections.ConfigDict, key: str, *, label: str | None = None
) -> tuple[ml_collections.ConfigDict, str]:
    """(parent node, leaf name) of ``key``; KeyError naming the key (or ``label``) and the closest field."""
    label = label or f"unknown config key {key!r}"
    names = key.split(".")
    node = config
    for i, name in enumerate(names):
        where = ".".join(names[:i]) or "the config"
        if not isinstance(node, ml_collections.ConfigDict):
            raise KeyError(f"{label}: {where} is a value, not a section")
        if name not in node:
            raise KeyError(f"{label}: no field {name!r} in {where}{_suggest(name, node)}")
        if i < len(names) - 1:
            node = node[name]
    return node, names[-1]


def parse_value(old: Any, raw: str) -> Any:
    """``raw`` parsed to the type of ``old`` (the config's current value); ValueError saying what failed."""
    if isinstance(old, bool):
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise ValueError(f"{raw!r} is not a bool (true/false)")
    if isinstance(old, int):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not an int") from None
    if isinstance(old, float):
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a float") from None
    if isinstance(old, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise ValueError(f"{raw!r} is not a Python literal (e.g. '(10, 50)')") from None
    if isinstance(old, (tuple, list)) and not isinstance(value, (tuple, list)):
        raise ValueError(f"{raw!r} is not a tuple (e.g. '(10, 50)')")
    return value


def set_value(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
    """Sets ``config.<key>`` from a string typed like its current value; unknown keys raise KeyError."""
    node, leaf = lookup(config, key)
    node[leaf] = parse_value(node[leaf], raw)


def _override_pattern(flag: str) -> re.Pattern:
    return re.compile(rf"^--?(?:no)?{re.escape(flag)}\.([^=]+)")


def check_flag_overrides(
    config: ml_collections.ConfigDict, argv: Sequence[str], flag: str = "config"
) -> None:
    """KeyError for the first ``--<flag>.<key>=...`` in argv whose key is not in ``config``."""
    for arg in argv:
        m = _override_pattern(flag).match(arg)
        if m:
            lookup(config, m.group(1), label=f"unknown config key --{flag}.{m.group(1)}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Builds every config object the run builds (train, model, synthetic data) without loading data.

    ValueError/TypeError name the bad field (e.g. ``train.batch_size: expected > 0, got 0``).
    """
    from experiments import parallel
    from experiments.train_lib import check_model_config, train_config
    from recjax.data.synthetic import SyntheticConfig

    train_config(config.train)
    check_model_config(config)
    parallel.check(config)  # mesh, embeddings, length buckets, balance sections
    if "synthetic" in config.data:
        synthetic = config.data.synthetic.to_dict()
        synthetic.pop("seed", None)
        SyntheticConfig(**synthetic).validate()


def _config_argument(argv: Sequence[str], flag: str) -> str | None:
    """The value of ``--<flag>=PATH`` / ``--<flag> PATH`` in argv (the last one given), else None."""
    found = None
    for i, arg in enumerate(argv):
        if arg.startswith((f"--{flag}=", f"-{flag}=")):
            found = arg.split("=", 1)[1]
        elif arg in (f"--{flag}", f"-{flag}") and i + 1 < len(argv):
            found = argv[i + 1]
    return found


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``path.py[:arg]`` -> its ``get_config([arg])``, as ml_collections' config_flags loads it."""
    path, sep, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_recjax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if sep else module.get_config()


def exit_on_unknown_override(argv: Sequence[str], *, default_config: str | None = None, flag: str = "config"):
    """Exits with a one-line error if a ``--<flag>.<key>=...`` in argv names no config field. Call it before
    ml_collections parses the flag: its own error is a bare AttributeError traceback."""
    if not any(_override_pattern(flag).match(a) for a in argv[1:]):
        return
    spec = _config_argument(argv[1:], flag) or default_config
    try:
        config = load_config(spec)
    except Exception:  # config_flags reports a broken config file itself
        return
    try:
        check_flag_overrides(config, argv[1:], flag)
    except KeyError as e:
        sys.stderr.write(f"FATAL Flags parsing error: {e.args[0]}\n")
        sys.exit(1)


def quiet_logging(flag_values) -> None:
    """WARNING and above unless ``--verbosity``/``-v`` was given: Orbax logs every checkpoint at INFO."""
    from absl import logging

    if not flag_values["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
