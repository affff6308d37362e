"""Point-wise feed-forward blocks and a small factory so a transformer block's FFN is pluggable.

``PointwiseFeedForward`` is SASRec's position-wise FFN (two 1x1 convolutions = two dense layers applied per
position): ``dropout(W2 dropout(act(W1 x + b1)) + b2)``. It returns only the update; the block adds the
residual (generative-recommenders' ``StandardAttentionFF`` adds it inside, which is the same computation).

``make_ffn(kind, d_model, hidden_dim, ...)`` builds an FFN by name. ``"dense"`` is the one above; ``"moe"``
is :class:`recjax.layers.moe.MoEFeedForward` (``options`` go to it, e.g. ``num_experts``, ``top_k``);
``register_ffn(name, factory)`` adds more. Every FFN is called as ``ffn(x_...xD, mask_...)``.

Letters: B batch, L sequence, D model dim, H hidden dim.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from recjax import validation

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
}


class PointwiseFeedForward(nnx.Module):
    """``ffn(x_...xD, mask=None) -> y_...xD`` (update only; no residual). ``mask`` zeroes padded outputs."""

    def __init__(
        self,
        d_model: int,
        hidden_dim: int,
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        validation.check_positive("d_model", d_model)
        validation.check_positive("hidden_dim", hidden_dim)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        init = nnx.initializers.xavier_normal()  # generative-recommenders re-inits its SASRec this way
        self.up = nnx.Linear(d_model, hidden_dim, kernel_init=init, rngs=rngs)
        self.down = nnx.Linear(hidden_dim, d_model, kernel_init=init, rngs=rngs)
        self.hidden_dropout = nnx.Dropout(dropout, rngs=rngs)
        self.out_dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        h = self.hidden_dropout(ACTIVATIONS[self.activation](self.up(x)))
        y = self.out_dropout(self.down(h))
        if mask is not None:
            y = jnp.where(mask[..., None], y, 0.0)
        return y


FFNFactory = Callable[..., nnx.Module]


def _dense(d_model, hidden_dim, *, activation, dropout, rngs, **options):
    if options:
        raise ValueError(f"ffn 'dense': unexpected options {sorted(options)}; it takes none")
    return PointwiseFeedForward(d_model, hidden_dim, activation=activation, dropout=dropout, rngs=rngs)


def _moe(d_model, hidden_dim, *, activation, dropout, rngs, **options):
    from recjax.layers.moe import MoEFeedForward  # local import: only needed when asked for

    del dropout  # the MoE layer has no dropout of its own
    options = dict(options)
    num_experts = options.pop("num_experts", 8)
    top_k = options.pop("top_k", 2)
    moe_activation = options.pop("activation", "swiglu" if activation != "silu" else "silu")
    return MoEFeedForward(d_model, hidden_dim, num_experts, top_k, moe_activation, rngs=rngs, **options)


_FFN_FACTORIES: dict[str, FFNFactory] = {"dense": _dense, "moe": _moe}


def register_ffn(name: str, factory: FFNFactory) -> None:
    """``factory(d_model, hidden_dim, *, activation, dropout, rngs, **options) -> module``."""
    _FFN_FACTORIES[name] = factory


def ffn_kinds() -> tuple[str, ...]:
    return tuple(sorted(_FFN_FACTORIES))


def make_ffn(
    kind: str,
    d_model: int,
    hidden_dim: int,
    *,
    activation: str = "relu",
    dropout: float = 0.0,
    rngs: nnx.Rngs,
    **options,
) -> nnx.Module:
    if kind not in _FFN_FACTORIES:
        raise ValueError(f"ffn: expected one of {ffn_kinds()}, got {kind!r}")
    return _FFN_FACTORIES[kind](
        d_model, hidden_dim, activation=activation, dropout=dropout, rngs=rngs, **options
    )
