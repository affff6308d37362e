"""Turn per-user sequences into fixed-shape, left-padded example arrays and batches (pure numpy).

Letters: N = examples (users), L = max sequence length, H = exclude width (history, bucketed), B = batch.

Examples are dicts of numpy arrays that share the leading dimension N; ``batches`` slices them into batch
dicts that follow the contract in ``recjax.data.types``:

- training (``make_train_examples``): ``inputs`` (N, L) = seq[:-1], ``targets`` (N, L) = seq[1:], both the
  last L positions, left-padded with 0; ``mask`` (N, L) = inputs != 0.
- evaluation (``make_eval_examples``): ``inputs`` (N, L), ``mask`` (N, L), ``target`` (N,), ``valid`` (N,)
  and ``exclude`` (N, H_all): the whole history before the target (not truncated to L), oldest first and
  right-padded with 0. ``batches`` trims ``exclude`` per batch to the longest history in that batch rounded
  up to ``exclude_bucket`` times a power of two (64, 128, 256, ... by default), so jit sees only a few
  distinct shapes (ML-1M test set, batch 128: 3 widths instead of 16 with plain multiples of 64).

Both also carry ``user`` (N,) int32, the row of the user in the dataset (to look up user side features).

Deviation from a literal "whole history": occurrences of the target id itself are left out of ``exclude``,
otherwise a re-consumed target could never be ranked. MovieLens has no repeats, so nothing changes there.

Padding of a short last batch (``drop_remainder=False``): evaluation pad rows copy the first row of the
batch with ``valid=False`` (a copy, not zeros, so a model never sees an all-padding row and metric sums
cannot pick up NaNs from it); training pad rows are all zeros (``mask`` False, ``targets`` 0: no loss).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from recjax.validation import check_positive

Examples = dict[str, np.ndarray]


def _as_id_array(name: str, index: int, seq, num_items: int | None) -> np.ndarray:
    arr = np.asarray(seq)
    if arr.ndim != 1:
        raise ValueError(f"{name}[{index}]: expected a 1-D sequence of item ids, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"{name}[{index}]: expected integer item ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    high = num_items if num_items is not None else np.iinfo(np.int32).max
    bad = (arr < 1) | (arr > high)
    if bad.any():
        pos = int(np.argmax(bad))
        want = f"[1, {num_items}]" if num_items is not None else ">= 1"
        raise ValueError(
            f"{name}: user index {index} has item id {int(arr[pos])} at position {pos}; "
            f"expected ids in {want} (0 is padding)"
        )
    return arr.astype(np.int32)


def left_pad(rows: Sequence[np.ndarray], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        r = r[-width:] if width else r[:0]
        if len(r):
            out[i, width - len(r) :] = r
    return out


def _bucket_width(x: int, bucket: int) -> int:
    """Smallest bucket * 2**k >= x (k >= 0)."""
    blocks = max(1, -(-x // bucket))
    return bucket * (1 << (blocks - 1).bit_length())


def make_train_examples(
    train_sequences: Sequence[np.ndarray], max_len: int, *, num_items: int | None = None
) -> Examples:
    """Next-item training pairs per user: inputs = seq[:-1], targets = seq[1:], last ``max_len``, left-padded.

    Users with fewer than 2 items have no pair and are skipped (``user`` says which rows remain).
    ``num_items``, when given, bounds the ids: any id outside [1, num_items] raises naming the user index.
    """
    check_positive("max_len", max_len)
    inputs, targets, users = [], [], []
    for u, seq in enumerate(train_sequences):
        s = _as_id_array("train_sequences", u, seq, num_items)
        if len(s) < 2:
            continue
        inputs.append(s[:-1])
        targets.append(s[1:])
        users.append(u)
    inputs_NxL = left_pad(inputs, max_len)
    return {
        "inputs": inputs_NxL,
        "targets": left_pad(targets, max_len),
        "mask": inputs_NxL != 0,
        "user": np.asarray(users, np.int32),
    }


def make_eval_examples(
    split_inputs: Sequence[np.ndarray],
    targets,
    max_len: int,
    *,
    num_items: int | None = None,
    users=None,
    exclude_bucket: int = 64,
) -> Examples:
    """Evaluation rows: the last ``max_len`` inputs (left-padded), the target and the full history to exclude.

    Args:
      split_inputs: per row, the items before the target, oldest first (``LeaveOneOut.test_inputs``).
      targets: (N,) the held-out item per row.
      max_len: model context length L.
      num_items: when given, every id must lie in [1, num_items].
      users: (N,) dataset row of each user (defaults to 0..N-1); copied into ``user``.
      exclude_bucket: ``exclude`` widths are this times a power of two (per batch, see ``batches``).
    """
    check_positive("max_len", max_len)
    check_positive("exclude_bucket", exclude_bucket)
    targets_N = np.asarray(targets)
    if targets_N.ndim != 1 or len(targets_N) != len(split_inputs):
        raise ValueError(
            f"targets: expected shape ({len(split_inputs)},) (one per input row), got {targets_N.shape}"
        )
    users_N = np.arange(len(split_inputs), dtype=np.int32) if users is None else np.asarray(users, np.int32)
    if users_N.shape != targets_N.shape:
        raise ValueError(f"users: expected shape {targets_N.shape}, got {users_N.shape}")
    if targets_N.size and targets_N.dtype.kind not in "iu":
        raise TypeError(f"targets: expected integer item ids, got dtype {targets_N.dtype}")
    bad_N = (targets_N < 1) | (targets_N > (num_items if num_items is not None else np.iinfo(np.int32).max))
    if bad_N.any():
        i = int(np.argmax(bad_N))
        want = f"[1, {num_items}]" if num_items is not None else ">= 1"
        raise ValueError(
            f"targets: user index {int(users_N[i])} has target item id {int(targets_N[i])}; expected {want}"
        )
    rows, history = [], []
    for i, seq in enumerate(split_inputs):
        s = _as_id_array("split_inputs", int(users_N[i]), seq, num_items)
        if len(s) == 0:
            raise ValueError(f"split_inputs: user index {int(users_N[i])} has no history before its target")
        rows.append(s)
        history.append(s[s != targets_N[i]])
    width = _bucket_width(max((len(h) for h in history), default=1), exclude_bucket)
    exclude_NxH = np.zeros((len(history), width), np.int32)
    for i, h in enumerate(history):
        exclude_NxH[i, : len(h)] = h
    inputs_NxL = left_pad(rows, max_len)
    return {
        "inputs": inputs_NxL,
        "mask": inputs_NxL != 0,
        "target": targets_N.astype(np.int32),
        "exclude": exclude_NxH,
        "valid": np.ones(len(rows), bool),
        "user": users_N,
    }


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch; shared by ``batches`` and the grain pipeline."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)])).permutation(num_examples)


def batch_order(
    num_examples: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int, drop_remainder: bool
) -> list[np.ndarray]:
    """Example indices of each batch of one epoch (the last one may be short unless dropped)."""
    check_positive("batch_size", batch_size)
    order = epoch_permutation(num_examples, seed, epoch) if shuffle else np.arange(num_examples)
    stop = num_examples - num_examples % batch_size if drop_remainder else num_examples
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


def collate(rows: Examples, batch_size: int, exclude_bucket: int = 64) -> dict[str, np.ndarray]:
    """Make a static-shape batch from gathered rows (<= batch_size of them): pad, trim ``exclude``."""
    n = len(next(iter(rows.values())))
    out = dict(rows)
    if "exclude" in out:
        longest = int((out["exclude"] != 0).sum(axis=1).max(initial=0))
        out["exclude"] = out["exclude"][:, : _bucket_width(longest, exclude_bucket)]
    if n < batch_size:
        pad = batch_size - n
        if "valid" in out:  # evaluation: repeat row 0, marked invalid
            out = {k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in out.items()}
            out["valid"][n:] = False
        else:
            out = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in out.items()}
    return out


def batches(
    examples: Examples,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    drop_remainder: bool = False,
    exclude_bucket: int = 64,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield batch dicts of exactly ``batch_size`` rows (see module docstring for padding rules).

    The order depends only on (seed, epoch) when ``shuffle``; the same call always gives the same batches.
    """
    if not examples:
        raise ValueError("examples: expected a non-empty dict of arrays")
    sizes = {k: len(v) for k, v in examples.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"examples: all arrays need the same leading dimension, got {sizes}")
    n = next(iter(sizes.values()))
    for idx in batch_order(
        n, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_remainder=drop_remainder
    ):
        yield collate({k: v[idx] for k, v in examples.items()}, batch_size, exclude_bucket)


def num_batches(num_examples: int, batch_size: int, *, drop_remainder: bool) -> int:
    return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)
