"""Length-aware batches and FreeScale load balancing (arXiv 2604.24073) in the input pipeline (pure numpy).

Letters: B batch rows, L max_len, W bucketed width (<= L), D data-parallel devices, C rows per device.

Length buckets (:func:`length_bucketed`): a training batch is left-padded to ``max_len``; its sequence
columns (``inputs``, ``targets``, ``mask``) are cut to the last W columns, W = the batch's longest sequence
rounded up to a power of two (at least ``min_width``, at most ``max_len``), so jit sees at most
``log2(max_len / min_width) + 2`` widths. SASRec/HSTU give the same outputs on the cut batch: positions
count real items (cumsum of the mask), HSTU's normaliser is the constant ``max_len`` and its relative bias
depends on ``t - s`` only, and the losses average over valid positions.

Balancing (:func:`balanced`) reorders the rows of each step's global batch among the D devices (device d
holds rows ``[d*C, (d+1)*C)``, the order ``shard_batch`` splits in). The step keeps its sample set and the
epoch its order (a pure function of (seed, epoch), so exact resume holds); because the losses average over
all valid positions of the global batch, a balanced step computes the same loss and gradients as an
unbalanced one (up to float summation order).

- ``"zigzag"`` (FreeScale's fixed batch size): rows sorted by length (longest first, ties by position) and
  dealt to devices 0..D-1, D-1..0, 0..D-1, ...: every device gets B/D rows and nearly equal tokens.
- ``"variable"`` (FreeScale's variable batch size): row weights ``L^alpha`` (alpha = 1: tokens; 2: the
  attention's quadratic cost); the length-sorted rows are cut into D contiguous segments of equal weight,
  so a device with long sequences gets fewer rows. Each device's segment is padded with all-zero rows to a
  common C (the largest segment rounded up to a power of two: a bounded number of batch shapes).

Deviation from the paper: FreeScale all-gathers the per-rank lengths and all-to-alls the samples between
ranks; here every process builds the same global batch (the pipeline is a pure function of (seed, epoch)),
so the partition is computed on the host and no exchange is needed. Under one SPMD program every device
runs the padded shape (C, W), so the balance pays off in compute that follows the real tokens (jagged
kernels, per-device programs); ``device_loads`` reports both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from recjax.validation import check_positive

SEQUENCE_KEYS = ("inputs", "targets", "mask", "timestamps")
MODES = ("none", "zigzag", "variable")


def bucket_width(longest: int, max_len: int, min_width: int = 8) -> int:
    """Smallest power of two >= ``longest`` (and >= ``min_width``), capped at ``max_len``."""
    w = max(int(min_width), 1)
    while w < longest:
        w *= 2
    return min(w, max_len)


def trim_to_bucket(batch: dict[str, np.ndarray], max_len: int, min_width: int = 8) -> dict[str, np.ndarray]:
    """``batch`` with its left-padded sequence columns cut to the bucket of its longest sequence."""
    if "mask" not in batch:
        raise ValueError(f"batch: expected a 'mask' key, got keys {sorted(batch)}")
    mask_BxL = batch["mask"]
    if mask_BxL.ndim != 2 or mask_BxL.shape[1] != max_len:
        raise ValueError(f"batch['mask']: expected shape (B, max_len={max_len}), got {mask_BxL.shape}")
    w = bucket_width(int(mask_BxL.sum(axis=1).max(initial=0)), max_len, min_width)
    return {k: v[:, -w:] if k in SEQUENCE_KEYS else v for k, v in batch.items()}


def length_bucketed(batch_iter: Callable[..., Iterator[dict]], max_len: int, min_width: int = 8):
    """A ``batch_iter`` (``NextItemTask``'s signature) whose batches are cut to length buckets."""
    check_positive("max_len", max_len)
    check_positive("min_width", min_width)

    def it(examples, batch_size, **kw) -> Iterator[dict]:
        for b in batch_iter(examples, batch_size, **kw):
            yield trim_to_bucket(b, max_len, min_width)

    return it


def _by_length(lengths_B: np.ndarray) -> np.ndarray:
    return np.lexsort((np.arange(len(lengths_B)), -lengths_B))  # longest first, ties by position


def zigzag_order(lengths_B: np.ndarray, num_devices: int) -> np.ndarray:
    """Row order putting device d's rows in block d: sorted by length, dealt in zig-zag."""
    b = len(lengths_B)
    if b % num_devices:
        raise ValueError(f"lengths_B: {b} rows do not divide over num_devices={num_devices}")
    k_B = np.arange(b)
    rnd, pos = k_B // num_devices, k_B % num_devices
    device_B = np.where(rnd % 2 == 0, pos, num_devices - 1 - pos)
    sorted_B = _by_length(lengths_B)
    # stable sort by device keeps each device's rows in dealing order
    return sorted_B[np.argsort(device_B, kind="stable")]


def variable_segments(lengths_B: np.ndarray, num_devices: int, alpha: float = 1.0) -> list[np.ndarray]:
    """Length-sorted rows cut into ``num_devices`` contiguous segments of equal ``L^alpha`` weight (rows of
    length 0 weigh nothing and go to the last segments). Every segment gets at least one row where there
    are enough rows with weight."""
    order_B = _by_length(lengths_B)
    w_B = np.power(lengths_B[order_B].astype(np.float64), alpha)
    w_B[lengths_B[order_B] == 0] = 0.0
    cum_B = np.cumsum(w_B)
    total = cum_B[-1] if len(cum_B) else 0.0
    # cut before the row whose cumulative weight passes d/D of the total (the midpoint rule)
    cuts = [int(np.searchsorted(cum_B - w_B / 2, total * d / num_devices)) for d in range(1, num_devices)]
    bounds = [0, *cuts, len(order_B)]
    return [order_B[bounds[d] : bounds[d + 1]] for d in range(num_devices)]


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def balance_batch(batch: dict[str, np.ndarray], num_devices: int, mode: str, alpha: float = 1.0) -> dict:
    """One global batch rebalanced over ``num_devices`` (``mode`` in :data:`MODES`)."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    check_positive("num_devices", num_devices)
    if mode == "none":
        return batch
    lengths_B = batch["mask"].sum(axis=1)
    if mode == "zigzag":
        order = zigzag_order(lengths_B, num_devices)
        return {k: v[order] for k, v in batch.items()}
    segments = variable_segments(lengths_B, num_devices, alpha)
    c = _pow2(max(len(s) for s in segments))
    out = {}
    for k, v in batch.items():
        rows = np.zeros((num_devices * c,) + v.shape[1:], v.dtype)  # padding rows: mask False, no loss
        for d, seg in enumerate(segments):
            rows[d * c : d * c + len(seg)] = v[seg]
        out[k] = rows
    return out


def balanced(
    batch_iter: Callable[..., Iterator[dict]], num_devices: int, mode: str = "zigzag", alpha: float = 1.0
):
    """A ``batch_iter`` whose every batch is :func:`balance_batch`-ed (same samples, same epoch order)."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    check_positive("num_devices", num_devices)

    def it(examples, batch_size, **kw) -> Iterator[dict]:
        for b in batch_iter(examples, batch_size, **kw):
            yield balance_batch(b, num_devices, mode, alpha)

    return it


def device_loads(batch: dict[str, np.ndarray], num_devices: int, alpha: float = 1.0) -> dict[str, np.ndarray]:
    """Per device (block of rows): real tokens, ``sum L^alpha`` cost, and rows; shape (D,) each."""
    lengths_DxC = batch["mask"].sum(axis=1).reshape(num_devices, -1).astype(np.float64)
    return {
        "tokens": lengths_DxC.sum(axis=1),
        "cost": np.power(lengths_DxC, alpha).sum(axis=1),
        "rows": (lengths_DxC > 0).sum(axis=1).astype(np.float64),
    }
