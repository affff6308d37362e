"""64-bit compare-and-swap on elements of a table ref, for Pallas Triton kernels (used by pallas_kernels.zch).

``jax.experimental.pallas.triton.atomic_cas`` (jax 0.11.2) only accepts a *scalar* ref (no indexer, no mask) -
``atomic_cas(ref.at[i], ...)`` fails to trace - so it cannot address a table element. ``table_cas(ref, idx_B,
cmp_B, val_B)`` is a small primitive with a Triton lowering to ``tt.atomic_cas`` on a tensor of pointers
(``ref + idx``, acq_rel, gpu scope) and a state-discharge rule that applies the lanes one after another, so
``interpret=True`` (CPU) runs the same kernel as one valid serialization of the atomics. ``tt.atomic_cas`` has
no mask: callers make masked-off lanes a no-op (e.g. CAS EMPTY -> EMPTY).

Letters: B lanes.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax._src import core as jax_core
from jax._src import state
from jax._src.lib.triton import dialect as tt_dialect
from jax._src.pallas.triton import lowering as tl
from jax._src.state import discharge as state_discharge

table_cas_p = jax_core.Primitive("zch_table_cas")


@table_cas_p.def_effectful_abstract_eval
def _table_cas_abstract_eval(ref_aval, idx_aval, cmp_aval, val_aval):
    if not (idx_aval.shape == cmp_aval.shape == val_aval.shape) or len(idx_aval.shape) != 1:
        raise ValueError("table_cas: idx, cmp and val must be vectors of one shape")
    if cmp_aval.dtype != val_aval.dtype or ref_aval.dtype != val_aval.dtype:
        raise ValueError("table_cas: ref, cmp and val must share a dtype")
    return jax_core.ShapedArray(val_aval.shape, val_aval.dtype), {state.WriteEffect(0)}


def table_cas(ref, idx_B, cmp_B, val_B):
    """Per lane: ``old = ref[idx]; if old == cmp: ref[idx] = val``; returns the olds (atomic per lane)."""
    return table_cas_p.bind(ref, idx_B, cmp_B, val_B)


@state_discharge.register_discharge_rule(table_cas_p)
def _table_cas_discharge_rule(ctx, ref, idx_B, cmp_B, val_B):
    del ctx

    def lane(i, carry):  # lanes in order: one valid serialization of the atomics
        table, old = carry
        cur = table[idx_B[i]]
        table = table.at[idx_B[i]].set(jnp.where(cur == cmp_B[i], val_B[i], cur))
        return table, old.at[i].set(cur)

    table, old = lax.fori_loop(0, idx_B.shape[0], lane, (ref, jnp.zeros_like(val_B)))
    return (table, None, None, None), old


@tl.register_lowering(table_cas_p)
def _table_cas_lowering_rule(ctx: tl.LoweringRuleContext, ptr, idx, cmp, val):
    _, idx_aval, cmp_aval, val_aval = ctx.avals_in
    idx = tl._ensure_ir_value(idx, idx_aval)
    ptrs = tl._add(tl._bcast_to(ptr, idx_aval.shape), idx)
    result_type = tl.ir.RankedTensorType.get(idx_aval.shape, tt_dialect.PointerType(ptr.type).pointee_type)
    return tt_dialect.atomic_cas(
        result_type,
        ptrs,
        tl._ensure_ir_value(cmp, cmp_aval),
        tl._ensure_ir_value(val, val_aval),
        sem=tt_dialect.MemSemantic.ACQUIRE_RELEASE,
        scope=tt_dialect.MemSyncScope.GPU,
    )
