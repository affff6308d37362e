"""Raw (unbounded) item IDs -> rows of a sequential model's item table, by MPZCH or by modulo hashing.

A recjax sequential model (SASRec, HSTU) has a dense item table of ``num_items + 1`` rows (row 0 =
padding). ``ItemIdRemapper`` lets it consume *raw* item IDs instead: batches follow the contract of
recjax/data/types.py except that the ID arrays (``inputs``, ``targets``, ``target``, ``exclude``) hold raw
IDs (int32/int64 >= 1, or uint32 pairs ``(..., 2)`` for 64-bit IDs; 0 / the zero pair = padding). Inside
``jit`` an int64 numpy array would be truncated to int32 (JAX's default 32-bit mode): IDs >= 2**31 must be
converted on the host with ``to_id_pairs(batch)`` first (int64 numpy outside jit is converted exactly).
Build the model with ``num_items = remapper.num_items`` (= ``table_size``) and, inside the jitted step:

    batch, zch_state, reset_R, stats = remapper.remap(zch_state, raw_batch, step, training=True)
    params, opt_state = reset_item_rows(params, opt_state, reset_R, key)    # before the loss
    ... the unchanged train step on ``batch`` ...

Methods (``RemapConfig.method``):
- ``"mpzch"``: a one-table ``ZchEmbeddingCollection`` (recjax.embeddings.zch); slot s -> model row s + 1.
  Training inserts-or-finds every ID of ``inputs``/``targets`` (LRU/LFU/TTL eviction when a window is full)
  and returns the rows that got a new owner in ``reset_R``; evaluation (``training=False``) is a read-only
  lookup. An ID without a row (fallback, or unknown at evaluation) becomes row 0: dropped from the input
  sequence (its ``mask`` entry is cleared and the row is re-left-padded by ``left_pad``, with every other
  per-position array of the batch, so the last *known* input is in the final (query) position), no training
  target, and at evaluation ``target_known`` is False (count it as a miss). A row left with no known input
  has an all-False ``mask``; the Trainer's evaluation counts it as a miss (``remap_hook.RemappedTask``).
- ``"modulo"``: the classic baseline ``row = 1 + hash(id) % table_size`` (the same splitmix64 hash); no
  state, never resets, distinct IDs may share a row (a collision) and a new ID inherits the row's
  trained embedding and optimizer moments.

``reset_item_rows`` re-initialises the masked rows of the item table found at ``item_path`` in an
``nnx.split`` parameter State (default ``("embedding", "items")``, the tied table of SASRec/HSTU) and zeroes
the same rows of every optimizer-state leaf under that path (Adam ``mu``/``nu``); scalars are untouched.

Freshness accounting (``RemapConfig.track_owners``, on by default): the state keeps ``owner`` (R, 2), the raw
ID that last trained each row (zero pair = none). Per training call, an ID occurrence whose row was last
trained for another ID is an *arrival*; an arrival on a row that had an owner and was not reset in this call
*inherits* a trained embedding (and Adam moments) of another ID. MPZCH: inherited = 0 by construction (every
new owner is reset); modulo: > 0 as soon as IDs share rows. Counted in ``stats["arrivals"]`` /
``stats["inherited"]`` (per occurrence, so an ID that keeps alternating with another on a shared row
counts every time it comes back).

The remapper satisfies the ``recjax.train.remap_hook.IdRemapper`` protocol (``init_state``, ``remap``,
``reset_rows``, ``rates``): ``Trainer(model, RemappedTask(NextItemTask(...), remapper), cfg, workdir)``
trains any recjax sequential model on raw IDs, with the state checkpointed beside the parameters (custom
loops: docs/ZCH.md).

Letters: B batch, L sequence, H excluded history, R model rows (table_size + 1), D embedding dim.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from recjax import validation
from recjax.embeddings import zch as ez
from recjax.embeddings import zch_eviction as zev
from recjax.ops import zch as ops

METHODS = ("mpzch", "modulo")
ID_KEYS = ("inputs", "targets", "target", "exclude")
NOT_POSITIONAL = ("target", "exclude")  # (B,) and (B, H): never re-padded with the sequence
TRAIN_KEYS = ("inputs", "targets")  # IDs that are inserted during training
# Counters returned by ``remap`` (int32, per call): summed over steps by the Trainer.
COUNTERS = ("ids", "hits", "inserts", "evictions", "fallbacks", "arrivals", "inherited")


@dataclasses.dataclass(frozen=True)
class RemapConfig:
    table_size: int  # managed rows (model num_items); the model has table_size + 1 rows with padding
    method: str = "mpzch"
    max_probe: int = 64
    num_buckets: int = 1
    eviction: str = "lru"  # "none" | "lru" | "lfu" | "ttl" (MPZCH only)
    probing: str = "two_choice"  # or "linear" (recjax.embeddings.zch.ZchTableConfig.probing; MPZCH only)
    ttl: int = 0
    impl: str = "auto"
    track_owners: bool = True  # keep the last training ID of each row: arrivals / inherited counters

    def __post_init__(self):
        validation.check_positive("RemapConfig.table_size", self.table_size)
        if self.method not in METHODS:
            raise ValueError(f"RemapConfig.method: expected one of {METHODS}, got {self.method!r}")
        if self.probing not in ops.PROBINGS:
            raise ValueError(f"RemapConfig.probing: expected one of {ops.PROBINGS}, got {self.probing!r}")
        if self.eviction not in zev.KINDS:
            raise ValueError(f"RemapConfig.eviction: expected one of {zev.KINDS}, got {self.eviction!r}")
        for name in ("max_probe", "num_buckets", "ttl"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise TypeError(f"RemapConfig.{name}: expected an int, got {type(v).__name__} {v!r}")
        if self.ttl < 0 or (self.eviction == "ttl" and self.ttl <= 0):
            need = "> 0 with eviction='ttl'" if self.eviction == "ttl" else ">= 0"
            raise ValueError(f"RemapConfig.ttl: expected {need}, got {self.ttl}")
        validation.check_positive("RemapConfig.max_probe", self.max_probe)
        validation.check_positive("RemapConfig.num_buckets", self.num_buckets)
        if self.method == "mpzch":  # the probe windows live inside one bucket: no silent clamping
            if self.table_size % self.num_buckets:
                raise ValueError(
                    f"RemapConfig.num_buckets: expected a divisor of table_size {self.table_size}, "
                    f"got {self.num_buckets}"
                )
            bucket = self.table_size // self.num_buckets
            if self.max_probe > bucket:
                raise ValueError(
                    "RemapConfig.max_probe: expected <= the bucket size (table_size / num_buckets) = "
                    f"{bucket}, got {self.max_probe}"
                )


def _pairs_and_valid(x, name: str):
    """Raw IDs (0 = padding) -> (uint32 pairs (..., 2) with padding as EMPTY_PAIR, valid (...) bool)."""
    pairs = ops.as_id_pairs(np.asarray(x) if isinstance(x, (list, tuple)) else x, name=name)
    valid = jnp.any(pairs != 0, axis=-1)
    return jnp.where(valid[..., None], pairs, ops.EMPTY_PAIR), valid


class ItemIdRemapper:
    """Maps raw item IDs in batches to model rows; see the module docstring. Holds configuration only.

    ``item_path`` / ``init_fn``: the table ``reset_rows`` re-initialises (default the tied item table of
    SASRec/HSTU and their truncated-normal(0.02) init)."""

    def __init__(
        self,
        cfg: RemapConfig,
        *,
        embedding_dim: int = 1,
        seed: int = 0,
        item_path: tuple[str, ...] = ("embedding", "items"),
        init_fn: Callable | None = None,
    ):
        self.cfg = cfg
        self.num_items = cfg.table_size
        self.num_rows = cfg.table_size + 1
        self.item_path, self.init_fn = item_path, init_fn
        self.coll = None
        if cfg.method == "mpzch":
            policy = ez.EvictionPolicy(cfg.eviction, ttl=cfg.ttl)
            table = ez.ZchTableConfig(
                "item",
                num_embeddings=cfg.table_size,
                embedding_dim=embedding_dim,
                feature_names=ID_KEYS,
                num_buckets=cfg.num_buckets,
                max_probe=cfg.max_probe,
                eviction=policy,
                probing=cfg.probing,
            )
            self.coll = ez.ZchEmbeddingCollection([table], impl=cfg.impl, seed=seed)

    def init_state(self) -> dict:
        state = self.coll.init_state() if self.coll is not None else {}
        if self.cfg.track_owners:
            state["owner"] = jnp.zeros((self.num_rows, 2), jnp.uint32)
        return state

    def remap(self, state: dict, batch: Mapping[str, object], step, *, training: bool = True):
        """-> (batch with rows, state, reset_R bool (num_rows,), stats: int32 counters ``COUNTERS``).

        Training remaps (and inserts) ``inputs``/``targets``; evaluation (``training=False``) remaps every
        ID key read-only and adds ``target_known`` (B,) when ``target`` is present."""
        keys = [k for k in ID_KEYS if k in batch]
        if not keys:
            raise KeyError(f"batch: expected at least one of {ID_KEYS}, got keys {sorted(batch)}")
        if training and any(k not in TRAIN_KEYS for k in keys):
            raise ValueError(f"batch: training remaps only {TRAIN_KEYS}; got {keys} (use training=False)")
        pv = {k: _pairs_and_valid(batch[k], f"batch[{k!r}]") for k in keys}
        out = dict(batch)
        reset_R = jnp.zeros((self.num_rows,), bool)
        zero = jnp.int32(0)
        if self.coll is None:
            rows = {}
            for k, (pairs, valid) in pv.items():
                _, h = ops.windows(pairs.reshape(-1, 2), num_buckets=1, bucket_size=self.cfg.table_size)
                rows[k] = jnp.where(valid, h.reshape(valid.shape) + 1, 0)
            n = sum(v.sum(dtype=jnp.int32) for _, v in pv.values())
            stats = dict(ids=n, hits=n, inserts=zero, evictions=zero, fallbacks=zero)
        else:
            zch_state = {k: v for k, v in state.items() if k != "owner"}
            slots, zch_state, resets, st = self.coll.remap(
                zch_state, {k: p for k, (p, _) in pv.items()}, step, training=training
            )
            state = {**state, **zch_state}
            rows = {k: jnp.where(pv[k][1] & (s >= 0), s + 1, 0) for k, s in slots.items()}
            reset_R = jnp.concatenate([jnp.zeros((1,), bool), resets["item"]])
            stats = {k: st["item"][k] for k in COUNTERS[:5]}
        stats.update(arrivals=zero, inherited=zero)
        if training and "owner" in state:
            state = dict(state)
            state["owner"], stats["arrivals"], stats["inherited"] = _track_owners(
                state["owner"], [(pv[k][0], rows[k]) for k in keys], reset_R
            )
        for k, r in rows.items():
            out[k] = r.astype(jnp.int32)
        if "inputs" in rows:
            keep_BxL = rows["inputs"] != 0
            if "mask" in batch:
                keep_BxL = jnp.asarray(batch["mask"]) & keep_BxL
                out["mask"] = keep_BxL
            out = left_pad(out, keep_BxL)
        if "target" in rows:
            out["target_known"] = rows["target"] != 0
        return out, state, reset_R, stats

    def reset_rows(self, params, opt_state, reset_R, key):
        """``reset_item_rows`` on this remapper's ``item_path`` with its ``init_fn`` (jit-friendly)."""
        return reset_item_rows(
            params, opt_state, reset_R, key, item_path=self.item_path, init_fn=self.init_fn
        )

    def rates(self, totals: Mapping[str, jax.Array], state: dict) -> dict[str, jax.Array]:
        """Rates per ID occurrence from summed ``COUNTERS``: hit, insert, eviction, fallback, arrival (on a
        row last trained for another ID) and inherited (such an arrival without a reset: the ID starts from
        another ID's embedding and Adam moments); and the table usage (rows with an owner)."""
        n = jnp.maximum(totals["ids"], 1).astype(jnp.float32)
        out = {
            "hit_rate": totals["hits"] / n,
            "insert_rate": totals["inserts"] / n,
            "eviction_rate": totals["evictions"] / n,
            "fallback_rate": totals["fallbacks"] / n,
        }
        out["arrival_rate"] = totals["arrivals"] / n
        out["inherited_rate"] = totals["inherited"] / n
        if self.coll is not None:
            used = (state["item"]["last_seen"] >= 0).sum()
        elif "owner" in state:
            used = jnp.any(state["owner"][1:] != 0, axis=-1).sum()
        else:
            return out
        out["table_usage"] = used / jnp.float32(self.cfg.table_size)
        return out


def left_pad(batch: dict, keep_BxL) -> dict:
    """Moves the kept positions of every per-position array (leading shape (B, L): ``inputs``, ``mask``,
    ``targets``, timestamps, ...; not ``target``/``exclude``) to the right end of each row, in their order,
    so the last kept item sits in the final position (the query position of SASRec/HSTU). Dropped positions
    become left padding (their ``mask`` is already False and their ``inputs`` row 0)."""
    order_BxL = jnp.argsort(keep_BxL, axis=-1, stable=True)  # False (dropped) first, order kept
    out = dict(batch)
    for k, v in batch.items():
        if k in NOT_POSITIONAL or getattr(v, "shape", ())[:2] != keep_BxL.shape:
            continue
        v = jnp.asarray(v)
        idx = order_BxL.reshape(order_BxL.shape + (1,) * (v.ndim - 2))
        out[k] = jnp.take_along_axis(v, idx, axis=1)
    return out


def _track_owners(owner_Rx2, pairs_rows, reset_R):
    """Updates the last training ID of each row; -> (owner, arrivals, inherited) (see module docstring)."""
    ids_Nx2 = jnp.concatenate([p.reshape(-1, 2) for p, _ in pairs_rows])
    rows_N = jnp.concatenate([r.reshape(-1) for _, r in pairs_rows])
    ok_N = rows_N > 0
    prev_Nx2 = owner_Rx2[rows_N]
    arrive_N = ok_N & jnp.any(prev_Nx2 != ids_Nx2, axis=-1)
    inherit_N = arrive_N & jnp.any(prev_Nx2 != 0, axis=-1) & ~reset_R[rows_N]
    owner_Rx2 = owner_Rx2.at[jnp.where(ok_N, rows_N, owner_Rx2.shape[0])].set(ids_Nx2, mode="drop")
    return owner_Rx2, arrive_N.sum(dtype=jnp.int32), inherit_N.sum(dtype=jnp.int32)


def to_id_pairs(batch: Mapping[str, object]) -> dict:
    """Host-side: the ID keys of a numpy batch -> uint32 pairs (..., 2) (0 stays the zero pair = padding).
    Needed for raw IDs >= 2**31 before a jitted step: JAX's 32-bit mode would truncate int64 arrays."""
    out = dict(batch)
    for k in ID_KEYS:
        if k in batch:
            out[k] = ops.as_id_pairs(np.asarray(batch[k]), name=f"batch[{k!r}]")
    return out


def _on_path(path, item_path: tuple[str, ...]) -> bool:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    n = len(item_path)
    return any(tuple(names[i : i + n]) == item_path for i in range(len(names) - n + 1))


def reset_item_rows(
    params,
    opt_state,
    reset_R,
    key,
    *,
    item_path: tuple[str, ...] = ("embedding", "items"),
    init_fn: Callable | None = None,
):
    """Rows where ``reset_R`` of the table at ``item_path`` get a fresh ``init_fn`` draw (default the
    SASRec/HSTU truncated normal 0.02); the same rows of optimizer leaves under ``item_path`` are zeroed.
    Jit-friendly; returns (params, opt_state). Raises if no parameter matches ``item_path``."""
    init_fn = init_fn or jax.nn.initializers.truncated_normal(0.02)
    found = []

    def fresh(path, leaf):
        if not _on_path(path, item_path) or getattr(leaf, "ndim", 0) != 2:
            return leaf
        if leaf.shape[0] != reset_R.shape[0]:
            raise ValueError(
                f"reset_R: expected {leaf.shape[0]} rows (the item table at {item_path}), got {reset_R.shape}"
            )
        found.append(leaf.shape)
        return jnp.where(reset_R[:, None], init_fn(key, leaf.shape, leaf.dtype), leaf)

    def zero(path, leaf):
        if _on_path(path, item_path) and getattr(leaf, "shape", None) in found:
            return jnp.where(reset_R[:, None], jnp.zeros_like(leaf), leaf)
        return leaf

    params = jax.tree_util.tree_map_with_path(fresh, params)
    if not found:
        raise ValueError(f"item_path: no 2-D parameter under {item_path} in params")
    return params, jax.tree_util.tree_map_with_path(zero, opt_state)


def modulo_collision_rate(raw_ids, table_size: int) -> float:
    """Fraction of distinct raw IDs that share their modulo-hash row with another distinct ID (host)."""
    ids = np.unique(np.asarray(raw_ids).reshape(-1))
    ids = ids[ids > 0]
    if not ids.size:
        return 0.0
    _, h = ops.windows(ops.as_id_pairs(ids), num_buckets=1, bucket_size=table_size)
    _, counts = np.unique(np.asarray(h), return_counts=True)
    return float(counts[counts > 1].sum()) / ids.size


def expected_modulo_collision_rate(num_ids: int, table_size: int) -> float:
    """Uniform-hash expectation of ``modulo_collision_rate``: 1 - (1 - 1/T)^(n-1)."""
    return 1.0 - math.exp((num_ids - 1) * math.log1p(-1.0 / table_size))
