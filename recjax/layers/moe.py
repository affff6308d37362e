"""Dropless Mixture-of-Experts feed-forward (MoEBlaze, arXiv 2601.05296) as a Flax NNX module.

``MoEFeedForward(d_model, ffn_dim, num_experts, top_k, activation="swiglu", rngs=...)`` is a drop-in
feed-forward for a transformer block: ``y = ffn(x_...xD)`` (any leading dims, optional validity mask). The
call sows its weighted router loss under ``"aux_loss"`` and its per-expert load under ``"expert_load"``
(``nnx.sow(nnx.Intermediate, ...)``): a training loss collects them with ``nnx.capture`` (as
``recjax.train.tasks.forward_with_aux`` does, so every task adds them without importing this module).
``ffn.forward(x, mask)`` returns ``(y, aux)`` and sows nothing.
``mesh=...`` runs the experts expert-parallel (``recjax.layers.moe_dispatch``).

Router: logits = x W_r in float32, softmax over E, top-k; the k weights are renormalised to sum to 1
(``renormalize=True``, Mixtral style) or kept as the softmax probabilities (Switch/GShard style).
Load-balancing loss (Switch Transformer, generalised to top-k): E * sum_e f_e P_e with f_e the fraction of the
L*k assignments sent to expert e and P_e the mean router probability of e (1.0 when perfectly balanced).
Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2. Masked (padding) tokens are routed
(static shapes) but excluded from both losses and the load, their assignments are dropped (expert id E: the
fused path skips their expert compute) and their outputs are zero.

Experts run through ``recjax.ops.grouped_matmul.moe_expert_ffn``: on a GPU the MoEBlaze index-dispatch
kernels (no permuted activation copy, fused SwiGLU and combine, recomputing backward), elsewhere XLA.
Deviation from the paper: its router details (renormalisation, loss weights) are not given; we use the common
Mixtral/Switch/ST-MoE choices above with weights 1e-2 (balance) and 1e-3 (z-loss).

Letters: L tokens, D model dim, F expert hidden dim, E experts, K top-k.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from recjax import validation
from recjax.layers import moe_dispatch
from recjax.ops import grouped_matmul as gmm_ops


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    d_model: int
    ffn_dim: int
    num_experts: int
    top_k: int
    activation: str = "swiglu"  # or "silu" (SiLU MLP)
    renormalize: bool = True
    load_balance_weight: float = 1e-2
    z_loss_weight: float = 1e-3
    impl: str = "auto"  # recjax.ops.grouped_matmul impl
    compute_dtype: str | None = None  # e.g. "bfloat16"; None: the input's dtype
    recompute: bool = True  # fused path: recompute expert pre-activations in the backward (saves 2 L k F)

    def __post_init__(self):
        for name in ("d_model", "ffn_dim", "num_experts", "top_k"):
            validation.check_positive(f"moe.{name}", getattr(self, name))
        if self.top_k > self.num_experts:
            raise ValueError(
                f"moe.top_k: expected 1 <= top_k <= num_experts={self.num_experts}, got {self.top_k}"
            )
        if self.activation not in ("swiglu", "silu"):
            raise ValueError(f"moe.activation: expected 'swiglu' or 'silu', got {self.activation!r}")
        if self.impl not in gmm_ops.IMPLS:
            raise ValueError(f"moe.impl: expected one of {gmm_ops.IMPLS}, got {self.impl!r}")
        validation.check_positive("moe.load_balance_weight", self.load_balance_weight, allow_zero=True)
        validation.check_positive("moe.z_loss_weight", self.z_loss_weight, allow_zero=True)
        if self.compute_dtype is not None and not jnp.issubdtype(jnp.dtype(self.compute_dtype), jnp.floating):
            raise ValueError(f"moe.compute_dtype: expected a floating dtype name, got {self.compute_dtype!r}")


class Routing(NamedTuple):
    expert_ids_LxK: jax.Array  # int32, distinct per row; E on masked tokens (dropped)
    weights_LxK: jax.Array  # float32 combine weights (0 on masked tokens)
    load_balance_loss: jax.Array
    z_loss: jax.Array
    load_E: jax.Array  # float32 tokens per expert (valid tokens only)


def route(
    logits_LxE: jax.Array, top_k: int, *, renormalize: bool = True, mask_L: jax.Array | None = None
) -> Routing:
    """Top-k softmax routing and its auxiliary losses (see the module docstring for the definitions)."""
    validation.check_shape("router_logits_LxE", logits_LxE, (None, None))
    validation.check_finite("router_logits_LxE", logits_LxE)
    n_tok, num_experts = logits_LxE.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: expected 1 <= top_k <= num_experts={num_experts}, got {top_k}")
    logits = logits_LxE.astype(jnp.float32)
    probs_LxE = jax.nn.softmax(logits, axis=-1)
    top_p, expert_ids = jax.lax.top_k(probs_LxE, top_k)
    weights = top_p / jnp.sum(top_p, axis=-1, keepdims=True) if renormalize else top_p
    valid_L = jnp.ones((n_tok,), jnp.float32) if mask_L is None else mask_L.astype(jnp.float32)
    n_valid = jnp.maximum(jnp.sum(valid_L), 1.0)
    weights = weights * valid_L[:, None]
    # one-hot sums (no scatter) give the per-expert assignment counts
    onehot_LxE = jnp.sum(jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32), axis=1)
    load_E = jnp.sum(onehot_LxE * valid_L[:, None], axis=0)
    frac_E = load_E / (n_valid * top_k)
    mean_prob_E = jnp.sum(probs_LxE * valid_L[:, None], axis=0) / n_valid
    balance = num_experts * jnp.sum(frac_E * mean_prob_E)
    z = jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * valid_L) / n_valid
    if mask_L is not None:  # id E = dropped: masked tokens cost no expert compute
        expert_ids = jnp.where(mask_L[:, None], expert_ids, num_experts)
    return Routing(expert_ids.astype(jnp.int32), weights, balance, z, load_E)


class MoEFeedForward(nnx.Module):
    """Dropless top-k MoE feed-forward; ``__call__(x_...xD, mask_...=None) -> y_...xD``."""

    def __init__(
        self,
        d_model: int,
        ffn_dim: int,
        num_experts: int,
        top_k: int,
        activation: str = "swiglu",
        *,
        rngs: nnx.Rngs,
        mesh: jax.sharding.Mesh | None = None,
        expert_axis: str = "expert",
        capacity: int | None = None,
        **options,
    ):
        """``mesh``: run the experts expert-parallel over its ``expert_axis`` (tokens and experts split over
        that axis, all-to-all exchange, see :mod:`recjax.layers.moe_dispatch`); ``capacity`` per device pair
        (None: dropless). ``options`` go to :class:`MoEConfig`."""
        self.config = cfg = MoEConfig(d_model, ffn_dim, num_experts, top_k, activation, **options)
        self.mesh, self.expert_axis, self.capacity = mesh, expert_axis, capacity
        d, f, e = d_model, ffn_dim, num_experts
        init = jax.nn.initializers.normal
        self.router = nnx.Param(init(0.02)(rngs.params(), (d, e), jnp.float32))
        # Logical axes: expert parallelism is the rule {"expert": <mesh axis>} (recjax.sharding.mesh).
        up_axes, down_axes = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")
        self.w_gate = nnx.Param(init(d**-0.5)(rngs.params(), (e, d, f), jnp.float32), logical_axes=up_axes)
        self.w_up = (
            nnx.Param(init(d**-0.5)(rngs.params(), (e, d, f), jnp.float32), logical_axes=up_axes)
            if activation == "swiglu"
            else None
        )
        self.w_down = nnx.Param(init(f**-0.5)(rngs.params(), (e, f, d), jnp.float32), logical_axes=down_axes)
        del cfg

    def forward(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(y, aux) with aux = {aux_loss, load_balance_loss, z_loss, expert_load}."""
        cfg = self.config
        gmm_ops.check_float("x", x)
        if x.ndim < 1 or x.shape[-1] != cfg.d_model:
            raise ValueError(f"x: expected shape (..., {cfg.d_model}), got {tuple(x.shape)}")
        if mask is not None:
            validation.check_shape("mask", mask, x.shape[:-1])
        lead = x.shape[:-1]
        x_LxD = x.reshape(-1, cfg.d_model)
        mask_L = None if mask is None else mask.reshape(-1)
        logits_LxE = jnp.dot(x_LxD.astype(jnp.float32), self.router[...])
        r = route(logits_LxE, cfg.top_k, renormalize=cfg.renormalize, mask_L=mask_L)
        dtype = jnp.dtype(cfg.compute_dtype) if cfg.compute_dtype else x.dtype
        w_up = None if self.w_up is None else self.w_up[...].astype(dtype)
        args = (
            x_LxD.astype(dtype),
            r.expert_ids_LxK,
            r.weights_LxK,
            self.w_gate[...].astype(dtype),
            w_up,
            self.w_down[...].astype(dtype),
        )
        if self.mesh is None:
            y_LxD = gmm_ops.moe_expert_ffn(
                *args, activation=cfg.activation, impl=cfg.impl, recompute=cfg.recompute
            )
        else:
            y_LxD = moe_dispatch.expert_parallel_ffn(
                *args,
                mesh=self.mesh,
                axis=self.expert_axis,
                capacity=self.capacity,
                activation=cfg.activation,
                impl=cfg.impl,
            )
        aux_loss = cfg.load_balance_weight * r.load_balance_loss + cfg.z_loss_weight * r.z_loss
        aux = {
            "aux_loss": aux_loss,
            "load_balance_loss": r.load_balance_loss,
            "z_loss": r.z_loss,
            "expert_load": r.load_E,
        }
        return y_LxD.astype(x.dtype).reshape(*lead, cfg.d_model), aux

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        y, aux = self.forward(x, mask)
        self.sow(nnx.Intermediate, "aux_loss", aux["aux_loss"])
        self.sow(nnx.Intermediate, "expert_load", aux["expert_load"])
        return y
