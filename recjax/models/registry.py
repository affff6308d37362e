"""``build_model(name, num_items, rngs=..., **overrides)``: a model from a name and flat hyper-parameters.

Overrides are the config dataclass's fields (e.g. an ``ml_collections.ConfigDict`` section passed as
``**cfg.model``); unknown names or keys raise a ValueError listing the valid ones. Tuples given as lists (as
ConfigDicts and JSON tend to) are converted back to tuples; dict-valued ``ffn_options`` become sorted pairs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax import nnx

from recjax.models.hstu import HSTU, HSTUConfig
from recjax.models.lime import LIME, LimeConfig
from recjax.models.mfli import MFLI, MFLIConfig
from recjax.models.sasrec import SASRec, SASRecConfig

MODELS: dict[str, tuple[type, type]] = {
    "sasrec": (SASRec, SASRecConfig),
    "hstu": (HSTU, HSTUConfig),
    "lime": (LIME, LimeConfig),
    "mfli": (MFLI, MFLIConfig),
}


def model_names() -> tuple[str, ...]:
    return tuple(sorted(MODELS))


def config_fields(name: str) -> tuple[str, ...]:
    """Hyper-parameter names ``build_model`` accepts for ``name`` (besides ``num_items``)."""
    _, config_cls = _lookup(name)
    return tuple(f.name for f in dataclasses.fields(config_cls) if f.name != "num_items")


def _lookup(name: str) -> tuple[type, type]:
    if name not in MODELS:
        raise ValueError(f"model name: expected one of {model_names()}, got {name!r}")
    return MODELS[name]


def _plain(key: str, value: Any) -> Any:
    if key == "ffn_options" and isinstance(value, Mapping):
        return tuple(sorted((str(k), v) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_plain("", v) for v in value)
    return value


def make_config(name: str, num_items: int, **overrides):
    """The frozen config dataclass for ``name`` with ``overrides`` applied (validated by the dataclass)."""
    _, config_cls = _lookup(name)
    valid = config_fields(name)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"{name} hyper-parameters: unknown {unknown}; valid keys are {sorted(valid)}")
    return config_cls(num_items=num_items, **{k: _plain(k, v) for k, v in overrides.items()})


def build_model(name: str, num_items: int, *, rngs: nnx.Rngs, **overrides) -> nnx.Module:
    """E.g. ``build_model("sasrec", 3706, rngs=nnx.Rngs(params=0, dropout=1), num_blocks=2)``."""
    model_cls, _ = _lookup(name)
    return model_cls(make_config(name, num_items, **overrides), rngs=rngs)
