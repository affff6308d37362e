"""Managed-collision (MPZCH) embedding collection: raw unbounded IDs -> distinct embedding rows.

TorchRec-like configuration: ``ZchTableConfig``s, each with its features; features of one table share its
rows. Per table the state is an identity table (raw ID per managed slot, -1 = empty, as uint32 pairs) and
metadata per slot (last-seen step, insertion step, expiry step, access count since insertion). Embedding rows
of a table: ``[managed slots (S) | reserved rows (R)]`` per shard.

One training step, functionally (all jit-friendly, ``self`` is static configuration):
    rows, zch_state, resets, stats = coll.remap(zch_state, features, step)      # insert-or-find + evict
    params[t], opt_state = reset_rows(params[t], opt_state, resets[t], init_fn, key, table_name=t)
    ... embed(params, rows) -> model -> loss -> optax update ...
A row whose slot got a new ID (insertion into an empty slot or eviction of another ID) is in ``resets``: its
embedding is re-initialised and its optimizer state rows (Adam mu/nu...) zeroed before use, so a new ID never
inherits a stale row. ``evict_expired`` (active TTL eviction) frees expired slots and returns their rows too.

Fallbacks, defined and counted (``stats["fallbacks"]``): an ID that is not admitted (admission probability <
1, an opt-in; existing IDs are always admitted) or whose windows are full with no evictable victim gets a
reserved row ``S + hash(id) % R`` (shared, never reset) if ``num_reserved_slots > 0``, else row -1 (embedding
zeros). A live ID is never overwritten except by the eviction policy, and never one used in the same batch.
Read-only mode (``training=False``): lookups only, nothing inserted or updated; unknown IDs take fallbacks.

Sharding (``mesh``, ``axis``): row-wise by buckets; shard d owns buckets [d B/D, (d+1) B/D) and has its own
reserved rows; each shard remaps the IDs of its buckets (probes never leave the shard) and results are
combined with one ``pmax``. With R = 0 the rows are the same as on one device (tested).

Probing (``ZchTableConfig.probing``): ``"two_choice"`` (default: two windows of ``ceil(max_probe / 2)``
slots per ID, insert into the emptier; eviction victims come from both windows) or ``"linear"`` (one window
of ``max_probe`` slots); see ``recjax.ops.zch``. A saved state must be reloaded with the same probing.

Deviations from TorchRec's HashZchManagedCollisionModule: eviction is decided outside the kernel, once per
batch, for IDs whose windows are full (one victim per slot; conflicting IDs fall back for this step); LFU is
kept (older TorchRec modules); expiry is counted in training steps, not wall-clock time; the metadata is
several int32 arrays rather than one packed tensor.

Letters: N IDs, S managed slots, R reserved rows, D embedding dim.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from recjax.embeddings import zch_eviction as ev
from recjax.embeddings.zch_eviction import EvictionPolicy, reset_rows  # noqa: F401  (public API)
from recjax.ops import zch as ops

INT_MAX = ev.INT_MAX
META = ("last_seen", "inserted_at", "expiry", "count")


@dataclasses.dataclass(frozen=True)
class ZchTableConfig:
    name: str
    num_embeddings: int  # rows: managed slots + reserved rows
    embedding_dim: int
    feature_names: tuple[str, ...]
    num_buckets: int = 1
    max_probe: int = 128
    eviction: EvictionPolicy = EvictionPolicy()
    admission_probability: float = 1.0
    num_reserved_slots: int = 0
    probing: str = "two_choice"  # or "linear" (one window of max_probe slots; ablations, old tables)

    @property
    def num_slots(self) -> int:
        return self.num_embeddings - self.num_reserved_slots

    def validate(self, num_shards: int = 1) -> None:
        where = f"table {self.name!r}"
        if self.num_reserved_slots < 0 or self.num_slots <= 0:
            raise ValueError(
                f"{where}: expected 0 <= num_reserved_slots < num_embeddings, got "
                f"{self.num_reserved_slots} of {self.num_embeddings}"
            )
        if self.num_buckets % num_shards or self.num_reserved_slots % num_shards:
            raise ValueError(
                f"{where}: num_buckets {self.num_buckets} and num_reserved_slots "
                f"{self.num_reserved_slots} must be divisible by {num_shards} shards"
            )
        ops.check_table(
            jax.ShapeDtypeStruct((self.num_slots, 2), jnp.uint32),
            self.num_buckets,
            self.max_probe,
            self.probing,
        )
        if not 0.0 < self.admission_probability <= 1.0:
            raise ValueError(
                f"{where}: admission_probability expected in (0, 1], got {self.admission_probability}"
            )
        if self.embedding_dim <= 0 or not self.feature_names:
            raise ValueError(f"{where}: expected embedding_dim > 0 and at least one feature")


def _representatives(ids_Nx2, mask_N):
    """Per lane, the first lane (stable sort) holding the same ID; masked-out lanes point to themselves."""
    n = ids_Nx2.shape[0]
    lanes = jnp.arange(n, dtype=jnp.int32)
    big = jnp.uint32(0xFFFFFFFF)
    hi, lo = jnp.where(mask_N, ids_Nx2[:, 1], big), jnp.where(mask_N, ids_Nx2[:, 0], big)
    hi_s, lo_s, lane_s = jax.lax.sort((hi, lo, lanes), num_keys=3)
    first = jnp.concatenate([jnp.ones((1,), bool), (hi_s[1:] != hi_s[:-1]) | (lo_s[1:] != lo_s[:-1])])
    rep_s = lane_s[jax.lax.cummax(jnp.where(first, lanes, 0))]
    rep = jnp.zeros((n,), jnp.int32).at[lane_s].set(rep_s)
    return jnp.where(mask_N, rep, lanes)


@functools.partial(jax.jit, static_argnames=("cfg", "training", "impl", "num_buckets"))
def remap_local(
    cfg: ZchTableConfig,
    st: dict,
    ids_Nx2,
    ttl_N,
    step,
    salt,
    *,
    training: bool,
    impl: str,
    num_buckets: int,
    owned_N,
):
    """One shard's remap: (local rows_N, state, reset_S, stats). Lanes not owned are left at row -1."""
    n_slots = st["identity"].shape[0]
    bucket_size = n_slots // num_buckets
    n_res = cfg.num_reserved_slots * num_buckets // cfg.num_buckets
    ids = jnp.where(owned_N[:, None], ids_Nx2, ops.EMPTY_PAIR)
    valid = owned_N & jnp.any(ids != ops.EMPTY_PAIR, axis=-1)
    kw = dict(num_buckets=num_buckets, max_probe=cfg.max_probe, impl=impl, probing=cfg.probing)
    found = ops.lookup(st["identity"], ids, **kw)
    zero = jnp.int32(0)
    stats = dict(
        ids=valid.sum(dtype=jnp.int32),
        hits=(found >= 0).sum(dtype=jnp.int32),
        inserts=zero,
        evictions=zero,
        eviction_age_sum=zero,
        not_admitted=zero,
    )
    reset = jnp.zeros((n_slots,), bool)
    if not training:
        slot = found
    else:
        admit = valid
        if cfg.admission_probability < 1.0:
            admit = valid & ((found >= 0) | (ops.admission_uniform(ids, salt) < cfg.admission_probability))
            stats["not_admitted"] = (valid & ~admit).sum(dtype=jnp.int32)
        ident, slot, status = ops.insert_or_find(
            st["identity"], jnp.where(admit[:, None], ids, ops.EMPTY_PAIR), **kw
        )
        inserted = status == ops.STATUS_INSERTED
        reset = reset.at[jnp.where(inserted, slot, n_slots)].set(True, mode="drop")
        # Eviction for IDs whose windows are full: one victim per distinct ID from the union of its windows,
        # never a slot used in this batch.
        full = status == ops.STATUS_FULL
        rep = _representatives(ids, full)
        bucket, starts, window_len = ops.probe_windows(
            ids,
            num_buckets=num_buckets,
            bucket_size=bucket_size,
            max_probe=cfg.max_probe,
            probing=cfg.probing,
        )
        touched = jnp.zeros((n_slots,), bool).at[jnp.where(slot >= 0, slot, n_slots)].set(True, mode="drop")
        is_rep = rep == jnp.arange(rep.shape[0])

        def evict_round(c):  # rounds until no progress: conflicting IDs retry on the next-best victim
            victim, touched, _ = c
            want = full & is_rep & (victim < 0)
            v = ev.choose_victims(
                cfg.eviction,
                st,
                jnp.maximum(bucket, 0) * bucket_size,
                starts,
                want,
                touched,
                step,
                bucket_size=bucket_size,
                max_probe=cfg.max_probe,
                window_len=window_len,
            )
            v = ev.resolve_conflicts(v)
            touched = touched.at[jnp.where(v >= 0, v, n_slots)].set(True, mode="drop")
            return jnp.where(v >= 0, v, victim), touched, jnp.any(v >= 0)

        no_victim = jnp.full(rep.shape, -1, jnp.int32)
        init = (no_victim, touched, jnp.asarray(cfg.eviction.kind != "none") & jnp.any(full))
        victim, _, _ = jax.lax.while_loop(lambda c: c[2], evict_round, init)
        won = victim >= 0
        ident = ident.at[jnp.where(won, victim, n_slots)].set(ids, mode="drop")
        age = jnp.where(won, step - st["inserted_at"][jnp.maximum(victim, 0)], 0)
        stats.update(
            inserts=(inserted | won).sum(dtype=jnp.int32),
            evictions=won.sum(dtype=jnp.int32),
            eviction_age_sum=age.sum(dtype=jnp.int32),
        )
        reset = reset.at[jnp.where(won, victim, n_slots)].set(True, mode="drop")
        slot = jnp.where(full, victim[rep], slot)
        # Metadata: fresh for new owners, then this batch's accesses.
        at = jnp.where(slot >= 0, slot, n_slots)
        expiry_N = jnp.where(ttl_N > 0, step + ttl_N, INT_MAX)
        st = dict(
            identity=ident,
            last_seen=st["last_seen"].at[at].set(step, mode="drop"),
            inserted_at=jnp.where(reset, step, st["inserted_at"]),
            expiry=jnp.where(reset, -INT_MAX, st["expiry"]).at[at].max(expiry_N, mode="drop"),
            count=jnp.where(reset, 0, st["count"]).at[at].add(1, mode="drop"),
        )
    fallback = valid & (slot < 0)
    stats["fallbacks"] = fallback.sum(dtype=jnp.int32)
    if n_res:
        _, res = ops.windows(ids, num_buckets=1, bucket_size=n_res)
        slot = jnp.where(fallback, n_slots + res, slot)
    stats["used"] = (st["last_seen"] >= 0).sum(dtype=jnp.int32)
    return jnp.where(valid, slot, -1), st, jnp.concatenate([reset, jnp.zeros((n_res,), bool)]), stats


class ZchEmbeddingCollection:
    """Tables of managed-collision embeddings (see the module docstring); holds configuration only."""

    def __init__(self, tables: Sequence[ZchTableConfig], *, impl: str = "auto", seed: int = 0):
        self.tables = {t.name: t for t in tables}
        if len(self.tables) != len(tables):
            raise ValueError("tables: duplicate table names")
        self.feature_table: dict[str, str] = {}
        for t in tables:
            t.validate()
            for f in t.feature_names:
                if f in self.feature_table:
                    raise ValueError(f"feature {f!r} is in tables {self.feature_table[f]!r} and {t.name!r}")
                self.feature_table[f] = t.name
        self.impl = ops.resolve_impl(impl)
        self.seed = seed

    def init_state(self) -> dict:
        out = {}
        for name, t in self.tables.items():
            # One array per field: a state donated to a jitted step may not hold one buffer twice.
            out[name] = dict(
                identity=ops.empty_identity(t.num_slots),
                last_seen=jnp.full((t.num_slots,), -1, jnp.int32),
                inserted_at=jnp.full((t.num_slots,), -1, jnp.int32),
                expiry=jnp.full((t.num_slots,), INT_MAX, jnp.int32),
                count=jnp.zeros((t.num_slots,), jnp.int32),
            )
        return out

    def init_params(self, key, init_fn=None) -> dict:
        init_fn = init_fn or jax.nn.initializers.normal(0.05)
        keys = jax.random.split(key, len(self.tables))
        return {
            n: init_fn(k, (t.num_embeddings, t.embedding_dim), jnp.float32)
            for k, (n, t) in zip(keys, self.tables.items(), strict=False)
        }

    def remap(
        self,
        state: dict,
        features: Mapping[str, object],
        step,
        *,
        training: bool = True,
        mesh: jax.sharding.Mesh | None = None,
        axis: str = "model",
    ):
        """features: name -> raw IDs (any shape; numpy int64 / JAX int32 >= 0 / uint32 pairs (..., 2)).
        Returns (rows: name -> int32 of the IDs' shape, state, resets: table -> (num_embeddings,) bool,
        stats: table -> dict of int32 counters)."""
        for f in features:
            if f not in self.feature_table:
                raise KeyError(f"features: unknown feature {f!r}; known {sorted(self.feature_table)}")
        pairs = {f: ops.as_id_pairs(v, name=f"features[{f!r}]") for f, v in features.items()}
        step = jnp.asarray(step, jnp.int32)
        rows, resets, stats, new_state = {}, {}, {}, dict(state)
        for name, cfg in self.tables.items():
            feats = [f for f in cfg.feature_names if f in pairs]
            if not feats:
                continue
            flat = [pairs[f].reshape(-1, 2) for f in feats]
            ids = jnp.concatenate(flat)
            ttl = jnp.concatenate(
                [
                    jnp.full((x.shape[0],), cfg.eviction.ttl_for(f), jnp.int32)
                    for f, x in zip(feats, flat, strict=False)
                ]
            )
            salt = (step.astype(jnp.uint32) * jnp.uint32(0x9E3779B1)) ^ jnp.uint32(self.seed)
            r, new_state[name], resets[name], stats[name] = self._remap_table(
                cfg, state[name], ids, ttl, step, salt, training, mesh, axis
            )
            offsets = np.cumsum([0] + [x.shape[0] for x in flat])
            for i, f in enumerate(feats):
                rows[f] = r[offsets[i] : offsets[i + 1]].reshape(pairs[f].shape[:-1])
        return rows, new_state, resets, stats

    def _remap_table(self, cfg, st, ids, ttl, step, salt, training, mesh, axis):
        kw = dict(training=training, impl=self.impl)
        if mesh is None:
            owned = jnp.ones((ids.shape[0],), bool)
            return remap_local(
                cfg, st, ids, ttl, step, salt, num_buckets=cfg.num_buckets, owned_N=owned, **kw
            )
        n_shards = mesh.shape[axis]
        cfg.validate(n_shards)
        local_buckets = cfg.num_buckets // n_shards
        rows_local = (cfg.num_slots + cfg.num_reserved_slots) // n_shards

        def shard(st_l, ids_r, ttl_r, step_r, salt_r):
            d = jax.lax.axis_index(axis)
            bucket, _ = ops.windows(ids_r, num_buckets=cfg.num_buckets, bucket_size=1)
            owned = (bucket >= 0) & (bucket // local_buckets == d)
            r, st_l, reset, stats = remap_local(
                cfg, st_l, ids_r, ttl_r, step_r, salt_r, num_buckets=local_buckets, owned_N=owned, **kw
            )
            r = jnp.where(r >= 0, r + d * rows_local, -1)
            return jax.lax.pmax(r, axis), st_l, reset, jax.tree.map(lambda x: jax.lax.psum(x, axis), stats)

        rep, sh = PartitionSpec(), PartitionSpec(axis)
        st_spec = jax.tree.map(lambda _: sh, st)
        # Row-wise placement of the state (a no-op when the caller already keeps it there).
        st = jax.tree.map(lambda x: jax.reshard(x, NamedSharding(mesh, sh)), st)
        ids, ttl, step, salt = (jax.reshard(x, NamedSharding(mesh, rep)) for x in (ids, ttl, step, salt))
        return jax.shard_map(
            shard,
            mesh=mesh,
            in_specs=(st_spec, rep, rep, rep, rep),
            out_specs=(rep, st_spec, sh, rep),
            check_vma=False,
        )(st, ids, ttl, step, salt)

    def evict_expired(self, state: dict, step, *, num_shards: int = 1) -> tuple[dict, dict, dict]:
        """Active eviction: frees every slot whose expiry step has passed. -> (state, resets, stats).
        ``num_shards``: the row layout of ``resets`` (reserved rows after each shard's slots), as in remap."""
        new_state, resets, stats = dict(state), {}, {}
        for name, cfg in self.tables.items():
            st = state[name]
            gone = ev.expired_mask(st, step)
            new_state[name] = dict(
                identity=jnp.where(gone[:, None], ops.EMPTY_PAIR, st["identity"]),
                last_seen=jnp.where(gone, -1, st["last_seen"]),
                inserted_at=jnp.where(gone, -1, st["inserted_at"]),
                expiry=jnp.where(gone, INT_MAX, st["expiry"]),
                count=jnp.where(gone, 0, st["count"]),
            )
            resets[name] = self._rows_mask(cfg, gone, num_shards)
            stats[name] = dict(
                evictions=gone.sum(dtype=jnp.int32),
                eviction_age_sum=jnp.where(gone, step - st["inserted_at"], 0).sum(dtype=jnp.int32),
            )
        return new_state, resets, stats

    @staticmethod
    def _rows_mask(cfg, slot_mask_S, n_shards: int = 1):
        """Managed-slot mask -> row mask with the reserved rows (never reset) after each shard's slots."""
        parts = slot_mask_S.reshape(n_shards, -1)
        res = jnp.zeros((n_shards, cfg.num_reserved_slots // n_shards), bool)
        return jnp.concatenate([parts, res], axis=1).reshape(-1)

    def embed(self, params: dict, rows: Mapping[str, jax.Array]) -> dict:
        """name -> (..., D) embeddings; row -1 gives zeros."""
        out = {}
        for f, r in rows.items():
            table = params[self.feature_table[f]]
            out[f] = jnp.where((r >= 0)[..., None], table[jnp.maximum(r, 0)], 0.0)
        return out


def zch_metrics(stats: Mapping[str, jax.Array], num_slots: int) -> dict[str, float]:
    """Rates from one remap's counters: hit / insert / collision (fallback) / eviction rates per ID, table
    usage, and the average age (steps since insertion) of evicted IDs."""
    s = {k: float(v) for k, v in stats.items()}
    n = max(s.get("ids", 0.0), 1.0)
    out = {
        "hit_rate": s.get("hits", 0.0) / n,
        "insert_rate": s.get("inserts", 0.0) / n,
        "collision_rate": s.get("fallbacks", 0.0) / n,
        "eviction_rate": s.get("evictions", 0.0) / n,
        "not_admitted_rate": s.get("not_admitted", 0.0) / n,
    }
    if "used" in s:
        out["table_usage"] = s["used"] / num_slots
    ev_n = s.get("evictions", 0.0)
    out["avg_eviction_age"] = s.get("eviction_age_sum", 0.0) / ev_n if ev_n else 0.0
    return out
