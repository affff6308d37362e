"""Datasets, splits and batches for sequential recommendation (see docs/DATA.md)."""

from recjax.data.batching import (
    batch_order,
    batches,
    epoch_permutation,
    make_eval_examples,
    make_train_examples,
    num_batches,
)
from recjax.data.splits import LeaveOneOut, leave_one_out
from recjax.data.synthetic import SyntheticConfig, make_synthetic
from recjax.data.types import SequenceDataset

__all__ = [
    "LeaveOneOut",
    "SequenceDataset",
    "SyntheticConfig",
    "batch_order",
    "batches",
    "epoch_permutation",
    "leave_one_out",
    "make_eval_examples",
    "make_synthetic",
    "make_train_examples",
    "num_batches",
]
