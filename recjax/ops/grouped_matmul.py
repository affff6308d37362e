"""Routed expert FFN and grouped matmul: the ops the MoE layer goes through.

``moe_expert_ffn(x_LxD, expert_ids_LxK, weights_LxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, impl=...)``
returns y_LxD = sum_k weights[l, k] * FFN_{expert_ids[l, k]}(x[l]); an id equal to E marks a dropped
assignment (padding token, over capacity) that contributes nothing (the Pallas path skips its compute).
Implementations:
- ``"pallas"``: MoEBlaze index dispatch with fused kernels (``pallas_kernels.grouped_matmul``): no permuted
  copy of x, SwiGLU fused into the first grouped GEMM, weighted combine fused into the second, backward
  recomputes the activation. Off a GPU it runs in Pallas interpret mode (slow; for tests).
- ``"xla"``: sort, permute (a gathered (L*K, D) copy), ``jax.lax.ragged_dot``, unpermute (MaxText style).
- ``"reference"``: every expert on every token in float32 (the definition; O(L E D F), small inputs only).
``"auto"`` is Pallas on an NVIDIA GPU with compute capability >= 8.0 and XLA elsewhere; on the Pallas path D
and F are zero-padded inside the op when they are not multiples of 16 (``pad_to_tiles``: exact, e.g.
SASRec's d=50 -> 64).

``grouped_matmul(lhs_MxK, rhs_GxKxN, group_sizes_G, impl="xla"|"reference"|"mosaic")``: rows in consecutive
groups. ``"mosaic"`` is the Hopper Mosaic GPU kernel (``pallas_kernels.grouped_matmul_mgpu``: TMA + wgmma,
bf16/f16 in, x's dtype out; interpret mode off a GPU). Explicit only, never chosen by "auto": on an H200 it
reached 42-49% of torch._grouped_mm, below the Triton kernel (benchmarks/RESULTS.md).

Letters: L tokens, D model dim, F expert hidden, E experts, K top-k; M rows, G groups, N output columns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import grouped_matmul as gm
from pallas_kernels import grouped_matmul_mgpu as gm_mgpu
from recjax import validation
from recjax.ops import dispatch

IMPLS = dispatch.IMPLS
Blocks = gm.Blocks


def resolve_impl(impl: str) -> str:
    return dispatch.resolve_impl(impl, IMPLS)


def default_blocks(d_model: int, ffn_dim: int, num_tokens: int) -> Blocks:
    """Hopper-sized tiles (bm=128, 64-wide up tiles, 128-wide output tiles), shrunk to divide D and F; 16-row
    tiles for tiny inputs (less padding)."""

    def fit(cap: int) -> int:
        b = cap
        while b > 16 and (d_model % b or ffn_dim % b):
            b //= 2
        return b

    big = num_tokens >= 4096
    return Blocks(bm=128 if big else 16, bn=fit(64), bk=fit(64), bn_out=fit(128), num_warps=8 if big else 4)


def check_float(name: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):  # numpy's kind is 'V' for bfloat16, so not check_dtype
        raise TypeError(f"{name}: expected floating dtype, got {x.dtype}")


def _xla(x, expert_ids, weights, wg, wu, w2, activation):
    n_tok, k = expert_ids.shape
    num_experts = wg.shape[0]
    weights = jnp.where(
        expert_ids < num_experts, weights, 0.0
    )  # dropped: computed by the last expert, weight 0
    expert_ids = jnp.minimum(expert_ids, num_experts - 1)
    flat = expert_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.searchsorted(flat[order], jnp.arange(num_experts + 1), side="left")
    sizes = (sizes[1:] - sizes[:-1]).astype(jnp.int32)
    xs = x[order // k]  # the permuted copy the fused path avoids
    a = jax.lax.ragged_dot(xs, wg, sizes, preferred_element_type=jnp.float32)
    h = jax.nn.silu(a)
    if activation == "swiglu":
        h = h * jax.lax.ragged_dot(xs, wu, sizes, preferred_element_type=jnp.float32)
    ys = jax.lax.ragged_dot(h.astype(x.dtype), w2, sizes, preferred_element_type=jnp.float32)
    ys = ys * weights.reshape(-1)[order].astype(jnp.float32)[:, None]
    inverse = jnp.argsort(order)
    return ys[inverse].reshape(n_tok, k, -1).sum(axis=1).astype(x.dtype)


def validate_ffn_inputs(
    x_LxD, expert_ids_LxK, weights_LxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, activation: str
) -> None:
    if activation not in gm.ACTIVATIONS:
        raise ValueError(f"activation: expected one of {gm.ACTIVATIONS}, got {activation!r}")
    validation.check_shape("x_LxD", x_LxD, (None, None))
    check_float("x_LxD", x_LxD)
    n_tok, d = x_LxD.shape
    validation.check_shape("w_gate_ExDxF", w_gate_ExDxF, (None, d, None))
    num_experts, _, f = w_gate_ExDxF.shape
    if activation == "swiglu":
        if w_up_ExDxF is None:
            raise ValueError("w_up_ExDxF: required for activation='swiglu', got None")
        validation.check_shape("w_up_ExDxF", w_up_ExDxF, (num_experts, d, f))
    validation.check_shape("w_down_ExFxD", w_down_ExFxD, (num_experts, f, d))
    validation.check_shape("expert_ids_LxK", expert_ids_LxK, (n_tok, None))
    validation.check_dtype("expert_ids_LxK", expert_ids_LxK, "iu")
    k = expert_ids_LxK.shape[1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"top_k: expected 1 <= k <= num_experts={num_experts}, got {k}")
    validation.check_shape("weights_LxK", weights_LxK, (n_tok, k))
    check_float("weights_LxK", weights_LxK)
    validation.check_range("expert_ids_LxK", expert_ids_LxK, 0, num_experts, allow=(num_experts,))
    validation.check_finite("weights_LxK", weights_LxK)


def moe_expert_ffn(
    x_LxD: jax.Array,
    expert_ids_LxK: jax.Array,
    weights_LxK: jax.Array,
    w_gate_ExDxF: jax.Array,
    w_up_ExDxF: jax.Array | None,
    w_down_ExFxD: jax.Array,
    *,
    activation: str = "swiglu",
    impl: str = "auto",
    blocks: Blocks | None = None,
    recompute: bool = True,
) -> jax.Array:
    """y_LxD (x's dtype) = sum_k weights * expert FFN; expert ids within a row must be distinct.
    ``recompute`` (Pallas only): the backward recomputes the expert pre-activations instead of saving them."""
    validate_ffn_inputs(
        x_LxD, expert_ids_LxK, weights_LxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, activation
    )
    name = resolve_impl(impl)
    args = (x_LxD, expert_ids_LxK.astype(jnp.int32), weights_LxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
    if name == "reference":  # handles dropped ids itself
        return gm.moe_ffn_reference(*args, activation=activation).astype(x_LxD.dtype)
    if name == "xla":
        return _xla(*args, activation)
    d_model = x_LxD.shape[1]
    w_up = w_up_ExDxF if activation == "swiglu" else None  # silu never reads it (nor validates it)
    x_LxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD = pad_to_tiles(x_LxD, w_gate_ExDxF, w_up, w_down_ExFxD)
    args = (x_LxD, args[1], weights_LxK, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
    if blocks is None:
        blocks = default_blocks(x_LxD.shape[1], w_gate_ExDxF.shape[2], x_LxD.shape[0])
    interpret = not dispatch.pallas_supported()
    y = gm.moe_ffn(*args, activation=activation, blocks=blocks, interpret=interpret, recompute=recompute)
    return y[:, :d_model]


def padded_width(n: int) -> int:
    """n itself when a multiple of 16 (the kernels' smallest tile); otherwise the next multiple of 64 (of 16
    below 64), so the padded width takes 64-wide tiles (F=200 -> 256, not 208, whose tiles would be 16)."""
    if n % 16 == 0:
        return n
    m = 64 if n > 64 else 16
    return -(-n // m) * m


def pad_to_tiles(x_LxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD):
    """Zero-pads D and F to ``padded_width`` when they are not multiples of 16, so widths such as SASRec's
    d=50 (-> 64) run on the kernels. Exact: padded x columns meet zero weight rows, a padded hidden unit has
    gate pre-activation 0 (silu(0) = 0) and a zero row of w_down, and padded output columns are sliced off by
    the caller; their gradients are dropped by the pad's transpose. Costs one copy of the weights per call
    when a width is padded (none otherwise)."""
    d, f = x_LxD.shape[1], w_gate_ExDxF.shape[2]
    pd, pf = padded_width(d) - d, padded_width(f) - f
    if not (pd or pf):
        return x_LxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD
    x_LxD = jnp.pad(x_LxD, ((0, 0), (0, pd)))
    w_gate_ExDxF = jnp.pad(w_gate_ExDxF, ((0, 0), (0, pd), (0, pf)))
    if w_up_ExDxF is not None:
        w_up_ExDxF = jnp.pad(w_up_ExDxF, ((0, 0), (0, pd), (0, pf)))
    w_down_ExFxD = jnp.pad(w_down_ExFxD, ((0, 0), (0, pf), (0, pd)))
    return x_LxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD


def _mosaic_interpret() -> bool:
    """Compiled on Hopper (compute capability 9.x); interpret mode off a GPU; other GPUs are refused."""
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return True
    cc = float(getattr(dev, "compute_capability", 0) or 0)
    if not 9.0 <= cc < 10.0:
        raise ValueError(f"impl: 'mosaic' needs a Hopper GPU (compute capability 9.x), got {cc}")
    return False


def grouped_matmul(
    lhs_MxK: jax.Array,
    rhs_GxKxN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    impl: str = "xla",
    mosaic_tiles: gm_mgpu.MgpuTiles | None = None,
) -> jax.Array:
    """out[m] = lhs[m] @ rhs[g(m)] with rows in consecutive groups of ``group_sizes_G`` (sum <= M).

    float32 out for "xla"/"reference"; lhs's dtype (bf16/f16) out for "mosaic" (tiles: ``mosaic_tiles``)."""
    validation.check_shape("lhs_MxK", lhs_MxK, (None, None))
    validation.check_shape("rhs_GxKxN", rhs_GxKxN, (None, lhs_MxK.shape[1], None))
    validation.check_shape("group_sizes_G", group_sizes_G, (rhs_GxKxN.shape[0],))
    validation.check_dtype("group_sizes_G", group_sizes_G, "iu")
    # concrete sizes only (skipped under jit): no negative group, and the groups fit in the M rows
    validation.check_range("group_sizes_G", group_sizes_G, 0, lhs_MxK.shape[0] + 1)
    if not validation.is_tracer(group_sizes_G) and int(np.sum(group_sizes_G)) > lhs_MxK.shape[0]:
        raise ValueError(
            f"group_sizes_G: expected a total <= M={lhs_MxK.shape[0]} rows, got {int(np.sum(group_sizes_G))}"
        )
    if impl not in ("xla", "reference", "auto", "mosaic"):
        raise ValueError(f"impl: expected 'auto', 'xla', 'reference' or 'mosaic', got {impl!r}")
    if impl == "reference":
        return gm.grouped_matmul_reference(lhs_MxK, rhs_GxKxN, group_sizes_G)
    if impl == "mosaic":
        tiles = mosaic_tiles or gm_mgpu.MgpuTiles()
        return gm_mgpu.grouped_matmul_mgpu(
            lhs_MxK, rhs_GxKxN, group_sizes_G, tiles=tiles, interpret=_mosaic_interpret()
        )
    out = jax.lax.ragged_dot(
        lhs_MxK, rhs_GxKxN, group_sizes_G.astype(jnp.int32), preferred_element_type=jnp.float32
    )
    return out
