"""A version tag for state derived from the parameters (an item-side cache, say), which the cache
remembers so that scoring a stale cache is refused instead of silently wrong.

The tag is an identity, not a step counter: it starts at a random 32-bit value drawn from the module's
``rngs`` (two models of different seeds never share a tag, two of the same seed and steps share their
parameters too) and every optimizer step advances it through a fixed bijection of uint32. The
``Trainer`` advances every ``ItemVersion`` of the model after each finite step (a non-finite step keeps
the parameters and the tag) and keeps the tag with its best parameters; a hand-written training loop
calls :func:`advance_item_versions` after each update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Knuth's MMIX LCG multiplier/increment restricted to 32 bits: odd multiplier, so the map is a bijection
# (no two tags collapse onto one) with full period 2^32.
_MUL, _INC = 1664525, 1013904223


class ItemVersion(nnx.Variable):
    """uint32 tag of the parameters' current version; see the module docstring."""


def new_item_version(rngs: nnx.Rngs) -> ItemVersion:
    return ItemVersion(jax.random.bits(rngs.params(), (), jnp.uint32))


def next_tag(tag: jax.Array) -> jax.Array:
    return tag * jnp.uint32(_MUL) + jnp.uint32(_INC)  # wraps mod 2^32


def advance_item_versions(model: nnx.Module) -> None:
    """Advances every ``ItemVersion`` inside ``model`` (after the parameters changed)."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, ItemVersion):
            node[...] = next_tag(node[...])
