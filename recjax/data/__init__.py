"""Datasets, splits and batches for sequential recommendation (see docs/DATA.md).

Datasets by name (built-ins, an interaction file, your own): ``recjax.data.registry.load`` / ``register``.

``recjax.data.pipeline`` (grain) is not imported here: the GPU image has no grain.
"""

from recjax.data.batching import (
    batch_order,
    batches,
    collate,
    epoch_permutation,
    make_eval_examples,
    make_train_examples,
    num_batches,
)
from recjax.data.download import PUBLISHED_MD5, ChecksumError, download
from recjax.data.interactions import load_interactions
from recjax.data.movielens import (
    FEATURE_SIZES,
    GENRES,
    load_ml1m_ratings,
    load_ml1m_sequential,
    load_ml100k,
)
from recjax.data.paths import ENV_VAR, GROUPLENS_URLS, data_dir
from recjax.data.splits import LeaveOneOut, leave_one_out
from recjax.data.synthetic import SyntheticConfig, make_synthetic
from recjax.data.types import SequenceDataset

__all__ = [
    "ENV_VAR",
    "FEATURE_SIZES",
    "GENRES",
    "GROUPLENS_URLS",
    "PUBLISHED_MD5",
    "ChecksumError",
    "LeaveOneOut",
    "SequenceDataset",
    "SyntheticConfig",
    "batch_order",
    "batches",
    "collate",
    "data_dir",
    "download",
    "epoch_permutation",
    "leave_one_out",
    "load_interactions",
    "load_ml100k",
    "load_ml1m_ratings",
    "load_ml1m_sequential",
    "make_eval_examples",
    "make_synthetic",
    "make_train_examples",
    "num_batches",
]
