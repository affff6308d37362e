"""A grain input pipeline giving exactly the batches of ``recjax.data.batching.batches``.

Grain is imported here only (the GPU image has no grain; the rest of ``recjax.data`` runs without it).

Why not ``MapDataset.shuffle``: grain's shuffle uses its own index permutation, which the numpy path cannot
reproduce without grain. Both paths therefore take the epoch order from ``batching.epoch_permutation(n,
seed, epoch)`` (seed and epoch fed to a numpy SeedSequence): the grain dataset is that order as a source,
batched into index blocks, then mapped to gathered, padded batch dicts by ``batching.collate``. The result is
deterministic, random-access (``ds[i]`` is batch i of the epoch, useful for resuming mid-epoch), and equal
batch by batch to the numpy iterator (tested).
"""

from __future__ import annotations

import grain
import numpy as np

from recjax.data import batching
from recjax.validation import check_positive


def grain_dataset(
    examples: batching.Examples,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    drop_remainder: bool = False,
    exclude_bucket: int = 64,
) -> grain.MapDataset:
    """One epoch of batch dicts as a ``grain.MapDataset`` (same arguments as ``batching.batches``)."""
    if not examples:
        raise ValueError("examples: expected a non-empty dict of arrays")
    sizes = {k: len(v) for k, v in examples.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"examples: all arrays need the same leading dimension, got {sizes}")
    check_positive("batch_size", batch_size)
    n = next(iter(sizes.values()))
    order = batching.epoch_permutation(n, seed, epoch) if shuffle else np.arange(n)

    def gather(index_block: np.ndarray) -> dict[str, np.ndarray]:
        return batching.collate({k: v[index_block] for k, v in examples.items()}, batch_size, exclude_bucket)

    return (
        grain.MapDataset.source(order)
        .batch(batch_size, drop_remainder=drop_remainder, batch_fn=np.asarray)
        .map(gather)
    )


def grain_iterator(
    examples: batching.Examples, batch_size: int, *, num_threads: int = 0, prefetch: int = 2, **kwargs
):
    """Iterate one epoch through grain's prefetching reader (order preserved with any ``num_threads``)."""
    ds = grain_dataset(examples, batch_size, **kwargs)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))
