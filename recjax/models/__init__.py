"""Complete models. Sequential recommenders: SASRec, HSTU (see docs/MODELS.md) and ``build_model``."""

from recjax.models.hstu import HSTU, HSTUConfig
from recjax.models.registry import build_model, config_fields, make_config, model_names
from recjax.models.sasrec import SASRec, SASRecConfig

__all__ = [
    "HSTU",
    "HSTUConfig",
    "SASRec",
    "SASRecConfig",
    "build_model",
    "config_fields",
    "make_config",
    "model_names",
]
