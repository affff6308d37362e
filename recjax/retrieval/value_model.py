"""Value Model: aggregates per-task predictions into one value per candidate (SilverTorch).

Formula (p_t = task prediction: probability for binary tasks, the regressed value for regression tasks;
o_t, s_t = per-task offset and scale that put regression outputs on a comparable range):

    z_t   = (p_t - o_t) / s_t
    value = b + sum_t w_t * z_t                       mode "fixed" (w, b configured, not trained)
                                                      mode "linear" (w, b learned, initialised to config)
    value = b + sum_t w_t * z_t + MLP(z)              mode "mlp" (MLP's last layer starts at zero, so the
                                                      model starts as the configured weighted sum)

The learned modes are trained on a scalar value target with squared error (``value_loss``); for
MovieLens-100K the target is defined in multitask_data.py.

Letters: N candidates (any leading shape), T tasks, G hidden width.
Deviation from the paper: SilverTorch names a Value Model aggregating multi-task scores but publishes no
formula; a weighted sum with optional learned correction is our choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from recjax import validation

VALUE_MODES = ("fixed", "linear", "mlp")


class FixedWeight(nnx.Variable):
    """Configured (non-trainable) value weights: not an nnx.Param, so optimizers leave them alone."""


@dataclass(frozen=True)
class ValueModelConfig:
    weights: tuple[float, ...]  # w_t, one per task
    bias: float = 0.0
    offsets: tuple[float, ...] | None = None  # o_t (default 0)
    scales: tuple[float, ...] | None = None  # s_t (default 1), must be > 0
    mode: str = "fixed"
    hidden_dim: int = 16  # G, mode "mlp" only

    def __post_init__(self):
        t = len(self.weights)
        if t == 0:
            raise ValueError("ValueModelConfig.weights: expected one weight per task, got none")
        if self.mode not in VALUE_MODES:
            raise ValueError(f"ValueModelConfig.mode: expected one of {VALUE_MODES}, got {self.mode!r}")
        for name in ("offsets", "scales"):
            v = getattr(self, name)
            if v is not None and len(v) != t:
                raise ValueError(f"ValueModelConfig.{name}: expected {t} values (one per task), got {len(v)}")
        if self.scales is not None and any(s <= 0 for s in self.scales):
            raise ValueError(f"ValueModelConfig.scales: expected > 0, got {self.scales}")
        if self.mode == "mlp":
            validation.check_positive("ValueModelConfig.hidden_dim", self.hidden_dim)

    @property
    def num_tasks(self) -> int:
        return len(self.weights)


class ValueModel(nnx.Module):
    """predictions_...xT -> value_... (see the module docstring for the formula)."""

    def __init__(self, config: ValueModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        t = config.num_tasks
        kind = FixedWeight if config.mode == "fixed" else nnx.Param
        self.w_T = kind(jnp.asarray(config.weights, jnp.float32))
        self.b = kind(jnp.asarray(config.bias, jnp.float32))
        self.offsets_T = FixedWeight(jnp.asarray(config.offsets or (0.0,) * t, jnp.float32))
        self.scales_T = FixedWeight(jnp.asarray(config.scales or (1.0,) * t, jnp.float32))
        if config.mode == "mlp":
            self.hidden = nnx.Linear(t, config.hidden_dim, rngs=rngs)
            self.out = nnx.Linear(config.hidden_dim, 1, kernel_init=nnx.initializers.zeros, rngs=rngs)

    def normalized(self, preds_NxT: jax.Array) -> jax.Array:
        return (preds_NxT.astype(jnp.float32) - self.offsets_T[...]) / self.scales_T[...]

    def __call__(self, preds_NxT: jax.Array) -> jax.Array:
        validation.check_shape("preds_NxT", preds_NxT, (*preds_NxT.shape[:-1], self.config.num_tasks))
        validation.check_dtype("preds_NxT", preds_NxT, "f")
        z = self.normalized(preds_NxT)
        value = z @ self.w_T[...] + self.b[...]
        if self.config.mode == "mlp":
            value = value + self.out(jax.nn.relu(self.hidden(z)))[..., 0]
        return value


def value_loss(values_N: jax.Array, target_N: jax.Array, mask_N: jax.Array | None = None) -> jax.Array:
    """Masked mean squared error between the value and its target."""
    validation.check_shape("target_N", target_N, values_N.shape)
    err = jnp.square(values_N.astype(jnp.float32) - target_N.astype(jnp.float32))
    if mask_N is None:
        return jnp.mean(err)
    validation.check_shape("mask_N", mask_N, values_N.shape)
    m = mask_N.astype(jnp.float32)
    return jnp.sum(err * m) / jnp.maximum(jnp.sum(m), 1.0)
